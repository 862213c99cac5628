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

import logging
import os
import random
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable, Union

import pytest
from conftest import recv
from fuzzing import U64, Draw, Mutation, Original, build_originals, exercise, gen_mutations, mutate
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import shmbus
from shmbus import _mutex
from shmbus._check import check
from shmbus._format import (
    LOCKS,
    M_RECOVERY,
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
CHILD_TIMEOUT = 30.0  # far above what a healthy child needs; only a hang reaches it


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
    """What readers, ``stats`` and ``check`` see: counters, samples, live ring bytes, semaphores, locks."""
    h, cap = bus._h64, bus.capacity
    head, tail = h[Q_HEAD], h[Q_TAIL]
    ring = bytes(bus._ring)
    live = (ring + ring)[tail % cap :][: head - tail] if tail <= head <= tail + cap else ring
    counters = [h[i] for i in (Q_HEAD, Q_NEXT_SEQ, Q_BYTES_IN, Q_TAIL, Q_TAIL_SEQ, Q_BYTES_OUT)]
    samples = h[Q_TIME_SAMPLES : Q_TIME_SAMPLES + 2 * TIME_SAMPLES].tolist()
    sems = {role: sem.value for role, sem in bus._sems.items()}
    locks = [lock.state() for lock in bus._locks]  # (holder, died, repair pending): free, nothing to mend
    return counters, samples, live, sems, locks, check(bus.path)


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
    ],
)
@pytest.mark.parametrize(("kind", "op"), WRITES)
def test_a_statistic_near_its_limit_wraps_and_the_write_works(
    bus_name: str, kind: str, op: str, stat: str, offset: int, fmt: str, value: int
) -> None:
    """``bytes_in`` is a statistic, not an invariant: it wraps, like ``bytes_out``.

    (Format 1's lock release counters are gone: a repair word holding any
    value is tested below, ``test_a_repair_word_of_any_value_is_mended_by_the_next_holder``.)
    """
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


def test_a_get_wraps_bytes_out(bus_name: str) -> None:
    with shmbus.Queue.create(bus_name, capacity=CAP) as q:
        q.put_many([1, 2])
        _poke(q.path, Q_BYTES_OUT * 8, "<Q", U64)
        assert q.get_nowait() == 1
        with q.get_view(block=False) as buf:
            assert bytes(buf) == b"\x02"
        assert q.get_many(1, block=False) == []




def _hold_head_and_die(path: str) -> None:
    """Child: take the head lock and end holding it (the kernel marks it OWNER_DIED)."""
    q = shmbus.Queue.open(path)
    assert q._head_lock.acquire(None)
    os._exit(0)


