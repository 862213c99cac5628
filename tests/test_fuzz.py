"""Corrupt and hostile bus files: every reader either works or raises ``CorruptBus``.

Writers too, on counters a hostile header sets near 2**64: a write that would
carry a position or sequence number past 2**64 - 1 raises ``CorruptBus``
before it stores anything; statistics counters wrap (see the end of the file).

Hypothesis drives the engine in ``fuzzing.py`` (``benchmarks/fuzz.py`` runs the
same cases by the hundred thousand): each case damages a copy of a valid
Queue or Topic file, opens it, reads it without blocking, asks for its
``stats`` and ``check``\\s it. A sound verdict from ``check`` is held to
account too: such a bus must open and hand out exactly the messages
``check`` counted.
"""

from __future__ import annotations

import os
import random
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable, Union

import pytest
from fuzzing import U64, Draw, Mutation, Original, build_originals, exercise, gen_mutations, mutate
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import shmbus
from shmbus._check import check
from shmbus._format import (
    I_HEAD_HOLDER,
    I_HEAD_RELEASES,
    I_TAIL_RELEASES,
    P_PID_STATE,
    PARTICIPANT_SIZE,
    Q_BYTES_IN,
    Q_BYTES_OUT,
    Q_HEAD,
    Q_NEXT_SEQ,
    Q_RECOVERIES,
    Q_TAIL,
    Q_TAIL_SEQ,
    Q_TIME_SAMPLES,
    TIME_SAMPLES,
)

CASES = 200  # per original: three originals, 600 cases


@pytest.fixture(scope="module")
def originals(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Original]]:
    """The valid buses' bytes; the buses themselves are already unlinked."""
    yield {o.name: o for o in build_originals(tmp_path_factory.mktemp("originals"))}


