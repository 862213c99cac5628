"""The get side of a ``Queue``: ``get`` and its kin, ``get_view``, under the tail lock.

One job: turn ``items`` tokens into records copied out (or viewed in place)
and committed by advancing ``tail_seq`` then ``tail``, following the locking
protocol in ``_queue``'s docstring; a take interrupted before its commit hands
its tokens back, so no message is stranded.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from itertools import accumulate
from typing import Any, Callable

from . import _accel, _faults, _ring
from ._codec import Encoded, Payload, extract, extract_range
from ._errors import BusClosed, CorruptBus, Empty, ShmbusError
from ._format import (
    I_SPACE_WAITING,
    Q_BYTES_OUT,
    Q_HEAD,
    Q_NEXT_SEQ,
    Q_SCRATCH,
    Q_TAIL,
    Q_TAIL_SEQ,
    REC_MSGPACK,
    REC_NDARRAY,
    REC_RAW,
    RECORD_SIZE,
    U64_MAX,
)
from ._queue_base import NO_RECORD, _deadline, _QueueBase
from ._recovery import NOT_TAKEN
from ._sync import check_timeout
from ._zerocopy import Record, RecordBatch, View, record_kind, view_kind

__all__ = ["_Consuming"]

log = logging.getLogger("shmbus")
_NO_TOKEN, _HAS_TOKEN = _accel.NO_TOKEN, _accel.HAS_TOKEN  # FastQueue.get_obj's "no message"
_DECODED = -1  # the "kind" of a kept message that C had already decoded
_REQUEUE_GRACE = 0.05  # seconds close() waits for the producer lock to put kept messages back
_monotonic = time.monotonic
# Record.kind by record kind code, as C's scan_records indexes it ("" for codes no message has).
_KIND_NAMES = tuple(
    record_kind(c) if c in (REC_MSGPACK, REC_RAW, REC_NDARRAY) else "" for c in range(REC_NDARRAY + 1)
)


def _as_bytes(payload: Payload) -> bytes:
    """A payload as get_bytes returns it (a bytes message comes as a 1-tuple, see extract)."""
    return bytes(payload[0]) if isinstance(payload, tuple) else bytes(payload)


class _Consuming(_QueueBase):
    """The consumer methods of ``Queue`` (a mixin: ``Queue`` is the only class built on it)."""

    _heal: Callable[[], None]  # Queue's: recover dead holders, then lost tokens
    # Messages this handle removed but a signal handler's exception kept from
    # the caller: (kind, payload) records, handed out first by the next get.
    _kept: list[tuple[int, Any]]

    def close(self) -> None:
        """Put back what this handle removed but never delivered (``_kept``), then close.

        A closed handle cannot deliver them, and dropping them would lose
        them: they go back into the queue, at its end (so after messages put
        since), if the producer lock is free now and they fit without
        waiting; otherwise they are dropped with a warning saying how many.
        """
        kept, self._kept = self.__dict__.get("_kept") or [], []
        if kept and not self._closed:
            batch = [self._kept_record(rec) for rec in kept]
            try:
                self._enter()
                try:
                    sent = self._head_lock.run(_monotonic() + _REQUEUE_GRACE, self._write, batch, 0.0)
                finally:
                    self._leave()
            except Exception as e:  # a lock this thread holds (close in a signal handler), say
                log.warning("%s: could not put back %d undelivered messages on close: %r",
                            self.path, len(kept), e)  # fmt: skip
            else:
                sent = 0 if sent is NOT_TAKEN else sent
                if sent < len(batch):
                    log.warning("%s: close dropped %d undelivered messages (no room to put them back)",
                                self.path, len(batch) - sent)  # fmt: skip
        super().close()

    def _kept_record(self, rec: tuple[int, Any]) -> Encoded:
        """A kept record as ``_write`` takes it."""
        kind, payload = rec
        if kind == _DECODED:
            if type(payload) is bytes:  # a raw record's data: get returns bytes either way
                return (REC_RAW, b"", payload, len(payload))
            return self._encode(payload)
        if type(payload) is tuple:  # a bytes message: encoded again as msgpack bin
            return self._encode(payload[0])
        data = bytes(payload)
        return (kind, b"", data, len(data))

    # -- consuming ---------------------------------------------------------------

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        """Remove and return the oldest message.

        Waits for one when ``block`` is true, for at most ``timeout`` seconds if
        given. Raises ``Empty`` when nothing arrived in time, ``CorruptBus`` if
        the record at the head of the queue is damaged.
        """
        if self._kept:
            return self._finish_kept(self._kept.pop(0))
        fast = self._fast
        spun = spin = 0.0
        if fast is not None:
            # (inline for the common call, get() with no arguments: ~80 ns of ~1200)
            spin = self.spin if block and timeout is None else self._spin_for(block, timeout)
            # What C handed out last belongs to an earlier get, which returned it or kept it:
            # forget it before the try below, or an exception that lands before this get's
            # C call would keep it again (a duplicate).
            fast.take_last()
        else:
            fast = None
        users = self._users
        users.append(None)  # (Bus._enter, inline: see there)
        try:  # (from the C call on: _keep takes back what C handed out)
            if self._closed:
                self._check_open()
            if fast is not None:
                # C: the whole get, decoding included, polling up to the spin first.
                got = fast.get_obj(self._part.tokens_index, spin)  # type: ignore[union-attr]
                if got is _NO_TOKEN:
                    spun = self._c_spun(spin)
                elif got is _HAS_TOKEN:  # not the common case: Python takes with the token
                    rec = self._take1(_deadline(block, timeout))
                    if rec is not None:
                        got = self._finish(*rec)
                        self._in_hand = []
                        return got
                elif type(got) is tuple:  # for Python to decode (a decoded message is never a tuple)
                    return self._finish(*got)
                else:
                    return got
                fast = None  # C handed nothing out: nothing of its to keep below
            kind, payload = self._get1(block, timeout, spun)
            got = self._finish(kind, payload)
        except BaseException as e:
            self._after_get_error(e, fast)
            raise
        finally:
            users.pop()  # (Bus._leave, inline)
            if not users and self._closed:
                self._release()
        self._in_hand = []
        return got

    def _after_get_error(self, exc: BaseException, fast: Any) -> None:
        """After a get that ``exc`` ended: keep what it took, unless ``exc`` is shmbus's own.

        shmbus's own (Empty, DecodeError...) spends what was taken; any other
        (a signal handler's, say) keeps it for the next get.
        """
        if isinstance(exc, ShmbusError):
            self._in_hand = []
        else:
            self._keep(fast)

    def _keep(self, fast: Any) -> None:
        """After an exception that was not ours in a get: keep what it removed, for the next get.

        CPython runs signal handlers right after a call returns, so a handler's
        exception can arrive just after C or ``_take`` removed messages: C
        keeps a reference to what it handed out (``take_last``), ``_take``
        lists its records in ``_in_hand``; both go to the front of ``_kept``.
        """
        kept = self._in_hand
        self._in_hand = []
        last = fast.take_last() if fast is not None else None
        if type(last) is list:  # take_many's records (take_many_obj's: some decoded)
            kept = [r if type(r) is tuple else (_DECODED, r) for r in last] + kept
        elif type(last) is tuple:  # a record for Python to decode
            kept.insert(0, last)
        elif last is not None:  # a decoded message, or a raw record's bytes
            kept.insert(0, (_DECODED, last))
        self._kept[:0] = kept

    def _spin_for(self, block: bool, timeout: float | None) -> float:
        """How long a get may poll before sleeping: the handle's spin, never past a shorter timeout."""
        spin = self.spin
        if timeout is None:
            return spin if block else 0.0
        check_timeout(timeout)  # refused before C takes a message
        return spin if block and timeout >= spin else 0.0

    def get_nowait(self) -> Any:
        """``get(block=False)``: raises ``Empty`` at once when the queue is empty."""
        return self.get(False)

    def get_bytes(self, block: bool = True, timeout: float | None = None) -> bytes:
        """Remove the oldest message and return its payload undecoded, as ``bytes``.

        For a message put with ``put_bytes`` (or a ``bytes`` message) that is
        the data itself; for any other message, its msgpack encoding.
        """
        if self._kept:
            return _as_bytes(self._kept_payload(self._kept.pop(0)))
        fast = self._fast
        spun = spin = 0.0
        if fast is not None:
            spin = self._spin_for(block, timeout)
            fast.take_last()  # an earlier get's (see get)
        else:
            fast = None
        self._enter()
        try:
            if fast is not None:
                recs, left = fast.take_many(self._part.tokens_index, 0, 1, spin)  # type: ignore[union-attr]
                if recs:  # a raw record's data, a bytes message's (in a 1-tuple), or msgpack
                    payload = recs[0][1]
                    return payload[0] if type(payload) is tuple else payload  # type: ignore[no-any-return]
                fast = None
                if left:  # not the common case: Python takes with the token
                    rec = self._take1(_deadline(block, timeout))
                    if rec is not None:
                        data = _as_bytes(rec[1])
                        self._in_hand = []
                        return data
                else:
                    spun = self._c_spun(spin)
            data = _as_bytes(self._get1(block, timeout, spun)[1])
        except BaseException as e:
            self._after_get_error(e, fast)
            raise
        finally:
            self._leave()
        self._in_hand = []
        return data

    def _finish_kept(self, rec: tuple[int, Any]) -> Any:
        """A kept record as get returns it."""
        return rec[1] if rec[0] == _DECODED else self._finish(*rec)

    def _kept_payload(self, rec: tuple[int, Any]) -> Payload:
        """The payload of a kept record (a decoded one is encoded again, as get_bytes returns msgpack)."""
        kind, payload = rec
        if kind != _DECODED:
            return payload  # type: ignore[no-any-return]
        return payload if type(payload) is bytes else self._codec.encode(payload)[1]

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
            if fast is not None:  # C takes with the token we hold
                recs, left = fast.take_many(part.tokens_index, 1, 1, 0.0)
                if recs:
                    self._in_hand = recs  # (take_many's own list: C's last, which _keep must not add twice)
                    return recs[0]  # type: ignore[no-any-return]
                if not left:
                    continue
            got = self._take1(deadline)
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
        if self._kept:
            kept, self._kept[:max_messages] = self._kept[:max_messages], []
            return [self._finish_kept(rec) for rec in kept]
        self._enter()
        try:
            return self._get_many(max_messages, block, timeout)
        finally:
            self._leave()

    def _get_many(self, max_messages: int, block: bool, timeout: float | None) -> list[Any]:
        deadline = self._begin(block, timeout)
        while True:
            fast = self._fast
            spin = 0.0
            if fast is not None:
                spin = self._spin_for(block, timeout)
                fast.take_last()  # an earlier get's (see get)
            else:
                fast = None
            try:
                some = self._take_some(fast, spin, max_messages, block, deadline)
                if some is None:
                    return []
                got, decoded = some
                if got or not block:
                    # (C decoded them all: its list is ours, and take_last forgets it)
                    msgs = fast.take_last() if decoded else self._codec.finish_many(got)
                    self._in_hand = []
                    return msgs
            except BaseException as e:
                self._after_get_error(e, fast)
                raise

    def _take_some(
        self, fast: Any, spin: float, max_messages: int, block: bool, deadline: float | None
    ) -> tuple[list[Any], bool] | None:
        """One round of get_many: ``(what was taken, maybe nothing; all decoded by C)``, or None
        when non-blocking found nothing.

        Records, and messages C decoded (``take_many_obj``): ``Codec.finish_many`` takes both.
        """
        part = self._part
        assert part is not None
        items = self._items
        k = 0
        if fast is not None:
            # C polls for the first token (up to the spin), takes more and the
            # common-case records; Python waits when there was none, and takes the rest.
            got, k, undecoded = fast.take_many_obj(part.tokens_index, 0, max_messages, spin)
            if not got and not k and block:
                # Spin for what C did not (as _get1), then sleep.
                rest = max(self.spin - self._c_spun(spin), 0.0)
                if not items.try_acquire() and not items.spin_acquire(deadline, rest, self._heal):
                    raise Empty(f"{self.path} is empty", path=self.path)
                got, k, undecoded = fast.take_many_obj(part.tokens_index, 1, max_messages, 0.0)
            # (a new list: C keeps its own for _keep, _take lists its own in _in_hand)
            if not k:
                return got, bool(got) and not undecoded
            try:
                return got + self._take(k, deadline), False
            except (Empty, BusClosed):  # the consumer lock did not come (in time): its tokens went back
                if got:
                    return got, False  # taken by C: delivered, not lost
                raise
        if block:
            if not items.try_acquire() and not items.spin_acquire(deadline, self.spin, self._heal):
                raise Empty(f"{self.path} is empty", path=self.path)
            k = 1
        try_acquire = items.try_acquire
        while k < max_messages and try_acquire():
            k += 1
        return (self._take(k, deadline), False) if k else None

    def _take1(self, deadline: float | None = None) -> tuple[int, Payload] | None:
        """``_take(1)`` with the common case inline (measured ~0.5 us of 2.5 per get).

        Holds one items token on entry. If anything interrupts it before the
        commit (a KeyboardInterrupt, say), the token goes back, so the
        message stays gettable; after the commit, the record is in ``_in_hand``.
        """
        h = self._h64
        tokens = self._part_tokens()
        h[tokens] = 1
        if _faults.armed:
            _faults.hit("get:after-token")
        try:
            got = self._tail_lock.run(deadline, self._take1_locked, tokens)
        except CorruptBus:
            got = None  # _take says what is wrong, and hands the token back
        except BaseException:  # BusClosed while waiting for the tail lock, say: nothing taken
            self._give_back_unused(tokens)
            raise
        if got is NOT_TAKEN:
            self._lock_timed_out(tokens, 1)
        if got is not None:
            return got  # type: ignore[return-value]
        taken = self._take(1, deadline)
        return taken[0] if taken else None

    def _give_back(self, tokens: int, k: int) -> None:
        """Post back ``k`` items tokens this handle holds unused, and record that it holds none."""
        for _ in range(k):
            self._items.release()
        self._h64[tokens] = 0

    def _give_back_unused(self, tokens: int) -> None:
        """Hand back the tokens still recorded after a take's lock wait raised: nothing used them.

        (BusClosed, a lock no death frees, a handler's exception.) The field
        is 0 once the locked part ran: that part commits or gives back itself.
        """
        k = self._h64[tokens]
        if k:
            self._give_back(tokens, min(k, self._cap // RECORD_SIZE))

    def _lock_timed_out(self, tokens: int, k: int) -> None:
        """The tail lock did not come before the deadline: hand the tokens back, raise ``Empty``."""
        self._give_back(tokens, k)
        raise Empty(
            f"{self.path}: no message in time (another consumer held the consumer lock)", path=self.path
        )

    def _take1_locked(self, tokens: int) -> tuple[int, Payload] | None:
        """Under the tail lock: take the record at tail if it is the common case, else None."""
        h = self._h64
        nxt = -1
        try:
            if _faults.armed:
                _faults.hit("get:after-lock")
            cap = self._cap
            tail = h[Q_TAIL]
            head = h[Q_HEAD]
            # The positions: _ring.check_positions inline, for a non-empty ring (its top bound
            # concerns writers); anything else goes the checked way, through _take.
            if not (
                tail < head <= tail + cap
                and not (head | tail) & 15
                and not self._h32[I_SPACE_WAITING]
                and self._slots is None
            ):
                return None
            start, kind, rseq, n, end = _ring.read(self._ring, cap, tail, head)
            seq = h[Q_TAIL_SEQ]
            if not rseq == seq < h[Q_NEXT_SEQ]:
                return None
            payload = extract(self._mm, self._ro + start % cap + RECORD_SIZE, n, kind)
            if _faults.armed:
                _faults.hit("get:after-copy")
            nxt = end
            self._commit_take(seq + 1, nxt, n, tokens, [(kind, payload)])
            return kind, payload
        except CorruptBus:
            raise  # read before any store: _take1 keeps the token for _take, which says what is wrong
        except BaseException:
            self._after_take_error(tokens, 1, nxt, [(kind, payload)] if nxt >= 0 else [])
            raise

    def _after_take_error(self, tokens: int, k: int, new_tail: int, recs: list[tuple[int, Payload]]) -> None:
        """Under the tail lock, after an exception: keep what was committed, or hand the tokens back.

        Whether the commit happened is read from the file (``tail`` moved to
        ``new_tail``), not from a Python flag an exception could have skipped.
        """
        h = self._h64
        if new_tail >= 0 and h[Q_TAIL] == new_tail:
            self._in_hand = recs
        else:  # nothing was consumed: every token goes back, so no message is stranded
            for _ in range(k):
                self._items.release()
        h[tokens] = 0

    def _part_tokens(self) -> int:
        """Index of our participant slot's tokens field (a scratch word when unclaimed)."""
        part = self._part
        assert part is not None
        return part.tokens_index or Q_SCRATCH  # a header word nobody reads

    def _take(self, k: int, deadline: float | None = None) -> list[tuple[int, Payload]]:
        """Copy out the ``k`` oldest records, for which ``k`` items tokens are held.

        Returns fewer when tokens outnumber records (a stray token, after a
        crash): those tokens are dropped, with a warning. The records are in
        ``_in_hand`` from their commit on.
        """
        h = self._h64
        tokens = self._part_tokens()
        h[tokens] = k
        if _faults.armed:
            _faults.hit("get:after-token")
        try:
            out = self._tail_lock.run(deadline, self._take_locked, tokens, k)
        except BaseException:  # BusClosed while waiting for the tail lock, say: nothing taken
            self._give_back_unused(tokens)
            raise
        if out is NOT_TAKEN:
            self._lock_timed_out(tokens, k)
        taken = len(out)  # type: ignore[arg-type]
        if self._slots is not None:
            for _ in range(taken):
                self._slots.release()
        if taken < k:
            log.warning("%s: %d items tokens had no record; dropped them", self.path, k - taken)
        return out  # type: ignore[return-value]

    def _tail_seq(self, tail: int, head: int) -> int:
        """Under the tail lock: ``tail_seq``, resynced first if the record at tail says otherwise.

        (A consumer interrupted between its two counter stores: the records carry the truth.)
        """
        h = self._h64
        seq = h[Q_TAIL_SEQ]
        if tail < head and _ring.read(self._ring, self._cap, tail, head)[2] != seq:
            log.warning("%s: tail_seq %d disagrees with the record at tail; resyncing", self.path, seq)
            self._resync(fix_next=False)
            seq = h[Q_TAIL_SEQ]
        return seq

    def _take_locked(self, tokens: int, k: int) -> list[tuple[int, Payload]]:
        h = self._h64
        out: list[tuple[int, Payload]] = []
        before = self._in_hand  # records an earlier step of this call committed (C's, say)
        taken = 0
        new_tail = -1
        try:
            if _faults.armed:
                _faults.hit("get:after-lock")
            ring, cap = self._ring, self._cap
            mm, ro = self._mm, self._ro
            tail = h[Q_TAIL]
            head = h[Q_HEAD]
            _ring.check_positions(head, tail, cap)
            seq = self._tail_seq(tail, head)
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
            new_tail = tail
            self._commit_take(seq, tail, nbytes, tokens, before + out)
        except BaseException:
            self._after_take_error(tokens, k, new_tail, before + out)
            raise
        return out

    def _commit_take(
        self, tail_seq: int, tail: int, nbytes: int, tokens: int, recs: list[tuple[int, Payload]] | None
    ) -> None:
        """The consumer commit, under the tail lock: the records up to ``tail`` are consumed.

        ``tail_seq`` first, then ``tail``, which makes it final: a consumer
        killed between the two leaves them apart, and the next holder resyncs
        ``tail_seq`` from the record at ``tail``. ``recs`` (the records copied
        out) are in ``_in_hand`` from then on. Statistics come after the
        commit (a consumer killed in between undercounts, never counts a
        message twice), then the tokens field is cleared (every token used)
        and a producer waiting for space is woken.
        """
        h = self._h64
        h[Q_TAIL_SEQ] = tail_seq
        if _faults.armed:
            _faults.hit("get:mid-commit")
        h[Q_TAIL] = tail
        if recs is not None:
            self._in_hand = recs
        h[Q_BYTES_OUT] = (h[Q_BYTES_OUT] + nbytes) & U64_MAX
        h[tokens] = 0
        if _faults.armed:
            _faults.hit("get:before-unlock")
        if self._h32[I_SPACE_WAITING]:
            self._h32[I_SPACE_WAITING] = 0
            self._space.release()

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
        self._enter()  # left when the block ends: close() waits for it
        try:
            return self._get_view(block, timeout)
        except BaseException:
            self._leave()
            raise

    def _get_view(self, block: bool, timeout: float | None) -> View:
        deadline = self._begin(block, timeout)
        items, h = self._items, self._h64
        if not items.try_acquire() and (not block or not items.spin_acquire(deadline, self.spin, self._heal)):
            raise Empty(f"{self.path} is empty", path=self.path)
        tokens = self._part_tokens()
        h[tokens] = 1
        lock = self._tail_lock
        try:
            if not lock.acquire(deadline):  # the timeout bounds the consumer lock's wait too
                raise Empty(f"{self.path}: no message in time (another consumer held the consumer lock)",
                            path=self.path)  # fmt: skip
            tail, head, cap = h[Q_TAIL], h[Q_HEAD], self._cap
            _ring.check_positions(head, tail, cap)
            start, kind, rseq, n, nxt = _ring.read(self._ring, cap, tail, head)
            if rseq != h[Q_TAIL_SEQ] or rseq >= h[Q_NEXT_SEQ]:
                raise self._bad_seq(start, rseq, h[Q_TAIL_SEQ], h[Q_NEXT_SEQ])
            a = start % cap + RECORD_SIZE
            got = extract_range(self._ring, a, n, kind)
            view = self._ring[got[0] : got[1]].toreadonly()

            def finish(consume: bool) -> None:
                try:
                    try:
                        if consume:
                            self._commit_take(rseq + 1, nxt, n, tokens, None)
                        else:
                            items.release()
                            h[tokens] = 0
                    except BaseException:
                        lock.abandon()  # cut short between two stores: the next holder resyncs
                        raise
                    lock.release()
                    if consume and self._slots is not None:
                        self._slots.release()
                finally:
                    self._leave()

            return self._track(View(view, view_kind(kind, got[2]), finish))
        except BaseException:  # nothing stored yet: only reads
            lock.release()
            items.release()
            h[tokens] = 0
            raise

    def get_records(self, max_records: int, block: bool = True, timeout: float | None = None) -> RecordBatch:
        """Up to ``max_records`` of the oldest messages as stored, in place, consumed only at the end.

        Use as ``with q.get_records(500) as batch:``; ``batch`` is a list of
        ``Record(seq, kind, data)``, ``data`` a read-only view into the ring
        (see ``Record``). Leaving the block normally consumes them all, an
        exception none; ``RecordBatch.consume(k)`` consumes exactly the
        first ``k``. Until then nothing is consumed: a process killed with
        the batch open leaves every record in the queue, under the same
        sequence number, for the next consumer. The consumer lock is held
        until the batch ends (other consumers wait), as with ``get_view``.

        Blocking: waits (up to ``timeout``) for the first message and returns
        1..max_records; non-blocking: raises ``Empty`` at once when there is
        none. Raises ``ValueError`` if ``max_records`` is below 1.
        """
        if max_records < 1:
            raise ValueError("max_records must be at least 1")
        self._enter()  # left when the batch ends: close() waits for it
        try:
            return self._get_records(max_records, block, timeout)
        except BaseException:
            self._leave()
            raise

    def _get_records(self, max_records: int, block: bool, timeout: float | None) -> RecordBatch:
        deadline = self._begin(block, timeout)
        items, h = self._items, self._h64
        if not items.try_acquire() and (not block or not items.spin_acquire(deadline, self.spin, self._heal)):
            raise Empty(f"{self.path} is empty", path=self.path)
        tokens = self._part_tokens()
        fast = self._fast
        if fast is not None:
            k = fast.take_tokens(tokens, 1, max_records)  # (C records k in the tokens field)
        else:
            k = 1
            more = items.try_acquire  # (bound once: one call per record taken)
            while k < max_records and more():
                k += 1
            h[tokens] = k
        lock = self._tail_lock
        try:
            if not lock.acquire(deadline):  # the timeout bounds the consumer lock's wait too
                raise Empty(f"{self.path}: no message in time (another consumer held the consumer lock)",
                            path=self.path)  # fmt: skip
            try:
                recs, ends, sizes = self._records_scan(fast, k)
            except BaseException:
                lock.release()
                raise
        except BaseException:  # nothing stored yet: only reads
            self._give_back(tokens, k)
            raise
        if len(recs) < k:  # stray tokens (a crash left them): dropped, as _take does
            log.warning("%s: %d items tokens had no record; dropped them", self.path, k - len(recs))
            h[tokens] = len(recs)
            if not recs:  # nothing to hand out: wait again, for what is left of the timeout
                lock.release()
                left = None if deadline is None else max(deadline - _monotonic(), 0.0)
                return self._get_records(max_records, block and left != 0.0, left)
        return self._track(RecordBatch(recs, self._records_finish(recs, ends, sizes, tokens)))

    def _records_scan(self, fast: Any, k: int) -> tuple[list[Record], Sequence[int], Sequence[int]]:
        """Under the tail lock: ``_records_locked``, its common case done by C when it is built.

        C reads the same records with the same checks, and gives anything else
        (bad positions, a damaged record, ``tail_seq`` to resync) back to Python.
        """
        if fast is not None:
            got = fast.scan_records(self._ring.toreadonly(), Record, _KIND_NAMES, k)
            if got is not None:
                recs, meta = got
                n = len(recs)
                words = memoryview(meta).cast("Q")  # the tail after each record, then the bytes so far
                return recs, words[:n], words[n:]
        return self._records_locked(k)

    def _records_locked(self, k: int) -> tuple[list[Record], list[int], list[int]]:
        """Under the tail lock: views of up to ``k`` records at tail, the tail after each, bytes so far."""
        h, ring, cap = self._h64, self._ring, self._cap
        tail, head = h[Q_TAIL], h[Q_HEAD]
        _ring.check_positions(head, tail, cap)
        seq = self._tail_seq(tail, head)
        last = h[Q_NEXT_SEQ]
        ro = ring.toreadonly()  # its slices are read-only too: one view per record, not two
        recs: list[Record] = []
        ends: list[int] = []
        lens: list[int] = []
        # (Locals bound once, and the tuple made without NamedTuple's Python-level __new__:
        # this loop runs per record, and the bridge takes thousands per call.)
        read, kind_of, new, add, add_end, add_len = _ring.read, record_kind, tuple.__new__, recs.append, \
            ends.append, lens.append  # fmt: skip
        for _ in range(k):
            if tail == head:
                break
            start, kind, rseq, n, tail = read(ring, cap, tail, head)
            if rseq != seq or rseq >= last:
                raise self._bad_seq(start, rseq, seq, last)
            a = start % cap + RECORD_SIZE
            add(new(Record, (rseq, kind_of(kind), ro[a : a + n])))
            add_end(tail)
            add_len(n)
            seq += 1
        return recs, ends, list(accumulate(lens))

    def _records_finish(
        self, recs: list[Record], ends: Sequence[int], sizes: Sequence[int], tokens: int
    ) -> Callable[[int], None]:
        """How a ``RecordBatch`` ends, under the tail lock it holds: consume its first ``n`` records."""
        h, items, lock = self._h64, self._items, self._tail_lock

        def finish(n: int) -> None:
            try:
                try:
                    # Unused tokens go back before the field says so: a death in between
                    # over-posts (harmless: a token without a record is dropped).
                    for _ in range(len(recs) - n):
                        items.release()
                    h[tokens] = n
                    if n:
                        self._commit_take(recs[n - 1].seq + 1, ends[n - 1], sizes[n - 1], tokens, None)
                    else:
                        h[tokens] = 0
                except BaseException:
                    lock.abandon()  # cut short between two stores: the next holder resyncs
                    raise
                lock.release()
                if self._slots is not None:
                    for _ in range(n):
                        self._slots.release()
            finally:
                self._leave()

        return finish

    # -- for callers that hold their tokens (the asyncio layer: ``_aio.QueueOps``) ----

    def _claim_slot(self) -> None:
        """Claim this handle's consumer slot unless it has one (running recovery first, as ``_begin``)."""
        self._enter()
        try:
            part = self._part
            assert part is not None
            if not part.me:
                part.claim(self.recover)
        finally:
            self._leave()

    def _take_held_one(self) -> Any:
        """With one items token in hand: the oldest message, decoded; ``NO_RECORD`` if the token had none.

        The token was taken without ``_take1``'s help (``try_acquire``, or by
        another thread); from here on it is ``_take1``'s, which hands it back
        if it is interrupted before the commit.
        """
        users = self._users
        users.append(None)  # (Bus._enter, inline as in get: the asyncio ready path)
        try:
            if self._closed:
                self._check_open()
            got = self._take1()
        finally:
            users.pop()  # (Bus._leave, inline)
            if not users and self._closed:
                self._release()
        if got is None:
            return NO_RECORD
        msg = self._finish(*got)
        self._in_hand = []
        return msg

    def _take_held(self, k: int) -> list[Any]:
        """With ``k`` items tokens in hand: up to ``k`` oldest messages, decoded ([]: the tokens had none)."""
        self._enter()
        try:
            got = self._take(k)
        finally:
            self._leave()
        if not got:
            return []
        msgs = self._codec.finish_many(got)
        self._in_hand = []
        return msgs
