"""The C fast path against pure Python on damaged and hostile queues (differential).

Two queues are built by the same calls: one handle uses the C path
(``shmbus/_cfast.c``), the other pure Python (``Queue._drop_fast_path``), and
their bytes and semaphore values are saved. Each hypothesis case restores both,
damages both alike (header counters, positions moved near 2**64, holder and
flag words, record headers, payload bytes, the ``items`` count), then runs the
same non-blocking ``get_nowait`` / ``get_many`` / ``get_records`` / ``put`` / ``put_many`` calls
on each. The C side must give what Python gives (the value, or the exception
type and its ``sent``) and leave the same state (counters, ring bytes, tokens
field, semaphore values). The one difference allowed: the C side refuses with a
shmbus error where Python went on, having changed nothing (it checks a little
more than Python's inlined single put: the alignment of the positions).

Then the bugs this file found, each as a plain test (see ``_cfast.c``).
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Iterator
from typing import Any, Callable

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import shmbus
from shmbus import _accel, _ring
from shmbus._format import (
    I_HEAD_REPAIR,
    I_SPACE_WAITING,
    I_TAIL_REPAIR,
    M_HEAD,
    M_TAIL,
    Q_BYTES_IN,
    Q_BYTES_OUT,
    Q_HEAD,
    Q_NEXT_SEQ,
    Q_TAIL,
    Q_TAIL_SEQ,
    Q_TIME_SAMPLES,
    RECORD_SIZE,
    TIME_SAMPLES,
)

pytestmark = [
    pytest.mark.skipif(not _accel.ENABLED, reason="no C fast path here: nothing to compare"),
    pytest.mark.timeout(120),
]

CAP = 4096
U64 = (1 << 64) - 1
P64 = 1 << 64
COUNTERS = (Q_HEAD, Q_NEXT_SEQ, Q_BYTES_IN, Q_TAIL, Q_TAIL_SEQ, Q_BYTES_OUT)
ROLES = ("items", "space")  # the locks are mutexes in the file: saved and restored with its bytes
# What the operations put: msgpack of several sizes, bytes (msgpack bin: Python copies
# those), an ndarray (kind 4: Python's too), and records too large to fit beside others.
OBJS: list[Any] = [
    0, -1, "s", "x" * 200, b"b" * 30, b"", {"k": [1, 2]}, [None, True, 2.5], "y" * 1500, b"z" * 3000,
    np.arange(7, dtype="<i4"),
]  # fmt: skip

# u64 values where sums overflow, and next_seq values that make a time sample due.
TOP_VALUES = [
    0, U64, 1 << 63, P64 - 16, P64 - 32, P64 - 2 * CAP - 16, P64 - 2 * CAP, P64 - 3 * CAP,
    (1 << 32) - 1, 255, 256 * 3 - 1,
]  # fmt: skip
# (kind, where, value): "u64"/"u32" store at a header word index, "shift" adds to both
# head and tail, "rec16"/"rec32"/"rec64"/"byte" store at a ring offset, "items" sets
# the semaphore's value.
# Lock words a damaged file may hold: OWNER_DIED alone (a dead holder), with a tid, with the
# waiters bit; a thread id no Linux hands out; all ones. (Not this thread's own id: see the report.)
LOCK_WORDS = [0x40000000, 0x40000000 | 12345, 0xC0000000, 0x3FFFFFF0, 0x80000000 | 0x3FFFFFF0, 0xFFFFFFFF]
Mutation = tuple[str, int, int]
Op = tuple[str, Any]
Outcome = tuple[str, Any]


# -- the pair of queues ------------------------------------------------------------------


def _live_records(q: shmbus.Queue) -> list[int]:
    """Ring offsets of every record and wrap marker header between tail and head."""
    h, cap = q._h64, q.capacity
    tail, head = h[Q_TAIL], h[Q_HEAD]
    out = []
    while tail < head:
        start, _, _, _, nxt = _ring.read(q._ring, cap, tail, head)
        if start != tail:
            out.append(tail % cap)
        out.append(start % cap)
        tail = nxt
    return out


def _build(q: shmbus.Queue) -> None:
    """Seven live messages of every kind, with a wrap marker among them (same calls, same bytes)."""
    for _ in range(16):  # head to 3584 of 4096: the messages below wrap
        q.put_bytes(b"f" * 200)
        assert q.get_nowait() == b"f" * 200
    q.put({"i": 1, "name": "abc"})
    q.put("s" * 100)
    q.put(b"x" * 60)
    q.put_bytes(b"r" * 40)
    q.put(np.arange(6, dtype="<i4"))
    q.put_many([12345, [1, 2, None], {"k": "v" * 300}])


class Pair:
    """The C handle and the Python handle, and how to put both back as they were."""

    def __init__(self, names: tuple[str, str]) -> None:
        self.c = shmbus.Queue.create(names[0], capacity=CAP)
        self.py = shmbus.Queue.create(names[1], capacity=CAP)
        self.py._drop_fast_path()
        assert self.c._fast is not None and self.py._fast is None
        for q in (self.c, self.py):
            _build(q)
        self.saved = {id(q): (bytes(q._mm), {r: q._sems[r].value for r in ROLES}) for q in self.both}
        assert _state(self.c) == _state(self.py), "the two paths built different queues"
        self.records = _live_records(self.c)
        ring = self.c._ring
        assert any(struct.unpack_from("<H", ring, r + 4)[0] == 3 for r in self.records), "no wrap marker"

    @property
    def both(self) -> tuple[shmbus.Queue, shmbus.Queue]:
        return self.c, self.py

    def restore(self) -> None:
        for q in self.both:
            data, sems = self.saved[id(q)]
            q._mm[:] = data
            for role, value in sems.items():
                _set_sem(q, role, value)

    def close(self) -> None:
        for q in self.both:
            q.close()


@pytest.fixture
def pair(bus_name: str) -> Iterator[Pair]:
    names = (bus_name, bus_name + "-py")  # the fixture removes the first; the second is ours
    p = None
    try:
        p = Pair(names)
        yield p
    finally:
        if p is not None:
            p.close()
        with contextlib.suppress(shmbus.BusNotFound):
            shmbus.unlink(names[1])


def _set_sem(q: shmbus.Queue, role: str, value: int) -> None:
    sem = q._sems[role]
    while sem.try_acquire():
        pass
    for _ in range(value):
        sem.release()


def _state(q: shmbus.Queue) -> tuple[object, ...]:
    """What the paths must leave alike: counters, tokens field, flag, holders, sample seqs, ring, semaphores.

    Not the release counters (the C path may take a lock once more, handing back)
    nor the times of the time samples.
    """
    h, h32 = q._h64, q._h32
    assert q._part is not None
    words = [h[i] for i in COUNTERS] + [h[q._part.tokens_index]]
    words += [h[Q_TIME_SAMPLES + 2 * i] for i in range(TIME_SAMPLES)]
    words32 = [h32[i] for i in (I_HEAD_REPAIR, I_TAIL_REPAIR, I_SPACE_WAITING)]
    locks = [lk.mutex.word() for lk in q._locks]  # both paths leave every lock as the other does
    return words, words32, locks, {r: q._sems[r].value for r in ROLES}, bytes(q._ring)


def _mutate(q: shmbus.Queue, muts: list[Mutation]) -> None:
    h, h32, ring = q._h64, q._h32, q._ring
    for kind, where, value in muts:
        if kind == "u64":
            h[where] = value
        elif kind == "u32":
            h32[where] = value
        elif kind == "shift":
            h[Q_HEAD] = (h[Q_HEAD] + value) & U64
            h[Q_TAIL] = (h[Q_TAIL] + value) & U64
        elif kind == "items":
            _set_sem(q, "items", value)
        else:
            fmt = {"rec16": "<H", "rec32": "<I", "rec64": "<Q", "byte": "<B"}[kind]
            struct.pack_into(fmt, ring, where, value)


# -- running one operation on both ---------------------------------------------------------


def _norm(v: Any) -> Any:
    """A comparable form of a result: arrays by dtype, shape and bytes."""
    if isinstance(v, np.ndarray):
        return ("ndarray", v.dtype.str, v.shape, v.tobytes())
    if isinstance(v, list):
        return [_norm(x) for x in v]
    return v


def _run(q: shmbus.Queue, op: Op) -> Outcome:
    name, arg = op
    calls: dict[str, Callable[[], Any]] = {
        "get_nowait": q.get_nowait,
        "get": lambda: q.get(timeout=arg),  # the C path spins first (up to the handle's 50 us)
        "get_many": lambda: q.get_many(arg, block=False),
        "put": lambda: q.put(arg, block=False),
        "put_many": lambda: q.put_many(arg, block=False),
        "get_records": lambda: _records(q, *arg),
    }
    try:
        return "ok", _norm(calls[name]())
    except shmbus.DecodeError as e:
        return "DecodeError", _norm(e.decoded)
    except shmbus.ShmbusError as e:
        return type(e).__name__, getattr(e, "sent", None)


def _records(q: shmbus.Queue, k: int, consume: int | None) -> list[tuple[int, str, bytes]]:
    """A ``get_records(k)`` batch as seen (copied), ended consuming its first ``consume`` (None: all)."""
    batch = q.get_records(k, block=False)
    seen = [(rec.seq, rec.kind, bytes(rec.data)) for rec in batch]
    batch.consume(None if consume is None else min(consume, len(batch)))
    return seen


def _compare(pair: Pair, ops: list[Op]) -> list[Outcome]:
    """Run ``ops`` on both in turn; fail on any difference but an allowed refusal (which ends the run)."""
    outs = []
    for op in ops:
        before = _state(pair.c)
        c = _run(pair.c, op)
        py = _run(pair.py, op)
        after = _state(pair.c)
        if c != py or after != _state(pair.py):
            # Allowed: C refused (a shmbus error) with nothing changed, where Python did something.
            assert c[0] != "ok", f"{op}: C gave {c!r}, Python {py!r}"
            # (The repair words aside: the next taker of a lock marked for repair clears it.)
            assert after[0] == before[0] and after[1][2] == before[1][2] and after[2:] == before[2:], (
                f"{op}: C raised {c[0]} after changing the queue (Python: {py!r})"
            )
            outs.append(("refused", c[0]))
            break
        outs.append(c)
    return outs


# -- the damage ------------------------------------------------------------------------------


def _u64(draw: Callable[[st.SearchStrategy[Any]], Any], cur: int, others: list[int]) -> int:
    choice = draw(st.integers(0, 5))
    if choice == 0:
        return (cur + draw(st.sampled_from([1, -1, 8, 16, -16, CAP, -CAP, 2 * CAP, -16 * 7]))) & U64
    if choice == 1:  # the top of the range, where sums overflow
        return draw(st.sampled_from(TOP_VALUES))
    if choice == 2:
        return int(draw(st.sampled_from(others)))
    if choice == 3:
        return int(draw(st.integers(0, 4 * CAP)))
    return int(draw(st.integers(0, U64)))


@st.composite
def mutations(draw: st.DrawFn, pair: Pair) -> list[Mutation]:
    # From the saved bytes, not the live queue (which the last example left as it left it):
    # the same draws must give the same case when hypothesis replays them.
    data, lay = pair.saved[id(pair.c)][0], pair.c.layout
    h, ring = memoryview(data).cast("Q"), memoryview(data)[lay.ring_offset :]
    out: list[Mutation] = []
    for _ in range(draw(st.integers(0, 3))):
        what = draw(st.integers(0, 6))
        if what == 0:
            word = draw(st.sampled_from(COUNTERS))
            out.append(("u64", word, _u64(draw, h[word], [h[i] for i in COUNTERS])))
        elif what == 1:  # both positions near 2**64 (or anywhere), ring offsets kept
            base = draw(st.sampled_from([P64 - CAP, P64 - 2 * CAP, P64 - 3 * CAP, P64 - 4 * CAP, 1 << 63]))
            out.append(("shift", 0, base))
        elif what == 2:
            if draw(st.booleans()):
                word = draw(st.sampled_from([I_SPACE_WAITING, I_HEAD_REPAIR, I_TAIL_REPAIR]))
                out.append(("u32", word, draw(st.sampled_from([0, 1, 2, (1 << 32) - 1]))))
            else:  # a lock's futex word: left by a dead holder, or naming a thread that does not exist
                word = draw(st.sampled_from([M_HEAD // 4, M_TAIL // 4]))
                out.append(("u32", word, draw(st.sampled_from(LOCK_WORDS))))
        elif what in (3, 4):  # a record header: length, kind, state or seq
            rec = draw(st.sampled_from(pair.records))
            field = draw(st.integers(0, 3))
            if field == 0:
                cur = struct.unpack_from("<I", ring, rec)[0]
                v = draw(st.sampled_from([cur + 1, cur + 16, max(cur - 1, 0), 0, CAP - 16, CAP,
                                          (1 << 32) - 1, (1 << 32) - 16]))  # fmt: skip
                out.append(("rec32", rec, v & 0xFFFFFFFF))
            elif field in (1, 2):
                out.append(("rec16", rec + 2 + 2 * field, draw(st.sampled_from([0, 1, 2, 3, 4, 5, 0xFFFF]))))
            else:
                cur = struct.unpack_from("<Q", ring, rec + 8)[0]
                v = draw(st.sampled_from([cur + 1, (cur - 1) & U64, 0, U64, cur + 2]))
                out.append(("rec64", rec + 8, v & U64))
        elif what == 5:  # a payload's first byte (msgpack bin or not), or any byte
            rec = draw(st.sampled_from(pair.records))
            at = draw(st.sampled_from([rec + RECORD_SIZE, draw(st.integers(0, CAP - 1))]))
            out.append(("byte", at, draw(st.sampled_from([0xC4, 0xC5, 0xC6, 0x00, 0x91, 0xFF]))))
        else:  # stray or missing items tokens
            out.append(("items", 0, draw(st.integers(0, 12))))
    return out


OPS = st.one_of(
    st.just(("get_nowait", None)),
    st.tuples(st.just("get"), st.sampled_from([0.0, 0.002])),
    st.tuples(st.just("get_many"), st.integers(1, 12)),
    st.tuples(st.just("put"), st.sampled_from(OBJS)),
    st.tuples(st.just("put_many"), st.lists(st.sampled_from(OBJS), min_size=1, max_size=6)),
    st.tuples(st.just("get_records"), st.tuples(st.integers(1, 12), st.sampled_from([None, 0, 2]))),
)


def test_the_pair_starts_alike_and_both_paths_read_it_whole(pair: Pair) -> None:
    want = [{"i": 1, "name": "abc"}, "s" * 100, b"x" * 60, b"r" * 40,
            _norm(np.arange(6, dtype="<i4")), 12345, [1, 2, None], {"k": "v" * 300}]  # fmt: skip
    assert _compare(pair, [("get_nowait", None), ("get_many", 12)]) == [
        ("ok", want[0]), ("ok", want[1:])
    ]  # fmt: skip
    pair.restore()
    assert _compare(pair, [("get_many", 3), ("put_many", ["a", b"b"]), ("get_many", 12)])[-1] == (
        "ok", [*want[3:], "a", b"b"]
    )  # fmt: skip


def test_c_and_python_agree_on_damaged_queues(pair: Pair) -> None:
    seen: dict[str, int] = {}

    # One pair for every example (built once: creating queues is the slow part); each restores it.
    @settings(max_examples=1000, deadline=None, database=None)
    @given(muts=mutations(pair), ops=st.lists(OPS, min_size=1, max_size=3))
    def case(muts: list[Mutation], ops: list[Op]) -> None:
        pair.restore()
        for q in pair.both:
            _mutate(q, muts)
        assert _state(pair.c) == _state(pair.py)
        outs = _compare(pair, ops)
        assert outs and len(outs) <= len(ops)
        for kind, _ in outs:
            seen[kind] = seen.get(kind, 0) + 1

    case()
    # Worth little unless the damage gives values and errors alike.
    for kind in ("ok", "CorruptBus", "Empty", "Full"):
        assert seen.get(kind, 0) >= 5, seen


# -- the bugs, one by one ------------------------------------------------------------------------


def _claimed(q: shmbus.Queue) -> shmbus.Queue:
    """The handle with its participant slot (the C path does nothing for an unclaimed one)."""
    assert q._part is not None
    q._part.claim(q.recover)
    return q


@pytest.mark.parametrize("pure", [False, True], ids=["c", "python"])
def test_get_many_on_a_damaged_record_consumes_none_of_the_good_ones_before_it(
    bus_name: str, pure: bool
) -> None:
    with _claimed(shmbus.Queue.create(bus_name, capacity=CAP)) as q:
        if pure:
            q._drop_fast_path()
        q.put_many([1, 2, 3])  # records of one byte: 32 bytes each
        struct.pack_into("<H", q._ring, 32 + 6, 7)  # the second's state
        for _ in range(2):
            with pytest.raises(shmbus.CorruptBus, match="state 7"):
                q.get_many(3, block=False)
            assert q.qsize() == 3 and q._h64[Q_TAIL] == 0 and q._sems["items"].value == 3
        assert q.get_nowait() == 1  # a single get still takes the good one
        q.unlink()


@pytest.mark.parametrize("pure", [False, True], ids=["c", "python"])
def test_put_many_whose_whole_batch_would_pass_the_top_writes_nothing(bus_name: str, pure: bool) -> None:
    with _claimed(shmbus.Queue.create(bus_name, capacity=CAP)) as q:
        if pure:
            q._drop_fast_path()
        h = q._h64
        h[Q_HEAD] = h[Q_TAIL] = P64 - 3 * CAP  # fits the ring's start; 2 * the batch passes the top
        batch = [b"x" * 100] * 20  # 20 spans of 128: one ring's worth at most
        with pytest.raises(shmbus.CorruptBus, match=r"2\*\*64"):
            q.put_many(batch, block=False)
        assert h[Q_HEAD] == P64 - 3 * CAP and h[Q_NEXT_SEQ] == 0 and q._sems["items"].value == 0
        q.put_many(batch[:2], block=False)  # a small batch still goes in
        assert q.get_many(4, block=False) == batch[:2]
        q.unlink()


@pytest.mark.parametrize("pure", [False, True], ids=["c", "python"])
def test_get_many_refuses_positions_past_the_top_as_python_does(bus_name: str, pure: bool) -> None:
    with _claimed(shmbus.Queue.create(bus_name, capacity=CAP)) as q:
        if pure:
            q._drop_fast_path()
        q.put_many([1, 2])
        h = q._h64
        h[Q_HEAD] += P64 - CAP  # same ring offsets, within one ring of 2**64
        h[Q_TAIL] += P64 - CAP
        with pytest.raises(shmbus.CorruptBus, match=r"2\*\*64"):
            q.get_many(2, block=False)
        assert q.qsize() == 2 and q._sems["items"].value == 2
        q.unlink()


def test_take_many_hands_back_the_token_it_was_given_when_it_raises(bus_name: str) -> None:
    with _claimed(shmbus.Queue.create(bus_name, capacity=CAP)) as q:
        q.put("m")
        items, fast, part = q._sems["items"], q._fast, q._part
        assert fast is not None and part is not None
        assert items.try_acquire()  # the token a blocking get_many waited for
        with pytest.raises(TypeError):
            fast.take_many("not an index", 1, 1, 0.0)  # (tokens_index, have, max, spin)
        assert items.value == 1 and q._h64[part.tokens_index] == 0
        assert q.get_nowait() == "m"
        q.unlink()


@pytest.mark.parametrize("lock_word", [0, 0x40000000], ids=["free", "dead-holder"])
def test_a_misaligned_head_is_refused_alike_by_every_single_put(pair: Pair, lock_word: int) -> None:
    """C, and Python's inline single put, check alignment as _ring.check_positions does.

    With the head lock left by a dead holder, the C handle hands back to the
    Python path that repairs it (not the inline one): both must refuse alike.
    """
    muts: list[Mutation] = [("u64", Q_HEAD, pair.c._h64[Q_HEAD] + 8), ("u32", M_HEAD // 4, lock_word)]
    for q in pair.both:
        _mutate(q, muts)
    assert _compare(pair, [("put", 5)]) == [("CorruptBus", None)]


# -- a ring past the hot window: the early wrap and large-ring arithmetic ------------------------

BIG_CAP = 2 * _ring.HOT_WINDOW  # room past the hot window, where a record wraps early
BIG = 60_000  # a large message: about 70 of them take head past the hot window
BIG_OBJS: list[Any] = [b"b" * BIG, "s" * BIG, {"k": "v" * 30_000}, 7, "x" * 3000, b""]
# Where both positions start (an empty ring): at the start, just short of and past the
# hot window, near the ring's end, and near 2**64 at the same ring offsets.
BIG_STARTS = [0, _ring.HOT_WINDOW - 2 * BIG, _ring.HOT_WINDOW + 16, BIG_CAP - BIG - 4096,
              P64 - 3 * BIG_CAP + _ring.HOT_WINDOW - 16, P64 - 2 * BIG_CAP - 16 * 1000]  # fmt: skip


class BigPair(Pair):
    """A C handle and a Python handle on empty rings of BIG_CAP bytes."""

    def __init__(self, names: tuple[str, str]) -> None:
        self.c = _claimed(shmbus.Queue.create(names[0], capacity=BIG_CAP))
        self.py = _claimed(shmbus.Queue.create(names[1], capacity=BIG_CAP))
        self.py._drop_fast_path()
        assert self.c._fast is not None and self.py._fast is None
        self.saved = {id(q): (bytes(q._mm), {r: q._sems[r].value for r in ROLES}) for q in self.both}

    def start_at(self, pos: int) -> None:
        """Both rings empty, with head = tail = pos (and the sequence numbers alike)."""
        self.restore()
        for q in self.both:
            h = q._h64
            h[Q_HEAD] = h[Q_TAIL] = pos
            h[Q_NEXT_SEQ] = h[Q_TAIL_SEQ] = 1000


@pytest.fixture
def big_pair(bus_name: str) -> Iterator[BigPair]:
    names = (bus_name, bus_name + "-py")
    p = None
    try:
        p = BigPair(names)
        yield p
    finally:
        if p is not None:
            p.close()
        with contextlib.suppress(shmbus.BusNotFound):
            shmbus.unlink(names[1])


def test_a_consumer_keeping_up_past_the_hot_window_wraps_early_alike(big_pair: BigPair) -> None:
    pair, cap, early = big_pair, BIG_CAP, []
    span = _ring.record_span(BIG + 5)  # both kinds of message: a 5-byte msgpack header
    pair.start_at(0)
    for i in range(2 * _ring.HOT_WINDOW // BIG):
        obj = BIG_OBJS[i % 2]
        head = pair.c._h64[Q_HEAD]
        assert _compare(pair, [("put", obj), ("get_nowait", None)]) == [("ok", None), ("ok", obj)]
        if pair.c._h64[Q_HEAD] - head != span:  # the record went to the ring's start
            assert head % cap + span <= cap, "it fitted before the end: only an early wrap moves it"
            early.append(head % cap)
    # The branch this test is for: the ring holds one message at a time, so the first
    # put at HOT_WINDOW or more into the ring goes back to its start, and only that one.
    assert len(early) >= 1 and all(_ring.HOT_WINDOW <= at < _ring.HOT_WINDOW + span for at in early), early


def test_c_and_python_agree_on_a_large_ring(big_pair: BigPair) -> None:
    seen: dict[str, int] = {}
    ops = st.one_of(
        st.tuples(st.just("put"), st.sampled_from(BIG_OBJS)),
        st.tuples(st.just("put_many"), st.lists(st.sampled_from(BIG_OBJS), min_size=1, max_size=4)),
        st.just(("get_nowait", None)),
        st.tuples(st.just("get_many"), st.integers(1, 6)),
    )

    @settings(max_examples=40, deadline=None, database=None)
    @given(start=st.sampled_from(BIG_STARTS), ops=st.lists(ops, min_size=1, max_size=12))
    def case(start: int, ops: list[Op]) -> None:
        big_pair.start_at(start)
        assert _state(big_pair.c) == _state(big_pair.py)
        for kind, _ in _compare(big_pair, ops):
            seen[kind] = seen.get(kind, 0) + 1

    case()
    assert seen.get("ok", 0) >= 20, seen
