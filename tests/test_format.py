"""The file format (``shmbus._format``): sizes, the header round trip, every refused header."""

from __future__ import annotations

import dataclasses
import zlib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import shmbus
from shmbus import CorruptBus, IncompatibleBus, NotABus, _format
from shmbus._format import (
    BOOT_ID,
    HEADER_MIN,
    KIND_QUEUE,
    KIND_TOPIC,
    M_HEAD,
    M_RECOVERY,
    M_SUBS,
    M_TAIL,
    MAGIC,
    MAX_SUBSCRIBERS,
    PAGE,
    PARTICIPANT_SIZE,
    STATIC,
    STATIC_SIZE,
    SUBSCRIBER_SIZE,
    VERSION,
    Layout,
    align_up,
    build_header,
    current_boot_id,
    max_payload,
    parse_header,
    parse_size,
    peek_ids,
    ring_capacity,
)
from shmbus._mutex import INIT_BYTES

BUS_ID = "0123456789abcdef"

# Positions of the static block's fields in STATIC.unpack (see the table in _format).
F_MAGIC, F_VERSION, F_KIND, F_CAPACITY, F_RING_OFFSET, F_MAXSIZE, F_FLAGS = range(7)
F_MAX_SUBS, F_MAX_PARTS, F_ALIGN, F_CREATED, F_BUS_ID, F_UID, F_PARTS_OFF, F_SUBS_OFF = range(7, 15)


def make_layout(**overrides: Any) -> Layout:
    args: dict[str, Any] = dict(
        kind=KIND_QUEUE, capacity=16 * PAGE, maxsize=0, max_subscribers=0,
        max_participants=64, bus_id=BUS_ID, creator_uid=1000,
    )  # fmt: skip
    args.update(overrides)
    return Layout.new(**args)


def parse(data: bytes, file_size: int | None = None, layout: Layout | None = None) -> Layout:
    size = file_size if file_size is not None else (layout or make_layout()).file_size
    return parse_header(data, path="/x/bus", file_size=size)


def with_field(header: bytes, index: int, value: Any, *, fix_crc: bool = True) -> bytes:
    """``header`` with one static field replaced and (as a hostile writer would) its crc redone."""
    fields = list(STATIC.unpack_from(header))
    fields[index] = value
    static = STATIC.pack(*fields)
    crc = header[STATIC_SIZE : STATIC_SIZE + 4]
    if fix_crc:
        crc = zlib.crc32(static).to_bytes(4, "little")
    return static + crc + header[STATIC_SIZE + 4 :]


# -- parse_size ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (1, 1),
        (65536, 65536),
        ("4096", 4096),
        ("64MiB", 64 * 1024**2),
        ("64mib", 64 * 1024**2),
        ("64 MiB", 64 * 1024**2),
        ("  7KiB ", 7 * 1024),
        ("1.5GB", 1_500_000_000),
        ("1.5 GiB", 3 * 1024**3 // 2),
        ("512k", 512_000),
        ("512kb", 512_000),
        ("2m", 2_000_000),
        ("1g", 10**9),
        ("1T", 10**12),
        ("1TiB", 1024**4),
        ("100b", 100),
        ("100B", 100),
    ],
)
def test_parse_size_accepts(text: int | str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "text",
    ["", "   ", "MiB", "64XB", "64 MiBs", "-1", "-1MiB", "1e6", "0x100", "1,000", "1.5.2k",
     "64 Mi B", "0", "0MiB", "0.0001b", 0, -4096, "12 34"],
)  # fmt: skip
def test_parse_size_refuses_bad_values_with_value_error(text: int | str) -> None:
    with pytest.raises(ValueError, match=r"size"):
        parse_size(text)


def test_parse_size_error_message_names_accepted_units() -> None:
    with pytest.raises(ValueError, match=r"64MiB"):
        parse_size("lots")


@pytest.mark.parametrize("value", [True, False, 1.5, None, b"64MiB", [4096]])
def test_parse_size_refuses_non_int_non_str_with_type_error(value: Any) -> None:
    with pytest.raises(TypeError):
        parse_size(value)


def test_align_up_and_max_payload() -> None:
    assert [align_up(n, 16) for n in (0, 1, 15, 16, 17, 32)] == [0, 16, 16, 16, 32, 32]
    assert align_up(4097, PAGE) == 2 * PAGE
    assert max_payload(PAGE) == PAGE - 16


# -- Layout and the header round trip ----------------------------------------------


