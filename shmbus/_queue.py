"""``Queue``: the multi-producer, multi-consumer work queue.

Rule: every message put is taken by exactly one ``get``, in the order the
puts committed. The locking protocol (also in ``docs/format.md``):

* ``head`` (binary semaphore) serializes producers; under it a producer
  places, writes and commits records and advances ``head``/``next_seq``.
* ``tail`` (binary semaphore) serializes consumers; under it a consumer copies
  records out and advances ``tail``/``tail_seq``.
* ``items`` counts committed records no consumer has claimed yet. A producer
  posts it once per record *after* publishing ``head`` (still under the head
  lock); a consumer takes one token per record *before* taking ``tail``, so a
  token always stands for a record that is already complete.
* ``space`` wakes a producer sleeping for free bytes. The producer sets
  ``space_waiting`` under ``tail`` after finding the ring still full; the
  consumer that frees bytes clears it and posts under the same lock, so the
  wake-up cannot be lost.
* ``slots`` (only with ``maxsize``) counts free message slots, as
  ``multiprocessing.Queue(maxsize)`` does.

Messages are encoded before any lock and decoded after every lock is
released: the critical sections hold only copies and counter updates.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from typing import Any

from . import _accel, _faults, _ring
from ._aio import QueueAio
from ._bus import Bus, record_time
from ._codec import Codec, Encoded, Payload, as_bytes_view, extract, extract_range
from ._errors import CorruptBus, Empty, Full
from ._format import (
    I_HEAD_HOLDER,
    I_HEAD_RELEASES,
    I_SPACE_WAITING,
    I_TAIL_HOLDER,
    I_TAIL_RELEASES,
    KIND_QUEUE,
    Q_BYTES_IN,
    Q_BYTES_OUT,
    Q_HEAD,
    Q_NEXT_SEQ,
    Q_SCRATCH,
    Q_TAIL,
    Q_TAIL_SEQ,
    REC_RAW,
    RECORD_SIZE,
    Layout,
    max_payload,
    ring_capacity,
)
from ._sync import SLICE, SPIN_DEFAULT
from ._zerocopy import Reservation, View, view_kind

__all__ = ["Queue"]

log = logging.getLogger("shmbus")
_monotonic = time.monotonic
_U64 = (1 << 64) - 1  # a statistic counter wraps like a u64 (a damaged header may hold any value)
_REPAIR_WAIT = 2.0  # seconds recovery waits for a live tail holder before giving up this round
_NOWAIT_GRACE = 0.05  # seconds a non-blocking put waits for the producer lock


_ONE_DONE = 1 << 2 | _accel.PUT_DONE  # FastQueue.put: the record is in, nothing left to do


_BAD_TIMEOUT = "'timeout' must be a non-negative number"
_NO_TOKEN, _HAS_TOKEN = _accel.NO_TOKEN, _accel.HAS_TOKEN  # FastQueue.get_obj's "no message"


def _as_bytes(payload: Payload) -> bytes:
    """A payload as get_bytes returns it (a bytes message comes as a 1-tuple, see extract)."""
    return bytes(payload[0]) if isinstance(payload, tuple) else bytes(payload)


def _deadline(block: bool, timeout: float | None) -> float | None:
    """Absolute deadline for a wait: 0 for non-blocking, None for ever."""
    if timeout is not None and timeout < 0:
        raise ValueError(_BAD_TIMEOUT)
    if not block:
        return 0.0
    if timeout is None:
        return None
    return _monotonic() + timeout


class Queue(Bus):
    """A multi-producer, multi-consumer FIFO queue in a memory-mapped file.

    Create it once with ``Queue.create``, open it anywhere with
    ``Queue.open``; both accept a file path, or a bare name that lives in
    ``/dev/shm``. Method names, ``block``/``timeout`` semantics and exceptions
    follow ``multiprocessing.Queue``.

    Example::

        with shmbus.Queue.create("jobs", capacity="16MiB") as q:
            q.put({"task": 1})
            assert q.get() == {"task": 1}
            q.unlink()
    """

    _KIND = KIND_QUEUE
    _ROLES = ("head", "tail", "items", "space")
    _aio: QueueAio | None = None  # asyncio threads, started by the first async call that waits
    _fast: Any = None  # the C fast path (_accel), when built and usable for this handle

    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        capacity: int | str = "64MiB",
        maxsize: int = 0,
        exist_ok: bool = False,
        mode: int = 0o600,
        *,
        codec: Codec | None = None,
    ) -> Queue:
        """Create a new queue and open it.

        Parameters:
            path: a file path, or a bare name (kept in ``/dev/shm``).
            capacity: ring size in bytes, an int or a string such as ``"64MiB"``;
                rounded up to a multiple of 4096. A message may be at most
                ``capacity - 16`` bytes once encoded.
            maxsize: the most messages the queue holds at once (0: bounded only
                by ``capacity``), as in ``multiprocessing.Queue(maxsize)``.
            exist_ok: open the bus already at ``path`` instead of failing.
            mode: permission bits of the file and semaphores (0o660 to share
                with your group).
            codec: msgpack options for this handle (see ``Codec``).

        Raises ``BusExists`` (unless ``exist_ok``), ``PermissionError``, and
        ``ValueError`` for a bad capacity or maxsize.
        """
        cap = ring_capacity(capacity)
        if not isinstance(maxsize, int) or not 0 <= maxsize < 1 << 31:
            raise ValueError(f"maxsize must be an int from 0 to 2**31-1, got {maxsize!r}")
        return cls._create(
            path, capacity=cap, maxsize=maxsize, max_subscribers=0,
            exist_ok=exist_ok, mode=mode, codec=codec,
        )  # fmt: skip

    # -- Bus hooks -------------------------------------------------------------

    @classmethod
    def _ROLES_FOR(cls, layout: Layout) -> list[str]:
        return [*cls._ROLES, "slots"] if layout.maxsize else list(cls._ROLES)

    @classmethod
    def _initial_sems(cls, layout: Layout, queued: int) -> dict[str, int]:
        init = {"head": 1, "tail": 1, "items": queued, "space": 0}
        if layout.maxsize:
            init["slots"] = max(layout.maxsize - queued, 0)
        return init

    def _queued(self) -> int:
        h = self._h64
        # At most what the ring can hold: counters from a corrupt header must not
        # become a huge semaphore count (ValueError) or a loop posting tokens.
        return min(max(h[Q_NEXT_SEQ] - h[Q_TAIL_SEQ], 0), self._layout.capacity // RECORD_SIZE)

    def _setup(self) -> None:
        self.spin = SPIN_DEFAULT
        s = self._sems
        self._head_lock = self._lock("head", I_HEAD_HOLDER, I_HEAD_RELEASES)
        self._tail_lock = self._lock("tail", I_TAIL_HOLDER, I_TAIL_RELEASES)
        self._locks = (self._head_lock, self._tail_lock)
        self._items = s["items"]
        self._space = s["space"]
        self._slots = s.get("slots")
        self._cap = self._layout.capacity
        self._max_payload = max_payload(self._cap)
        self._encode = self._codec.encode
        self._finish = self._codec.finish
        self._ro = self._layout.ring_offset
        self._fast = _accel.queue_fast_path(self)

    def _describe(self) -> str:
        return f"qsize={self.qsize()}"

    # -- producing -------------------------------------------------------------

    def put(self, obj: Any, block: bool = True, timeout: float | None = None) -> None:
        """Put ``obj`` at the end of the queue.

        Waits for space (bytes, or a slot under ``maxsize``) when ``block`` is
        true, for at most ``timeout`` seconds if given. Raises ``Full`` when no
        space came in time, ``EncodeError`` when msgpack cannot encode ``obj``,
        ``MessageTooLarge`` when it could never fit. On any error nothing is
        written.
        """
        if timeout is not None and timeout < 0:  # before C may leave the lock held
            raise ValueError(_BAD_TIMEOUT)
        fast = self._fast
        if fast is not None and not _faults.armed:
            # C: the whole put, encoding included, when obj is of a plain type,
            # the head lock is free and the record fits without a wrap;
            # otherwise it hands back, with the lock or without.
            r = fast.put_obj(self._part.me, obj)  # type: ignore[union-attr]
            if r == _ONE_DONE:
                return
            if r > 0 and r & 3 == _accel.PUT_HELD:
                k = r >> 2
                if not self._finish_fast_put(k, [] if k else [self._encode(obj)], _deadline(block, timeout)):
                    raise Full(f"{self.path} is full: no space freed in time", path=self.path)
                return
        self._put_one(self._encode(obj), block, timeout)

    def _put_one(self, enc: Encoded, block: bool, timeout: float | None) -> None:
        """Put one encoded message: C when it can, the Python paths otherwise."""
        fast = self._fast
        if fast is not None and enc[3] <= self._max_payload and not _faults.armed:
            # C with Python's encoding (bytes, arrays, subclasses...): as in put.
            r = fast.put(self._part.me, *enc)  # type: ignore[union-attr]
            if r == _ONE_DONE:
                return
            if r & 3 == _accel.PUT_HELD:
                if not self._finish_fast_put(r >> 2, [enc], _deadline(block, timeout)):
                    raise Full(f"{self.path} is full: no space freed in time", path=self.path)
                return
        # Pure-Python fast path (measured ~0.6 us of 2.6 per put): the head lock
        # is free, no maxsize, and the record fits without a wrap. Anything
        # else, and every error, goes through _put, which checks and waits.
        elif (
            self._slots is None
            and not self._closed
            and enc[3] <= self._max_payload
            and self._head_lock.try_acquire()
        ):
            try:
                self._put_locked(enc, _deadline(block, timeout))
            finally:
                self._head_lock.release()
            return
        self._put([enc], _deadline(block, timeout))

    def _finish_fast_put(self, k: int, batch: list[Encoded], deadline: float | None) -> int:
        """Go on from where the C path stopped, under the head lock it left held; release it.

        It wrote, published and posted the first ``k`` records of ``batch``
        (``batch`` may hold only the rest); return how many are in the queue now.
        """
        try:
            h = self._h64
            seq = h[Q_NEXT_SEQ]
            if k and (seq - 1) & 255 < k:  # as in _publish: a time sample is due
                record_time(h, (seq - 1) & ~255)
            return k + self._write(batch[k:], deadline) if k < len(batch) else k
        finally:
            self._head_lock.release()

    def _put_locked(self, enc: Encoded, deadline: float | None) -> None:
        """One record, under the head lock: the common case inline, the rest via ``_write``."""
        if _faults.armed:
            _faults.hit("put:after-lock")
        h = self._h64
        cap = self._cap
        head = h[Q_HEAD]
        tail = h[Q_TAIL]
        kind, prefix, body, n = enc
        seq = h[Q_NEXT_SEQ]
        # Near 2**64 (a damaged header) it is _write's to refuse, before a byte is written.
        if (
            tail <= head <= tail + cap
            and head <= _U64 - 2 * cap
            and seq < _U64
            and (_ring.place(head, tail, cap, n) == head)
        ):
            new_head = _ring.write(self._ring, cap, head, head, kind, seq, prefix, body)
            if _faults.armed:
                _faults.hit("put:after-write")
            self._publish(seq + 1, n, new_head, 1)
        elif not self._write([enc], deadline):
            raise Full(f"{self.path} is full: no space freed in time", path=self.path)

    def put_nowait(self, obj: Any) -> None:
        """``put(obj, block=False)``: raises ``Full`` at once when there is no space."""
        self._put([self._encode(obj)], 0.0)

    def put_many(self, objs: Iterable[Any], block: bool = True, timeout: float | None = None) -> None:
        """Put every object of ``objs``, in order, in one lock round.

        All are encoded first, so an ``EncodeError`` or ``MessageTooLarge``
        writes nothing. If space runs out and the timeout passes midway,
        ``Full`` is raised and its ``sent`` attribute says how many of the
        first messages are in the queue.
        """
        encoded = [self._encode(o) for o in objs]
        if not encoded:
            return
        fast = self._fast
        if fast is not None and not _faults.armed:
            self._check_sizes(item[3] for item in encoded)  # before a byte is written
            deadline = _deadline(block, timeout)  # before C may leave the lock held
            r = fast.put_many(self._part.me, encoded)  # type: ignore[union-attr]
            if r & 3 == _accel.PUT_DONE:
                return
            if r & 3 == _accel.PUT_HELD:
                sent = self._finish_fast_put(r >> 2, encoded, deadline)
                if sent < len(encoded):
                    raise Full(f"{self.path} is full: no space freed in time", path=self.path, sent=sent)
                return
        self._put(encoded, _deadline(block, timeout))

    def put_bytes(self, data: bytes | bytearray | memoryview, block: bool = True,
                  timeout: float | None = None) -> None:  # fmt: skip
        """Put raw bytes with no msgpack framing; ``get`` returns them as ``bytes``.

        For callers with their own serializer (protobuf, Arrow IPC...).
        """
        if timeout is not None and timeout < 0:  # before C may leave the lock held
            raise ValueError(_BAD_TIMEOUT)
        body = data if type(data) is bytes else as_bytes_view(data)
        self._put_one((REC_RAW, b"", body, len(body)), block, timeout)

    def _put(self, batch: list[Encoded], deadline: float | None) -> None:
        self._check_open()
        self._check_sizes(item[3] for item in batch)
        # A non-blocking put still waits a moment for the producer lock (another
        # producer's copy); a producer that holds it while sleeping for space
        # means the queue is full anyway.
        if not self._head_lock.acquire(_monotonic() + _NOWAIT_GRACE if deadline == 0.0 else deadline):
            raise Full(f"{self.path}: timed out waiting for the producer lock", path=self.path)
        try:
            sent = self._write(batch, deadline)
        finally:
            self._head_lock.release()
        if sent < len(batch):
            raise Full(f"{self.path} is full: no space freed in time", path=self.path, sent=sent)

    def _write(self, batch: list[Encoded], deadline: float | None) -> int:
        """Write records under the head lock; return how many were committed.

        What is written is published before every wait (for a slot or for
        space): a batch larger than the free room must let consumers drain
        its first records, or the wait could never end.
        """
        h = self._h64
        ring, cap, slots = self._ring, self._cap, self._slots
        head = h[Q_HEAD]
        seq = h[Q_NEXT_SEQ]
        nbytes = sent = published = 0
        if _faults.armed:
            _faults.hit("put:after-lock")
        # The whole batch, before anything is stored: a head or next_seq a damaged
        # header put near 2**64 raises CorruptBus with nothing written.
        _ring.check_room(head, seq, cap, [item[3] for item in batch])
        try:
            for kind, prefix, body, n in batch:
                if slots is not None and not slots.try_acquire():
                    count, published = sent - published, sent
                    self._publish(seq, nbytes, head, count)
                    nbytes = 0
                    if not slots.acquire(deadline, self.recover):
                        break
                try:
                    tail = h[Q_TAIL]
                    _ring.check_positions(head, tail, cap)
                    start = _ring.place(head, tail, cap, n)
                    if start < 0 or _ring.rebases(head, tail, start):
                        count, published = sent - published, sent
                        self._publish(seq, nbytes, head, count)
                        nbytes = 0
                        start, head = self._wait_space(head, n, deadline)
                except BaseException:
                    if slots is not None:
                        slots.release()  # taken for this record, which is not written (CorruptBus...)
                    raise
                if start < 0:
                    if slots is not None:
                        slots.release()
                    break
                head = _ring.write(ring, cap, head, start, kind, seq, prefix, body)
                if _faults.armed:
                    _faults.hit("put:after-write")
                seq += 1
                nbytes += n
                sent += 1
        finally:
            # (``published`` is updated before each publish, so an interrupted
            # publish is never repeated: its missing tokens are healed by
            # consumers, see _heal_tokens.)
            self._publish(seq, nbytes, head, sent - published)
        return sent

    def _publish(self, seq: int, nbytes: int, head: int, count: int) -> None:
        """Make ``count`` newly written records visible to consumers (under the head lock)."""
        h = self._h64
        if seq > _U64 or head > _U64:
            # Only from a damaged header, through the single put's fast path,
            # which checks neither (``_write`` and ``_make_room`` did, with
            # _ring.check_room). Refused before any store: the record written
            # past head stays invisible.
            raise CorruptBus(
                f"{self.path}: this put would take next_seq to {seq} and head to {head}, past 2**64 - 1, "
                "which no bus reaches: the header is damaged: remove the bus with `shmbus rm` and "
                "create it again",
                path=self.path,
            )
        # Counters first, head last: a reader that sees the new head also sees
        # complete records and counters (x86-64 keeps stores in order).
        h[Q_NEXT_SEQ] = seq
        if _faults.armed:
            _faults.hit("put:mid-publish")
        h[Q_BYTES_IN] = (h[Q_BYTES_IN] + nbytes) & _U64  # a statistic: wraps, like bytes_out
        h[Q_HEAD] = head
        if (seq - 1) & 255 < count:  # one of them is a multiple of 256: a time sample (_format)
            record_time(h, (seq - 1) & ~255)
        if _faults.armed:
            _faults.hit("put:before-post")
        post = self._items.release
        for _ in range(count):
            post()

    def _wait_space(self, head: int, n: int, deadline: float | None) -> tuple[int, int]:
        """Sleep until ``n`` payload bytes fit after ``head``; return ``(start, head)``.

        Called under the head lock; ``start`` is -1 on timeout. When the ring is
        empty and the record must wrap (or wraps early: ``_ring.HOT_WINDOW``), tail
        and head both move on to the start (under the tail lock, so no consumer
        sees them apart), and the new head is returned.
        """
        h32, h = self._h32, self._h64
        cap = self._cap
        while True:
            self._tail_lock.acquire(None)  # held only for copies, even by a non-blocking put
            try:
                tail = h[Q_TAIL]
                _ring.check_positions(head, tail, cap)
                start = _ring.place(head, tail, cap, n)
                if start >= 0 and _ring.rebases(head, tail, start):
                    h[Q_TAIL] = start
                    h[Q_HEAD] = head = start
                elif start < 0:
                    h32[I_SPACE_WAITING] = 1
            finally:
                self._tail_lock.release()
            if start >= 0:
                return start, head
            # Sleep one slice at most, then look again: the consumer that should
            # post ``space`` may have died after freeing the bytes.
            slice_end = _monotonic() + SLICE
            if not self._space.acquire(slice_end if deadline is None else min(deadline, slice_end)):
                if deadline is not None and _monotonic() >= deadline:
                    return -1, head
                self.recover()

    # -- consuming ---------------------------------------------------------------

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        """Remove and return the oldest message.

        Waits for one when ``block`` is true, for at most ``timeout`` seconds if
        given. Raises ``Empty`` when nothing arrived in time, ``CorruptBus`` if
        the record at the head of the queue is damaged.
        """
        fast = self._fast
        spun = 0.0
        if fast is not None and not _faults.armed:
            part = self._part
            # (inline for the common call, get() with no arguments: ~80 ns of ~1200)
            spin = self.spin if block and timeout is None else self._spin_for(block, timeout)
            # C: the whole get, decoding included, polling up to the spin first.
            got = fast.get_obj(part.me, part.tokens_index, spin)  # type: ignore[union-attr]
            if got is _NO_TOKEN:
                spun = min(spin, _accel.SPIN_MAX) if part.me else 0.0  # type: ignore[union-attr]
            elif got is _HAS_TOKEN:  # not the common case: Python takes with the token
                got = self._take1()
                if got is not None:
                    return self._finish(*got)
            elif type(got) is tuple:  # for Python to decode (a decoded message is never a tuple)
                return self._finish(*got)
            else:
                return got
        kind, payload = self._get1(block, timeout, spun)
        return self._finish(kind, payload)

    def _spin_for(self, block: bool, timeout: float | None) -> float:
        """How long a get may poll before sleeping: the handle's spin, never past a shorter timeout."""
        spin = self.spin
        if timeout is None:
            return spin if block else 0.0
        if timeout < 0:  # refused before C takes a message, as _deadline does
            raise ValueError(_BAD_TIMEOUT)
        return spin if block and timeout >= spin else 0.0

    def get_nowait(self) -> Any:
        """``get(block=False)``: raises ``Empty`` at once when the queue is empty."""
        return self.get(False)

    def get_bytes(self, block: bool = True, timeout: float | None = None) -> bytes:
        """Remove the oldest message and return its payload undecoded, as ``bytes``.

        For a message put with ``put_bytes`` (or a ``bytes`` message) that is
        the data itself; for any other message, its msgpack encoding.
        """
        fast = self._fast
        spun = 0.0
        if fast is not None and not _faults.armed:
            part = self._part
            spin = self._spin_for(block, timeout)
            recs, left = fast.take_many(part.me, part.tokens_index, 0, 1, spin)  # type: ignore[union-attr]
            if recs:
                return recs[0][1]  # type: ignore[no-any-return]  # a raw record's data, or msgpack
            if left:  # not the common case: Python takes with the token
                got = self._take1()
                if got is not None:
                    return _as_bytes(got[1])
            else:
                spun = min(spin, _accel.SPIN_MAX) if part.me else 0.0  # type: ignore[union-attr]
        return _as_bytes(self._get1(block, timeout, spun)[1])

    def _get1(self, block: bool, timeout: float | None, spun: float = 0.0) -> tuple[int, Payload]:
        """Wait for a token (spinning for what is left after ``spun`` seconds), take its record."""
        if self._closed:
            self._check_open()
        deadline = _deadline(block, timeout)
        part = self._part
        assert part is not None
        if not part.me:
            part.claim(self.recover)
        items = self._items
        while True:
            if not items.try_acquire() and (
                not block or not items.spin_acquire(deadline, max(self.spin - spun, 0.0), self._heal)
            ):
                raise Empty(f"{self.path} is empty", path=self.path)
            fast = self._fast
            if fast is not None and not _faults.armed:  # C takes with the token we hold
                recs, left = fast.take_many(part.me, part.tokens_index, 1, 1, 0.0)
                if recs:
                    return recs[0]  # type: ignore[no-any-return]
                if not left:
                    continue
            got = self._take1()
            if got is not None:
                return got

    def get_many(self, max_messages: int, block: bool = True, timeout: float | None = None) -> list[Any]:
        """Remove and return up to ``max_messages`` of the oldest messages, in one lock round.

        Blocking: waits (up to ``timeout``) for the first message and returns
        1..max_messages of them, or raises ``Empty``. Non-blocking: returns
        0..max_messages at once. If a message cannot be decoded, the others
        are not lost: the ``DecodeError`` raised carries them, in order, as
        its ``decoded`` attribute.
        """
        self._check_open()
        if max_messages < 1:
            raise ValueError("max_messages must be at least 1")
        deadline = _deadline(block, timeout)
        part = self._part
        assert part is not None
        if not part.me:
            part.claim(self.recover)
        items = self._items
        while True:
            k = 0
            fast = self._fast
            if fast is not None and not _faults.armed:
                # C polls for the first token (up to the spin), takes more and the
                # common-case records; Python waits when there was none, and takes the rest.
                spin = self._spin_for(block, timeout)
                got, k = fast.take_many(part.me, part.tokens_index, 0, max_messages, spin)
                if not got and not k and block:
                    if not items.try_acquire() and not items.spin_acquire(
                        deadline, 0.0 if spin else self.spin, self._heal
                    ):
                        raise Empty(f"{self.path} is empty", path=self.path)
                    got, k = fast.take_many(part.me, part.tokens_index, 1, max_messages, 0.0)
                if k:
                    got += self._take(k)
            else:
                if block:
                    if not items.try_acquire() and not items.spin_acquire(deadline, self.spin, self._heal):
                        raise Empty(f"{self.path} is empty", path=self.path)
                    k = 1
                try_acquire = items.try_acquire
                while k < max_messages and try_acquire():
                    k += 1
                if not k:
                    return []
                got = self._take(k)
            if got or not block:
                return self._codec.finish_many(got)

    def _take1(self) -> tuple[int, Payload] | None:
        """``_take(1)`` with the common case inline (measured ~0.5 us of 2.5 per get).

        Holds one items token on entry. If anything interrupts it before the
        commit (a KeyboardInterrupt, say), the token goes back, so the
        message stays gettable.
        """
        h = self._h64
        tokens = self._part_tokens()
        h[tokens] = 1
        if _faults.armed:
            _faults.hit("get:after-token")
        tail_lock = self._tail_lock
        committed = False
        try:
            tail_lock.acquire(None)
            try:
                if _faults.armed:
                    _faults.hit("get:after-lock")
                cap = self._cap
                tail = h[Q_TAIL]
                head = h[Q_HEAD]
                if (
                    tail < head <= tail + cap
                    and not (head | tail) & 15
                    and not self._h32[I_SPACE_WAITING]
                    and self._slots is None
                ):
                    start, kind, rseq, n, nxt = _ring.read(self._ring, cap, tail, head)
                    seq = h[Q_TAIL_SEQ]
                    if rseq == seq < h[Q_NEXT_SEQ]:
                        payload = extract(self._mm, self._ro + start % cap + RECORD_SIZE, n, kind)
                        if _faults.armed:
                            _faults.hit("get:after-copy")
                        h[Q_TAIL_SEQ] = seq + 1
                        if _faults.armed:
                            _faults.hit("get:mid-commit")
                        h[Q_TAIL] = nxt
                        committed = True
                        # Statistics after the commit: a consumer killed in between
                        # undercounts, never counts a message twice.
                        h[Q_BYTES_OUT] = (h[Q_BYTES_OUT] + n) & _U64
                        h[tokens] = 0
                        if _faults.armed:
                            _faults.hit("get:before-unlock")
                        return kind, payload
            finally:
                tail_lock.release()
        except CorruptBus:
            pass  # _take says what is wrong, and hands the token back
        except BaseException:
            if not committed:
                self._items.release()
                h[tokens] = 0
            raise
        got = self._take(1)
        return got[0] if got else None

    def _part_tokens(self) -> int:
        """Index of our participant slot's tokens field (a scratch word when unclaimed)."""
        part = self._part
        assert part is not None
        return part.tokens_index or Q_SCRATCH  # a header word nobody reads

    def _take(self, k: int) -> list[tuple[int, Payload]]:
        """Copy out the ``k`` oldest records, for which ``k`` items tokens are held.

        Returns fewer when tokens outnumber records (a stray token, after a
        crash): those tokens are dropped, with a warning.
        """
        h = self._h64
        tokens = self._part_tokens()
        h[tokens] = k
        if _faults.armed:
            _faults.hit("get:after-token")
        out: list[tuple[int, Payload]] = []
        taken = 0
        committed = locked = False
        try:
            self._tail_lock.acquire(None)
            locked = True
            if _faults.armed:
                _faults.hit("get:after-lock")
            ring, cap = self._ring, self._cap
            mm, ro = self._mm, self._ro
            tail = h[Q_TAIL]
            head = h[Q_HEAD]
            _ring.check_positions(head, tail, cap)
            seq = h[Q_TAIL_SEQ]
            if tail < head and _ring.read(ring, cap, tail, head)[2] != seq:
                # A consumer interrupted between its two counter stores: the
                # records carry the truth.
                log.warning("%s: tail_seq %d disagrees with the record at tail; resyncing", self.path, seq)
                self._resync(fix_next=False)
                seq = h[Q_TAIL_SEQ]
            nbytes = 0
            read = _ring.read
            append = out.append
            last = h[Q_NEXT_SEQ]  # loaded after head, which producers store after it
            while taken < k and tail != head:
                start, kind, rseq, n, tail = read(ring, cap, tail, head)
                if rseq != seq or rseq >= last:
                    raise self._bad_seq(start, rseq, seq, last)
                append((kind, extract(mm, ro + start % cap + RECORD_SIZE, n, kind)))
                seq += 1
                nbytes += n
                taken += 1
            if _faults.armed:
                _faults.hit("get:after-copy")
            h[Q_TAIL_SEQ] = seq
            if _faults.armed:
                _faults.hit("get:mid-commit")
            h[Q_TAIL] = tail
            committed = True
            h[Q_BYTES_OUT] = (h[Q_BYTES_OUT] + nbytes) & _U64  # after the commit, as in _take1
            h[tokens] = 0
            if _faults.armed:
                _faults.hit("get:before-unlock")
            if self._h32[I_SPACE_WAITING]:
                self._h32[I_SPACE_WAITING] = 0
                self._space.release()
        except BaseException:
            if not committed:
                # Nothing was consumed: every token goes back, so no message is stranded.
                taken = 0
                for _ in range(k):
                    self._items.release()
                h[tokens] = 0
            raise
        finally:
            if locked:
                self._tail_lock.release()
        if self._slots is not None:
            for _ in range(taken):
                self._slots.release()
        if taken < k:
            log.warning("%s: %d items tokens had no record; dropped them", self.path, k - taken)
        return out

    def _bad_seq(self, start: int, rseq: int, seq: int, last: int | None = None) -> CorruptBus:
        off = start % self._cap
        expected = f"expected {seq}" if rseq != seq else f"not below next_seq {last}"
        return CorruptBus(
            f"{self.path}: record at ring offset {off} has sequence number {rseq}, {expected}",
            path=self.path, offset=off,
        )  # fmt: skip

    # -- zero-copy -------------------------------------------------------------

    def reserve(self, nbytes: int, block: bool = True, timeout: float | None = None) -> Reservation:
        """Reserve ``nbytes`` in the ring to fill in place; use as ``with q.reserve(n) as buf:``.

        ``buf`` is a writable ``memoryview`` straight into the shared ring.
        Leaving the block commits it as one raw-bytes message (``get`` returns
        ``bytes``); an exception abandons it and nothing is visible. The
        producer lock is held until the block ends, so keep it short. Raises
        ``Full`` (no space in time) or ``MessageTooLarge``.
        """
        self._check_open()
        self._check_sizes((nbytes,))
        deadline = _deadline(block, timeout)
        if not self._head_lock.acquire(_monotonic() + _NOWAIT_GRACE if deadline == 0.0 else deadline):
            raise Full(f"{self.path}: timed out waiting for the producer lock", path=self.path)

        def abandon() -> None:
            if self._slots is not None:
                self._slots.release()

        return self._reservation(
            nbytes,
            lambda: self._make_room(nbytes, deadline),
            lambda seq, new_head: self._publish(seq + 1, nbytes, new_head, 1),
            abandon,
        )

    def _make_room(self, n: int, deadline: float | None) -> tuple[int, int, int]:
        """Under the head lock: wait for a slot and for ``n`` bytes; return (start, head, seq)."""
        slots, h, cap = self._slots, self._h64, self._cap
        head, seq = h[Q_HEAD], h[Q_NEXT_SEQ]  # ours to move while we hold the head lock
        _ring.check_room(head, seq, cap, [n])  # before any wait or store (a damaged header)
        if slots is not None and not slots.try_acquire() and not slots.acquire(deadline, self.recover):
            raise Full(f"{self.path} is full: no slot freed in time", path=self.path)
        try:
            tail = h[Q_TAIL]
            _ring.check_positions(head, tail, cap)
            start = _ring.place(head, tail, cap, n)
            if start < 0 or _ring.rebases(head, tail, start):
                start, head = self._wait_space(head, n, deadline)
        except BaseException:
            if slots is not None:
                slots.release()  # taken for this record, which is not written (CorruptBus...)
            raise
        if start < 0:
            if slots is not None:
                slots.release()
            raise Full(f"{self.path} is full: no space freed in time", path=self.path)
        return start, head, seq

    def get_view(self, block: bool = True, timeout: float | None = None) -> View:
        """The oldest message's payload, in place; use as ``with q.get_view() as buf:``.

        ``buf`` is a read-only ``memoryview`` into the shared ring, valid inside
        the block (raw bytes for ``put_bytes``/``reserve``/``bytes`` messages,
        the msgpack encoding for others; ``View.kind`` says which). Leaving the
        block normally consumes the message; an exception leaves it in the
        queue. The consumer lock is held until the block ends, so keep it
        short. Raises ``Empty`` when nothing arrived in time.
        """
        if self._closed:
            self._check_open()
        deadline = _deadline(block, timeout)
        part = self._part
        assert part is not None
        if not part.me:
            part.claim(self.recover)
        items, h = self._items, self._h64
        if not items.try_acquire() and (not block or not items.spin_acquire(deadline, self.spin, self._heal)):
            raise Empty(f"{self.path} is empty", path=self.path)
        tokens = self._part_tokens()
        h[tokens] = 1
        try:
            self._tail_lock.acquire(None)
        except BaseException:
            items.release()
            h[tokens] = 0
            raise
        try:
            tail, head, cap = h[Q_TAIL], h[Q_HEAD], self._cap
            _ring.check_positions(head, tail, cap)
            start, kind, rseq, n, nxt = _ring.read(self._ring, cap, tail, head)
            if rseq != h[Q_TAIL_SEQ] or rseq >= h[Q_NEXT_SEQ]:
                raise self._bad_seq(start, rseq, h[Q_TAIL_SEQ], h[Q_NEXT_SEQ])
        except BaseException:
            self._tail_lock.release()
            items.release()
            h[tokens] = 0
            raise
        a = start % cap + RECORD_SIZE
        got = extract_range(self._ring, a, n, kind)
        view = self._ring[got[0] : got[1]].toreadonly()

        def finish(consume: bool) -> None:
            try:
                if consume:
                    h[Q_TAIL_SEQ] = rseq + 1
                    h[Q_TAIL] = nxt
                    h[Q_BYTES_OUT] = (h[Q_BYTES_OUT] + n) & _U64  # after the commit, as in _take1
                    if self._h32[I_SPACE_WAITING]:
                        self._h32[I_SPACE_WAITING] = 0
                        self._space.release()
                else:
                    items.release()
                h[tokens] = 0
            finally:
                self._tail_lock.release()
            if consume and self._slots is not None:
                self._slots.release()

        return View(view, view_kind(kind, got[2]), finish)

    # -- asyncio (the mechanism is in _aio) -------------------------------------

    async def aget(self, timeout: float | None = None) -> Any:
        """``get`` for asyncio: wait for the oldest message without blocking the event loop.

        Parameters:
            timeout: seconds to wait at most (None: for ever).

        Raises ``Empty`` when nothing arrived in time, ``BusClosed`` if the
        handle is closed meanwhile, ``CorruptBus`` as ``get`` does. Returns the
        message. A cancelled ``aget`` consumes nothing: the message stays for
        the next ``get``.
        """
        return await self._async().get(timeout)

    async def aget_many(self, max_messages: int, timeout: float | None = None) -> list[Any]:
        """``get_many`` for asyncio: wait for the first message, return 1 to ``max_messages``.

        Parameters:
            max_messages: the most messages to return (at least 1).
            timeout: seconds to wait for the first one at most (None: for ever).

        Raises ``Empty`` when nothing arrived in time, ``BusClosed``, and
        ``DecodeError`` as ``get_many`` does. Cancelled, it consumes nothing.
        """
        return await self._async().get_many(max_messages, timeout)

    async def aput(self, obj: Any, timeout: float | None = None) -> None:
        """``put`` for asyncio: wait for space without blocking the event loop.

        Parameters:
            obj: the message.
            timeout: seconds to wait for space at most (None: for ever).

        Raises ``Full`` when no space came in time, ``EncodeError``,
        ``MessageTooLarge``, ``BusClosed``. Puts waiting for space go in one
        at a time, in the order they were called. If cancelled while waiting
        its turn, nothing is sent; once its turn came the put completes anyway.
        """
        await self._async().put([self._encode(obj)], timeout)

    async def aput_many(self, objs: Iterable[Any], timeout: float | None = None) -> None:
        """``put_many`` for asyncio: put every object, in order, waiting for space without blocking.

        Parameters:
            objs: the messages.
            timeout: seconds to wait for space at most (None: for ever).

        Raises ``Full`` (its ``sent`` says how many went in), ``EncodeError``
        or ``MessageTooLarge`` (nothing sent), ``BusClosed``. If cancelled,
        the messages that fitted at once stay in; the rest are sent only if
        their turn to wait for space had already come (see docs/asyncio.md).
        """
        encoded = [self._encode(o) for o in objs]
        if encoded:
            await self._async().put(encoded, timeout)

    def _async(self) -> QueueAio:
        aio = self._aio
        if aio is None or aio.pid != os.getpid():
            self._check_open()
            aio = self._aio = QueueAio(self)
        return aio

    def close(self) -> None:
        """Release this handle, after stopping its asyncio threads; the queue stays.

        Pending ``aget``/``aput`` calls raise ``BusClosed``. Idempotent.
        """
        aio, self._aio = self._aio, None
        if aio is not None:
            aio.close()
        _accel.drop_fast_path(self)  # it holds the mapping: before the mapping closes
        super().close()

    # -- crash recovery hooks ------------------------------------------------

    def _repair(self, roles: list[str]) -> None:
        if "head" in roles:
            # A producer died under the head lock: counters may be half-stored and
            # records published without their items tokens. Mend both under the
            # tail lock too (inherited from the dead, or taken now), so no
            # consumer moves meanwhile.
            own_tail = "tail" not in roles
            # Bounded: a tail holder we cannot see die (no participant slot)
            # must not hang every recovery behind us.
            if own_tail and not self._tail_lock.sem.acquire(_monotonic() + _REPAIR_WAIT):
                log.warning("%s: tail lock busy; counters left for the next recovery", self.path)
                return
            try:
                self._resync(fix_next=True)
                self._reconcile_tokens()
            finally:
                if own_tail:
                    self._tail_lock.sem.release()
        elif "tail" in roles:
            self._resync(fix_next=False)

    def _reconcile_tokens(self) -> None:
        """Post the items tokens that records lack (under both locks, in recovery).

        Live consumers between taking tokens and recording them make this
        over-count, which is harmless: a token without a record is dropped.
        """
        assert self._part is not None
        records = self._queued()
        have = self._items.value + self._part.live_tokens()
        for _ in range(records - have):
            self._items.release()
        self._reconcile_slots()

    def _reconcile_slots(self) -> None:
        """With ``maxsize``: post the free-slot tokens a dead process took with it.

        A producer killed after taking a slot, or a consumer killed before
        giving its slots back, would otherwise shrink the queue for ever.
        A live consumer between its commit and its slot post makes this
        over-count by its batch: the bound is then exceeded by that much once.
        """
        slots = self._slots
        if slots is not None:
            for _ in range(self._layout.maxsize - self._queued() - slots.value):
                slots.release()

    def _heal(self) -> None:
        """After each empty slice of a consumer's wait: recover dead holders, then lost tokens.

        A process interrupted or killed between taking or posting an items
        token and recording it can leave records without tokens: the queue
        holds messages while ``items`` is 0. Posting what is missing heals it;
        posting one too many is harmless (a token without a record is dropped).
        """
        self.recover()
        if self._items.value or not self._queued():
            return
        part = self._part
        assert part is not None
        # Recovery lock first, then the tail lock: the order recover() takes them in.
        with part.recovery_lock():
            if not self._tail_lock.sem.acquire(_monotonic() + _REPAIR_WAIT):
                return
            try:
                missing = self._queued() - part.live_tokens() - self._items.value
                if missing > 0:
                    log.warning("%s: %d messages had no items token; healing", self.path, missing)
                    for _ in range(missing):
                        self._items.release()
            finally:
                self._tail_lock.sem.release()

    def _reap(self, slot: int) -> None:
        assert self._part is not None
        self._reconcile_slots()
        # Tokens a dead consumer took and never used go back (at worst one too many);
        # no more than the ring's records, whatever a damaged table says.
        for _ in range(min(self._part.tokens_of(slot), self._layout.capacity // RECORD_SIZE)):
            self._items.release()

    # -- inspection ----------------------------------------------------------

    def qsize(self) -> int:
        """Messages in the queue now (a snapshot: other processes change it at once)."""
        self._check_open()
        return self._queued()

    def empty(self) -> bool:
        """True if the queue holds no message now (a snapshot)."""
        return self.qsize() == 0

    def full(self) -> bool:
        """True if a small message would not fit now: ``maxsize`` reached or no free bytes."""
        self._check_open()
        maxsize = self._layout.maxsize
        if maxsize and self._queued() >= maxsize:
            return True
        h = self._h64
        return _ring.place(h[Q_HEAD], h[Q_TAIL], self._cap, 1) < 0

    @property
    def spin_us(self) -> float:
        """Microseconds a waiting ``get`` polls before it sleeps (default 50; 0: sleep at once).

        Polling saves the kernel's wake-up (tens of microseconds) when the
        producer is on another core; each poll yields the CPU, so an idle wait
        costs little. Set it per handle: ``q.spin_us = 0``.
        """
        return self.spin * 1e6

    @spin_us.setter
    def spin_us(self, value: float) -> None:
        if value < 0:
            raise ValueError("spin_us must be 0 or more")
        self.spin = value / 1e6

    @property
    def maxsize(self) -> int:
        """The message bound set at create (0: bounded only by capacity)."""
        return self._layout.maxsize
