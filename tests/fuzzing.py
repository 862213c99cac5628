"""The corrupt-file fuzzer of ``tests/test_fuzz.py`` (hypothesis) and ``benchmarks/fuzz.py`` (long runs).

A valid bus (a Queue whose records wrapped, one with ``maxsize``, and a Topic
with a subscriber) is built once and its bytes kept; the bus itself is
unlinked, so its semaphores are gone. Each case mutates a copy (random bytes
anywhere, and targeted values in the counters, the record headers, the
subscriber table, and the static block with its crc recomputed, as a hostile
writer would), writes it to a new path, and uses it as a reader would: open,
``stats``, non-blocking gets or a subscription, and ``check``. Each step must
work or raise ``CorruptBus`` (or its subclass ``DecodeError``); only a few
outcomes a damaged header makes legitimate are allowed besides (see
``exercise``). Opening the copy recreates the semaphores from its header;
every copy is unlinked with ``shmbus.unlink``, or by hand when the header is
too damaged for that.

Mutations are generated from a ``draw(lo, hi)`` integer source, so hypothesis
(which shrinks them) and ``random.randint`` produce the same cases.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Union

import shmbus
from shmbus import _mutex, _ring, _sync
from shmbus._check import check, examine
from shmbus._file import ALL_ROLES
from shmbus._format import (
    ALIGN,
    LOCKS,
    M_RECOVERY,
    MAGIC,
    Q_BYTES_IN,
    Q_BYTES_OUT,
    Q_HEAD,
    Q_NEXT_SEQ,
    Q_TAIL,
    Q_TAIL_SEQ,
    S_CURSOR,
    S_LOST,
    S_NEXT_SEQ,
    S_OWNER,
    S_RECEIVED,
    S_STATE_PID,
    STATIC,
    STATIC_SIZE,
    SUBSCRIBER_SIZE,
    Layout,
    parse_header,
)

Draw = Callable[[int, int], int]
# (kind, file offset, value): kind "u8", "u16", "u32" or "u64" stores ``value``
# little-endian at the offset; "static" replaces field ``offset`` of the
# STATIC tuple with ``value`` and recomputes the crc (a hostile writer).
Mutation = tuple[str, int, Union[int, bytes]]

U64 = (1 << 64) - 1
COUNTERS = (Q_HEAD, Q_NEXT_SEQ, Q_BYTES_IN, Q_TAIL, Q_TAIL_SEQ, Q_BYTES_OUT)
_FORMATS = {"u8": "<B", "u16": "<H", "u32": "<I", "u64": "<Q"}
# The mutexes of a bus (any kind): the owner word (futex word, bytes 0..3 of
# each) and glibc's __owner field (bytes 8..11) are left to tests/test_fuzz.py,
# which forges them in a child process with every call timed: here a reader's
# calls without a timeout (subscribe) would wait for ever on a word naming a
# live thread, and a crash (a word naming us; an unrecoverable __owner, which
# trylock leaves locked) would take pytest with it.
MUTEXES = sorted({off for locks in LOCKS.values() for _, off, _ in locks} | {M_RECOVERY})
# Fields of the STATIC tuple: 0 magic, 1 version, 2 kind, 3 capacity, 4 ring_offset,
# 5 maxsize, 6 flags, 7 max_subscribers, 8 max_participants, 9 align,
# 10 created_ns, 11 bus_id, 12 creator_uid, 13 participants_offset, 14 subscribers_offset.
F_MAGIC, F_VERSION, F_KIND = 0, 1, 2


@dataclass
class Original:
    """A valid bus file's bytes and what the mutations aim at."""

    name: str
    cls: type[shmbus.Queue] | type[shmbus.Topic]
    data: bytes
    layout: Layout
    records: list[int] = field(default_factory=list)  # file offsets of the live record headers

    @property
    def bus_id(self) -> str:
        return str(self.layout.bus_id)


# -- the originals -------------------------------------------------------------------


def _messages(i: int) -> Any:
    """A varied stream: small dicts, strings, bin8/bin16 bytes, lists, ints, and numpy arrays if installed."""
    if i % 6 == 5 and importlib.util.find_spec("numpy"):
        import numpy as np

        return np.arange(i % 11, dtype="<i4" if i % 4 else "<f8").reshape(-1, 1)
    return [
        {"i": i, "name": "x" * (i % 37)},
        "s" * (i * 13 % 300),
        bytes(range(256))[: i * 7 % 250] * (1 + i % 3),
        [i, -i, 2.5, None, True, {"k": [1, 2]}],
        i * 1_000_003,
        {"arrays": "need numpy"},
    ][i % 6]


