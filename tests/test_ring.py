"""The ring algorithm (``shmbus._ring``) on a plain ``bytearray``: no mmap, semaphores or msgpack.

Exhaustive over every aligned head offset and every payload length of a tiny
ring, then a hypothesis state machine against a ``collections.deque`` model,
then damaged records, which must raise ``CorruptBus`` and nothing else.
"""

from __future__ import annotations

import ast
import collections
import inspect

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from shmbus import CorruptBus, _ring
from shmbus._format import (
    ALIGN,
    PAGE,
    REC_MSGPACK,
    REC_NDARRAY,
    REC_RAW,
    REC_WRAP,
    RECORD,
    RECORD_SIZE,
    STATE_COMMITTED,
    max_payload,
)
from shmbus._ring import check_positions, check_room, place, read, rebases, record_span, skip, write

CAP = 256
MAX = max_payload(CAP)  # 240
OFFSETS = range(0, CAP, ALIGN)
BASES = (0, 7 * CAP)  # positions only grow: a ring that has wrapped many times behaves the same


def payload_of(length: int, salt: int = 0) -> bytes:
    return bytes((i * 7 + salt) & 0xFF for i in range(length))


def ring_bytes(buf: bytearray, start: int, end: int) -> bytes:
    """The bytes at positions ``[start, end)``, following the wrap."""
    return bytes(buf[p % CAP] for p in range(start, end))


def next_wrap(pos: int) -> int:
    return pos + CAP - pos % CAP


def payload_at(buf: bytearray | memoryview, start: int, length: int) -> bytes:
    p = start % CAP + RECORD_SIZE
    return bytes(buf[p : p + length])


# -- the module's rule -------------------------------------------------------------


def test_ring_module_imports_nothing_but_the_format_and_errors() -> None:
    tree = ast.parse(inspect.getsource(_ring))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add("." * node.level + (node.module or ""))
    assert imported <= {"__future__", "typing", "._errors", "._format"}, imported


# -- arithmetic ----------------------------------------------------------------------


def test_record_span_is_header_plus_payload_rounded_to_align() -> None:
    assert [record_span(n) for n in (0, 1, 15, 16, 17, 240)] == [16, 32, 32, 32, 48, 256]
    for n in range(1000):
        span = record_span(n)
        assert span % ALIGN == 0
        assert RECORD_SIZE + n <= span < RECORD_SIZE + n + ALIGN


@pytest.mark.parametrize("base", BASES)
def test_place_agrees_with_a_free_space_oracle_everywhere(base: int) -> None:
    # Every aligned head offset x every fill level x every length: place() must
    # start at head when the record fits before the end, after a wrap otherwise,
    # and say -1 exactly when the free bytes it would need are not there.
    for off in OFFSETS:
        head = base + CAP + off
        room = CAP - off
        for used in range(0, CAP + 1, ALIGN):
            tail = head - used
            free = CAP - used
            for length in range(MAX + 1):
                span = record_span(length)
                start = place(head, tail, CAP, length)
                if span <= room:
                    fits, where = span <= free, head
                else:
                    # An empty ring takes any record: the caller rebases tail to the start.
                    fits, where = room + span <= free or used == 0, head + room
                assert start == (where if fits else -1), (off, used, length)
                if start >= 0:
                    assert start % CAP + span <= CAP  # never straddles the end
                    new_tail = start if rebases(head, tail, start) else tail
                    assert start + span - new_tail <= CAP  # never overruns the tail


def test_place_refuses_everything_on_a_full_ring() -> None:
    for off in OFFSETS:
        for length in (0, 1, MAX):
            assert place(CAP + off, off, CAP, length) == -1


def test_empty_ring_takes_any_message_up_to_max_payload_at_every_offset() -> None:
    # max_payload() is what the Queue promises (``MessageTooLarge`` above it).
    # An empty ring must honour it wherever head happens to stand, or a
    # producer waits for space that no consumer can ever free.
    stuck = [
        (off, length)
        for off in OFFSETS
        for length in range(MAX + 1)
        if place(CAP + off, CAP + off, CAP, length) < 0
    ]
    largest = {o: max(n for n in range(MAX + 1) if place(CAP + o, CAP + o, CAP, n) >= 0) for o in OFFSETS}
    assert not stuck, (
        f"{len(stuck)} (head offset, length) pairs never fit an empty ring of {CAP} bytes "
        f"(max_payload {MAX}); largest length that fits, by head offset: {largest}"
    )