def test_layout_new_places_tables_after_header_and_ring_on_a_page() -> None:
    lay = make_layout(kind=KIND_TOPIC, max_subscribers=10, max_participants=64)
    assert lay.participants_offset == HEADER_MIN
    assert lay.subscribers_offset == HEADER_MIN + 64 * PARTICIPANT_SIZE
    assert lay.ring_offset % PAGE == 0
    assert lay.ring_offset >= lay.subscribers_offset + 10 * SUBSCRIBER_SIZE
    assert lay.ring_offset - (lay.subscribers_offset + 10 * SUBSCRIBER_SIZE) < PAGE
    assert lay.file_size == lay.ring_offset + lay.capacity
    assert lay.created_ns > 0


def test_layout_is_frozen() -> None:
    lay = make_layout()
    with pytest.raises(dataclasses.FrozenInstanceError):
        lay.capacity = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"kind": KIND_TOPIC, "max_subscribers": 8},
        {"kind": KIND_TOPIC, "max_subscribers": 256, "max_participants": 200},
        {"maxsize": 12345, "capacity": 1024 * PAGE},
        {"creator_uid": 0, "bus_id": "ffffffffffffffff"},
        {"creator": (4194304, 1 << 40)},  # an anonymous bus: flags bit 0, creator pid and start
    ],
)
def test_build_then_parse_header_round_trips(overrides: dict[str, Any]) -> None:
    lay = make_layout(**overrides)
    header = build_header(lay)
    assert len(header) == HEADER_MIN
    assert header.startswith(MAGIC)
    # Counters and reserved space start at zero, the locks and the recovery mutex are fresh
    # mutexes, the boot id is ours.
    expected = bytearray(HEADER_MIN - 128)
    for off in (M_RECOVERY, M_HEAD, M_TAIL, M_SUBS):
        expected[off - 128 : off - 128 + len(INIT_BYTES)] = INIT_BYTES
    expected[BOOT_ID - 128 : BOOT_ID - 128 + 16] = current_boot_id()
    assert header[128:] == bytes(expected)
    assert parse(header, layout=lay) == lay


def test_parse_header_accepts_a_file_larger_than_needed() -> None:
    lay = make_layout()
    assert parse(build_header(lay), file_size=lay.file_size + PAGE) == lay


def test_parse_header_needs_only_the_first_128_bytes() -> None:
    lay = make_layout()
    assert parse(build_header(lay)[:128], layout=lay) == lay


# -- refusals ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [b"", b"\x93SHM", b"hello world, this is text" * 50, bytes(HEADER_MIN),
     b"\x93SHMBUS\r" + bytes(HEADER_MIN - 8)],
)  # fmt: skip
def test_no_magic_is_not_a_bus(data: bytes) -> None:
    with pytest.raises(NotABus) as info:
        parse(data)
    assert info.value.path == "/x/bus"


def test_wrong_magic_on_a_valid_header_is_not_a_bus() -> None:
    header = bytearray(build_header(make_layout()))
    header[1] ^= 0x20
    with pytest.raises(NotABus):
        parse(bytes(header))


@pytest.mark.parametrize("version", [0, 1, VERSION + 1, 0xFFFFFFFF])
def test_other_version_is_incompatible(version: int) -> None:
    header = with_field(build_header(make_layout()), F_VERSION, version)
    with pytest.raises(IncompatibleBus, match=rf"version {version}\b") as info:
        parse(header)
    assert info.value.path == "/x/bus"


def test_a_version_1_file_is_refused_at_open(bus_name: str) -> None:
    """Format 1 had semaphore locks and no mutexes at 832..1023: opening one must not use those bytes."""
    q = shmbus.Queue.create(bus_name, capacity=16 * PAGE)
    path = q.path
    q.close()
    with open(path, "r+b") as f:
        head = bytearray(f.read(HEADER_MIN))
        head[832:1024] = bytes(192)  # a format 1 file had nothing there
        f.seek(0)
        f.write(with_field(bytes(head), F_VERSION, 1))
    for opener in (shmbus.Queue.open, shmbus.Topic.open):
        with pytest.raises(IncompatibleBus, match=r"version 1\b") as info:
            opener(path)
        assert info.value.path == path


def test_other_version_is_incompatible_even_with_a_stale_crc() -> None:
    # A future version may lay out its header differently: the version decides first.
    header = with_field(build_header(make_layout()), F_VERSION, VERSION + 1, fix_crc=False)
    with pytest.raises(IncompatibleBus):
        parse(header)


@pytest.mark.parametrize("offset", [12, 16, 24, 32, 40, 44, 48, 52, 56, 64, 79, 80, 88, 92, 123])
def test_flipped_byte_in_static_block_fails_the_crc(offset: int) -> None:
    header = bytearray(build_header(make_layout()))
    header[offset] ^= 0x01  # bytes 0..11 (magic, version) are decided before the crc
    with pytest.raises(CorruptBus, match="checksum") as info:
        parse(bytes(header))
    assert info.value.offset == 124


