"""The Topic's C fast path against pure Python on damaged and hostile topics (differential).

Two topics are built by the same calls, each with a subscription that fell
behind: one handle publishes and reads through C (``FastTopic``), the other in
pure Python (``Topic._drop_fast_path`` before subscribing). Each hypothesis
case restores both (bytes and the subscription's state), damages both alike
(header counters, positions moved near 2**64, lock words, record headers,
payload bytes, the subscription's cursor), then runs the same publish and read
calls on each. The C side must give what Python gives (the value, or the
exception type) and leave the same state (counters, ring bytes, the slot, the
subscription's attributes). A batch C ends at a record it leaves to Python
(an ndarray) goes on in Python, decoded as one, so batches end and fail where
Python's do; a ``get_many`` is still compared as a drain (calls until none is
left). One difference is allowed: where Python raises CorruptBus in the middle
of a batch (losing the ones it had copied), C has handed out those it read
before the record it left to Python; the next call raises.

Then: the C path is the one used; lapped subscribers; a writer wrapping the
ring in another process while the reader copies; the crash steps of a publish
reached from C with the state Python has there.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import struct
import sys
from collections.abc import Iterator
from typing import Any, Callable

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import shmbus
from shmbus import _accel, _faults, _ring
from shmbus._format import (
    I_HEAD_REPAIR,
    M_HEAD,
    Q_BYTES_IN,
    Q_HEAD,
    Q_NEXT_SEQ,
    Q_TAIL,
    Q_TAIL_SEQ,
    Q_TIME_SAMPLES,
    RECORD_SIZE,
    S_CURSOR,
    S_LOST,
    S_NEXT_SEQ,
    S_RECEIVED,
    TIME_SAMPLES,
)

pytestmark = [
    pytest.mark.skipif(not _accel.ENABLED, reason="no C fast path here: nothing to compare"),
    pytest.mark.timeout(180),
]

CAP = 4096
U64 = (1 << 64) - 1
P64 = 1 << 64
COUNTERS = (Q_HEAD, Q_NEXT_SEQ, Q_BYTES_IN, Q_TAIL, Q_TAIL_SEQ)
SUB_WORDS = (S_CURSOR, S_NEXT_SEQ, S_LOST, S_RECEIVED)
SUB_ATTRS = ("_cursor", "_next", "lost", "received")
OBJS: list[Any] = [
    0, "s", "x" * 200, b"b" * 30, {"k": [1, 2]}, [None, True, 2.5], "y" * 1500, np.arange(5, dtype="<i4"),
]  # fmt: skip
TOP_VALUES = [0, U64, 1 << 63, P64 - 16, P64 - 2 * CAP, P64 - 3 * CAP, 255, 256 * 3 - 1]
LOCK_WORDS = [0x40000000, 0x40000000 | 12345, 0x3FFFFFF0, 0xFFFFFFFF]
Mutation = tuple[str, int, int]
Op = tuple[str, Any]
Outcome = tuple[str, Any]


def _records(t: shmbus.Topic) -> list[int]:
    """Ring offsets of every record and wrap marker header between tail and head."""
    h, cap = t._h64, t.capacity
    tail, head = h[Q_TAIL], h[Q_HEAD]
    out = []
    while tail < head:
        start, _, _, _, nxt = _ring.read(t._ring, cap, tail, head)
        if start != tail:
            out.append(tail % cap)
        out.append(start % cap)
        tail = nxt
    return out


def _build(t: shmbus.Topic) -> shmbus.Subscription:
    """A ring that wrapped and evicted, holding messages of every kind; a subscription behind them."""
    sub = t.subscribe("earliest")
    for i in range(30):
        t.publish_bytes(bytes([i]) * 200)  # laps the ring: the subscription lost the first ones
    t.publish({"i": 1, "name": "abc"})
    t.publish("s" * 100)
    t.publish(b"x" * 60)
    t.publish_bytes(b"r" * 40)
    t.publish(np.arange(6, dtype="<i4"))
    t.publish_many([12345, [1, 2, None], {"k": "v" * 300}])
    assert sub.get_many(3, block=False)
    return sub


class Pair:
    """The C topic and the Python topic with their subscriptions, and how to put both back."""

    def __init__(self, names: tuple[str, str]) -> None:
        self.c = shmbus.Topic.create(names[0], capacity=CAP)
        self.py = shmbus.Topic.create(names[1], capacity=CAP)
        self.py._drop_fast_path()  # before subscribing: its subscription's door has no C reader
        self.subs = {id(t): _build(t) for t in self.both}
        assert self.c._fast is not None and self.sub(self.c)._door.fast is not None
        assert self.sub(self.py)._door.fast is None
        self.saved = {id(t): (bytes(t._mm), _sub_attrs(self.sub(t))) for t in self.both}
        assert _state(self, self.c) == _state(self, self.py), "the two paths built different topics"
        self.records = _records(self.c)
        ring = self.c._ring
        assert any(struct.unpack_from("<H", ring, r + 4)[0] == 3 for r in self.records), "no wrap marker"

    @property
    def both(self) -> tuple[shmbus.Topic, shmbus.Topic]:
        return self.c, self.py

    def sub(self, t: shmbus.Topic) -> shmbus.Subscription:
        return self.subs[id(t)]

    def restore(self) -> None:
        for t in self.both:
            data, attrs = self.saved[id(t)]
            t._mm[:] = data
            for name, value in zip(SUB_ATTRS, attrs):
                setattr(self.sub(t), name, value)

    def close(self) -> None:
        for t in self.both:
            t.close()


def _sub_attrs(sub: shmbus.Subscription) -> tuple[int, ...]:
    return tuple(getattr(sub, name) for name in SUB_ATTRS)


def _state(pair: Pair, t: shmbus.Topic, drained: bool = False) -> tuple[object, ...]:
    """What the paths must leave alike: counters, samples, lock words, ring, the slot, the attributes.

    After a drain, not the cursor saved in the slot: it is saved only by a call
    that hands something out, and C ends a batch at a record it leaves to
    Python, so a cursor moved past old records at the end of a drain may be
    saved by one path and only kept in the attribute (compared) by the other.
    """
    h, sub = t._h64, pair.sub(t)
    words = [h[i] for i in COUNTERS] + [h[Q_TIME_SAMPLES + 2 * i] for i in range(TIME_SAMPLES)]
    slot = [h[sub._base + i] for i in SUB_WORDS[drained:]]
    locks = [lk.mutex.word() for lk in t._locks]
    return words, t._h32[I_HEAD_REPAIR], locks, slot, _sub_attrs(sub), bytes(t._ring)


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


def _mutate(pair: Pair, t: shmbus.Topic, muts: list[Mutation]) -> None:
    h, h32, ring, sub = t._h64, t._h32, t._ring, pair.sub(t)
    for kind, where, value in muts:
        if kind == "u64":
            h[where] = value
        elif kind == "u32":
            h32[where] = value
        elif kind == "shift":
            h[Q_HEAD] = (h[Q_HEAD] + value) & U64
            h[Q_TAIL] = (h[Q_TAIL] + value) & U64
        elif kind == "attr":
            setattr(sub, SUB_ATTRS[where], value)
        else:
            fmt = {"rec16": "<H", "rec32": "<I", "rec64": "<Q", "byte": "<B"}[kind]
            struct.pack_into(fmt, ring, where, value)


# -- running one operation on both ---------------------------------------------------------


def _norm(v: Any) -> Any:
    """A comparable form of a result (arrays by dtype, shape and bytes), short to print."""
    if isinstance(v, np.ndarray):
        return ("ndarray", v.dtype.str, v.shape, v.tobytes())
    if isinstance(v, list):
        return [_norm(x) for x in v]
    if isinstance(v, (bytes, str)) and len(v) > 8:
        return (type(v).__name__, v[:4], len(v), hash(v))
    return v


def _drain(sub: shmbus.Subscription, k: int) -> list[Any]:
    out: list[Any] = []
    for _ in range(CAP // 16):  # (a ring holds no more records than that)
        try:
            got = sub.get_many(k, block=False)
        except shmbus.ShmbusError as e:
            e.drained = out  # type: ignore[attr-defined]
            raise
        if not got:
            break
        out += got
    return out


def _run(pair: Pair, t: shmbus.Topic, op: Op) -> Outcome:
    name, arg = op
    sub = pair.sub(t)
    calls: dict[str, Callable[[], Any]] = {
        "publish": lambda: t.publish(arg),
        "publish_many": lambda: t.publish_many(arg),
        "publish_bytes": lambda: t.publish_bytes(arg),
        "get_nowait": sub.get_nowait,
        "get": lambda: sub.get(timeout=arg),  # C polls first (up to the subscription's spin)
        "get_bytes": lambda: sub.get_bytes(block=False),
        "drain": lambda: _drain(sub, arg),
    }
    try:
        return "ok", _norm(calls[name]())
    except shmbus.DecodeError as e:  # (a drain: what it handed out before, then the batch's good ones)
        return "DecodeError", _norm(getattr(e, "drained", []) + e.decoded)
    except shmbus.ShmbusError as e:
        return type(e).__name__, _norm(getattr(e, "drained", None))


def _compare(pair: Pair, ops: list[Op]) -> list[Outcome]:
    """Run ``ops`` on both in turn; fail on any difference (see the module docstring for the one allowed)."""
    outs = []
    for op in ops:
        c = _run(pair, pair.c, op)
        py = _run(pair, pair.py, op)
        # (Where Python raises CorruptBus past a record it copied, C hands that one out: it may not decode.)
        same_error = c[0] == py[0] or (c[0], py[0]) == ("DecodeError", "CorruptBus")
        if op[0] == "drain" and "ok" not in (c[0], py[0]) and same_error:
            # Python raised in the middle of a batch, losing what it had copied: C handed those
            # out (or, for a DecodeError, the batches end elsewhere): the states differ from here.
            n = min(len(c[1]), len(py[1]))
            assert py[1][:n] == c[1][:n], f"{op}: C gave {c!r}, Python {py!r}"
            outs.append(c)
            break
        assert c == py, f"{op}: C gave {c!r}, Python {py!r}"
        drained = op[0] == "drain"
        assert _state(pair, pair.c, drained) == _state(pair, pair.py, drained), f"{op}: the states differ"
        outs.append(c)
    return outs


# -- the damage ------------------------------------------------------------------------------


def _u64(draw: Callable[[st.SearchStrategy[Any]], Any], cur: int, others: list[int]) -> int:
    choice = draw(st.integers(0, 4))
    if choice == 0:
        return (cur + draw(st.sampled_from([1, -1, 8, 16, -16, CAP, -CAP, 2 * CAP, -16 * 7]))) & U64
    if choice == 1:
        return draw(st.sampled_from(TOP_VALUES))
    if choice == 2:
        return int(draw(st.sampled_from(others)))
    if choice == 3:
        return int(draw(st.integers(0, 16 * CAP)))
    return int(draw(st.integers(0, U64)))


@st.composite
def mutations(draw: st.DrawFn, pair: Pair) -> list[Mutation]:
    data, attrs = pair.saved[id(pair.c)]
    h, ring = memoryview(data).cast("Q"), memoryview(data)[pair.c.layout.ring_offset :]
    out: list[Mutation] = []
    for _ in range(draw(st.integers(0, 3))):
        what = draw(st.integers(0, 6))
        if what == 0:
            word = draw(st.sampled_from(COUNTERS))
            out.append(("u64", word, _u64(draw, h[word], [h[i] for i in COUNTERS])))
        elif what == 1:
            base = draw(st.sampled_from([P64 - CAP, P64 - 2 * CAP, P64 - 3 * CAP, 1 << 63]))
            out.append(("shift", 0, base))
        elif what == 2:
            if draw(st.booleans()):
                out.append(("u32", I_HEAD_REPAIR, draw(st.sampled_from([0, 1]))))
            else:
                out.append(("u32", M_HEAD // 4, draw(st.sampled_from(LOCK_WORDS))))
        elif what in (3, 4):
            rec = draw(st.sampled_from(pair.records))
            field = draw(st.integers(0, 3))
            if field == 0:
                cur = struct.unpack_from("<I", ring, rec)[0]
                v = draw(st.sampled_from([cur + 1, cur + 16, max(cur - 1, 0), 0, CAP - 16, CAP, U64 >> 32]))
                out.append(("rec32", rec, v & 0xFFFFFFFF))
            elif field in (1, 2):
                out.append(("rec16", rec + 2 + 2 * field, draw(st.sampled_from([0, 1, 2, 3, 4, 5, 0xFFFF]))))
            else:
                cur = struct.unpack_from("<Q", ring, rec + 8)[0]
                v = draw(st.sampled_from([cur + 1, (cur - 1) & U64, 0, U64, cur + 2]))
                out.append(("rec64", rec + 8, v & U64))
        elif what == 5:
            rec = draw(st.sampled_from(pair.records))
            at = draw(st.sampled_from([rec + RECORD_SIZE, draw(st.integers(0, CAP - 1))]))
            out.append(("byte", at, draw(st.sampled_from([0xC4, 0xC5, 0x00, 0x91, 0xC1, 0xFF]))))
        else:  # the subscription's own state: its cursor or next sequence number
            i = draw(st.integers(0, 1))
            out.append(("attr", i, _u64(draw, attrs[i], [h[Q_HEAD], h[Q_TAIL], h[Q_NEXT_SEQ]])))
    return out


OPS = st.one_of(
    st.just(("get_nowait", None)),
    st.tuples(st.just("get"), st.sampled_from([0.0, 0.002])),
    st.just(("get_bytes", None)),
    st.tuples(st.just("drain"), st.integers(1, 12)),
    st.tuples(st.just("publish"), st.sampled_from(OBJS)),
    st.tuples(st.just("publish_many"), st.lists(st.sampled_from(OBJS), min_size=1, max_size=6)),
    st.tuples(st.just("publish_bytes"), st.sampled_from([b"", b"q" * 50, b"w" * 900])),
)


def test_the_pair_starts_alike_and_both_paths_read_it_whole(pair: Pair) -> None:
    want = _norm([b"r" * 40, np.arange(6, dtype="<i4"), 12345, [1, 2, None], {"k": "v" * 300}])
    [(kind, got)] = _compare(pair, [("drain", 12)])
    assert kind == "ok" and got[-5:] == want and len(got) > 5
    pair.restore()
    outs = _compare(pair, [("get_bytes", None), ("publish_many", ["a", b"b"]), ("drain", 2)])
    assert outs[-1][0] == "ok" and outs[-1][1][-6:] == [*want[1:], "a", b"b"]


def test_c_and_python_agree_on_damaged_topics(pair: Pair) -> None:
    seen: dict[str, int] = {}

    @settings(max_examples=700, deadline=None, database=None)
    @given(muts=mutations(pair), ops=st.lists(OPS, min_size=1, max_size=4))
    def case(muts: list[Mutation], ops: list[Op]) -> None:
        pair.restore()
        for t in pair.both:
            _mutate(pair, t, muts)
        assert _state(pair, pair.c) == _state(pair, pair.py)
        for kind, _ in _compare(pair, ops):
            seen[kind] = seen.get(kind, 0) + 1

    case()
    for kind in ("ok", "CorruptBus", "Empty"):
        assert seen.get(kind, 0) >= 5, seen


def test_a_damaged_length_after_a_bytes_message_is_read_alike(pair: Pair) -> None:
    """A record's length grown into the next record (0xc4 = 196 bytes), read in a batch that
    begins at a bytes message (once handed back by C): both decode the batch and fail alike."""
    pair.restore()
    for t in pair.both:
        _mutate(pair, t, [("byte", 3088, 0xC4)])
    assert [kind for kind, _ in _compare(pair, [("drain", 6)])] == ["DecodeError"]


def test_c_and_python_agree_on_lapped_subscribers(pair: Pair) -> None:
    """Publishing laps the subscription many times over, in every size; both count the same loss."""
    for round_ in range(6):
        ops: list[Op] = [("publish_many", [("m" * (37 * i % 700), round_, i) for i in range(40)])]
        ops += [("publish", {"n": i}) for i in range(5)] + [("get_nowait", None), ("drain", 3)]
        assert [kind for kind, _ in _compare(pair, ops)] == ["ok"] * len(ops)
    c, py = pair.sub(pair.c), pair.sub(pair.py)
    assert c.lost == py.lost > 200 and c.received == py.received


# -- the C path is the one used --------------------------------------------------------------------


def test_publish_and_get_run_in_c(bus_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with shmbus.Topic.create(bus_name, capacity=1 << 20) as t:
        sub = t.subscribe()

        def python_path(*args: Any) -> Any:
            raise AssertionError("the Python path ran")

        monkeypatch.setattr(t, "_write", python_path)
        monkeypatch.setattr(sub, "_read", python_path)
        t.publish({"a": 1})
        t.publish(b"raw bytes message")  # (msgpack bin: C writes it; Python reads it back)
        t.publish_bytes(b"xyz")
        t.publish_many([1, "two", [3]])
        assert sub.get() == {"a": 1}
        monkeypatch.undo()  # a bytes message is Python's to copy (extract keeps it undecoded)
        assert sub.get_nowait() == b"raw bytes message"
        monkeypatch.setattr(sub, "_read", python_path)
        assert sub.get_bytes() == b"xyz"
        assert sub.get_many(5) == [1, "two", [3]]
        assert sub.received == 6 and sub.lost == 0
        sub.close()
        t.unlink()


def test_a_count_c_cannot_hold_goes_to_python(bus_name: str) -> None:
    with shmbus.Topic.create(bus_name, capacity=CAP) as t:
        sub = t.subscribe()
        t.publish_many([1, 2, 3])
        assert sub.get_many(10**30, block=False) == [1, 2, 3]
        t.publish(4)
        assert sub.get_many(2.5, block=False) == [4]  # type: ignore[arg-type]
        sub.close()
        t.unlink()


def test_a_waiting_subscriber_is_woken_by_a_c_publish(bus_name: str) -> None:
    """C says a wait flag is set; Python posts the wake-up (the subscriber sleeps, no spin)."""
    import threading

    with shmbus.Topic.create(bus_name, capacity=1 << 16) as t:
        sub = t.subscribe(spin=0)
        got: list[Any] = []
        reader = threading.Thread(target=lambda: got.append(sub.get(timeout=30)))
        reader.start()
        while not t._mm[sub._flag]:  # the reader sleeps (its wait flag is set)
            reader.join(0.001)
        t.publish("wake")
        reader.join(30)
        assert got == ["wake"]
        sub.close()
        t.unlink()


# Messages whose reads take each turn of a blocking get: C decodes, hands a record back
# (a bytes message, an ndarray), or leaves the decoding to Python (an ext type, a timestamp).
GET_OBJS: list[Any] = [
    {"seq": 1, "name": "a"}, b"raw", np.arange(3, dtype="<i4"), msgpack.ExtType(5, b"xyz"),
    msgpack.Timestamp(1, 2), [1, 2.5, None], "x" * 300,
]  # fmt: skip


def test_a_plain_get_takes_the_steps_of_a_get_with_a_timeout(bus_name: str) -> None:
    """``get()`` runs ``_get``'s steps inline: the same messages and state as ``get(timeout=...)``."""
    with shmbus.Topic.create(bus_name, capacity=1 << 16) as t:
        plain, timed = t.subscribe(), t.subscribe()
        for obj in GET_OBJS:
            t.publish(obj)
        t.publish_bytes(b"as is")
        for _ in range(len(GET_OBJS) + 1):
            assert _norm(plain.get()) == _norm(timed.get(timeout=5))
            assert _sub_attrs(plain) == _sub_attrs(timed)
        plain.close()
        with pytest.raises(shmbus.BusClosed):
            plain.get()
        timed.close()
        t.unlink()