# -- write and read, exhaustively ------------------------------------------------------


@pytest.mark.parametrize("base", BASES)
def test_write_then_read_every_offset_and_length(base: int) -> None:
    buf = bytearray(CAP)
    for off in OFFSETS:
        head = tail = base + CAP + off
        for length in range(MAX + 1):
            start = place(head, tail, CAP, length)
            if start < 0:
                continue  # see test_empty_ring_takes_any_message_up_to_max_payload_at_every_offset
            data = payload_of(length, off)
            seq = 1000 + length
            new_head = write(buf, CAP, head, start, REC_RAW, seq, b"", data)
            assert new_head == start + record_span(length)
            assert start in (head, next_wrap(head))
            # Read from the old head: a wrap marker there is followed to the record,
            # unless the empty ring was rebased (tail moves to the start).
            from_ = start if rebases(head, tail, start) else tail
            assert new_head - from_ <= CAP
            check_positions(new_head, from_, CAP)
            got = read(buf, CAP, from_, new_head)
            assert got == (start, REC_RAW, seq, length, new_head)
            assert payload_at(buf, start, length) == data
            assert skip(buf, CAP, from_, new_head) == (new_head, seq)
            if start != head and from_ == tail:
                wlen, wkind, wstate, wseq = RECORD.unpack_from(buf, head % CAP)
                assert (wlen, wkind, wstate, wseq) == (0, REC_WRAP, STATE_COMMITTED, seq)


@pytest.mark.parametrize("used", [16, 48, 112, 128, 192, 224])
def test_write_never_touches_the_records_still_held(used: int) -> None:
    for off in OFFSETS:
        head = 3 * CAP + off
        tail = head - used
        for length in range(0, MAX + 1, 3):
            buf = bytearray(b"\xee" * CAP)
            for p in range(tail, head):
                buf[p % CAP] = 0xA5
            before = ring_bytes(buf, tail, head)
            start = place(head, tail, CAP, length)
            if start < 0:
                continue
            new_head = write(buf, CAP, head, start, REC_MSGPACK, 5, b"p", payload_of(length)[1:])
            assert ring_bytes(buf, tail, head) == before, (off, used, length)
            assert new_head - tail <= CAP
            # And only the bytes of [head, new_head) changed.
            changed = {i for i in range(CAP) if buf[i] not in (0xEE, 0xA5)}
            allowed = {p % CAP for p in range(head, new_head)}
            assert changed <= allowed


def test_write_a_zero_length_record() -> None:
    buf = bytearray(CAP)
    head = write(buf, CAP, 32, 32, REC_MSGPACK, 9, b"", None)
    assert head == 48
    assert read(buf, CAP, 32, head) == (32, REC_MSGPACK, 9, 0, 48)


@pytest.mark.parametrize(
    ("prefix", "body"),
    [
        (b"", None),
        (b"abc", None),
        (b"", b"xyz"),
        (b"\xc4\x03", b"xyz"),
        (b"\xc4\x03", bytearray(b"xyz")),
        (b"\xc4\x03", memoryview(b"--xyz--")[2:5]),
        (b"h" * 20, b"b" * 200),
    ],
)
def test_payload_is_prefix_then_body(prefix: bytes, body: bytes | bytearray | memoryview | None) -> None:
    buf = bytearray(CAP)
    head = write(buf, CAP, 0, 0, REC_MSGPACK, 1, prefix, body)
    _, _, _, length, end = read(buf, CAP, 0, head)
    expected = prefix + bytes(body or b"")
    assert (length, end) == (len(expected), head)
    assert payload_at(buf, 0, length) == expected


def test_works_on_a_memoryview_too() -> None:
    # The Queue passes a memoryview of the mapping; the same code, the same answers.
    raw = bytearray(CAP)
    buf = memoryview(raw)
    head = tail = 200
    start = place(head, tail, CAP, 100)
    assert start == CAP
    head = write(buf, CAP, head, start, REC_RAW, 3, b"", payload_of(100))
    assert read(buf, CAP, tail, head) == (CAP, REC_RAW, 3, 100, CAP + 128)
    assert payload_at(raw, CAP, 100) == payload_of(100)
    buf.release()


