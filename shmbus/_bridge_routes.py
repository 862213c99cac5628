"""The four routes' loops: when a record is released on one side, given what the other side confirmed.

Rule: a record leaves the side it came from only once the other side holds
it. Queue -> stream consumes local records only after JetStream acknowledged
them (``Publisher.publish``), through ``Queue.get_records``, which consumes
nothing until then: a bridge killed at any instant leaves every unacknowledged
record in the local queue, under the same sequence number. Stream -> Queue or
Topic acknowledges a JetStream message only after the local put or publish
committed: a bridge killed in between delivers that fetch again (duplicates,
at most one fetch per kill; never a loss). Topic -> stream subscribes from
the sequence number after the last record the stream holds, publishes what
the subscription reads and counts, in ``missed``, what the ring overwrote
before it could (the subscription's ``lost``: while no bridge ran too).

Each route has one thread of its own for the calls that may block on the
bus (a Queue's consumer lock belongs to the thread that took it, so the
thread that begins a ``RecordBatch`` also ends it); the rest runs on the
event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
import time
from typing import Any, Callable, TypeVar

from . import _bridge_wire as wire
from ._bridge_config import Route
from ._bridge_publish import Counters, OutRecord, Publisher
from ._bridge_pull import Puller
from ._errors import Empty, Full, SequenceAhead
from ._queue import Queue
from ._subscription import Subscription
from ._topic import Topic
from ._zerocopy import RecordBatch

__all__ = ["RouteRunner"]

log = logging.getLogger("shmbus")
_T = TypeVar("_T")
_WAIT_SLICE = 0.25  # seconds a blocking bus call waits before the loop checks for a stop
# A Queue's waits run crash recovery (tokens a killed consumer took) only after a whole
# recovery slice (0.25 s) spent empty-handed: a shorter wait, repeated, would never run it.
_QUEUE_WAIT = 1.0
_PROGRESS_EVERY = 5.0  # seconds between "still working" signals for fetched messages held by a full Queue


class _Backoff:
    """Pauses after a short round: 0.1 s doubling up to the reconnect wait, reset by a full round."""

    def __init__(self, top: float) -> None:
        self._top = top
        self._next = 0.1

    def reset(self) -> None:
        self._next = 0.1

    async def pause(self, stopping: asyncio.Event) -> None:
        delay, self._next = self._next, min(self._next * 2, self._top)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stopping.wait(), delay)


class RouteRunner:
    """Runs one route until ``stopping`` is set; ``status()`` reports it."""

    def __init__(self, route: Route, nc: Any, js: Any, stream: str, ack_timeout: float,
                 reconnect_wait: float, stopping: asyncio.Event) -> None:  # fmt: skip
        self.route = route
        self._nc = nc
        self._js = js
        self.stream = stream
        self._ack_timeout = ack_timeout
        self._stopping = stopping
        self._backoff = _Backoff(reconnect_wait)
        self.counters = Counters()
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="shmbus-bridge")
        self._lag: Callable[[], int] = lambda: 0
        self._pending = -1  # in-routes: the consumer's pending count in the last fetch (-1: none yet)

    def status(self) -> dict[str, Any]:
        """One route's state and counters, for a status line."""
        c = self.counters
        try:
            lag = self._lag() if self.route.outbound else self._pending
        except Exception:  # a closed bus: no lag to show
            lag = -1
        row = {
            "route": self.route.name, "stream": self.stream, "state": c.state, "moved": c.moved,
            "messages": c.messages, "duplicates": c.duplicates, "retries": c.retries, "lag": lag,
        }  # fmt: skip
        if not self.route.outbound:
            row.update(not_msgpack=c.not_msgpack, bad_frames=c.bad_frames)
        if not self.route.queue:
            row["missed"] = c.missed
        if c.last_error:
            row["last_error"] = c.last_error
        return row

    async def _call(self, fn: Callable[..., _T], *args: Any) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    async def run(self) -> None:
        """Run the route; return once a stop was asked and the round in flight settled."""
        body = {
            "queue-to-stream": self._queue_out, "topic-to-stream": self._topic_out,
            "stream-to-queue": self._stream_in, "stream-to-topic": self._stream_in,
        }[self.route.direction]  # fmt: skip
        try:
            await body()
            self.counters.state = "stopped"
        finally:
            self._thread.shutdown(wait=False)

    def _publisher(self, bus_id: str) -> Publisher:
        max_payload = int(getattr(self._nc, "max_payload", 0) or 1024 * 1024)
        return Publisher(self._js, self.route, self.stream, bus_id, self._ack_timeout, max_payload,
                         self.counters)  # fmt: skip

    # -- Queue -> stream -------------------------------------------------------------

    async def _queue_out(self) -> None:
        q = await self._call(Queue.open, self.route.bus)
        try:
            self._lag = q.qsize
            pub = self._publisher(q.stats().bus_id)
            self.counters.state = "running"
            while not self._stopping.is_set():
                got = await self._call(self._take, q)
                if got is not None:
                    await self._forward(pub, *got)
        finally:
            self._lag = lambda: -1
            await self._call(q.close)

    def _take(self, q: Queue) -> tuple[RecordBatch, list[OutRecord]] | None:
        """In the route's thread: the oldest records, in place and not consumed.

        Their views stay valid until the batch is consumed, after the publish:
        frames are joined from them directly, single messages copy each one.
        """
        try:
            batch = q.get_records(self.route.max_batch, True, _QUEUE_WAIT)
        except Empty:
            return None
        return batch, list(batch.records)

    async def _forward(self, pub: Publisher, batch: RecordBatch, recs: list[OutRecord]) -> None:
        """Publish a batch and consume exactly what the stream holds; a short round backs off."""
        k = 0
        try:
            covered = await pub.publish(recs)
            k = max(0, min(covered - recs[0][0], len(recs)))
        finally:
            # Ended in the thread that began it (its lock is that thread's), even if cancelled.
            await asyncio.shield(self._call(batch.consume, k))
        if k < len(recs):
            self.counters.state = "retrying"
            await self._backoff.pause(self._stopping)
        else:
            self.counters.state = "running"
            self._backoff.reset()

    # -- Topic -> stream -------------------------------------------------------------

    async def _topic_out(self) -> None:
        t = await self._call(Topic.open, self.route.bus)
        try:
            bus_id = t.stats().bus_id
            pub = self._publisher(bus_id)
            sub = await self._call(self._subscribe_topic, t, await self._resume_point(bus_id))
            self._lag = lambda: max(t.stats().put_count - sub.next_seq, 0)  # behind the Topic's newest
            self.counters.missed = sub.lost  # what the ring overwrote since the stream's last record
            self.counters.state = "running"
            try:
                await self._topic_loop(sub, pub)
            finally:
                await self._call(sub.close)
        finally:
            await self._call(t.close)

    def _subscribe_topic(self, t: Topic, resume: int | None) -> Subscription:
        """In the route's thread: a subscription from ``resume`` (what the ring overwrote since: ``lost``)."""
        if resume is None:
            return t.subscribe("earliest")
        try:
            return t.subscribe(resume)
        except SequenceAhead as e:  # the stream holds records of a bus with this id the ring never had
            log.warning("%s: %s; starting at the oldest record the ring holds", self.route.name, e)
            return t.subscribe("earliest")

    async def _topic_loop(self, sub: Subscription, pub: Publisher) -> None:
        c = self.counters
        while not self._stopping.is_set():
            try:
                got = await self._call(sub.get_records, self.route.max_batch, True, _WAIT_SLICE)
            except Empty:
                got = []
            # The subscription counts what the ring overwrote before it read it (and, from a
            # resume point, what it overwrote while no bridge ran), exactly.
            c.missed = sub.lost
            recs = [(r.seq, r.kind, bytes(r.data)) for r in got]
            while recs and not self._stopping.is_set():
                covered = await pub.publish(recs)
                recs = [r for r in recs if r[0] >= covered]
                if recs:
                    c.state = "retrying"
                    await self._backoff.pause(self._stopping)
            c.state = "running"
            self._backoff.reset()

    async def _resume_point(self, bus_id: str) -> int | None:
        """The sequence number after the last record of this bus the stream holds on the subject, if any."""
        import nats.js.errors

        try:
            msg = await self._js.get_last_msg(self.stream, self.route.subject)
        except nats.js.errors.NotFoundError:
            return None
        headers = msg.headers or {}
        if headers.get(wire.BUS) != bus_id or wire.SEQ not in headers:
            return None  # the last message came from another bus: message ids still drop repeats
        return int(headers[wire.SEQ]) + wire.frame_count(headers)

    # -- stream -> Queue / Topic -----------------------------------------------------

    async def _stream_in(self) -> None:
        bus: Queue | Topic
        if self.route.queue:
            bus = await self._call(Queue.open, self.route.bus)
        else:
            bus = await self._call(Topic.open, self.route.bus)
        try:  # (an in-route's lag is the consumer's pending count: see status)
            puller = await self._subscribe()
            self.counters.state = "running"
            try:
                while puller is not None and not self._stopping.is_set():
                    await self._fetch_round(puller, bus)
            finally:
                if puller is not None:
                    with contextlib.suppress(Exception):  # a connection already gone
                        await puller.stop()
        finally:
            await self._call(bus.close)

    async def _subscribe(self) -> Puller | None:
        """The route's pull consumer, retried while the server is away; None if a stop came first."""
        while not self._stopping.is_set():
            try:
                await self._update_ack_wait()
                r, config = self.route, self._consumer_config()
                puller = Puller(self._nc, self._js, self.stream, r.subject, r.durable_name(), config)
                await puller.start()
                return puller
            except Exception as e:  # not connected, or a JetStream API timeout: try again
                self.counters.last_error = f"subscribe: {e!r}"
                self.counters.state = "retrying"
                await self._backoff.pause(self._stopping)
        return None

    async def _update_ack_wait(self) -> None:
        """An existing durable consumer keeps its settings, but takes the route's ack wait.

        (Binding to an existing durable takes it as it is: without this, a
        changed ``ack_wait`` would be silently ignored. The ack wait is one of the
        fields JetStream lets a consumer change.)
        """
        import nats.js.errors

        durable = self.route.durable_name()
        if not durable:
            return
        try:
            info = await self._js.consumer_info(self.stream, durable)
        except nats.js.errors.NotFoundError:
            return  # the Puller creates it with _consumer_config
        if info.config.ack_wait != self.route.ack_wait:
            config = dataclasses.replace(info.config, ack_wait=self.route.ack_wait)
            await self._js.add_consumer(self.stream, config)
            log.warning("%s: consumer %s: ack wait set to %g s (was %g s)", self.route.name, durable,
                        self.route.ack_wait, info.config.ack_wait)  # fmt: skip

    def _consumer_config(self) -> Any:
        from nats.js import api

        durable = self.route.durable_name()
        return api.ConsumerConfig(
            ack_policy=api.AckPolicy.EXPLICIT, ack_wait=self.route.ack_wait,
            max_ack_pending=max(4 * self.route.max_batch, 1000),
            deliver_policy=api.DeliverPolicy.ALL if durable else api.DeliverPolicy.NEW,
            inactive_threshold=None if durable else 60.0,
        )  # fmt: skip

    async def _fetch_round(self, puller: Puller, bus: Queue | Topic) -> None:
        try:
            msgs = await puller.fetch(self.route.max_batch, _WAIT_SLICE * 2)
            if not msgs:
                return
        except Exception as e:  # the server went away, say: the fetch is retried after a pause
            self.counters.last_error = f"fetch: {e!r}"
            self.counters.retries += 1
            self.counters.state = "retrying"
            await self._backoff.pause(self._stopping)
            return
        self._pending = msgs[-1].metadata.num_pending
        records = [rec for m in msgs for rec in self._records_of(m)]
        redelivered = sum(1 for m in msgs if _redelivered(m))
        if isinstance(bus, Queue):
            loop = asyncio.get_running_loop()
            done = await self._call(self._put_all, bus, records, lambda: self._progress(loop, msgs, puller))
            if not done:  # stopping with the queue full: unacknowledged, so delivered again later
                return
        else:
            await self._call(bus.publish_records, records)
        for m in msgs:
            await m.ack()
        c = self.counters
        c.moved += len(records)
        c.messages += len(msgs)
        c.duplicates += redelivered
        c.state = "running"
        self._backoff.reset()

    def _records_of(self, m: Any) -> list[tuple[str, bytes | memoryview]]:
        """A fetched message's records; one not msgpack or a broken frame is kept raw, logged and counted."""
        c = self.counters
        headers = m.headers
        try:
            if headers and headers.get(wire.FRAME) == wire.FRAME_VERSION:  # the common case, first
                return wire.frame_records(m.data, wire.frame_count(headers))  # type: ignore[return-value]
            got = wire.records_of(m.data, headers)
        except wire.WireError as e:
            c.bad_frames += 1
            log.warning("%s: %s; kept whole as raw bytes", self._where(m), e)
            return [("raw", m.data)]
        if got[0].not_msgpack:
            c.not_msgpack += 1
            log.warning("%s is not msgpack; put as raw bytes (get returns bytes)", self._where(m))
        return [(x.kind, x.data) for x in got]

    def _where(self, m: Any) -> str:
        return f"{self.route.name}: stream message {m.metadata.sequence.stream}"

    def _put_all(self, q: Queue, records: list[tuple[str, bytes | memoryview]],
                 progress: Callable[[], None]) -> bool:  # fmt: skip
        """In the route's thread: put every record, waiting for room; False if a stop came first."""
        last = time.monotonic()
        # Well inside the ack wait: a message held here must not be delivered again meanwhile.
        every = min(_PROGRESS_EVERY, self.route.ack_wait / 3)
        while records:
            try:
                q.put_records(records, True, _QUEUE_WAIT)
                return True
            except Full as e:
                records = records[e.sent or 0 :]
            if self._stopping.is_set():
                return False
            if time.monotonic() - last > every:
                progress()
                last = time.monotonic()
        return True

    def _progress(self, loop: asyncio.AbstractEventLoop, msgs: list[Any], puller: Puller) -> None:
        """From the route's thread: tell JetStream the held messages are still being worked on.

        Those of this round, and those delivered since (requests run ahead of the rounds):
        none of them may reach its ack wait while a full Queue holds the round up.
        """

        async def tell() -> None:
            for m in [*msgs, *puller.held()]:
                await m.in_progress()

        asyncio.run_coroutine_threadsafe(tell(), loop)


def _redelivered(m: Any) -> bool:
    """True if JetStream delivered ``m`` before: its ack subject's delivery count is above 1.

    Read from the subject's tokens, without the client's full metadata parse
    (a dataclass per message): ``$JS.ACK.<stream>.<consumer>.<delivered>...``
    (9 tokens), or with a domain and an account hash before the stream (12 or more).
    """
    tokens = (m.reply or "").split(".")
    if len(tokens) == 9:
        return tokens[4] != "1"
    if len(tokens) >= 12:
        return tokens[6] != "1"
    return bool(m.metadata.num_delivered > 1)