@pytest.mark.parametrize("offset", [124, 125, 127])
def test_flipped_byte_in_the_crc_itself_is_corrupt(offset: int) -> None:
    header = bytearray(build_header(make_layout()))
    header[offset] ^= 0x80
    with pytest.raises(CorruptBus, match="checksum"):
        parse(bytes(header))


def test_every_single_bit_flip_in_the_static_block_is_refused() -> None:
    good = build_header(make_layout())
    for offset in range(STATIC_SIZE + 4):
        for bit in range(8):
            header = bytearray(good)
            header[offset] ^= 1 << bit
            with pytest.raises((NotABus, IncompatibleBus, CorruptBus)):
                parse(bytes(header))


PAGE_LAYOUT = make_layout()


@pytest.mark.parametrize(
    ("index", "value", "offset"),
    [
        (F_KIND, 0, 12),
        (F_KIND, 3, 12),
        (F_ALIGN, 8, 52),
        (F_ALIGN, 0, 52),
        (F_CAPACITY, 0, 16),
        (F_CAPACITY, 16, 16),
        (F_CAPACITY, PAGE + 16, 16),
        (F_CAPACITY, 1 << 41, 16),
        (F_CAPACITY, (1 << 64) - PAGE, 16),
        (F_MAXSIZE, 1 << 31, 32),
        (F_MAXSIZE, (1 << 64) - 1, 32),
        (F_MAX_SUBS, (1 << 16) + 1, 32),
        (F_MAX_SUBS, 0xFFFFFFFF, 32),
        (F_MAX_PARTS, 0xFFFFFFFF, 32),
        (F_BUS_ID, b"0123456789ABCDEF", 64),
        (F_BUS_ID, b"0123456789abcde\0", 64),
        (F_BUS_ID, b"../../etc/passwd", 64),
        (F_BUS_ID, bytes(16), 64),
        (F_PARTS_OFF, 0, 84),
        (F_PARTS_OFF, HEADER_MIN + 32, 84),
        (F_PARTS_OFF, 0xFFFFFFFF, 84),
        (F_SUBS_OFF, 0, 84),
        (F_SUBS_OFF, PAGE_LAYOUT.subscribers_offset + 64, 84),
        (F_SUBS_OFF, 0xFFFFFFFF, 84),
        (F_RING_OFFSET, 0, 24),
        (F_RING_OFFSET, PAGE_LAYOUT.ring_offset + PAGE, 24),
        (F_RING_OFFSET, PAGE_LAYOUT.ring_offset - 16, 24),
        (F_RING_OFFSET, (1 << 64) - PAGE, 24),
    ],
)
def test_hostile_header_with_recomputed_crc_is_corrupt(index: int, value: Any, offset: int) -> None:
    header = with_field(build_header(PAGE_LAYOUT), index, value)
    with pytest.raises(CorruptBus) as info:
        # A huge file so that only the field itself, not the file size, can be at fault.
        parse(header, file_size=1 << 62)
    assert info.value.offset == offset
    assert info.value.path == "/x/bus"
    assert "checksum" not in str(info.value)


def test_hostile_table_sizes_that_keep_offsets_consistent_are_corrupt() -> None:
    # max_participants and the subscribers offset moved together: still out of range.
    header = with_field(build_header(PAGE_LAYOUT), F_MAX_PARTS, 1 << 20)
    header = with_field(header, F_SUBS_OFF, HEADER_MIN + (1 << 20) * PARTICIPANT_SIZE)
    with pytest.raises(CorruptBus):
        parse(header, file_size=1 << 62)


