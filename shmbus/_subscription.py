"""``Subscription``: one subscriber's lock-free, seqlock-style reader of a ``Topic``.

Rule: a subscriber trusts a copy out of the ring only if ``tail`` has not
passed its cursor once the copy is done (``lapped``), and it takes no lock a
publisher waits on. The publisher's side of the protocol is in ``_topic``'s
docstring (and ``docs/format.md``); this side:

* The subscriber keeps its own cursor and sequence number. It copies a
  record out, then re-reads ``tail``; if ``tail`` passed the record
  meanwhile, the copy may be torn and is thrown away. Its cursor then jumps
  to ``tail`` and the gap in sequence numbers is added to ``lost``, so
  received + lost = published since it subscribed, exactly.
* Before it trusts the positions it reads, it checks them (``bad_positions``)
  and each record's header (``_ring.read``, and a number below ``next_seq``);
  a record that fails either is corruption only if ``tail`` did not pass it
  while it looked.
* Wake-up: about to sleep, it sets its slot's wait flag, fences, re-checks
  ``head`` (``moved``) and sleeps on its semaphore ``sub<i>``, never longer
  than ``_SAFETY_SLICE`` between re-checks, which bounds any latency a missed
  post could cause (see ``_wait``).

It sees its ``Topic`` only through a ``TopicDoor``, made by
``Topic.subscribe``: the mapping, the layout values, its slot, and the
handle's operations it may call.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from . import _accel, _ring
from ._aio import SubscriptionAio
from ._codec import Codec, Payload, extract, extract_range
from ._errors import BusClosed, CorruptBus, Empty, ShmbusError
from ._format import (
    Q_HEAD,
    Q_NEXT_SEQ,
    Q_TAIL,
    Q_TAIL_SEQ,
    RECORD_SIZE,
    S_CURSOR,
    S_LOST,
    S_NEXT_SEQ,
    S_RECEIVED,
)
from ._sync import Sem, check_timeout
from ._sync import deadline as _deadline
from ._zerocopy import Record, View, record_kind, view_kind

if TYPE_CHECKING:
    from ._cfast import FastTopic

__all__ = ["Subscription", "TopicDoor", "bad_positions", "lapped", "moved"]

_monotonic = time.monotonic
_SAFETY_SLICE = 0.1  # seconds a subscriber sleeps at most before re-checking head
# What a read hands out (FastTopic.read's modes): decoded messages, or payloads as bytes.
_MESSAGES, _BYTES = 1, 2
# get_records' names for the record kinds a reader meets.


def _as_bytes(payload: Payload) -> bytes:
    """A payload as get_bytes returns it (a bytes message comes as a 1-tuple, see ``extract``)."""
    return bytes(payload[0]) if isinstance(payload, tuple) else bytes(payload)


@dataclass(frozen=True, eq=False)  # (a door is compared by identity: it holds views)
class TopicDoor:
    """What a ``Subscription`` may use of its ``Topic`` handle; ``Topic.subscribe`` makes one per slot.

    The views stay valid between ``enter()`` and ``leave()`` (``Bus._enter``):
    a reader uses them only in between.
    """

    path: str
    h64: memoryview  # the header as u64 words: head, tail, next_seq, the slot's counters
    mm: mmap.mmap  # the whole mapping: payload copies (one copy to bytes) and the wait flag
    ring: memoryview  # the ring alone: in-place views
    capacity: int
    ring_offset: int  # where the ring starts in ``mm``
    slot: int
    base: int  # the slot's first word in ``h64``
    flag: int  # the slot's wait flag byte in ``mm``
    sem: Sem  # the slot's wake-up semaphore sub<i> (opened and closed with the handle)
    enter: Callable[[], None]  # count a call in progress; BusClosed once the handle is closed
    leave: Callable[[], None]  # the end of that call
    check_open: Callable[[], None]  # BusClosed once the handle is closed
    codec: Codec  # the handle's: decodes what was copied out
    release_slot: Callable[[], None]  # free the slot and its wait flag (nothing once the handle is closed)
    forget: Callable[[Subscription], None]  # the handle no longer closes this subscription with itself
    fast: FastTopic | None = None  # the C reader (_accel), or None; once closed it hands every read back


# -- the protocol's steps, named once -------------------------------------------------
# The per-record loops (_next_record, _read) keep inline copies of bad_positions
# and lapped, marked at each copy: a call there costs a measurable share of a
# read. tests/test_subscription.py checks that each copy agrees with its function.


def bad_positions(head: int, tail: int, cursor: int, capacity: int) -> bool:
    """The reader's check of ``head``, ``tail`` and its ``cursor``: True when they cannot be right.

    Every position is a multiple of 16, and ``[tail, head)`` spans at most the
    ring. ``tail > head`` is allowed: a publisher restarting an empty ring at
    the next lap stores ``tail`` first.
    """
    return bool((head | tail | cursor) & 15 or (tail <= head and head - tail > capacity))


def lapped(h64: memoryview, cursor: int) -> bool:
    """The seqlock re-check: True once ``tail`` passed ``cursor``, so the record there may be overwritten.

    A publisher stores the new ``tail`` before it writes over a record, so a
    copy made while this stays False is intact.
    """
    return h64[Q_TAIL] > cursor


def moved(h64: memoryview, cursor: int) -> bool:
    """True once ``head`` is past ``cursor``: there is something new to read.

    ``>``, not ``!=``: while a publisher restarts an empty ring at the next
    lap, head is briefly behind a cursor that already jumped there.
    """
    return h64[Q_HEAD] > cursor


class Subscription:
    """One subscriber's view of a Topic: its own cursor, lost count and wake-up semaphore.

    Made by ``Topic.subscribe``; belongs to the process that made it. Iterate
    over it to block for each next message.
    """

    _aio: SubscriptionAio | None = None  # the asyncio waiter thread, started by the first wait

    def __init__(self, door: TopicDoor, start: str | int, spin: float) -> None:
        self._door = door
        self.slot = door.slot
        self.spin = spin
        self._closed = False
        self._pid = os.getpid()  # a forked child's copy does not own the slot
        h = door.h64
        self._base = door.base
        # Position before sequence number, in the order the publisher stores them
        # in reverse (sequence number first): a record published in between is
        # then skipped as "before the subscription", never counted as lost.
        self.lost = 0
        if start == "latest":
            self._cursor = h[Q_HEAD]
            self._next = h[Q_NEXT_SEQ]
        else:
            self._cursor = h[Q_TAIL]
            self._next = h[Q_TAIL_SEQ]
            if isinstance(start, int):
                # From the tail, records numbered below ``start`` are skipped as
                # "before the subscription"; what the ring no longer holds of
                # start.. is lost now, so received + lost counts from ``start``.
                self.lost = max(self._next - start, 0)
                self._next = max(self._next, start)
        self.received = 0
        self._flag = door.flag
        self._sem = door.sem
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

    @property
    def next_seq(self) -> int:
        """The sequence number of the next message this subscription can return (none below it).

        Every message a Topic publishes is numbered, from 0, in publish order.
        """
        return self._next

    @property
    def last_seq(self) -> int | None:
        """The sequence number of the last message returned (None before the first).

        After ``get_many``, the messages returned are numbered
        ``last_seq - len(batch) + 1`` to ``last_seq`` when ``lost`` did not
        grow during the call; one message at a time (``get``, ``get_bytes``)
        it is always that message's number. (After a ``get_view`` whose
        message was overwritten, it is the number of that lost message.)
        """
        return self._next - 1 if self.received else None

    lost: int
    """Messages that were overwritten before this subscriber read them."""
    received: int
    """Messages this subscriber returned."""

    def __repr__(self) -> str:
        where = self._door.path
        return f"<shmbus.Subscription {where!r} slot={self.slot} received={self.received} lost={self.lost}>"

    def _save(self) -> None:
        h, b = self._door.h64, self._base
        h[b + S_CURSOR] = self._cursor
        h[b + S_NEXT_SEQ] = self._next
        h[b + S_LOST] = self.lost
        h[b + S_RECEIVED] = self.received

    def _check_open(self) -> None:
        if self._closed:
            raise BusClosed(f"this subscription to {self._door.path} is closed", path=self._door.path)
        self._door.check_open()

    # -- reading ---------------------------------------------------------------

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        """Return the next message; wait for one when ``block`` (up to ``timeout`` seconds).

        Raises ``Empty`` when nothing arrived in time.
        """
        d = self._door
        fast = d.fast
        if fast is None or not block or timeout is not None or self._closed:
            return self.get_many(1, block, timeout)[0] if block else self._get_nowait()
        # _get's steps for the common call, inline: each Python call there is a
        # measurable share of a round trip (tests/test_subscription.py runs both).
        d.enter()
        try:
            got = fast.read(self, self._base, 1, _MESSAGES, self.spin)  # (C polls SPIN_MAX at most)
            if type(got) is list and got:
                return got[0]
            got, final = self._took(got, 1)
            if not got:
                spun = self._spin_for(True, None) if got is None else 0.0
                got, final = self._block(1, _MESSAGES, None, spun)
        finally:
            d.leave()
        return self._finish(got, final, _MESSAGES)[0]

    def _get_nowait(self) -> Any:
        got = self.get_many(1, False)
        if not got:
            raise Empty(f"no new message on {self._door.path}", path=self._door.path)
        return got[0]

    def get_nowait(self) -> Any:
        """``get(block=False)``: raises ``Empty`` at once when there is no new message."""
        return self._get_nowait()

    def get_many(self, max_messages: int, block: bool = True, timeout: float | None = None) -> list[Any]:
        """Return up to ``max_messages`` next messages.

        Blocking: waits (up to ``timeout``) for the first and returns 1..max, or
        raises ``Empty``. Non-blocking: returns 0..max at once.
        """
        return self._get(max_messages, block, timeout, _MESSAGES)

    def get_bytes(self, block: bool = True, timeout: float | None = None) -> bytes:
        """Return the next message's payload undecoded, as ``bytes``; wait as ``get`` does.

        For a message published with ``publish_bytes`` (or a ``bytes`` message)
        that is the data itself; for any other message, its msgpack encoding.
        Raises ``Empty`` when nothing arrived in time.
        """
        got = self._get(1, block, timeout, _BYTES)
        if not got:
            raise Empty(f"no new message on {self._door.path}", path=self._door.path)
        return got[0]  # type: ignore[no-any-return]

    def _get(self, k: int, block: bool, timeout: float | None, mode: int) -> list[Any]:
        """``get_many``, handing out messages or (``_BYTES``) payloads."""
        if self._closed:
            self._check_open()
        d = self._door
        # The topic's open check, as _check_open's; then close() from another
        # thread only interrupts the wait (BusClosed), the mapping stays till we leave.
        d.enter()
        try:
            if k < 1:
                raise ValueError("max_messages must be at least 1")
            if timeout is not None:
                check_timeout(timeout)
            spin = self._spin_for(block, timeout)
            got, final = self._fetch(k, mode, spin)
            if not got and block:
                got, final = self._block(k, mode, timeout, spin if got is None else 0.0)
        finally:
            d.leave()
        return self._finish(got or [], final, mode)

    def _block(self, k: int, mode: int, timeout: float | None, spun: float) -> tuple[list[Any], bool]:
        """``_fetch`` once something is new, waiting up to ``timeout`` (``spun``: seconds C polled)."""
        deadline = _deadline(timeout)
        got: list[Any] | None = None
        final = False
        while not got:
            if not self._wait(deadline, spun):
                raise Empty(f"no new message on {self._door.path}", path=self._door.path)
            spun = 0.0
            got, final = self._fetch(k, mode, 0.0)
        return got, final

    def _spin_for(self, block: bool, timeout: float | None) -> float:
        """How long C may poll for a first message (at most SPIN_MAX: it holds the GIL)."""
        if not block or self._door.fast is None or (timeout is not None and timeout < self.spin):
            return 0.0
        return min(self.spin, _accel.SPIN_MAX)

    def _fetch(self, k: int, mode: int, spin: float) -> tuple[list[Any] | None, bool]:
        """Up to ``k`` next records: (items, final), final when C decoded them; None: C found nothing new.

        C reads the common case (polling head up to ``spin`` seconds when
        nothing is new); Python reads whatever C hands back.
        """
        fast = self._door.fast
        if fast is not None:
            return self._took(fast.read(self, self._base, k, mode, spin), k)
        return self._read(k), False

    def _took(self, got: Any, k: int) -> tuple[list[Any] | None, bool]:
        """``_fetch``'s result from what ``FastTopic.read`` returned (Python reads on when C handed back)."""
        if got is None or (type(got) is list and got):
            return got, True
        if got:  # a tuple: records for Python to decode (and raise on)
            recs = list(got)
            if len(recs) < k:  # C stopped at a record Python reads: the batch goes on, as _read's would
                # On damage, C's ones (counted and saved) are handed out; the cursor
                # stays at the damage, so the next read meets (and raises) it again.
                with contextlib.suppress(ShmbusError):
                    recs += self._read(k - len(recs))
            return recs, False
        return self._read(k), False

    def _finish(self, got: list[Any], final: bool, mode: int) -> list[Any]:
        """Records read as ``get_many`` or ``get_bytes`` hands them out (outside ``enter``/``leave``)."""
        if final:
            return got
        if mode == _BYTES:
            return [_as_bytes(payload) for _, payload in got]
        return self._door.codec.finish_many(got)

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

    async def aget_records(self, max_records: int, timeout: float | None = None) -> list[Record]:
        """``get_records`` for asyncio: wait for the first next message, return 1 to ``max_records``.

        Parameters:
            max_records: the most messages to return (at least 1).
            timeout: seconds to wait for the first one at most (None: for ever).

        Raises ``Empty`` when nothing arrived in time, ``BusClosed``.
        """
        return await self._async().get_many(max_records, timeout, self._records_now)

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
            aio = self._aio = SubscriptionAio(self._door.path, self._read_now, self._wait_slice)
        return aio

    def _read_now(self, max_messages: int) -> list[Any]:
        """(For ``SubscriptionAio``.) Up to ``max_messages`` next messages, decoded, without waiting."""
        if self._closed:
            self._check_open()
        d = self._door
        d.enter()  # (the topic's open check)
        try:
            got, final = self._fetch(max_messages, _MESSAGES, 0.0)  # lock-free: no await in between
        finally:
            d.leave()
        return self._finish(got, final, _MESSAGES) if got else []

    def _records_now(self, max_messages: int) -> list[Any]:
        """(For ``SubscriptionAio``.) ``get_records`` without waiting."""
        return self.get_records(max_messages, block=False)

    def _wait_slice(self, deadline: float) -> bool:
        """(For ``SubscriptionAio``'s thread.) ``_wait`` as one call on the topic (BusClosed once closed)."""
        d = self._door
        d.enter()
        try:
            return self._wait(deadline)
        finally:
            d.leave()

    def _read(self, k: int, numbered: bool = False) -> list[Any]:
        """Copy out up to ``k`` records past the cursor, without any lock: (kind, payload) pairs, or
        ``numbered``, a ``Record`` each (its payload copied whole, a ``bin`` header kept)."""
        d = self._door
        h, mm, cap, ro = d.h64, d.mm, d.capacity, d.ring_offset
        out: list[Any] = []
        while len(out) < k:
            found = self._next_record()
            if found is None:
                break
            start, kind, rseq, n, after = found
            a = ro + start % cap + RECORD_SIZE
            payload: Any = mm[a : a + n] if numbered else extract(mm, a, n, kind)  # (a record never wraps)
            if h[Q_TAIL] > self._cursor:  # lapped(h, self._cursor), inline: once per record
                continue  # the copy may be torn: throw it away and resync
            self.lost += rseq - self._next
            self._next, self._cursor = rseq + 1, after
            out.append(Record(rseq, record_kind(kind), payload) if numbered else (kind, payload))
        if out:
            self.received += len(out)
            self._save()
        return out

    def get_records(self, max_records: int, block: bool = True, timeout: float | None = None) -> list[Record]:
        """Up to ``max_records`` next messages as stored: ``Record(seq, kind, data)``, ``data`` copied.

        For a reader that forwards messages without decoding them (a bridge to
        another system) and must say which is which: the stored form
        ``Topic.publish_records`` takes back (see ``Record``), with each
        message's sequence number; a gap between two is what was overwritten
        before this subscriber read it (also counted in ``lost``). Blocking:
        waits (up to ``timeout``) for the first and returns 1..max, or raises
        ``Empty``. Non-blocking: returns 0..max at once. It reads in Python
        (the C reader hands out no numbers).
        """
        if self._closed:
            self._check_open()
        d = self._door
        d.enter()
        try:
            if max_records < 1:
                raise ValueError("max_records must be at least 1")
            if timeout is not None:
                check_timeout(timeout)
            deadline = _deadline(timeout)
            got = self._read(max_records, True)
            while not got and block:
                if not self._wait(deadline):
                    raise Empty(f"no new message on {d.path}", path=d.path)
                got = self._read(max_records, True)
        finally:
            d.leave()
        return got

    def _next_record(self) -> tuple[int, int, int, int, int] | None:
        """Find the next intact record at or past the cursor: (start, kind, seq, length, after).

        Moves the cursor past records from before the subscription and to the
        tail when lapped; returns None when there is nothing new. The caller
        copies the payload, then re-checks ``tail`` against the cursor.
        """
        d = self._door
        h, ring, cap = d.h64, d.ring, d.capacity
        cursor, nxt = self._cursor, self._next
        skipped = 0
        while True:
            head = h[Q_HEAD]
            tail = h[Q_TAIL]
            # bad_positions(head, tail, cursor, cap), inline: once per record
            if (head | tail | cursor) & 15 or (tail <= head and head - tail > cap):
                raise CorruptBus(f"{d.path}: ring positions out of range (head {head}, tail {tail})")
            if cursor >= head:
                if cursor > head and tail <= head:
                    raise CorruptBus(f"{d.path}: head {head} went behind a subscriber's cursor {cursor}")
                self._cursor = cursor
                return None  # (cursor past head: a publisher is restarting an empty ring at the next lap)
            if cursor < tail:  # lapped, with the tail just read
                cursor = tail  # skip to the oldest intact record
                continue
            try:
                start, kind, rseq, n, after = _ring.read(ring, cap, cursor, head)
            except CorruptBus:
                if lapped(h, cursor):
                    continue  # overwritten while we looked: not corruption
                raise
            if rseq >= h[Q_NEXT_SEQ]:  # records are numbered below next_seq, which is stored before head
                if lapped(h, cursor):
                    continue  # overwritten while we looked
                raise CorruptBus(f"{d.path}: record with sequence number {rseq}, past next_seq")
            if rseq < nxt:
                skipped += after - cursor
                if skipped > cap:  # a ring's worth of old records: only a broken header does that
                    raise CorruptBus(f"{d.path}: records behind sequence number {nxt} fill the ring")
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
        deadline = _deadline(timeout)
        d = self._door
        d.enter()  # left when the block ends (it reads the ring and saves the cursor)
        try:
            return self._get_view(block, deadline)
        except BaseException:
            d.leave()
            raise

    def _get_view(self, block: bool, deadline: float | None) -> View:
        self._check_open()
        found = self._next_record()
        while found is None:
            if not block or not self._wait(deadline):
                raise Empty(f"no new message on {self._door.path}", path=self._door.path)
            found = self._next_record()
        d = self._door
        start, kind, rseq, n, after = found
        a, b, is_bytes = extract_range(d.ring, start % d.capacity + RECORD_SIZE, n, kind)
        view = d.ring[a:b].toreadonly()
        cursor = self._cursor

        def intact() -> bool:
            return not lapped(d.h64, cursor)

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
                d.leave()

        return View(view, view_kind(kind, is_bytes), finish, intact)

    def _wait(self, deadline: float | None, spun: float = 0.0) -> bool:
        """Sleep until head moves past the cursor; False if ``deadline`` passed first.

        It polls for ``spin`` seconds first, less the ``spun`` seconds C polled already.
        """
        d = self._door
        h, mm, cursor = d.h64, d.mm, self._cursor
        if self.spin > spun and not self._closed:
            end = _monotonic() + self.spin - spun
            while _monotonic() < end:
                if moved(h, cursor):
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
                if moved(h, cursor):
                    mm[self._flag] = 0
                    return True
                now = _monotonic()
                if deadline is not None and now >= deadline:
                    mm[self._flag] = 0
                    return False
                wait_until = now + _SAFETY_SLICE if deadline is None else min(deadline, now + _SAFETY_SLICE)
                self._sem.acquire(wait_until)
                mm[self._flag] = 0
                if moved(h, cursor):
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
        d = self._door
        if self._pid == os.getpid():
            d.release_slot()
        d.forget(self)

    @property
    def closed(self) -> bool:
        """True once ``close()`` was called."""
        return self._closed

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