def _live(data: bytes) -> tuple[int, int]:
    """``(head, tail)`` of a bus file's bytes."""
    return struct.unpack_from("<Q", data, Q_HEAD * 8)[0], struct.unpack_from("<Q", data, Q_TAIL * 8)[0]


def _walk(data: bytes, lay: Layout) -> tuple[list[int], bool]:
    """File offsets of every record and wrap marker header from tail to head; was there a marker."""
    head, tail = _live(data)
    ring = memoryview(data)[lay.ring_offset :]
    out, marker = [], False
    while tail < head:
        start, _, _, _, nxt = _ring.read(ring, lay.capacity, tail, head)
        if start != tail:
            out.append(lay.ring_offset + tail % lay.capacity)
            marker = True
        out.append(lay.ring_offset + start % lay.capacity)
        tail = nxt
    return out, marker


def _original(name: str, cls: type[shmbus.Queue] | type[shmbus.Topic], data: bytes) -> Original | None:
    """``data`` as an Original, or None while its live records hold no wrap marker yet."""
    lay = parse_header(data, path=name, file_size=len(data))
    records, marker = _walk(data, lay)
    return Original(name, cls, data, lay, records) if marker and len(records) > 8 else None


def build_originals(directory: Path) -> list[Original]:
    """Make the valid buses, keep their bytes, and unlink them (file and semaphores)."""
    out = []
    for name, maxsize in (("queue", 0), ("queue-maxsize", 12)):
        path = str(directory / f"original-{name}")
        with shmbus.Queue.create(path, capacity=4096, maxsize=maxsize) as q:
            for i in range(10_000):
                q.put(_messages(i), timeout=0)
                if i % 4 == 1:
                    q.put_bytes(bytes([i & 0xFF]) * (i % 40))  # raw records, some of length 0
                while q.qsize() > 10:
                    q.get_nowait()
                o = _original(name, shmbus.Queue, Path(path).read_bytes())
                if i > 40 and o is not None:
                    break
        shmbus.unlink(path)
        assert o is not None
        out.append(o)
    path = str(directory / "original-topic")
    with shmbus.Topic.create(path, capacity=4096, max_subscribers=3) as t:
        sub = t.subscribe("earliest")
        for i in range(10_000):
            t.publish(_messages(i))
            if i % 6 == 1:
                t.publish_bytes(bytes([i & 0xFF]) * (i % 50))
            if i % 17 == 0:
                sub.get_many(3, block=False)
            o = _original("topic", shmbus.Topic, Path(path).read_bytes())  # the subscriber active
            if i > 100 and o is not None:
                break
        sub.close()
    shmbus.unlink(path)
    assert o is not None
    out.append(o)
    return out


# -- mutations -------------------------------------------------------------------------


def _pick(draw: Draw, options: list[Any]) -> Any:
    return options[draw(0, len(options) - 1)]


def _u64_value(draw: Draw, cur: int, o: Original, data: bytes) -> int:
    cap = o.layout.capacity
    others = [struct.unpack_from("<Q", data, c * 8)[0] for c in COUNTERS]
    choice = draw(0, 12)
    if choice <= 8:
        delta = [1, -1, ALIGN, -ALIGN, 8, cap, -cap, 2 * cap, -ALIGN * draw(1, 20)][choice]
        return (cur + delta) & U64
    if choice == 9:
        return _pick(draw, [0, U64, 1 << 63, (1 << 63) - 1, (1 << 32) - 1, 1 << 32])
    if choice == 10:
        return int(_pick(draw, others))
    if choice == 11:
        return draw(0, 4 * cap)
    return draw(0, U64)


def _counter(draw: Draw, o: Original, data: bytes) -> list[Mutation]:
    off = _pick(draw, list(COUNTERS)) * 8
    return [("u64", off, _u64_value(draw, struct.unpack_from("<Q", data, off)[0], o, data))]