def test_committed_state_is_stored_with_the_header() -> None:
    buf = bytearray(CAP)
    write(buf, CAP, 0, 0, REC_MSGPACK, 77, b"hello", None)
    assert RECORD.unpack_from(buf, 0) == (5, REC_MSGPACK, STATE_COMMITTED, 77)


# -- check_positions ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("head", "tail"), [(0, 0), (16, 0), (CAP, 0), (10 * CAP, 9 * CAP), (5 * CAP + 32, 5 * CAP)]
)
def test_check_positions_accepts_valid(head: int, tail: int) -> None:
    check_positions(head, tail, CAP)


@pytest.mark.parametrize(
    ("head", "tail"),
    [(0, 16), (CAP + 16, 0), (2 * CAP, 0), (8, 0), (16, 8), (24, 8), (2**64 - 16, 0)],
)
def test_check_positions_refuses_invalid(head: int, tail: int) -> None:
    with pytest.raises(CorruptBus, match="positions"):
        check_positions(head, tail, CAP)


TOP = 2**64 - 1 - 2 * CAP  # the highest head: one more record cannot carry it past 2**64 - 1


def test_check_positions_keeps_two_laps_below_2_64() -> None:
    last = TOP & ~(ALIGN - 1)
    check_positions(last, last - CAP, CAP)
    for head in (last + ALIGN, 2**64 - ALIGN):
        with pytest.raises(CorruptBus, match=r"positions within 512 bytes of 2\*\*64"):
            check_positions(head, head, CAP)


@pytest.mark.parametrize("length", [0, 1, 100, MAX])
@pytest.mark.parametrize("offset", OFFSETS)
def test_a_record_from_any_accepted_head_stays_below_2_64(offset: int, length: int) -> None:
    head = (TOP & ~(CAP - 1)) - CAP + offset  # near the top, at every place in the ring
    check_positions(head, head, CAP)
    start = place(head, head, CAP, length)
    end = start + record_span(length)
    assert end <= 2**64 - 1 and end - head < 2 * record_span(length)


def test_check_room_takes_the_whole_batch() -> None:
    check_room(0, 2**64 - 4, CAP, [1, 2, 3])  # numbered up to 2**64 - 2: next_seq 2**64 - 1
    with pytest.raises(CorruptBus, match="next_seq 18446744073709551613 leaves no sequence number"):
        check_room(0, 2**64 - 3, CAP, [1, 2, 3])
    spans = 3 * record_span(1)
    head = (TOP - 2 * spans) & ~(ALIGN - 1)
    check_room(head, 0, CAP, [1, 1, 1])
    with pytest.raises(CorruptBus, match=r"positions within \d+ bytes of 2\*\*64"):
        check_room(head + ALIGN, 0, CAP, [1, 1, 1])
    check_room(0, 0, CAP, [])  # nothing to write: nothing to refuse


# -- against a model ----------------------------------------------------------------------


class RingModel(RuleBasedStateMachine):
    """Random writes (some empty, some wrapping) and reads, checked against a deque."""

    def __init__(self) -> None:
        super().__init__()
        self.buf = bytearray(b"\xdd" * CAP)
        base = 5 * CAP
        self.head = self.tail = base
        self.next_seq = 0
        self.expect_seq = 0
        self.model: collections.deque[tuple[int, int, bytes]] = collections.deque()

    @rule(
        length=st.one_of(st.just(0), st.integers(1, MAX), st.integers(MAX - 40, MAX)),
        kind=st.sampled_from([REC_MSGPACK, REC_RAW]),
        cut=st.integers(0, MAX),
        as_view=st.booleans(),
    )
    def put(self, length: int, kind: int, cut: int, as_view: bool) -> None:
        start = place(self.head, self.tail, CAP, length)
        if start < 0:
            return  # no room now: the Queue would wait for a read
        if rebases(self.head, self.tail, start):
            self.tail = start  # empty ring: both positions restart at the wrap
        data = payload_of(length, salt=self.next_seq)  # distinct contents, so mix-ups show
        prefix, body = data[:cut], data[cut:]
        self.head = write(
            self.buf, CAP, self.head, start, kind, self.next_seq, prefix,
            memoryview(body) if as_view else body,
        )  # fmt: skip
        self.model.append((self.next_seq, kind, data))
        self.next_seq += 1

    @precondition(lambda self: self.model)
    @rule()
    def get(self) -> None:
        start, kind, seq, length, nxt = read(self.buf, CAP, self.tail, self.head)
        want_seq, want_kind, want = self.model.popleft()
        assert (seq, kind, length) == (want_seq, want_kind, len(want))
        assert seq == self.expect_seq
        assert payload_at(self.buf, start, length) == want
        assert self.tail <= start < nxt <= self.head
        self.tail = nxt
        self.expect_seq += 1

    @precondition(lambda self: self.model)
    @rule()
    def drop(self) -> None:
        nxt, seq = skip(self.buf, CAP, self.tail, self.head)
        assert seq == self.model.popleft()[0] == self.expect_seq
        self.tail = nxt
        self.expect_seq += 1

    @invariant()
    def positions_are_sane(self) -> None:
        check_positions(self.head, self.tail, CAP)
        assert 0 <= self.head - self.tail <= CAP
        assert (self.head == self.tail) == (not self.model)

    @invariant()
    def every_held_record_is_readable_in_order(self) -> None:
        pos = self.tail
        for want_seq, want_kind, want in self.model:
            start, kind, seq, length, pos = read(self.buf, CAP, pos, self.head)
            assert (seq, kind, payload_at(self.buf, start, length)) == (want_seq, want_kind, want)
        assert pos == self.head