@pytest.fixture(scope="module")
def case_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Where each mutated copy is written (and removed again by ``exercise``)."""
    return str(tmp_path_factory.mktemp("cases") / "case")


@st.composite
def mutations(draw: st.DrawFn, o: Original) -> list[Mutation]:
    source: Draw = lambda lo, hi: draw(st.integers(lo, hi))  # noqa: E731 - the engine's integer source
    return gen_mutations(o, source)


def test_the_originals_are_sound_wrapped_and_varied(originals: dict[str, Original], case_path: str) -> None:
    for o in originals.values():
        out = exercise(o, case_path, o.data)
        assert out.failures == [] and out.sound and out.opened, (o.name, out)
        assert out.messages >= 6 and len(o.records) > out.messages  # a wrap marker among the records
    assert not Path(case_path).exists()


@pytest.mark.parametrize("name", ["queue", "queue-maxsize", "topic"])
@settings(max_examples=CASES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_damaged_bus_works_or_raises_corrupt_bus(
    originals: dict[str, Original], case_path: str, name: str, data: st.DataObject
) -> None:
    o = originals[name]
    muts = data.draw(mutations(o), label="mutations")
    out = exercise(o, case_path, mutate(o.data, muts))
    assert out.failures == [], f"{name} with {muts}: {out.failures}"
    assert not Path(case_path).exists()


def test_every_kind_of_outcome_is_reached(originals: dict[str, Original], case_path: str) -> None:
    """The fuzzer is no good if every case is refused at open: some must open, some stay sound."""
    rng = random.Random(7)
    ends = {"refused": 0, "opened": 0, "sound": 0, "read": 0}
    for n in range(300):
        o = list(originals.values())[n % 3]
        out = exercise(o, case_path, mutate(o.data, gen_mutations(o, rng.randint)))
        assert out.failures == []
        ends["sound" if out.sound else "opened" if out.opened else "refused"] += 1
        ends["read"] += out.messages > 0
    assert min(ends.values()) >= 20, ends


def test_a_hostile_header_is_refused_at_the_field_open_and_check_both_name(
    originals: dict[str, Original], case_path: str
) -> None:
    o = originals["queue"]
    capacity_1tib: list[Mutation] = [("static", 3, 1 << 40)]  # crc recomputed: only the checks stop it
    Path(case_path).write_bytes(mutate(o.data, capacity_1tib))
    try:
        with pytest.raises(shmbus.CorruptBus) as e:
            shmbus.Queue.open(case_path)
        (problem,) = check(case_path)
    finally:
        shmbus.unlink(case_path)
    assert problem.offset == e.value.offset == len(o.data) and "truncated" in problem.message


# -- writers on counters near 2**64 --------------------------------------------------------
#
# A hostile header may hold any u64 (memoryview item assignment of 2**64 or more
# raised a bare ValueError, after storing some counters). Targeted values, on a
# live handle, poked through the file as another process would.

Bus = Union[shmbus.Queue, shmbus.Topic]
CAP = 8192  # a power of two: 2**64 is a multiple of it, so a record can end exactly at 2**64
P64 = 1 << 64


def _poke(path: str, offset: int, fmt: str, value: int) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, struct.pack(fmt, value), offset)
    finally:
        os.close(fd)


def _reserve(bus: Bus) -> None:
    with bus.reserve(48) as buf:
        buf[:] = b"r" * 48


# Every write path, with a first record of 64 bytes (48 payload bytes) where the
# size matters: at head 2**64 - 64 the single put's fast path ends exactly at 2**64.
QUEUE_WRITES: dict[str, Callable[[Any], None]] = {
    "put": lambda q: q.put(b"x" * 46),  # msgpack bin 8: 48 bytes
    "put_many": lambda q: q.put_many([b"x" * 46, b"a", b"b"]),
    "put_bytes": lambda q: q.put_bytes(b"y" * 48),
    "reserve": _reserve,
}
TOPIC_WRITES: dict[str, Callable[[Any], None]] = {
    "publish": lambda t: t.publish(b"x" * 46),
    "publish_many": lambda t: t.publish_many([b"x" * 46, b"a", b"b"]),
    "publish_bytes": lambda t: t.publish_bytes(b"y" * 48),
    "reserve": _reserve,
}
WRITES = (
    [("queue", op) for op in QUEUE_WRITES]
    + [("queue-maxsize", op) for op in QUEUE_WRITES]
    + [("topic", op) for op in TOPIC_WRITES]
)

# Headers no write can go on from: {u64 word: value}, and what the message names.
OVERFLOWING: dict[str, tuple[dict[int, int], str]] = {
    "next_seq=2**64-1": ({Q_NEXT_SEQ: U64}, "next_seq"),
    "head=tail=2**64-16": ({Q_HEAD: P64 - 16, Q_TAIL: P64 - 16}, r"2\*\*64"),
    "head=tail=2**64-64": ({Q_HEAD: P64 - 64, Q_TAIL: P64 - 64}, r"2\*\*64"),
    "head=2**64-16": ({Q_HEAD: P64 - 16}, "positions"),
    "tail=2**64-16": ({Q_TAIL: P64 - 16}, "positions"),
}


def _make(kind: str, name: str) -> Bus:
    if kind == "topic":
        return shmbus.Topic.create(name, capacity=CAP)
    return shmbus.Queue.create(name, capacity=CAP, maxsize=8 if kind == "queue-maxsize" else 0)


def _writes(bus: Bus) -> dict[str, Callable[[Any], None]]:
    return QUEUE_WRITES if isinstance(bus, shmbus.Queue) else TOPIC_WRITES


def _visible(bus: Bus) -> tuple[object, ...]:
    """What readers, ``stats`` and ``check`` see: counters, time samples, live ring bytes, semaphores."""
    h, cap = bus._h64, bus.capacity
    head, tail = h[Q_HEAD], h[Q_TAIL]
    ring = bytes(bus._ring)
    live = (ring + ring)[tail % cap :][: head - tail] if tail <= head <= tail + cap else ring
    counters = [h[i] for i in (Q_HEAD, Q_NEXT_SEQ, Q_BYTES_IN, Q_TAIL, Q_TAIL_SEQ, Q_BYTES_OUT)]
    samples = h[Q_TIME_SAMPLES : Q_TIME_SAMPLES + 2 * TIME_SAMPLES].tolist()
    sems = {role: sem.value for role, sem in bus._sems.items()}
    return counters, samples, live, sems, check(bus.path)


@pytest.mark.parametrize("damage", list(OVERFLOWING))
@pytest.mark.parametrize(("kind", "op"), WRITES)
def test_a_write_past_2_64_raises_corrupt_bus_and_changes_nothing(
    bus_name: str, kind: str, op: str, damage: str
) -> None:
    words, names = OVERFLOWING[damage]
    with _make(kind, bus_name) as bus:
        sub = bus.subscribe("earliest") if isinstance(bus, shmbus.Topic) else None
        bus.put("kept") if isinstance(bus, shmbus.Queue) else bus.publish("kept")
        for word, value in words.items():
            _poke(bus.path, word * 8, "<Q", value)
        before = _visible(bus)
        for _ in range(2):  # the second time too: the first released every lock and token it took
            with pytest.raises(shmbus.CorruptBus, match=names):
                _writes(bus)[op](bus)
            assert _visible(bus) == before
        if Q_NEXT_SEQ in words:  # the positions still frame the message that was there
            assert (bus.get_nowait() if sub is None else sub.get_nowait()) == "kept"
        if sub is not None:
            sub.close()


@pytest.mark.parametrize(("kind", "op"), [w for w in WRITES if w[1].endswith("_many")])
def test_a_batch_gets_every_sequence_number_below_2_64_or_none(bus_name: str, kind: str, op: str) -> None:
    with _make(kind, bus_name) as bus:
        sub = bus.subscribe("latest") if isinstance(bus, shmbus.Topic) else None
        write = _writes(bus)[op]
        _poke(bus.path, Q_NEXT_SEQ * 8, "<Q", P64 - 3)  # room for two more numbers: not for three
        _poke(bus.path, Q_TAIL_SEQ * 8, "<Q", P64 - 3)
        before = _visible(bus)
        with pytest.raises(shmbus.CorruptBus, match="next_seq"):
            write(bus)
        assert _visible(bus) == before
        _poke(bus.path, Q_NEXT_SEQ * 8, "<Q", P64 - 4)  # room for three: the last is numbered 2**64 - 2
        _poke(bus.path, Q_TAIL_SEQ * 8, "<Q", P64 - 4)
        write(bus)
        assert bus._h64[Q_NEXT_SEQ] == U64
        reader = bus if sub is None else sub
        assert reader.get_many(3, block=False) == [b"x" * 46, b"a", b"b"]
        with pytest.raises(shmbus.CorruptBus, match="next_seq"):
            write(bus)
        if sub is not None:
            sub.close()


@pytest.mark.parametrize(
    ("stat", "offset", "fmt", "value"),
    [
        ("bytes_in", Q_BYTES_IN * 8, "<Q", U64),
        ("bytes_in", Q_BYTES_IN * 8, "<Q", P64 - 16),
        ("head_releases", I_HEAD_RELEASES * 4, "<I", 2**32 - 1),
    ],
)
@pytest.mark.parametrize(("kind", "op"), WRITES)
def test_a_statistic_near_its_limit_wraps_and_the_write_works(
    bus_name: str, kind: str, op: str, stat: str, offset: int, fmt: str, value: int
) -> None:
    """``bytes_in`` and the release counters are statistics, not invariants: they wrap, like ``bytes_out``."""
    size = struct.calcsize(fmt)
    read = lambda b: int.from_bytes(b._mm[offset : offset + size], "little")  # noqa: E731
    with _make(kind, bus_name) as bus:
        sub = bus.subscribe("earliest") if isinstance(bus, shmbus.Topic) else None
        write = _writes(bus)[op]
        start = read(bus)
        write(bus)
        step = read(bus) - start  # what one write adds
        _poke(bus.path, offset, fmt, value)
        write(bus)
        assert read(bus) == (value + step) % (1 << 8 * size)
        reader = bus if sub is None else sub
        got = reader.get_many(8, block=False)
        assert got[: len(got) // 2] == got[len(got) // 2 :] and got  # both writes delivered, alike
        if sub is not None:
            sub.close()


@pytest.mark.parametrize(
    ("offset", "fmt", "value"), [(Q_BYTES_OUT * 8, "<Q", U64), (I_TAIL_RELEASES * 4, "<I", 2**32 - 1)]
)
def test_a_get_wraps_bytes_out_and_the_tail_release_counter(
    bus_name: str, offset: int, fmt: str, value: int
) -> None:
    with shmbus.Queue.create(bus_name, capacity=CAP) as q:
        q.put_many([1, 2])
        _poke(q.path, offset, fmt, value)
        assert q.get_nowait() == 1
        with q.get_view(block=False) as buf:
            assert bytes(buf) == b"\x02"
        assert q.get_many(1, block=False) == []


def test_recovery_wraps_its_count_and_leaves_a_next_seq_it_cannot_store(
    bus_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Recovery stores counters too, from the waits of a put or get: the same rules hold."""
    with shmbus.Queue.create(bus_name, capacity=CAP) as q:
        q.put("kept")
        h, lay = q._h64, q.layout
        # A dead head holder: a slot marked live whose lock byte nobody holds, and the lock it took.
        slot = lay.max_participants - 1
        h[(lay.participants_offset + slot * PARTICIPANT_SIZE) // 8 + P_PID_STATE] = (1 << 32) | 0x7FFFFFFF
        assert q._head_lock.sem.try_acquire()
        q._h32[I_HEAD_HOLDER] = slot + 1
        _poke(q.path, Q_RECOVERIES * 8, "<Q", U64)
        _poke(q.path, lay.ring_offset + 8, "<Q", U64)  # the record's seq: next_seq would be 2**64
        assert q.recover() == 1
        assert h[Q_RECOVERIES] == 0
        assert "cannot resync counters" in caplog.text and h[Q_NEXT_SEQ] == 1
        assert q._head_lock.sem.value == 1