def _record(draw: Draw, o: Original, data: bytes) -> list[Mutation]:
    rec = _pick(draw, o.records)
    part = draw(0, 3)
    cap = o.layout.capacity
    if part == 0:  # length
        cur = struct.unpack_from("<I", data, rec)[0]
        v = _pick(draw, [cur + 1, cur + ALIGN, max(cur - 1, 0), 0, cap - 16, cap, (1 << 32) - 1,
                         draw(0, (1 << 32) - 1)])  # fmt: skip
        return [("u32", rec, v & 0xFFFFFFFF)]
    if part in (1, 2):  # kind, state
        return [("u16", rec + 2 + 2 * part, _pick(draw, [0, 1, 2, 3, 4, 0xFFFF, draw(0, 0xFFFF)]))]
    cur = struct.unpack_from("<Q", data, rec + 8)[0]
    return [("u64", rec + 8, _pick(draw, [cur + 1, (cur - 1) & U64, 0, U64, cur + 2, draw(0, U64)]))]


def _subscriber(draw: Draw, o: Original, data: bytes) -> list[Mutation]:
    lay = o.layout
    if not lay.max_subscribers:
        return _record(draw, o, data)
    slots = [lay.subscribers_offset + i * SUBSCRIBER_SIZE for i in range(lay.max_subscribers)]
    which = _pick(draw, [S_STATE_PID, S_CURSOR, S_NEXT_SEQ, S_LOST, S_RECEIVED, -1])
    if which < 0:  # every slot taken by one pid (live, dead, impossible), no participant: reclaim or refuse
        word = 1 | _pick(draw, [os.getpid(), 0, (1 << 22) + 1, 1 << 31, (1 << 32) - 1]) << 32
        out: list[Mutation] = []
        for at in slots:
            out += [("u64", at + S_STATE_PID * 8, word), ("u64", at + S_OWNER * 8, 0)]
        return out
    off = _pick(draw, slots) + which * 8
    if which == S_STATE_PID:
        pid = _pick(draw, [os.getpid(), 1, 0, (1 << 31) - 1, 1 << 31, (1 << 32) - 1, draw(0, (1 << 32) - 1)])
        return [("u64", off, _pick(draw, [0, 1, 2, (1 << 32) - 1]) | pid << 32)]
    return [("u64", off, _u64_value(draw, struct.unpack_from("<Q", data, off)[0], o, data))]


def _static(draw: Draw, o: Original, data: bytes) -> list[Mutation]:
    fields = STATIC.unpack_from(data)
    index = draw(1, 14)
    cur = fields[index]
    if index == 11:  # bus_id: another valid id, or garbage
        own = f"{os.getpid():016x}".encode()  # valid, and no other fuzzing process uses it
        value: int | bytes = _pick(draw, [own, b"Z" + own[1:], b"../../etc/passwd"])
    elif index == 10:
        value = draw(0, U64)
    else:
        size = 1 << (64 if index in (3, 4, 5) else 32)  # the u64 fields, and the u32 ones
        value = _pick(draw, [cur + 1, max(cur - 1, 0), cur * 2, cur // 2, 0, 1, 2, 3, 16, 17, 256, 257,
                             cur + 4096, max(cur - 4096, 0), cur + 32, draw(0, (1 << 32) - 1)])  # fmt: skip
        value %= size
    return [("static", index, value)]


def _byte(draw: Draw, o: Original, data: bytes) -> list[Mutation]:
    lay = o.layout
    region = draw(0, 4)
    if region == 0:
        lo, hi = 0, len(data) - 1  # anywhere
    elif region == 1:
        lo, hi = 0, STATIC_SIZE + 3  # the static block and its crc
    elif region == 2:
        lo, hi = STATIC_SIZE + 4, lay.ring_offset - 1  # counters and tables
    elif region == 3:
        lo, hi = lay.ring_offset, len(data) - 1  # the ring
    else:
        rec = _pick(draw, o.records)
        lo, hi = rec, rec + 15  # a record header
    at = draw(lo, hi)
    for m in MUTEXES:
        if m <= at < m + 12 and (at - m) // 4 != 1:
            at = m + 4 + at % 4  # an owner word or __owner: the count field instead (see MUTEXES)
    return [("u8", at, draw(0, 255))]


def _lock(draw: Draw, o: Original, data: bytes) -> list[Mutation]:
    """A lock's repair word (any u32), or its mutex's bytes other than the owner words (see MUTEXES)."""
    locks = LOCKS[o.layout.kind]
    _role, off, repair = _pick(draw, [*locks, ("recovery", M_RECOVERY, None)])
    part = draw(0, 3)
    if part == 0 and repair is not None:
        return [("u32", repair * 4, _pick(draw, [1, 2, 1 << 31, (1 << 32) - 1, draw(0, (1 << 32) - 1)]))]
    if part == 1:  # the kind word: any other kind of mutex is refused at open
        return [("u32", off + 16, _pick(draw, [0, 0x12, 0x21, 0x93, _mutex.KIND_WORD ^ 0x10,
                                               draw(0, (1 << 32) - 1)]))]  # fmt: skip
    if part == 2:  # count, nusers
        return [("u32", off + _pick(draw, [4, 12]), _pick(draw, [1, (1 << 32) - 1, draw(0, (1 << 32) - 1)]))]
    return [("u8", off + draw(20, 63), draw(0, 255))]  # spins, elision, robust list pointers


