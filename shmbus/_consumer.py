"""The get side of a ``Queue``: ``get`` and its kin, ``get_view``, under the tail lock.

One job: turn ``items`` tokens into records copied out (or viewed in place)
and committed by advancing ``tail_seq`` then ``tail``, following the locking
protocol in ``_queue``'s docstring; a take interrupted before its commit hands
its tokens back, so no message is stranded.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from . import _accel, _faults, _ring
from ._bus import _U64
from ._codec import Payload, extract, extract_range
from ._errors import CorruptBus, Empty
from ._format import (
    I_SPACE_WAITING,
    Q_BYTES_OUT,
    Q_HEAD,
    Q_NEXT_SEQ,
    Q_SCRATCH,
    Q_TAIL,
    Q_TAIL_SEQ,
    RECORD_SIZE,
)
from ._queue_base import _BAD_TIMEOUT, _deadline, _QueueBase
from ._zerocopy import View, view_kind

__all__ = ["_Consuming"]

log = logging.getLogger("shmbus")
_NO_TOKEN, _HAS_TOKEN = _accel.NO_TOKEN, _accel.HAS_TOKEN  # FastQueue.get_obj's "no message"


def _as_bytes(payload: Payload) -> bytes:
    """A payload as get_bytes returns it (a bytes message comes as a 1-tuple, see extract)."""
    return bytes(payload[0]) if isinstance(payload, tuple) else bytes(payload)


class _Consuming(_QueueBase):
    """The consumer methods of ``Queue`` (a mixin: ``Queue`` is the only class built on it)."""

    _heal: Callable[[], None]  # Queue's: recover dead holders, then lost tokens

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
                spun = self._c_spun(spin)
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
                spun = self._c_spun(spin)
        return _as_bytes(self._get1(block, timeout, spun)[1])

    def _begin(self, block: bool, timeout: float | None) -> float | None:
        """Start a wait for messages: refuse a closed handle, return the deadline, claim our slot.

        Claiming first runs recovery, so a wait behind a dead holder's lock
        can free it.
        """
        if self._closed:
            self._check_open()
        deadline = _deadline(block, timeout)
        part = self._part
        assert part is not None
        if not part.me:
            part.claim(self.recover)
        return deadline

    def _c_spun(self, spin: float) -> float:
        """How long the C path polled for ``spin`` asked: at most SPIN_MAX, nothing without a slot."""
        part = self._part
        assert part is not None
        return min(spin, _accel.SPIN_MAX) if part.me else 0.0

    def _get1(self, block: bool, timeout: float | None, spun: float = 0.0) -> tuple[int, Payload]:
        """Wait for a token (spinning for what is left after ``spun`` seconds), take its record."""
        deadline = self._begin(block, timeout)
        part = self._part
        assert part is not None
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
        deadline = self._begin(block, timeout)
        part = self._part
        assert part is not None
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
                    # Spin for what C did not (as _get1), then sleep.
                    rest = max(self.spin - self._c_spun(spin), 0.0)
                    if not items.try_acquire() and not items.spin_acquire(deadline, rest, self._heal):
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

    def get_view(self, block: bool = True, timeout: float | None = None) -> View:
        """The oldest message's payload, in place; use as ``with q.get_view() as buf:``.

        ``buf`` is a read-only ``memoryview`` into the shared ring, valid inside
        the block (raw bytes for ``put_bytes``/``reserve``/``bytes`` messages,
        the msgpack encoding for others; ``View.kind`` says which). Leaving the
        block normally consumes the message; an exception leaves it in the
        queue. The consumer lock is held until the block ends, so keep it
        short. Raises ``Empty`` when nothing arrived in time.
        """
        deadline = self._begin(block, timeout)
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