TestRingModel = RingModel.TestCase
TestRingModel.settings = settings(
    max_examples=150, stateful_step_count=60, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)  # fmt: skip


# -- damaged records -------------------------------------------------------------------------


def one_record(length: int = 10, at: int = 0) -> tuple[bytearray, int, int]:
    """A ring holding one record at ``at``; returns (buf, tail, head)."""
    buf = bytearray(CAP)
    tail = CAP + at
    head = write(buf, CAP, tail, tail, REC_MSGPACK, 4, payload_of(length), None)
    return buf, tail, head


def patch(buf: bytearray, off: int, *, length: int | None = None, kind: int | None = None,
          state: int | None = None) -> None:  # fmt: skip
    old = list(RECORD.unpack_from(buf, off))
    for i, v in enumerate((length, kind, state)):
        if v is not None:
            old[i] = v
    RECORD.pack_into(buf, off, *old)


@pytest.mark.parametrize("kind", [0, 5, 6, 0x7FFF, 0xFFFF])  # 1, 2, 4: messages; 3: wrap
def test_unknown_kind_is_corrupt(kind: int) -> None:
    buf, tail, head = one_record(at=32)
    patch(buf, 32, kind=kind)
    with pytest.raises(CorruptBus, match=f"kind {kind}") as info:
        read(buf, CAP, tail, head)
    assert info.value.offset == 32
    with pytest.raises(CorruptBus):
        skip(buf, CAP, tail, head)


@pytest.mark.parametrize("kind", [REC_MSGPACK, REC_RAW, REC_WRAP])
@pytest.mark.parametrize("state", [0, 2, 0xFFFF])
def test_uncommitted_record_is_corrupt(kind: int, state: int) -> None:
    buf, tail, head = one_record(at=64)
    patch(buf, 64, kind=kind, state=state)
    with pytest.raises(CorruptBus, match="not a committed message"):
        read(buf, CAP, tail, head)


def test_a_zeroed_header_is_corrupt() -> None:
    # What a producer that died before committing leaves behind in a fresh ring.
    buf = bytearray(CAP)
    with pytest.raises(CorruptBus):
        read(buf, CAP, 0, 32)


@pytest.mark.parametrize("length", [17, 100, MAX, 2**32 - 1])
def test_length_past_head_is_corrupt(length: int) -> None:
    buf, tail, head = one_record(length=10, at=0)  # span 32
    patch(buf, 0, length=length)
    with pytest.raises(CorruptBus, match="past the written data") as info:
        read(buf, CAP, tail, head)
    assert info.value.offset == 0


def test_length_past_the_end_of_the_ring_is_corrupt() -> None:
    # head is a full ring ahead, so only the end-of-ring check can catch it.
    buf = bytearray(CAP)
    tail = 2 * CAP + 224
    patch(buf, 224, length=100, kind=REC_MSGPACK, state=STATE_COMMITTED)
    with pytest.raises(CorruptBus, match="past the written data"):
        read(buf, CAP, tail, tail + CAP)