_GENERATORS = (_byte, _counter, _record, _subscriber, _static, _byte, _record, _lock)


def gen_mutations(o: Original, draw: Draw) -> list[Mutation]:
    """One to four kinds of damage to ``o``, from the integer source ``draw(lo, hi)``."""
    out = []
    for _ in range(draw(1, 4)):
        out += _GENERATORS[draw(0, len(_GENERATORS) - 1)](draw, o, o.data)
    return out


def mutate(data: bytes, mutations: list[Mutation]) -> bytes:
    """Apply ``mutations`` to a copy of ``data``."""
    buf = bytearray(data)
    for kind, off, value in mutations:
        if kind == "static":
            fields = list(STATIC.unpack_from(buf))
            fields[off] = value
            STATIC.pack_into(buf, 0, *fields)
            struct.pack_into("<I", buf, STATIC_SIZE, zlib.crc32(buf[:STATIC_SIZE]))
        else:
            assert isinstance(value, int)
            struct.pack_into(_FORMATS[kind], buf, off, value)
    return bytes(buf)


# -- using a mutated copy -------------------------------------------------------------------


@dataclass
class Outcome:
    """What one case did: the unexpected results (empty: the case passed) and a few counts."""

    failures: list[str] = field(default_factory=list)
    opened: bool = False
    sound: bool = False  # check() found no problem
    messages: int = 0


def _allowed_at_open(o: Original, data: bytes) -> tuple[type[BaseException], ...]:
    """``CorruptBus``, plus what a changed magic, version or kind legitimately raises instead."""
    allowed: list[type[BaseException]] = [shmbus.CorruptBus]
    old, new = STATIC.unpack_from(o.data), STATIC.unpack_from(data)
    if new[F_MAGIC] != old[F_MAGIC]:
        allowed.append(shmbus.NotABus)
    if new[F_VERSION] != old[F_VERSION] or new[F_KIND] != old[F_KIND]:
        allowed.append(shmbus.IncompatibleBus)
    return tuple(allowed)


def _all_slots_taken(data: bytes) -> bool:
    """True when the subscriber table of ``data`` (valid header) has no free slot."""
    lay = parse_header(data, path="-", file_size=len(data))
    return all(
        struct.unpack_from("<I", data, lay.subscribers_offset + i * SUBSCRIBER_SIZE)[0]
        for i in range(lay.max_subscribers)
    )


class _Stop(Exception):
    """A step failed unexpectedly (already recorded): skip the rest of the case."""


Errors = tuple[type[BaseException], ...]


class _Steps:
    """Runs calls; one that raises something outside its allowed errors is a failure."""

    def __init__(self, out: Outcome) -> None:
        self.out = out
        self.decode_errors = 0

    def __call__(self, what: str, fn: Callable[[], Any], allowed: Errors = ()) -> Any:
        try:
            return fn()
        except shmbus.DecodeError:
            if shmbus.DecodeError not in allowed and shmbus.CorruptBus not in allowed:
                self.out.failures.append(f"{what} raised DecodeError on a bus check() found sound")
                raise _Stop from None
            self.decode_errors += 1
            raise
        except allowed:
            raise
        except Exception as e:
            self.out.failures.append(f"{what} raised {type(e).__name__}: {e}")
            raise _Stop from e


def exercise(o: Original, path: str, data: bytes) -> Outcome:
    """Write ``data`` at ``path``, use it as a reader would, remove it; return what happened."""
    out = Outcome()
    Path(path).write_bytes(data)
    try:
        _exercise(o, path, data, out)
    finally:
        remove(o, path)
    return out


