"""``Topic``: one-to-many broadcast where a slow subscriber never holds up a publisher.

Rule: publishers never wait for subscribers, and subscribers take no lock a
publisher waits on. The protocol (also in ``docs/format.md``):

* Publishers serialize on the ``head`` semaphore. When the ring is full a
  publisher drops the oldest records: it stores the new ``tail`` (and
  ``tail_seq``) *before* it writes a byte over them, then writes the record,
  its header last, then ``next_seq`` and ``head``.
* A subscriber keeps its own cursor and reads without a lock, seqlock-style:
  it copies a record out, then re-reads ``tail``; if ``tail`` passed the
  record meanwhile, the copy may be torn and is thrown away. Its cursor
  then jumps to ``tail`` and the gap in sequence numbers is added to
  ``lost``, so received + lost = published since it subscribed, exactly.
* Wake-up: each subscriber slot ``i`` has a semaphore ``sub<i>`` and a wait
  flag byte. A subscriber about to sleep sets its flag, fences, re-checks
  ``head`` and sleeps; after every publish the publisher reads all flags in
  one slice and posts the semaphore of each flagged slot, so every waiting
  subscriber wakes, not just one. The flag and ``head`` are ordered by full
  fences on both sides (see ``_wait``), and a sleep never lasts longer than
  ``_SAFETY_SLICE`` between re-checks, which bounds any latency a missed post
  could cause.
* Subscriber slots are claimed and freed under the ``subs`` semaphore, which
  only subscribers take (``subscribe``/``close``). A slot whose process is
  gone is reclaimed when the table is full.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Iterator
from typing import Any, Literal

from . import _faults, _ring
from ._aio import SubscriptionAio, checkpoint
from ._bus import Bus
from ._codec import Codec, Encoded, Payload, as_bytes_view, extract, extract_range
from ._errors import BusClosed, CorruptBus, Empty, TooManySubscribers
from ._format import (
    KIND_TOPIC,
    MAX_SUBSCRIBERS,
    Q_BYTES_IN,
    Q_HEAD,
    Q_NEXT_SEQ,
    Q_TAIL,
    Q_TAIL_SEQ,
    REC_RAW,
    RECORD_SIZE,
    S_ATTACHED,
    S_CURSOR,
    S_LOST,
    S_NEXT_SEQ,
    S_OWNER,
    S_RECEIVED,
    S_STATE_PID,
    SUBSCRIBER_SIZE,
    U64_MAX,
    WAIT_FLAGS,
    Layout,
    max_payload,
    ring_capacity,
)
from ._recovery import pid_alive
from ._stats import record_time, subscriber_rows
from ._sync import SPIN_DEFAULT
from ._zerocopy import Reservation, View, view_kind

__all__ = ["Topic", "Subscription"]

log = logging.getLogger("shmbus")
_monotonic = time.monotonic
_SAFETY_SLICE = 0.1  # seconds a subscriber sleeps at most before re-checking head


class Topic(Bus):
    """A broadcast topic: every subscriber sees every message; the ring drops the oldest.

    Example::

        with shmbus.Topic.create("metrics", capacity="1MiB") as t:
            sub = t.subscribe()
            t.publish({"cpu": 0.5})
            assert sub.get() == {"cpu": 0.5}
            sub.close()
            t.unlink()
    """

    _KIND = KIND_TOPIC
    _ROLES = ()  # the wake-up semaphores sub<i> are added per layout

    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        *,
        capacity: int | str = "16MiB",
        exist_ok: bool = False,
        mode: int = 0o600,
        max_subscribers: int = 32,
        codec: Codec | None = None,
        preallocate: bool = False,
    ) -> Topic:
        """Create a new topic and open it.

        Every option is keyword-only, as in ``Queue.create``.

        Parameters:
            path: a file path, or a bare name (kept in ``/dev/shm``).
            capacity: ring size in bytes, an int or a string such as ``"16MiB"``;
                at least 4096 (one page), rounded up to a multiple of 4096. It
                bounds how far behind a subscriber may fall before it loses messages.
            exist_ok: open the topic already at ``path`` instead of failing.
            mode: permission bits of the file and semaphores.
            max_subscribers: subscriber slots (1 to 256), fixed at create.
            codec: msgpack options for this handle (see ``Codec``).
            preallocate: reserve the file's space now (``posix_fallocate``):
                a full file system then fails here with ``NoSpace`` instead of
                killing a later put with SIGBUS. Without it, a file system with
                less room than the bus logs a warning.

        Raises ``BusExists`` (unless ``exist_ok``), ``NoSpace``, ``PermissionError``, and
        ``ValueError`` for a bad capacity or slot count.
        """
        cap = ring_capacity(capacity)
        if not isinstance(max_subscribers, int) or not 1 <= max_subscribers <= MAX_SUBSCRIBERS:
            raise ValueError(f"max_subscribers must be from 1 to {MAX_SUBSCRIBERS}, got {max_subscribers!r}")
        return cls._create(
            path, capacity=cap, maxsize=0, max_subscribers=max_subscribers,
            exist_ok=exist_ok, mode=mode, codec=codec, preallocate=preallocate,
        )  # fmt: skip

    # -- Bus hooks -------------------------------------------------------------

    @classmethod
    def _ROLES_FOR(cls, layout: Layout) -> list[str]:
        # Every subscriber slot's wake-up semaphore is made with the topic,
        # exclusively: a name squatted in /dev/shm then fails create, instead
        # of letting a stranger hold or flood a subscriber's wake-ups.
        return [*cls._ROLES, *(f"sub{i}" for i in range(layout.max_subscribers))]

    @classmethod
    def _initial_sems(cls, layout: Layout, queued: int) -> dict[str, int]:
        return {f"sub{i}": 0 for i in range(layout.max_subscribers)}

    def _queued(self) -> int:
        h = self._h64
        return max(h[Q_NEXT_SEQ] - h[Q_TAIL_SEQ], 0)

    def _setup(self) -> None:
        self._locks = self._make_locks()
        self._head_lock, self._subs_lock = self._locks
        self._cap = self._layout.capacity
        self._max_payload = max_payload(self._cap)
        self._encode = self._codec.encode
        n = self._layout.max_subscribers
        self._flags_end = WAIT_FLAGS + n
        self._no_flags = bytes(n)
        self._wakers = [self._sems[f"sub{i}"] for i in range(n)]
        self._subscriptions: list[Subscription] = []

    def _describe(self) -> str:
        h = self._h64
        return f"published={h[Q_NEXT_SEQ]}"

    def close(self) -> None:
        """Close this handle and every subscription made through it; the topic stays."""
        for sub in list(getattr(self, "_subscriptions", ())):
            sub.close()
        self._wakers = []
        super().close()

    # -- publishing ------------------------------------------------------------

    def publish(self, obj: Any) -> None:
        """Publish ``obj`` to every subscriber; never waits for them.

        When the ring is full the oldest messages are dropped. Raises
        ``EncodeError`` or ``MessageTooLarge`` (nothing published).
        """
        self._publish([self._encode(obj)])

    def publish_many(self, objs: Iterable[Any]) -> None:
        """Publish every object of ``objs``, in order, in one lock round."""
        batch = [self._encode(o) for o in objs]
        if batch:
            self._publish(batch)

    async def apublish(self, obj: Any) -> None:
        """``publish`` for asyncio; like ``publish`` it never waits for subscribers.

        Parameters:
            obj: the message.

        Raises ``EncodeError`` or ``MessageTooLarge`` (nothing published),
        ``BusClosed``. It takes only the short publisher lock, on the loop's
        thread, and yields to the loop now and then (see docs/asyncio.md).
        """
        await checkpoint()
        self.publish(obj)

    async def apublish_many(self, objs: Iterable[Any]) -> None:
        """``publish_many`` for asyncio: publish every object of ``objs``, in order, in one lock round.

        Parameters:
            objs: the messages.

        Raises ``EncodeError`` or ``MessageTooLarge`` (nothing published), ``BusClosed``.
        """
        await checkpoint()
        self.publish_many(objs)

    def publish_bytes(self, data: bytes) -> None:
        """Publish raw bytes with no msgpack framing (subscribers get ``bytes``)."""
        body = data if type(data) is bytes else as_bytes_view(data)
        self._publish([(REC_RAW, b"", body, len(body))])

    def _publish(self, batch: list[Encoded]) -> None:
        self._enter()
        try:
            self._check_sizes(item[3] for item in batch)
            lock = self._head_lock
            try:
                lock.acquire(None)  # (a BusClosed from its wait: nothing published)
                self._write(batch)
            except BaseException as e:
                lock.release_after(e)
                raise
            lock.release()  # a full fence: the new head is visible before we read the flags
            self._wake_if_waiting()
        finally:
            self._leave()

    def _write(self, batch: list[Encoded]) -> None:
        if _faults.armed:
            _faults.hit("publish:after-lock")
        ring, cap, h = self._ring, self._cap, self._h64
        # The whole batch, before anything is stored: a head or next_seq a damaged
        # header put near 2**64 raises CorruptBus with nothing written.
        _ring.check_room(h[Q_HEAD], h[Q_NEXT_SEQ], cap, [item[3] for item in batch])
        for kind, prefix, body, n in batch:
            start, head, seq = self._make_room(n)
            new_head = _ring.write(ring, cap, head, start, kind, seq, prefix, body)
            self._commit_record(seq, n, new_head)

    def _make_room(self, n: int) -> tuple[int, int, int]:
        """Under the head lock: drop the oldest records until ``n`` bytes fit; return (start, head, seq).

        The new tail is stored *before* the caller overwrites anything:
        subscribers re-check it after copying, which is how they detect a lap.
        """
        h = self._h64
        head, tail = h[Q_HEAD], h[Q_TAIL]
        _ring.check_positions(head, tail, self._cap)
        seq = h[Q_NEXT_SEQ]
        _ring.check_room(head, seq, self._cap, [n])  # before the first store (reserve has no batch check)
        start, new_tail, _ = _ring.evict(self._ring, self._cap, tail, head, n)
        if new_tail != tail:
            # Read, not counted: a sequence number skipped after a publisher's
            # death leaves a gap that counting the dropped records would miss.
            h[Q_TAIL_SEQ] = seq if new_tail >= head else _ring.seq_at(self._ring, self._cap, new_tail)
            h[Q_TAIL] = new_tail
            if _faults.armed:
                _faults.hit("publish:after-evict")
        return start, head, seq

    def _commit_record(self, seq: int, n: int, new_head: int) -> None:
        """Publish one written record: each goes out at once, so readers never wait for a batch."""
        h = self._h64
        h[Q_NEXT_SEQ] = seq + 1
        if _faults.armed:
            _faults.hit("publish:mid-publish")
        h[Q_BYTES_IN] = (h[Q_BYTES_IN] + n) & U64_MAX  # a statistic: wraps (the Queue's bytes_out too)
        h[Q_HEAD] = new_head
        if not seq & 255:  # one message in 256: a time sample (see _format)
            record_time(h, seq)

    def reserve(self, nbytes: int) -> Reservation:
        """Reserve ``nbytes`` in the ring to fill in place; use as ``with t.reserve(n) as buf:``.

        Leaving the block publishes the bytes as one raw message; an exception
        abandons it (the oldest messages it displaced stay dropped). Never waits
        for subscribers; holds the publisher lock until the block ends.
        """
        self._check_open()
        self._check_sizes((nbytes,))

        def abandon() -> None:
            h = self._h64
            if h[Q_TAIL] > h[Q_HEAD]:  # we restarted an empty ring at the next lap: finish the move
                h[Q_HEAD] = h[Q_TAIL]

        return self._reservation(
            nbytes,
            None,
            lambda: self._make_room(nbytes),
            lambda seq, new_head: self._commit_record(seq, nbytes, new_head),
            abandon,
            self._wake_if_waiting,
        )

    def _wake_if_waiting(self) -> None:
        if self._mm is not None and self._mm[WAIT_FLAGS : self._flags_end] != self._no_flags:
            self._wake_waiters()

    def _wake_waiters(self) -> None:
        assert self._mm is not None
        flags = self._mm[WAIT_FLAGS : self._flags_end]
        for i, flag in enumerate(flags):
            if flag:
                w = self._wakers[i]
                if w.value <= 0:  # one pending wake-up is enough
                    w.release()

    # -- subscribing -----------------------------------------------------------

    def subscribe(
        self, start: Literal["latest", "earliest"] = "latest", *, spin: float | None = None
    ) -> Subscription:
        """Join the topic: the new subscription receives every message published from now on.

        Parameters:
            start: ``"latest"`` (only messages published after this call) or
                ``"earliest"`` (also the oldest messages still in the ring).
            spin: microseconds to poll before sleeping when waiting (default 50;
                0 sleeps at once). Also ``sub.spin_us`` afterwards.

        Raises ``TooManySubscribers`` when every slot is taken by a live process.
        """
        if start not in ("latest", "earliest"):
            raise ValueError(f"start must be 'latest' or 'earliest', got {start!r}")
        self._enter()
        try:
            slot = self._claim_slot()
            sub = Subscription(self, slot, start, SPIN_DEFAULT if spin is None else spin / 1e6)
        finally:
            self._leave()
        self._subscriptions.append(sub)
        return sub

    def _slot_base(self, slot: int) -> int:
        return (self._layout.subscribers_offset + slot * SUBSCRIBER_SIZE) // 8

    def _claim_slot(self) -> int:
        h = self._h64
        part = self._part
        assert part is not None
        part.claim(self.recover)  # before the lock: the slot records its owner
        lock = self._subs_lock
        try:
            lock.acquire(None)
            if _faults.armed:
                _faults.hit("subscribe:after-lock")
            free = [i for i in range(self._layout.max_subscribers) if h[self._slot_base(i)] & 0xFFFFFFFF == 0]
            if not free:
                free = self._reclaim_dead()
            if not free:
                raise TooManySubscribers(
                    f"all {self._layout.max_subscribers} subscriber slots of {self.path} are taken by "
                    "live processes: close a subscription, or recreate the topic with more max_subscribers",
                    path=self.path,
                )
            slot = free[0]
            base = self._slot_base(slot)
            for i in range(1, SUBSCRIBER_SIZE // 8):
                h[base + i] = 0
            h[base + S_ATTACHED] = time.time_ns()
            h[base + S_OWNER] = part.me
            h[base + S_STATE_PID] = 1 | os.getpid() << 32
            return slot
        finally:
            lock.release()

    def _reclaim_dead(self) -> list[int]:
        """Free the slots whose owning process is gone (under the subs lock)."""
        self.recover()  # frees the slots of dead participants (see _reap)
        h = self._h64
        freed = []
        for i in range(self._layout.max_subscribers):
            base = self._slot_base(i)
            pid = h[base] >> 32
            if h[base] & 0xFFFFFFFF == 0:
                freed.append(i)
            elif not h[base + S_OWNER] and pid and not pid_alive(pid):
                # No participant recorded (table full): fall back on the pid.
                log.warning("%s: reclaiming subscriber slot %d of dead process %d", self.path, i, pid)
                h[base + S_STATE_PID] = 0
                freed.append(i)
        return freed

    # -- crash recovery hooks ------------------------------------------------

    def _repair(self, role: str) -> bool:
        if role == "head":
            self._resync(fix_next=True, gaps=True)  # publishers only: nobody else moves tail
        return True  # the subs lock guards single-word stores: nothing to mend

    def _reap(self, slot: int) -> None:
        # A dead subscriber's slot and wait flag are freed for others.
        h = self._h64
        assert self._mm is not None
        for i in range(self._layout.max_subscribers):
            base = self._slot_base(i)
            if h[base] & 0xFFFFFFFF and h[base + S_OWNER] == slot + 1:
                log.warning("%s: freeing subscriber slot %d of a dead process", self.path, i)
                h[base + S_STATE_PID] = 0
                self._mm[WAIT_FLAGS + i] = 0

    def _release_slot(self, slot: int) -> None:
        lock = self._subs_lock
        try:
            lock.acquire(None)
            self._h64[self._slot_base(slot) + S_STATE_PID] = 0
        finally:
            lock.release()

    def subscribers(self) -> list[dict[str, int]]:
        """The active subscriber slots: slot, pid, lag (messages behind), lost, received."""
        self._enter()
        try:
            return subscriber_rows(self._h64, self._layout)
        finally:
            self._leave()


class Subscription:
    """One subscriber's view of a Topic: its own cursor, lost count and wake-up semaphore.

    Made by ``Topic.subscribe``; belongs to the process that made it. Iterate
    over it to block for each next message.
    """

    _aio: SubscriptionAio | None = None  # the asyncio waiter thread, started by the first wait

    def __init__(self, topic: Topic, slot: int, start: str, spin: float) -> None:
        self._topic = topic
        self.slot = slot
        self.spin = spin
        self._closed = False
        self._pid = os.getpid()  # a forked child's copy does not own the slot
        h = topic._h64
        self._base = topic._slot_base(slot)
        # Position before sequence number, in the order the publisher stores them
        # in reverse (sequence number first): a record published in between is
        # then skipped as "before the subscription", never counted as lost.
        if start == "latest":
            self._cursor = h[Q_HEAD]
            self._next = h[Q_NEXT_SEQ]
        else:
            self._cursor = h[Q_TAIL]
            self._next = h[Q_TAIL_SEQ]
        self.lost = 0
        self.received = 0
        self._flag = WAIT_FLAGS + slot
        self._sem = topic._sems[f"sub{slot}"]  # opened with the topic (closed with it too)
        self._save()

    @property
    def spin_us(self) -> float:
        """Microseconds a waiting ``get`` polls before it sleeps (0: sleep at once)."""
        return self.spin * 1e6

    @spin_us.setter
    def spin_us(self, value: float) -> None:
        if value < 0:
            raise ValueError("spin_us must be 0 or more")
        self.spin = value / 1e6

    lost: int
    """Messages that were overwritten before this subscriber read them."""
    received: int
    """Messages this subscriber returned."""

    def __repr__(self) -> str:
        where = self._topic.path
        return f"<shmbus.Subscription {where!r} slot={self.slot} received={self.received} lost={self.lost}>"

    def _save(self) -> None:
        h, b = self._topic._h64, self._base
        h[b + S_CURSOR] = self._cursor
        h[b + S_NEXT_SEQ] = self._next
        h[b + S_LOST] = self.lost
        h[b + S_RECEIVED] = self.received

    def _check_open(self) -> None:
        if self._closed:
            raise BusClosed(f"this subscription to {self._topic.path} is closed", path=self._topic.path)
        self._topic._check_open()

    # -- reading ---------------------------------------------------------------

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        """Return the next message; wait for one when ``block`` (up to ``timeout`` seconds).

        Raises ``Empty`` when nothing arrived in time.
        """
        return self.get_many(1, block, timeout)[0] if block else self._get_nowait()

    def _get_nowait(self) -> Any:
        got = self.get_many(1, False)
        if not got:
            raise Empty(f"no new message on {self._topic.path}", path=self._topic.path)
        return got[0]

    def get_nowait(self) -> Any:
        """``get(block=False)``: raises ``Empty`` at once when there is no new message."""
        return self._get_nowait()

    def get_many(self, max_messages: int, block: bool = True, timeout: float | None = None) -> list[Any]:
        """Return up to ``max_messages`` next messages.

        Blocking: waits (up to ``timeout``) for the first and returns 1..max, or
        raises ``Empty``. Non-blocking: returns 0..max at once.
        """
        self._check_open()
        if max_messages < 1:
            raise ValueError("max_messages must be at least 1")
        if timeout is not None and timeout < 0:
            raise ValueError("'timeout' must be a non-negative number")
        t = self._topic
        t._enter()  # close() from another thread: the wait raises BusClosed, the mapping stays till then
        try:
            got = self._read(max_messages)
            if not got and block:
                deadline = None if timeout is None else _monotonic() + timeout
                while not got:
                    if not self._wait(deadline):
                        raise Empty(f"no new message on {t.path}", path=t.path)
                    got = self._read(max_messages)
        finally:
            t._leave()
        return t._codec.finish_many(got)

    def __iter__(self) -> Iterator[Any]:
        while True:
            yield self.get()

    # -- asyncio (the mechanism is in _aio) -------------------------------------

    async def aget(self, timeout: float | None = None) -> Any:
        """``get`` for asyncio: wait for the next message without blocking the event loop.

        Parameters:
            timeout: seconds to wait at most (None: for ever).

        Raises ``Empty`` when nothing arrived in time, ``BusClosed`` if the
        subscription is closed meanwhile. Returns the message.
        """
        return (await self._async().get_many(1, timeout))[0]

    async def aget_many(self, max_messages: int, timeout: float | None = None) -> list[Any]:
        """``get_many`` for asyncio: wait for the first next message, return 1 to ``max_messages``.

        Parameters:
            max_messages: the most messages to return (at least 1).
            timeout: seconds to wait for the first one at most (None: for ever).

        Raises ``Empty`` when nothing arrived in time, ``BusClosed``.
        """
        return await self._async().get_many(max_messages, timeout)

    def __aiter__(self) -> Subscription:
        """``async for msg in sub``: wait for each next message; the loop ends when ``sub`` is closed."""
        return self

    async def __anext__(self) -> Any:
        """The next message (``aget()``); ``StopAsyncIteration`` once the subscription is closed."""
        if self._closed:
            raise StopAsyncIteration
        try:
            return await self.aget()
        except BusClosed:
            if self._closed:
                raise StopAsyncIteration from None
            raise

    def _async(self) -> SubscriptionAio:
        aio = self._aio
        if aio is None or aio.pid != os.getpid():
            self._check_open()
            aio = self._aio = SubscriptionAio(self)
        return aio

    def _read(self, k: int) -> list[tuple[int, Payload]]:
        """Copy out up to ``k`` records past the cursor, without any lock."""
        t = self._topic
        h, mm, cap = t._h64, t._mm, t._cap
        ro = t._layout.ring_offset
        out: list[tuple[int, Payload]] = []
        while len(out) < k:
            found = self._next_record()
            if found is None:
                break
            start, kind, rseq, n, after = found
            payload = extract(mm, ro + start % cap + RECORD_SIZE, n, kind)
            if h[Q_TAIL] > self._cursor:
                continue  # the copy may be torn: throw it away and resync
            self.lost += rseq - self._next
            self._next, self._cursor = rseq + 1, after
            out.append((kind, payload))
        if out:
            self.received += len(out)
            self._save()
        return out

    def _next_record(self) -> tuple[int, int, int, int, int] | None:
        """Find the next intact record at or past the cursor: (start, kind, seq, length, after).

        Moves the cursor past records from before the subscription and to the
        tail when lapped; returns None when there is nothing new. The caller
        copies the payload, then re-checks ``tail`` against the cursor.
        """
        t = self._topic
        h, ring, cap = t._h64, t._ring, t._cap
        cursor, nxt = self._cursor, self._next
        skipped = 0
        while True:
            head = h[Q_HEAD]
            tail = h[Q_TAIL]
            if (head | tail | cursor) & 15 or (tail <= head and head - tail > cap):
                raise CorruptBus(f"{t.path}: ring positions out of range (head {head}, tail {tail})")
            if cursor >= head:
                if cursor > head and tail <= head:
                    raise CorruptBus(f"{t.path}: head {head} went behind a subscriber's cursor {cursor}")
                self._cursor = cursor
                return None  # (cursor past head: a publisher is restarting an empty ring at the next lap)
            if cursor < tail:
                cursor = tail  # lapped: skip to the oldest intact record
                continue
            try:
                start, kind, rseq, n, after = _ring.read(ring, cap, cursor, head)
            except CorruptBus:
                if h[Q_TAIL] > cursor:
                    continue  # overwritten while we looked: not corruption
                raise
            if rseq >= h[Q_NEXT_SEQ]:  # records are numbered below next_seq, which is stored before head
                if h[Q_TAIL] > cursor:
                    continue  # overwritten while we looked
                raise CorruptBus(f"{t.path}: record with sequence number {rseq}, past next_seq")
            if rseq < nxt:
                skipped += after - cursor
                if skipped > cap:  # a ring's worth of old records: only a broken header does that
                    raise CorruptBus(f"{t.path}: records behind sequence number {nxt} fill the ring")
                cursor = after  # published before we subscribed
                continue
            self._cursor = cursor
            return start, kind, rseq, n, after

    def get_view(self, block: bool = True, timeout: float | None = None) -> View:
        """The next message's payload, in place; use as ``with sub.get_view() as buf:``.

        No lock is held: a publisher may overwrite the record while you read
        it. ``View.valid()`` tells whether it is still intact; leaving the
        block raises ``Overwritten`` if it was not (the message then counts in
        ``lost``). Raises ``Empty`` when nothing arrived in time.
        """
        self._check_open()
        if timeout is not None and timeout < 0:
            raise ValueError("'timeout' must be a non-negative number")
        deadline = None if timeout is None else _monotonic() + timeout
        t = self._topic
        t._enter()  # left when the block ends (it reads the ring and saves the cursor)
        try:
            return self._get_view(block, deadline)
        except BaseException:
            t._leave()
            raise

    def _get_view(self, block: bool, deadline: float | None) -> View:
        self._check_open()
        found = self._next_record()
        while found is None:
            if not block or not self._wait(deadline):
                raise Empty(f"no new message on {self._topic.path}", path=self._topic.path)
            found = self._next_record()
        t = self._topic
        start, kind, rseq, n, after = found
        a, b, is_bytes = extract_range(t._ring, start % t._cap + RECORD_SIZE, n, kind)
        view = t._ring[a:b].toreadonly()
        cursor = self._cursor

        def intact() -> bool:
            return t._h64[Q_TAIL] <= cursor

        def finish(_: bool) -> None:
            try:
                if intact():
                    self.lost += rseq - self._next
                    self.received += 1
                else:
                    self.lost += rseq + 1 - self._next
                self._next, self._cursor = rseq + 1, after
                self._save()
            finally:
                t._leave()

        return View(view, view_kind(kind, is_bytes), finish, intact)

    def _wait(self, deadline: float | None) -> bool:
        """Sleep until head moves past the cursor; False if ``deadline`` passed first."""
        t = self._topic
        h, mm, cursor = t._h64, t._mm, self._cursor
        assert mm is not None
        if self.spin > 0 and not self._closed:
            end = _monotonic() + self.spin
            while _monotonic() < end:
                if h[Q_HEAD] > cursor:
                    return True
                os.sched_yield()  # see Sem.spin_acquire: never starve the publisher
        try:
            while True:
                if self._closed:  # closed by another thread (or a signal handler) while we wait
                    self._check_open()
                mm[self._flag] = 1
                # sem_post + sem_trywait: a locked instruction, i.e. a full fence, so
                # the flag store is visible before we load head (the publisher
                # fences between storing head and loading the flags).
                self._sem.release()
                self._sem.try_acquire()
                # ``>``, not ``!=``: while a publisher restarts an empty ring at the
                # next lap, head is briefly behind a cursor that already jumped there.
                if h[Q_HEAD] > cursor:
                    mm[self._flag] = 0
                    return True
                now = _monotonic()
                if deadline is not None and now >= deadline:
                    mm[self._flag] = 0
                    return False
                wait_until = now + _SAFETY_SLICE if deadline is None else min(deadline, now + _SAFETY_SLICE)
                self._sem.acquire(wait_until)
                mm[self._flag] = 0
                if h[Q_HEAD] > cursor:
                    return True
        except BaseException:
            # A signal handler's exception out of the wait (or anything else): we no
            # longer wait, so publishers must not keep posting our semaphore.
            mm[self._flag] = 0
            raise

    # -- lifecycle -------------------------------------------------------------

    def close(self) -> None:
        """Leave the topic and free the slot; idempotent.

        A call waiting on the subscription in another thread (``get``,
        ``get_many``, ``get_view``, ``aget``) raises ``BusClosed`` within
        ``_SAFETY_SLICE``.
        """
        if self._closed:
            return
        self._closed = True
        aio, self._aio = self._aio, None
        if aio is not None:
            aio.close()  # joins the waiter thread, which uses the semaphore and flag closed below
        t = self._topic
        if not t.closed and self._pid == os.getpid():
            assert t._mm is not None
            t._mm[self._flag] = 0
            t._release_slot(self.slot)
        if self in t._subscriptions:
            t._subscriptions.remove(self)

    @property
    def closed(self) -> bool:
        """True once ``close()`` was called."""
        return self._closed

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