def test_wrap_marker_with_nothing_after_is_corrupt() -> None:
    buf = bytearray(CAP)
    tail = CAP + 192
    RECORD.pack_into(buf, 192, 0, REC_WRAP, STATE_COMMITTED, 3)
    for head in (tail + 16, tail + 64):  # head at or before the end of the ring
        with pytest.raises(CorruptBus, match="wrap marker") as info:
            read(buf, CAP, tail, head)
        assert info.value.offset == 192


def test_wrap_marker_at_ring_offset_zero_is_corrupt() -> None:
    buf = bytearray(CAP)
    RECORD.pack_into(buf, 0, 0, REC_WRAP, STATE_COMMITTED, 3)
    with pytest.raises(CorruptBus):
        read(buf, CAP, CAP, 2 * CAP)


@pytest.mark.parametrize("after", [(0, 0, 0), (5, REC_WRAP, STATE_COMMITTED), (5, 9, 1), (300, 1, 1)])
def test_wrap_marker_followed_by_garbage_is_corrupt(after: tuple[int, int, int]) -> None:
    buf = bytearray(CAP)
    tail = CAP + 224
    RECORD.pack_into(buf, 224, 0, REC_WRAP, STATE_COMMITTED, 3)
    length, kind, state = after
    RECORD.pack_into(buf, 0, length, kind, state, 3)
    with pytest.raises(CorruptBus):
        read(buf, CAP, tail, tail + 32 + 64)


