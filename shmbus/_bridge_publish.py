"""Publishing records to a JetStream subject with pipelined acks: what the stream holds, exactly.

Rule: ``Publisher.publish`` returns the sequence number up to which (not
included) the stream is known to hold the records given, and nothing is
counted as held that JetStream did not acknowledge. Whoever releases records
locally (a Queue route consuming them) releases exactly those.

How duplicates are kept out of the stream: every message's id is its bus id
and first record's sequence number (``_bridge_wire``), so a record published
again within the stream's duplicate window is dropped by JetStream. One
record per message, that is the whole story. With batch framing a message's
record count is part of what it stands for, so a publisher sends a frame
again with the count it had: it remembers the frames it sent and did not see
acknowledged (``_unsettled``); a new process cannot, so it starts by
*probing*, one frame at a time, and on a duplicate reads the stored frame's
count back from the stream (``get_msg``) and aligns its next frame on it,
until JetStream stores a new frame.
"""

from __future__ import annotations

import asyncio
import logging
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import accumulate, repeat
from operator import add, itemgetter
from typing import Any, Union

from . import _bridge_wire as wire
from ._bridge_config import Route
from ._bridge_errors import BridgeError

__all__ = ["Publisher", "Counters", "OutRecord"]

log = logging.getLogger("shmbus")

# (sequence number, kind, stored bytes): a Queue's ``Record`` read in place (its views stay valid
# until the batch is consumed, after the publish), or a copy.
OutRecord = tuple[int, str, Union[bytes, memoryview]]
_DATA = itemgetter(2)
_FRAME_BYTES = 256 * 1024  # a frame's payload at most (below the server's max_payload too)
_HEADER_ROOM = 512  # bytes kept for a message's headers under max_payload


@dataclass
class Counters:
    """What a route did so far (its status line shows them)."""

    moved: int = 0  # records delivered: stored in the stream (out) or committed to the bus (in)
    messages: int = 0  # NATS messages published (out) or acknowledged (in)
    duplicates: int = 0  # records JetStream reported as already stored (out) or redelivered (in)
    missed: int = 0  # Topic records overwritten before the bridge read them
    not_msgpack: int = 0  # in: messages that were not msgpack, kept as raw bytes
    bad_frames: int = 0  # in: framed messages whose lengths did not add up, kept whole as raw bytes
    retries: int = 0  # rounds that ended short (server away, ack timeout)
    state: str = "starting"
    last_error: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