def test_a_plain_get_waits_past_its_spin(bus_name: str) -> None:
    """C polls for the spin and finds nothing; the wait goes on in Python until a publish."""
    import threading

    with shmbus.Topic.create(bus_name, capacity=1 << 16) as t:
        sub = t.subscribe(spin=1)
        got: list[Any] = []
        reader = threading.Thread(target=lambda: got.append(sub.get()))
        reader.start()
        while not t._mm[sub._flag]:  # the reader sleeps (its wait flag is set)
            reader.join(0.001)
        t.publish({"late": True})
        reader.join(30)
        assert got == [{"late": True}] and sub.received == 1
        sub.close()
        t.unlink()


def test_a_batch_c_encodes_is_finished_by_python_past_a_wrap(bus_name: str) -> None:
    """publish_objs writes the records before the wrap, Python the rest (the bytes Python writes alone)."""
    c = shmbus.Topic.create(bus_name, capacity=CAP)
    py = shmbus.Topic.create(bus_name + "-py", capacity=CAP)
    try:
        py._drop_fast_path()
        batch = [{"i": i, "pad": "x" * 900} for i in range(7)]  # 944-byte records: the fifth wraps
        subs = [t.subscribe("earliest") for t in (c, py)]
        for t in (c, py):
            t.publish_many(batch)
        assert _snapshot(c) == _snapshot(py)
        assert [s.get_many(10, block=False) for s in subs] == [batch[3:], batch[3:]]
    finally:
        c.close()
        py.close()
        shmbus.unlink(bus_name + "-py")  # the bus_name fixture removes the first