@pytest.mark.parametrize("missing", [1, PAGE, PAGE_LAYOUT.capacity // 2, PAGE_LAYOUT.file_size - 1])
def test_file_smaller_than_the_header_says_is_corrupt(missing: int) -> None:
    size = PAGE_LAYOUT.file_size - missing
    with pytest.raises(CorruptBus, match="truncated") as info:
        parse(build_header(PAGE_LAYOUT), file_size=size)
    assert info.value.offset == size


@pytest.mark.parametrize("length", [8, 64, 127])
def test_header_cut_short_after_the_magic_is_corrupt(length: int) -> None:
    with pytest.raises(CorruptBus, match="truncated"):
        parse(build_header(PAGE_LAYOUT)[:length])


def test_file_shorter_than_header_min_is_corrupt() -> None:
    with pytest.raises(CorruptBus, match="truncated"):
        parse(build_header(PAGE_LAYOUT), file_size=HEADER_MIN - 1)


def test_hostile_capacity_that_the_file_cannot_hold_is_corrupt() -> None:
    # A valid-looking capacity of 1 TiB on a small file must not be mapped.
    header = with_field(build_header(PAGE_LAYOUT), F_CAPACITY, 1 << 40)
    with pytest.raises(CorruptBus, match="truncated"):
        parse(header, file_size=PAGE_LAYOUT.file_size)


def test_errors_carry_a_next_step() -> None:
    header = with_field(build_header(PAGE_LAYOUT), F_KIND, 9)
    with pytest.raises(CorruptBus, match=r"shmbus rm"):
        parse(header)


# -- peek_ids --------------------------------------------------------------------------


def test_peek_ids_of_a_valid_header() -> None:
    lay = make_layout(kind=KIND_TOPIC, max_subscribers=12)
    assert peek_ids(build_header(lay)) == (BUS_ID, 12)


def test_peek_ids_reads_a_damaged_header() -> None:
    # Used to find the semaphores of a corrupt bus: the crc and other fields do not matter.
    header = bytearray(build_header(make_layout(max_subscribers=3)))
    header[16:24] = b"\xff" * 8  # capacity garbage
    header[124:128] = b"\0\0\0\0"  # crc garbage
    assert peek_ids(bytes(header)) == (BUS_ID, 3)
    assert peek_ids(with_field(bytes(header), F_VERSION, 7)) == (BUS_ID, 3)


def test_peek_ids_clamps_a_huge_subscriber_count() -> None:
    header = with_field(build_header(make_layout()), F_MAX_SUBS, 0xFFFFFFFF)
    assert peek_ids(header) == (BUS_ID, MAX_SUBSCRIBERS)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not a bus at all" * 20,
        build_header(PAGE_LAYOUT)[: STATIC_SIZE - 1],
        with_field(build_header(PAGE_LAYOUT), F_BUS_ID, b"0123456789ABCDEF"),
        with_field(build_header(PAGE_LAYOUT), F_BUS_ID, b"../../../tmp/xyz"),
        with_field(build_header(PAGE_LAYOUT), F_MAGIC, b"\x93SHMBUX\n"),
    ],
)
def test_peek_ids_returns_none_for_what_it_cannot_trust(data: bytes) -> None:
    assert peek_ids(data) is None


def test_an_anonymous_layout_carries_its_creator_in_the_static_block() -> None:
    lay = make_layout(creator=(1234, 987654321))
    assert lay.anonymous and (lay.flags, lay.creator_pid, lay.creator_start) == (1, 1234, 987654321)
    fields = STATIC.unpack_from(build_header(lay))
    assert (fields[F_FLAGS], fields[15], fields[16], fields[17]) == (1, 1234, 987654321, bytes(20))
    assert not make_layout().anonymous and STATIC.unpack_from(build_header(make_layout()))[15:17] == (0, 0)


@pytest.mark.parametrize("value", [1, 16, 4095, "4000", "1KiB"])
def test_a_capacity_below_one_page_is_an_error_not_a_round_up(value: Any) -> None:
    with pytest.raises(ValueError, match="below the minimum of 4096 bytes"):
        ring_capacity(value)
    assert ring_capacity(4096) == 4096 and ring_capacity(4097) == 8192


# -- packed words and inline copies ------------------------------------------------

_U32 = st.integers(0, (1 << 32) - 1)


@given(_U32, _U32)
def test_participant_word_round_trips(pid: int, state: int) -> None:
    word = _format.participant_word(pid, state)
    assert (_format.participant_pid(word), _format.participant_state(word)) == (pid, state)
    # pid at byte 0, state at byte 4, as PARTICIPANT_FIELDS says
    assert word.to_bytes(8, "little") == pid.to_bytes(4, "little") + state.to_bytes(4, "little")


@given(_U32, _U32)
def test_subscriber_word_round_trips(state: int, pid: int) -> None:
    word = _format.subscriber_word(state, pid)
    assert (_format.subscriber_state(word), _format.subscriber_pid(word)) == (state, pid)
    assert word.to_bytes(8, "little") == state.to_bytes(4, "little") + pid.to_bytes(4, "little")


@given(st.integers(0, (1 << 64) - 1), st.integers(1, 4096))
def test_the_inline_sample_test_agrees_with_sample_due(last: int, count: int) -> None:
    # The per-put paths of _producer.py test ``(seq - 1) & 255 < count`` inline (seq - 1 = last).
    assert (last & 255 < count) == _format.sample_due(last, count)
    # _topic.py, one message at a time: ``not seq & 255``
    assert (not last & 255) == _format.sample_due(last, 1)


def test_the_inline_sample_tests_are_where_they_are_said_to_be() -> None:
    # If SAMPLE_EVERY changes, these inline copies must change with it.
    assert _format.SAMPLE_EVERY - 1 == 255
    source = (Path(shmbus.__file__).parent / "_producer.py").read_text()
    assert source.count("& 255 < ") == source.count("_format.sample_due(") == 2