class Publisher:
    """Publishes one route's records; see the module's docstring for what it guarantees."""

    def __init__(self, js: Any, route: Route, stream: str, bus_id: str, ack_timeout: float,
                 max_payload: int, counters: Counters) -> None:  # fmt: skip
        self._js = js
        self._subject = route.subject
        self._stream = stream
        self._bus_id = bus_id
        self._framing = route.batch
        self._ack_timeout = ack_timeout
        self._max_payload = max_payload
        self._frame_bytes = min(_FRAME_BYTES, max_payload - _HEADER_ROOM)
        self._counters = counters
        self._probing = route.batch  # a new publisher knows nothing of frames an earlier one sent
        self._unsettled: dict[int, int] = {}  # frames sent, not acknowledged: first seq -> count
        self.skip_below = 0  # records below this are in the stream already (a longer stored frame)

    def _plan(self, recs: Sequence[OutRecord]) -> list[wire.Outgoing]:
        """The messages that carry ``recs``: one each, or frames (aligned on unsettled ones)."""
        sizes = list(map(len, map(_DATA, recs)))  # (C-level maps: this runs per record)
        if max(sizes) > self._max_payload - _HEADER_ROOM:
            seq, size = next((r[0], n) for r, n in zip(recs, sizes) if n > self._max_payload - _HEADER_ROOM)
            raise BridgeError(
                f"record {seq} of {self._bus_id} is {size} bytes: above the server's "
                f"max_payload ({self._max_payload}); raise it in the server's config"
            )
        if not self._framing:
            return [wire.single(self._bus_id, seq, kind, bytes(data)) for seq, kind, data in recs]
        # Where each record ends in a frame that would start at the first: a frame from
        # record i ends at the last record whose end is within _frame_bytes of record i's start.
        ends = list(accumulate(map(add, sizes, repeat(wire.FRAME_OVERHEAD, len(sizes)))))
        out: list[wire.Outgoing] = []
        i, start = 0, 0
        while i < len(recs):
            want = self._unsettled.get(recs[i][0], 0)
            if want:
                j = min(i + want, len(recs))
            else:
                j = max(bisect_right(ends, start + self._frame_bytes, i), i + 1)
            out.append(wire.frame(self._bus_id, recs[i][0], recs[i:j]))
            i, start = j, ends[j - 1]
        return out

    async def publish(self, recs: Sequence[OutRecord]) -> int:
        """Publish ``recs`` (consecutive sequence numbers); return the first one the stream may lack.

        Returns ``recs[-1][0] + 1`` (or more) when every record is stored.
        Acks are pipelined: every message is sent, then all acks awaited
        together, for at most the ack timeout.
        """
        while recs and recs[0][0] < self.skip_below:
            recs = recs[1:]
        if not recs:
            return self.skip_below
        if self._unsettled:  # frames of records consumed elsewhere meanwhile are no longer ours
            self._unsettled = {s: n for s, n in self._unsettled.items() if s >= recs[0][0]}
        outs = self._plan(recs)
        if self._probing:
            outs = outs[:1]
        futures = await self._send(outs)
        if futures:
            await asyncio.wait(futures, timeout=self._ack_timeout)
        covered = recs[0][0]
        for out, fut in zip(outs, futures):
            if not fut.done() or fut.cancelled() or fut.exception() is not None:
                break
            ack = fut.result()
            end = out.first + out.n
            self._unsettled.pop(out.first, None)
            self._counters.messages += 1
            if ack.duplicate:
                stored = await self._stored_count(ack.seq) if self._framing else 1
                self._counters.duplicates += min(stored, out.n)
                end = out.first + stored
                if stored != out.n:
                    self._probing = True
                    covered = self._covered(recs, covered, end)
                    break
            else:
                self._probing = False
            covered = self._covered(recs, covered, end)
        self._settle(outs, futures)
        return covered

    def _covered(self, recs: Sequence[OutRecord], covered: int, end: int) -> int:
        """Advance what the stream holds to ``end``; past the batch, remember it in ``skip_below``."""
        self._counters.moved += max(0, min(end, recs[-1][0] + 1) - covered)
        if end > recs[-1][0] + 1:
            self.skip_below = end
        return max(covered, end)

    async def _send(self, outs: list[wire.Outgoing]) -> list[asyncio.Future[Any]]:
        """Publish each message (no waiting for acks); stop at the first that cannot be sent."""
        futures: list[asyncio.Future[Any]] = []
        for out in outs:
            try:
                # No wait_stall: with one, the client waits for its window in a task of its own,
                # a yield per message that sends each message in a write of its own (measured
                # 3x slower). The window never fills: a round is at most MAX_BATCH messages
                # (_bridge_config) and its unanswered acks are cancelled at its end.
                fut = await self._js.publish_async(
                    self._subject, out.payload, stream=self._stream, headers=out.headers
                )
            except Exception as e:  # not connected, a full reconnect buffer, stalled acks: next round
                self._counters.last_error = f"publish: {e!r}"
                break
            if self._framing:
                self._unsettled[out.first] = out.n
            futures.append(fut)
        return futures

    def _settle(self, outs: list[wire.Outgoing], futures: list[asyncio.Future[Any]]) -> None:
        """After a round: cancel acks that never came (each holds a slot of the client's window)."""
        short = False
        for out, fut in zip(outs, futures):
            if not fut.done():
                fut.cancel()
                short = True
            elif not fut.cancelled() and fut.exception() is not None:
                short = True
                self._counters.last_error = f"publish {out.first}: {fut.exception()!r}"
        if short or len(futures) < len(outs):
            self._counters.retries += 1

    async def _stored_count(self, stream_seq: int) -> int:
        """How many records the stored message at ``stream_seq`` holds (a duplicate's original)."""
        msg = await self._js.get_msg(self._stream, stream_seq)
        return wire.frame_count(msg.headers)