# -- a writer wrapping the ring while the reader copies ---------------------------------------------


def _publisher(name: str, n: int, ready: Any) -> None:
    with shmbus.Topic.open(name) as t:
        ready.wait(30)
        for i in range(n):
            t.publish({"i": i, "d": "x" * (i * 7 % 500)})
        t.publish({"i": -1})


def test_a_reader_in_c_keeps_only_intact_copies_while_a_writer_laps_it(bus_name: str) -> None:
    n = 20000
    with shmbus.Topic.create(bus_name, capacity=CAP * 2) as t:
        sub = t.subscribe()
        ctx = mp.get_context("spawn")
        ready = ctx.Event()
        child = ctx.Process(target=_publisher, args=(bus_name, n, ready))
        child.start()
        try:
            ready.set()
            last = -1
            while True:
                for msg in sub.get_many(8, timeout=60):
                    if msg["i"] == -1:
                        break
                    assert msg["i"] > last and msg["d"] == "x" * (msg["i"] * 7 % 500), msg
                    last = msg["i"]
                else:
                    continue
                break
            child.join(60)
            assert child.exitcode == 0
            assert sub.received + sub.lost == n + 1 and sub.lost > 0
        finally:
            if child.is_alive():
                child.kill()
                child.join()
        sub.close()
        t.unlink()