@settings(max_examples=500, deadline=None)
@given(
    junk=st.binary(min_size=CAP, max_size=CAP),
    headers=st.lists(
        st.tuples(
            st.integers(0, CAP // ALIGN - 1),
            st.integers(0, 300),
            st.sampled_from([0, 1, 2, 3, 4, 0xFFFF]),
            st.sampled_from([0, 1, 2]),
        ),
        max_size=6,
    ),
    tail_slot=st.integers(0, CAP // ALIGN - 1),
    used=st.integers(1, CAP // ALIGN),
    laps=st.integers(0, 2**20),
)
def test_read_of_any_bytes_returns_a_valid_record_or_raises_corrupt_bus(
    junk: bytes, headers: list[tuple[int, int, int, int]], tail_slot: int, used: int, laps: int
) -> None:
    buf = bytearray(junk)
    # Plausible-looking headers among the junk make the deeper paths reachable.
    for slot, length, kind, state in headers:
        RECORD.pack_into(buf, slot * ALIGN, length, kind, state, 0)
    tail = laps * CAP + tail_slot * ALIGN
    head = tail + used * ALIGN
    try:
        start, kind, _seq, length, nxt = read(buf, CAP, tail, head)
    except CorruptBus as e:  # anything else (IndexError, struct.error) fails the test
        assert e.offset is not None and 0 <= e.offset < CAP
        return
    assert kind in (REC_MSGPACK, REC_RAW, REC_NDARRAY)
    assert tail <= start < nxt <= head
    assert start % CAP + RECORD_SIZE + length <= CAP
    assert nxt == start + record_span(length)


# -- early wrap: large records go back to the ring's start while the ring is nearly empty ---------

MIB = 1 << 20


@pytest.mark.parametrize(
    ("head_off", "used", "length", "early"),
    [
        (5 * MIB, 0, MIB, True),  # empty: a rebase to the next lap
        (5 * MIB, record_span(MIB), MIB, True),  # one record in: a wrap marker at head
        (5 * MIB, 2 * record_span(MIB), MIB, True),
        (5 * MIB, 2 * record_span(MIB) + ALIGN, MIB, False),  # more queued: keep the ring's bytes
        (_ring.HOT_WINDOW - ALIGN, 0, MIB, False),  # still inside the hot window
        (5 * MIB, _ring.NEAR_EMPTY, 100, True),  # small records: up to NEAR_EMPTY queued
        (5 * MIB, _ring.NEAR_EMPTY + ALIGN, 100, False),
        (5 * MIB, 3 * MIB, 3 * MIB - RECORD_SIZE, False),  # the ring's start is not free (tail at 2 MiB)
    ],
)
def test_place_wraps_a_large_record_early_only_when_the_start_is_free(
    head_off: int, used: int, length: int, early: bool
) -> None:
    cap = 16 * MIB
    head = 3 * cap + head_off
    tail = head - used
    start = place(head, tail, cap, length)
    assert start == (4 * cap if early else head)
    new_tail = start if rebases(head, tail, start) else tail
    assert start + record_span(length) - new_tail <= cap  # never overruns the tail
    assert rebases(head, tail, start) == (early and used == 0)


# -- inline copies of named steps ------------------------------------------------------------
# record_span and check_positions are spelled out inline where a call would cost on every
# record (see record_span). These tie each copy to the named step.


@settings(max_examples=300, deadline=None)
@given(pages=st.integers(1, 4), at=st.integers(0, 4 * PAGE), lap=st.integers(0, 2**40), data=st.data())
def test_every_inline_record_span_agrees_with_record_span(
    pages: int, at: int, lap: int, data: st.DataObject
) -> None:
    cap = pages * PAGE
    head = lap * cap + (at % cap) // ALIGN * ALIGN
    length = data.draw(st.integers(0, cap - RECORD_SIZE))
    span = record_span(length)
    room = cap - head % cap
    start = head + room if span > room else head
    assert place(head, head, cap, length) == start  # on an empty ring, any record fits
    assert _ring.evict(bytearray(cap), cap, head, head, length)[0] == start
    buf = bytearray(cap)
    assert write(buf, cap, head, start, REC_RAW, 7, b"", b"x" * length) == start + span
    assert read(buf, cap, start, start + span)[4] == start + span  # a wrap here rebases
    assert _ring.commit(buf, cap, start, REC_RAW, 7, length) == start + span
    top = 2**64 - 1 - 2 * cap - 2 * span  # the highest head check_room accepts for this record
    check_room(top, 0, cap, [length])
    with pytest.raises(CorruptBus):
        check_room(top + 1, 0, cap, [length])


def _fast_get_positions(head: int, tail: int, cap: int) -> bool:
    return tail < head <= tail + cap and not (head | tail) & 15


def _fast_put_positions(head: int, tail: int, cap: int, n: int = 0) -> bool:
    room = head + 2 * (n + 31) <= 2**64 - 1 - 2 * cap
    return tail <= head <= tail + cap and not (head | tail) & 15 and room


@pytest.mark.parametrize(
    ("method", "text"),
    [
        ("shmbus._consumer:_Consuming._take1_locked", "tail < head <= tail + cap and not (head | tail) & 15"),
        ("shmbus._producer:_Producing._put_locked",
         "tail <= head <= tail + cap and not (head | tail) & 15"
         "and head + 2 * (n + 31) <= U64_MAX - 2 * cap"),
    ],
)
def test_the_inline_position_checks_are_the_ones_tested_here(method: str, text: str) -> None:
    module, qualname = method.split(":")
    obj: object = __import__(module, fromlist=["_"])
    for part in qualname.split("."):
        obj = getattr(obj, part)
    source = "".join(inspect.getsource(obj).split())  # type: ignore[arg-type]
    assert "".join(text.split()) in source


@settings(max_examples=500, deadline=None)
@given(
    cap=st.sampled_from([PAGE, 3 * PAGE]),
    tail=st.one_of(st.integers(0, 2**64 - 1), st.integers(0, 4 * PAGE)),
    delta=st.integers(-64, 4 * PAGE),
    slack=st.integers(0, 15),
)
def test_the_inline_position_checks_admit_only_what_check_positions_accepts(
    cap: int, tail: int, delta: int, slack: int
) -> None:
    head = max(tail + delta, 0) + slack
    tail = tail // ALIGN * ALIGN + (slack if delta % 2 else 0)
    try:
        check_positions(head, tail, cap)
        accepted = True
    except CorruptBus:
        accepted = False
    if _fast_get_positions(head, tail, cap) and head <= 2**64 - 1 - 2 * cap:
        assert accepted  # the top bound is a writer's: a get stores no position past head
    if _fast_put_positions(head, tail, cap):
        assert accepted


@settings(max_examples=500, deadline=None)
@given(
    cap=st.sampled_from([PAGE, 3 * PAGE]),
    below=st.integers(0, 8 * PAGE),
    n=st.integers(0, PAGE - RECORD_SIZE),
)
def test_the_inline_put_check_admits_only_what_check_room_accepts(cap: int, below: int, n: int) -> None:
    # Near 2**64: the single put's inline test and _write's check_room must not disagree
    # on a record the inline test lets through (C and Python take either path).
    head = (2**64 - 1 - 2 * cap - below) // ALIGN * ALIGN
    if _fast_put_positions(head, head, cap, n):
        check_room(head, 0, cap, [n])
