"""The put side of a ``Queue``: ``put`` and its kin, ``reserve``, under the head lock.

One job: get encoded records into the ring and make them visible, following
the locking protocol in ``_queue``'s docstring: wait for a slot and for free
bytes, write, then publish counters before ``head`` and post one ``items``
token per record, so a token always stands for a complete record.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from . import _accel, _faults, _ring
from ._codec import Encoded, as_bytes_view
from ._errors import BusClosed, CorruptBus, Full
from ._format import I_SPACE_WAITING, Q_BYTES_IN, Q_HEAD, Q_NEXT_SEQ, Q_TAIL, REC_RAW, U64_MAX
from ._queue_base import _deadline, _QueueBase
from ._recovery import NOT_TAKEN
from ._stats import record_time
from ._sync import SLICE, check_timeout
from ._zerocopy import Reservation, stored_batch

__all__ = ["_Producing"]

_monotonic = time.monotonic
_NOWAIT_GRACE = 0.05  # seconds a non-blocking put waits for the producer lock
_ONE_DONE = 1 << 2 | _accel.PUT_DONE  # FastQueue.put: the record is in, nothing left to do


class _Producing(_QueueBase):
    """The producer methods of ``Queue`` (a mixin: ``Queue`` is the only class built on it)."""

    # -- producing -------------------------------------------------------------

    def put(self, obj: Any, block: bool = True, timeout: float | None = None) -> None:
        """Put ``obj`` at the end of the queue.

        Waits for space (bytes, or a slot under ``maxsize``) when ``block`` is
        true, for at most ``timeout`` seconds if given. Raises ``Full`` when no
        space came in time, ``EncodeError`` when msgpack cannot encode ``obj``,
        ``MessageTooLarge`` when it could never fit. On any error nothing is
        written.
        """
        if timeout is not None:  # checked before C may leave the lock held
            check_timeout(timeout)
        fast = self._fast
        if fast is not None:
            # C: the whole put, encoding included, when obj is of a plain type,
            # the head lock is free and the record fits without a wrap;
            # otherwise it hands back, with the lock or without.
            r = fast.put_obj(obj)
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
        if fast is not None and enc[3] <= self._max_payload:
            # C with Python's encoding (bytes, arrays, subclasses...): as in put.
            r = fast.put(*enc)
            if r == _ONE_DONE:
                return
            if r & 3 == _accel.PUT_HELD:
                if not self._finish_fast_put(r >> 2, [enc], _deadline(block, timeout)):
                    raise Full(f"{self.path} is full: no space freed in time", path=self.path)
                return
        # Pure-Python fast path (measured ~0.6 us of 2.6 per put): the head lock
        # is free, no maxsize, and the record fits without a wrap. Anything
        # else, and every error, goes through _put, which checks and waits.
        elif self._slots is None and enc[3] <= self._max_payload:
            users = self._users
            users.append(None)  # (Bus._enter, inline: see there)
            try:
                deadline = _deadline(block, timeout)
                run = self._head_lock.run
                if not self._closed and run(0.0, self._put_locked, enc, deadline) is not NOT_TAKEN:
                    return
            finally:
                users.pop()  # (Bus._leave, inline)
                if not users and self._closed:
                    self._release()
        self._put([enc], _deadline(block, timeout))

    def _finish_fast_put(self, k: int, batch: list[Encoded], deadline: float | None) -> int:
        """Go on from where the C path stopped, under the head lock it left held; release it.

        It wrote, published and posted the first ``k`` records of ``batch``
        (which may be empty when it wrote them all); return how many are in the queue now.
        (A signal handler's exception raised between the C call and here
        finds the lock held by this thread: ``Queue.put``'s ``finally`` frees it.)
        """
        lock = self._head_lock
        try:
            h = self._h64
            seq = h[Q_NEXT_SEQ]
            if k and (seq - 1) & 255 < k:  # _format.sample_due(seq - 1, k), inline: a per-put path
                record_time(h, (seq - 1) & ~255)
            n = k + self._write(batch[k:], deadline) if k < len(batch) else k
        except BaseException as e:
            if isinstance(e, BusClosed):
                e.sent += k  # C's records are in too
            lock.release_after(e)
            raise
        lock.release()
        return n

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
        # The positions: _ring.check_positions inline, with _ring.check_room's bound for this
        # record, up to 15 bytes stricter (n + 31 >= its span): where this refuses, _write
        # decides exactly, so every path (C's too) accepts the same (test_ring ties them).
        if (
            tail <= head <= tail + cap
            and not (head | tail) & 15
            and head + 2 * (n + 31) <= U64_MAX - 2 * cap
            and seq < U64_MAX
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
        fast = self._fast
        if fast is not None and type(objs) is list and objs:
            if timeout is not None:  # checked before C may leave the lock held
                check_timeout(timeout)
            self._enter()
            try:
                if self._put_objs(fast, objs, _deadline(block, timeout)):
                    return
            finally:
                self._leave()
        # C encodes a list of plain messages in one call; None: some are Python's to encode.
        encoded = fast.encode_many(objs) if fast is not None and type(objs) is list else None
        if encoded is None:
            encoded = [self._encode(o) for o in objs]
        if not encoded:
            return
        self._enter()  # before C, which may hand the head lock over held
        try:
            self._put_many(encoded, block, timeout)
        finally:
            self._leave()

    def _put_objs(self, fast: Any, objs: list[Any], deadline: float | None) -> bool:
        """put_many's common case in C, encoding included; False if C left it all to Python.

        C encodes the whole list, msgpack's bytes, and writes what fits
        (msgspec installed, every message of plain types); Python encodes
        whatever is left past the first records C wrote, the same bytes.
        """
        had = self._head_lock.mutex.expect()  # C may hand it over held (PUT_HELD)
        try:
            r = fast.put_objs(objs)
            if r < 0 or r & 3 != _accel.PUT_HELD:
                self._head_lock.mutex.settle(had)  # C released it, or never took it
            if r < 0 or r & 3 == _accel.PUT_NOT_TAKEN:
                return False  # nothing written: the encoded path, which waits and checks
            if r & 3 == _accel.PUT_DONE:
                return True
            # The first ones are in, the lock held: Python writes the rest, encoded
            # again (the same bytes; no EncodeError can come: C encoded them all).
            encoded = [self._encode(o) for o in objs]
            sent = self._finish_fast_put(r >> 2, encoded, deadline)
        except BaseException:
            self._head_lock.abandon()  # as in _put_many
            raise
        if sent < len(encoded):
            raise Full(f"{self.path} is full: no space freed in time", path=self.path, sent=sent)
        return True

    def _put_many(self, encoded: list[Encoded], block: bool, timeout: float | None) -> None:
        fast = self._fast
        if fast is not None:
            self._check_sizes(item[3] for item in encoded)  # before a byte is written
            deadline = _deadline(block, timeout)  # before C may leave the lock held
            had = self._head_lock.mutex.expect()  # C may hand it over held (PUT_HELD)
            try:
                r = fast.put_many(encoded)
                if r & 3 != _accel.PUT_HELD:
                    self._head_lock.mutex.settle(had)  # C released it, or never took it
                if r & 3 == _accel.PUT_DONE:
                    return
                sent = self._finish_fast_put(r >> 2, encoded, deadline) if r & 3 == _accel.PUT_HELD else -1
            except BaseException:
                # A handler's exception as C returned the lock to us: free it if we
                # hold it (abandon does nothing otherwise), and the next holder checks.
                self._head_lock.abandon()
                raise
            if sent >= 0:
                if sent < len(encoded):
                    raise Full(f"{self.path} is full: no space freed in time", path=self.path, sent=sent)
                return
        self._put(encoded, _deadline(block, timeout))

    def put_bytes(self, data: bytes | bytearray | memoryview, block: bool = True,
                  timeout: float | None = None) -> None:  # fmt: skip
        """Put raw bytes with no msgpack framing; ``get`` returns them as ``bytes``.

        For callers with their own serializer (protobuf, Arrow IPC...).
        """
        if timeout is not None:  # checked before C may leave the lock held
            check_timeout(timeout)
        body = data if type(data) is bytes else as_bytes_view(data)
        self._put_one((REC_RAW, b"", body, len(body)), block, timeout)

    def put_records(self, records: Iterable[tuple[str, bytes | memoryview]], block: bool = True,
                    timeout: float | None = None) -> None:  # fmt: skip
        """Put messages in their stored form, ``(kind, data)`` pairs, in order, with no encoding.

        ``kind`` is a ``Record.kind`` ("msgpack", "raw" or "ndarray"): what
        ``get_records`` read elsewhere goes in unchanged (a ``Record``
        qualifies, its ``seq`` is ignored: this queue numbers them). A
        "msgpack" record must hold one msgpack object, which ``get`` decodes
        later (a ``DecodeError`` then otherwise). Raises ``ValueError`` for an
        unknown kind, ``MessageTooLarge`` (nothing sent), ``Full`` as ``put_many``.
        """
        batch = stored_batch(records)
        if batch:
            self._enter()
            try:
                self._put_many(batch, block, timeout)
            finally:
                self._leave()

    def _put(self, batch: list[Encoded], deadline: float | None) -> None:
        """Put ``batch``, in order, by ``deadline``; ``Full`` (its ``sent``: how many went in) if not."""
        self._enter()
        try:
            self._put_locking(batch, deadline)
        finally:
            self._leave()

    def _put_locking(self, batch: list[Encoded], deadline: float | None) -> None:
        self._check_sizes(item[3] for item in batch)
        # A non-blocking put still waits a moment for the producer lock (another
        # producer's copy); a producer that holds it while sleeping for space
        # means the queue is full anyway.
        lock_deadline = _monotonic() + _NOWAIT_GRACE if deadline == 0.0 else deadline
        sent = self._head_lock.run(lock_deadline, self._write, batch, deadline)
        if sent is NOT_TAKEN:
            raise Full(f"{self.path}: timed out waiting for the producer lock", path=self.path)
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
        except BusClosed as e:  # closed while waiting for a slot or space: these went in
            e.sent = sent  # (published just below)
            raise
        finally:
            # (``published`` is updated before each publish, so an interrupted
            # publish is never repeated: its missing tokens are healed by
            # consumers, see _heal_tokens.)
            self._publish(seq, nbytes, head, sent - published)
        return sent

    def _publish(self, seq: int, nbytes: int, head: int, count: int) -> None:
        """Make ``count`` newly written records visible to consumers (under the head lock)."""
        h = self._h64
        if seq > U64_MAX or head > U64_MAX:
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
        h[Q_BYTES_IN] = (h[Q_BYTES_IN] + nbytes) & U64_MAX  # a statistic: wraps, like bytes_out
        h[Q_HEAD] = head
        if (seq - 1) & 255 < count:  # _format.sample_due(seq - 1, count), inline: a per-put path
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
        while True:
            # The tail lock is held only for copies, even by a non-blocking put.
            # (a non-blocking put still waits a moment: a consumer's copy is short)
            lock_deadline = _monotonic() + _NOWAIT_GRACE if deadline == 0.0 else deadline
            got = self._tail_lock.run(lock_deadline, self._room_or_flag, head, n)
            if got is NOT_TAKEN:
                return -1, head
            start, head = got
            if start >= 0:
                return start, head
            # Sleep one slice at most, then look again: the consumer that should
            # post ``space`` may have died after freeing the bytes.
            slice_end = _monotonic() + SLICE
            if not self._space.acquire(slice_end if deadline is None else min(deadline, slice_end)):
                if deadline is not None and _monotonic() >= deadline:
                    return -1, head
                self.recover()

    def _room_or_flag(self, head: int, n: int) -> tuple[int, int]:
        """Under both locks: place ``n`` bytes (moving an empty ring on), or flag that we wait for space."""
        h = self._h64
        cap = self._cap
        tail = h[Q_TAIL]
        _ring.check_positions(head, tail, cap)
        start = _ring.place(head, tail, cap, n)
        if start >= 0 and _ring.rebases(head, tail, start):
            h[Q_TAIL] = start
            h[Q_HEAD] = head = start
        elif start < 0:
            self._h32[I_SPACE_WAITING] = 1
        return start, head

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

        def abandon() -> None:
            if self._slots is not None:
                self._slots.release()

        return self._reservation(
            nbytes,
            _monotonic() + _NOWAIT_GRACE if deadline == 0.0 else deadline,
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

    # -- for callers that must not wait here (the asyncio layer: ``_aio.QueueOps``) ----

    def _check_batch(self, batch: list[Encoded]) -> None:
        """Refuse, before any lock, a closed handle (``BusClosed``) or a message no ring space fits."""
        self._check_open()
        if any(item[3] > self._max_payload for item in batch):
            self._check_sizes(item[3] for item in batch)  # MessageTooLarge, with its sizes

    def _put_ready(self, batch: list[Encoded]) -> int:
        """Put what fits of ``batch`` now, not even waiting for the producer lock; return how many."""
        users = self._users
        users.append(None)  # (Bus._enter, inline as in _put_one: the asyncio ready path)
        try:
            if self._closed:
                self._check_open()
            sent = self._head_lock.run(0.0, self._write, batch, 0.0)
        finally:
            users.pop()  # (Bus._leave, inline)
            if not users and self._closed:
                self._release()
        return 0 if sent is NOT_TAKEN else sent