# -- the crash steps: C reaches them with the stores Python made there --------------------------------


def _snapshot(t: shmbus.Topic) -> tuple[Any, ...]:
    h = t._h64
    words = [h[i] for i in COUNTERS] + [h[Q_TIME_SAMPLES + 2 * i] for i in range(TIME_SAMPLES)]
    held = [lk.mutex.word() & 0x3FFFFFFF != 0 for lk in t._locks]
    return (*words, *held, bytes(t._ring))


def _steps(monkeypatch: pytest.MonkeyPatch, t: shmbus.Topic, op: Callable[[shmbus.Topic], Any]) -> list[Any]:
    """Run ``op(t)`` with every step recorded: (step, reached from C, the state there)."""
    out: list[Any] = []

    def record(step: str) -> None:
        from_c = sys._getframe(1).f_code is _accel._c_step.__code__
        out.append((step, from_c, _snapshot(t)))

    monkeypatch.setattr(_faults, "hit", record)
    _faults.arm("publish:after-lock")  # armed: Python checks ``armed``, C holds the hook
    try:
        op(t)
    finally:
        _faults.disarm()
    return out


PUBLISH_OPS: dict[str, tuple[Callable[[shmbus.Topic], Any], list[str]]] = {
    "publish": (lambda t: t.publish({"a": 1}), ["publish:after-lock", "publish:mid-publish"]),
    "publish_bytes": (lambda t: t.publish_bytes(b"raw"), ["publish:after-lock", "publish:mid-publish"]),
    "publish_many": (lambda t: t.publish_many([1, "two", {"3": 3}]),
                     ["publish:after-lock", *["publish:mid-publish"] * 3]),
    # Records of 1024 bytes in a ring of 4096: the fifth and sixth drop the oldest.
    "evicting": (lambda t: t.publish_many(["x" * 1005] * 6),
                 ["publish:after-lock", *["publish:mid-publish"] * 4,
                  *["publish:after-evict", "publish:mid-publish"] * 2]),
}  # fmt: skip


@pytest.mark.parametrize("op", list(PUBLISH_OPS))
def test_c_reaches_every_publish_step_with_the_stores_python_made_there(
    monkeypatch: pytest.MonkeyPatch, bus_name: str, op: str
) -> None:
    c = shmbus.Topic.create(bus_name, capacity=CAP)
    py = shmbus.Topic.create(bus_name + "-py", capacity=CAP)
    try:
        py._drop_fast_path()
        for t in (c, py):
            t._h64[Q_NEXT_SEQ] = t._h64[Q_TAIL_SEQ] = 254  # a time sample falls in the batches
        fn, want = PUBLISH_OPS[op]
        in_c, in_py = _steps(monkeypatch, c, fn), _steps(monkeypatch, py, fn)
        assert [s for s, _, _ in in_py] == want and [s for s, _, _ in in_c] == want
        assert not any(from_c for _, from_c, _ in in_py) and all(from_c for _, from_c, _ in in_c)
        for (step, _, state), (_, _, got) in zip(in_py, in_c):
            assert got == state, f"{op}: the C path's state at {step} differs from Python's"
        assert _snapshot(c) == _snapshot(py)
    finally:
        c.close()
        py.close()
        shmbus.unlink(bus_name + "-py")  # the bus_name fixture removes the first