def _exercise(o: Original, path: str, data: bytes, out: Outcome) -> None:
    step = _Steps(out)
    header_errors = _allowed_at_open(o, data)
    # check() reports a corrupt bus as a problem; it raises only for what is not a bus of this format.
    not_checkable = tuple(e for e in header_errors if e not in (shmbus.CorruptBus, shmbus.IncompatibleBus))
    if STATIC.unpack_from(data)[F_VERSION] != STATIC.unpack_from(o.data)[F_VERSION]:
        not_checkable += (shmbus.IncompatibleBus,)
    report = None
    with contextlib.suppress(_Stop, *not_checkable):
        report = step("check", lambda: examine(path), not_checkable)
        out.sound = report.ok
        if check(path) != list(report.problems):
            out.failures.append("check() and examine() disagree")
    if report is not None and data[: len(MAGIC)] != MAGIC:
        out.failures.append("check() accepted a file without the magic")
    # A sound bus opens (unless its kind was relabelled) and reads without CorruptBus;
    # only DecodeError remains, since check() decodes more leniently than the default codec.
    if out.sound:
        header_errors = tuple(e for e in header_errors if e is shmbus.IncompatibleBus)
    reading: Errors = (shmbus.DecodeError,) if out.sound else (shmbus.CorruptBus,)
    try:
        bus = step("open", lambda: o.cls.open(path), header_errors)
    except (_Stop, *header_errors):
        return
    out.opened = True
    try:
        step("stats", bus.stats)
        step("repr", lambda: repr(bus))
        if isinstance(bus, shmbus.Queue):
            got: int | None = _read_queue(bus, step, reading)
        else:
            got = _read_topic(bus, data, step, reading)
        out.messages = got or 0
        if report is not None and report.ok and got is not None and not step.decode_errors \
                and got != report.messages:  # fmt: skip
            out.failures.append(f"check() counted {report.messages} messages, readers got {got}")
    except (_Stop, *reading):
        pass
    finally:
        with contextlib.suppress(_Stop):
            step("close", bus.close)


def _drain(step: _Steps, what: str, get_many: Callable[[int], list[Any]], allowed: Errors) -> int:
    got = 0
    for k in (1, 3, 64, 64, 64, 64, 64, 64, 64):  # more than the 4096 / 16 records a ring can hold
        try:
            batch = step(what, lambda k=k: get_many(k), allowed)
        except shmbus.DecodeError:
            continue
        if not batch:
            break
        got += len(batch)
    return got


def _one(step: _Steps, what: str, fn: Callable[[], Any], allowed: Errors) -> int:
    """1 if ``fn`` returned a message, 0 if it raised ``Empty`` or an allowed error."""
    try:
        step(what, fn, (shmbus.Empty, *allowed))
    except (shmbus.Empty, *allowed):
        return 0
    return 1


def _view(bus: shmbus.Queue | shmbus.Subscription) -> bytes:
    with bus.get_view(block=False) as buf:
        return bytes(buf)


def _read_queue(q: shmbus.Queue, step: _Steps, allowed: Errors) -> int:
    """Messages read with get_nowait, get_view and get_many until empty."""
    got = _one(step, "Queue.get_nowait", q.get_nowait, allowed)
    got += _one(step, "Queue.get_view", lambda: _view(q), allowed)
    got += _drain(step, "Queue.get_many", lambda k: q.get_many(k, block=False), allowed)
    step("Queue.qsize", q.qsize)
    return got


def _read_topic(t: shmbus.Topic, data: bytes, step: _Steps, allowed: Errors) -> int | None:
    """Messages an "earliest" subscription reads; None when every slot was (legitimately) taken."""
    step("Topic.subscribers", t.subscribers)
    full: Errors = (shmbus.TooManySubscribers,) if _all_slots_taken(data) else ()
    try:
        sub = step("Topic.subscribe", lambda: t.subscribe("earliest"), (*full, *allowed))
    except shmbus.TooManySubscribers:
        return None
    with sub:
        got = _one(step, "Subscription.get_view", lambda: _view(sub), allowed)
        got += _drain(step, "Subscription.get_many", lambda k: sub.get_many(k, block=False), allowed)
        got += _one(step, "Subscription.get_nowait", sub.get_nowait, allowed)
    return got


def remove(o: Original, path: str) -> None:
    """Unlink the copy and its semaphores, by hand when its header is too damaged to name them."""
    try:
        shmbus.unlink(path)
    except shmbus.BusNotFound:
        pass
    except shmbus.NotABus:
        os.unlink(path)
    # Semaphores named from the original id, in case the copy's header no longer names them.
    _sync.unlink_sems(o.bus_id, ALL_ROLES + [f"sub{i}" for i in range(o.layout.max_subscribers)])