def test_recovery_wraps_its_count_and_leaves_a_next_seq_it_cannot_store(
    bus_name: str, procs: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Recovery stores counters too (the next taker of a dead holder's lock): the same rules hold.

    Format 1 staged the dead holder through the holder field and the head
    semaphore; here a real process dies holding the head mutex.
    """
    with shmbus.Queue.create(bus_name, capacity=CAP) as q:
        q.put("kept")
        h = q._h64
        child = procs.start(_hold_head_and_die, q.path)
        child.join(CHILD_TIMEOUT)
        assert child.exitcode == 0 and q._head_lock.state()[:2] == (0, True)  # held by a dead process
        _poke(q.path, Q_RECOVERIES * 8, "<Q", U64)
        _poke(q.path, q.layout.ring_offset + 8, "<Q", U64)  # the record's seq: next_seq would be 2**64
        with caplog.at_level(logging.WARNING, logger="shmbus"):
            q.recover()
        assert h[Q_RECOVERIES] == 0
        assert "cannot resync counters" in caplog.text and h[Q_NEXT_SEQ] == 1
        assert q._head_lock.state()[:2] == (0, False)  # taken, mended as far as it can be, released


# -- the lock words: repair words, mutex bytes -------------------------------------------------
#
# Each lock is a glibc robust mutex in the header (``_mutex``) with a repair
# word (``_format.LOCKS``). A repair word may hold any u32; a mutex's kind word
# decides what glibc does with it, so a damaged one is refused at open; its
# owner word (the futex word) may name anyone, and nothing may crash or hang.

KIND_CODES = {"queue": 1, "queue-maxsize": 1, "topic": 2}
ROLES = [("queue", "head"), ("queue", "tail"), ("topic", "head"), ("topic", "subs")]


def _lock_at(kind: str, role: str) -> tuple[int, int | None]:
    """``(mutex byte offset, repair word u32 index or None)`` of a lock of a bus kind."""
    if role == "recovery":
        return M_RECOVERY, None
    ((off, repair),) = [(off, i) for r, off, i in LOCKS[KIND_CODES[kind]] if r == role]
    return off, repair


def _next_holder(bus: Bus, role: str) -> None:
    """Take the lock ``role`` the way a user's call does."""
    if role == "head":
        bus.put("c") if isinstance(bus, shmbus.Queue) else bus.publish("c")
    elif role == "tail":
        assert bus.get(timeout=1) == "a"
        bus.put("c")
    else:
        assert isinstance(bus, shmbus.Topic)
        bus.subscribe("latest").close()
        bus.publish("c")


@pytest.mark.parametrize("value", [1, 2, 1 << 31, 2**32 - 1])
@pytest.mark.parametrize(("kind", "role"), ROLES)
def test_a_repair_word_of_any_value_is_mended_by_the_next_holder(
    bus_name: str, kind: str, role: str, value: int
) -> None:
    with _make(kind, bus_name) as bus:
        sub = bus.subscribe("earliest") if isinstance(bus, shmbus.Topic) else None
        bus.put_many(["a", "b"]) if sub is None else bus.publish_many(["a", "b"])
        _, repair = _lock_at(kind, role)
        assert repair is not None
        _poke(bus.path, repair * 4, "<I", value)
        (problem,) = check(bus.path)
        assert problem.offset == _lock_at(kind, role)[0]
        assert f"the {role} lock awaits the repair" in problem.message
        before = bus._h64[Q_RECOVERIES]
        _next_holder(bus, role)
        assert bus._h32[repair] == 0 and bus._h64[Q_RECOVERIES] == before + 1
        assert check(bus.path) == []
        reader = bus if sub is None else sub
        want = ["b", "c"] if role == "tail" else ["a", "b", "c"]
        assert reader.get_many(8, timeout=1) == want
        if sub is not None:
            sub.close()


@pytest.mark.parametrize("kind", ["queue", "queue-maxsize", "topic"])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_damaged_mutex_kind_word_is_refused_at_open_and_named_by_check(
    bus_name: str, kind: str, data: st.DataObject
) -> None:
    roles = [r for r, _, _ in LOCKS[KIND_CODES[kind]]] + ["recovery"]
    role = data.draw(st.sampled_from(roles), label="role")
    value = data.draw(st.integers(0, 2**32 - 1).filter(lambda v: v != _mutex.KIND_WORD), label="kind word")
    with _make(kind, bus_name) as bus:
        bus.put("kept") if isinstance(bus, shmbus.Queue) else bus.publish("kept")
    off, _ = _lock_at(kind, role)
    _poke(bus.path, off + 16, "<I", value)
    try:
        cls = shmbus.Topic if kind == "topic" else shmbus.Queue
        with pytest.raises(shmbus.CorruptBus, match=f"the {role} lock's bytes are damaged"):
            cls.open(bus.path)
        (problem,) = check(bus.path)
        assert problem.offset == off and f"the {role} lock has damaged bytes" in problem.message
    finally:
        shmbus.unlink(bus.path)


# Garbage owner words: the futex word (byte 0), and glibc's __owner (byte 8).
# "me" is the thread id of the process using the bus: a forged word naming the
# caller must be refused (CorruptBus), never unlocked (unlocking a mutex this
# thread did not lock corrupts glibc's robust list: SIGSEGV).
PID_MAX_LIMIT = 1 << 22  # the kernel never hands out a thread id above this
UNRECOVERABLE, INCONSISTENT = 0x7FFFFFFE, 0x7FFFFFFF  # glibc's __owner values
OWNER_WORDS = ["ghost", "died", "died+ghost", "died+me", "all-ones", "me", "me+waiters",
               "unrecoverable", "inconsistent"]  # fmt: skip
ALLOWED = {"ok", "timeout", "CorruptBus"}


def _owner_word(name: str, rng: random.Random, me: int) -> tuple[int, int]:
    """``(offset in the mutex, u32 value)`` of the forged word ``name``."""
    ghost = rng.randrange(PID_MAX_LIMIT + 1, _mutex.TID_MASK + 1)
    if name in ("unrecoverable", "inconsistent"):  # (ENOTRECOVERABLE: trylock leaves it locked by us)
        return 8, UNRECOVERABLE if name == "unrecoverable" else INCONSISTENT
    return 0, {
        "ghost": ghost,
        "died": _mutex.OWNER_DIED,
        "died+ghost": _mutex.OWNER_DIED | ghost,
        "died+me": _mutex.OWNER_DIED | me,
        "all-ones": 0xFFFFFFFF,
        "me": me,
        "me+waiters": me | 0x80000000,  # FUTEX_WAITERS
    }[name]


def _ops(bus: Bus, sub: shmbus.Subscription | None, word: str) -> list[tuple[str, Callable[[], object]]]:
    """Every call a user makes, each bounded by a timeout (0.2 s), or one that cannot wait."""
    def view(reader: Any) -> bytes:
        with reader.get_view(timeout=0.2) as buf:
            return bytes(buf)

    common: list[tuple[str, Callable[[], object]]] = [("stats", bus.stats), ("recover", bus.recover)]
    if isinstance(bus, shmbus.Queue):
        return [
            ("put", lambda: bus.put("p", timeout=0.2)),
            ("put_many", lambda: bus.put_many(["p", "q"], timeout=0.2)),
            ("put_nowait", lambda: bus.put_nowait("n")),
            ("get", lambda: bus.get(timeout=0.2)),
            ("get_many", lambda: bus.get_many(2, timeout=0.2)),
            ("get_view", lambda: view(bus)),
            ("get_nowait", bus.get_nowait),
            ("qsize", bus.qsize),
            *common,
        ]
    assert sub is not None
    ops: list[tuple[str, Callable[[], object]]] = [
        ("Subscription.get", lambda: sub.get(timeout=0.2)),
        ("Subscription.get_many", lambda: sub.get_many(2, timeout=0.2)),
        ("Subscription.get_view", lambda: view(sub)),
        ("subscribers", bus.subscribers),
        *common,
    ]
    if word != "ghost":
        # publish and subscribe take no timeout: they wait for a live holder,
        # and a ghost's lock (a thread that does not exist) until recover --force.
        ops += [("publish", lambda: bus.publish("p")), ("subscribe", lambda: bus.subscribe().close())]
    return ops


def _use_with_a_forged_owner(conn: Any, path: str, kind: str, off: int, word: str, seed: int) -> None:
    """Child: forge the owner word of the mutex at ``off``, then make every call; send the outcomes."""
    bus = (shmbus.Topic if kind == "topic" else shmbus.Queue).open(path)
    sub = bus.subscribe("earliest") if isinstance(bus, shmbus.Topic) else None
    field, value = _owner_word(word, random.Random(seed), threading.get_native_id())
    struct.pack_into("<I", bus._mm, off + field, value)
    conn.send(value)
    assert conn.recv() == "go"
    outcomes = []
    for name, op in _ops(bus, sub, word):
        try:
            op()
            outcomes.append((name, "ok"))
        except (shmbus.Empty, shmbus.Full):
            outcomes.append((name, "timeout"))
        except shmbus.CorruptBus:
            outcomes.append((name, "CorruptBus"))
        except Exception as e:
            outcomes.append((name, f"{type(e).__name__}: {e}"))
    conn.send(outcomes)
    conn.close()
    os._exit(0)  # no close: a Subscription's close waits for the subs lock, which may be a ghost's


@pytest.mark.parametrize("word", OWNER_WORDS)
@pytest.mark.parametrize(("kind", "role"), [*ROLES, ("queue", "recovery"), ("topic", "recovery")])
def test_a_garbage_owner_word_never_crashes_nor_hangs_and_check_names_it(
    bus_name: str, procs: Any, kind: str, role: str, word: str
) -> None:
    seed = random.randrange(1 << 32)
    with _make(kind, bus_name) as bus:
        bus.put_many(["a", "b"]) if isinstance(bus, shmbus.Queue) else bus.publish_many(["a", "b"])
    off, _ = _lock_at(kind, role)
    parent, child_end = procs.ctx.Pipe()
    child = procs.start(_use_with_a_forged_owner, child_end, bus.path, kind, off, word, seed)
    child_end.close()  # ours: a child that dies unheard is seen at once
    try:
        value = recv(parent, child, CHILD_TIMEOUT)
        tid, died = _mutex.owner_of(value)
        problems = check(bus.path)
        if word == "inconsistent":  # unlocked, its taker gone: the next taker just takes it
            assert problems == []
        elif word == "unrecoverable" or died or not os.path.exists(f"/proc/{tid}"):
            # ("me": a live thread's word looks held, no more: named once the thread is gone, below)
            assert [p.offset for p in problems] == [off], (hex(value), problems)
            assert f"the {role} lock" in problems[0].message
        parent.send("go")
        outcomes = recv(parent, child, CHILD_TIMEOUT)  # fails on a hang, and on a crash (exit code -11)
        child.join(CHILD_TIMEOUT)
        assert child.exitcode == 0, f"{word} (word {value:#x}): the child ended with {child.exitcode}"
        assert [o for o in outcomes if o[1] not in ALLOWED] == [], (word, hex(value), outcomes)
        if word.startswith("me"):
            # Refused, never unlocked: the word still names the (now gone) thread, and check says so.
            assert struct.unpack_from("<I", Path(bus.path).read_bytes(), off)[0] == value
            (problem,) = check(bus.path)
            assert problem.offset == off and f"held by thread {tid}" in problem.message
        # Whatever is left, recover --force (nobody uses the bus now) makes it whole again.
        with (shmbus.Topic if kind == "topic" else shmbus.Queue).open(bus.path) as again:
            again.recover(force=True)
            assert check(bus.path) == []
            if isinstance(again, shmbus.Queue):
                again.put("z", timeout=1)
                got: list[Any] = []
                while "z" not in got:  # (get_many may stop at what one lock round saw)
                    got += again.get_many(16, timeout=1)
                assert got[-1] == "z" and set(got) <= {"a", "b", "p", "q", "n", "z"}
            else:
                with again.subscribe("latest") as s:
                    again.publish("z")
                    assert s.get(timeout=1) == "z"
    finally:
        procs.reap()
        shmbus.unlink(bus.path)
