"""The codec (``shmbus._codec``): msgpack round trips, the zero-copy bytes path, refusals.

Most tests drive the codec the way a Queue does, with no Queue: ``encode``,
then the payload ``prefix + body`` stored in a buffer, ``extract`` to copy it
out, ``finish`` to decode it.
"""

from __future__ import annotations

import array
import contextlib
import datetime
import math
import mmap
import pickle
from typing import Any

import msgpack
import pytest
from conftest import packable_depth
from hypothesis import given, settings
from hypothesis import strategies as st

import shmbus
from shmbus import Codec, CorruptBus, DecodeError, EncodeError, ShmbusError
from shmbus._codec import DEFAULT_CODEC, extract
from shmbus._format import REC_MSGPACK, REC_RAW

JUNK = b"\xee" * 7  # around the payload, as other records would be in the ring


def stored(codec: Codec, obj: Any) -> tuple[int, bytes]:
    """Encode ``obj`` and return its record kind and payload as it would lie in the ring."""
    kind, prefix, body, n = codec.encode(obj)
    payload = prefix + (bytes(body) if body is not None else b"")
    assert len(payload) == n
    return kind, payload


def roundtrip(obj: Any, codec: Codec = DEFAULT_CODEC, buffer: type = bytes) -> Any:
    kind, payload = stored(codec, obj)
    ring = buffer(JUNK + payload + JUNK)
    return codec.finish(kind, extract(ring, len(JUNK), len(payload)))


def ext_as_tuple(code: int, data: bytes) -> tuple[int, bytes]:
    return (code, data)


# -- round trips ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "obj",
    [
        None, True, False, 0, 1, -1, 127, 128, -33, 2**31, 2**63 - 1, -(2**63), 2**64 - 1,
        0.0, -0.0, 1.5, -2.25e300, math.inf, -math.inf, 1e-310,
        "", "hello", "ünïcødé ✓ 😀", "x" * 70000,
        b"", b"\x00", b"bytes", bytes(range(256)), b"\xc4" * 1000,
        [], [1, "two", 3.0, None], {}, {"a": 1, "b": [1, 2, {"c": b"d"}]},
        {"nested": {"deeper": {"deepest": [[], {}, [[[]]]]}}}, {b"bin key": 1},
        [[1, 2], [3, [4, [5, [6]]]]], {"big": b"z" * 100_000},
    ],
)  # fmt: skip
def test_round_trip(obj: Any) -> None:
    out = roundtrip(obj)
    assert out == obj
    assert type(out) is type(obj)
    assert msgpack.packb(out) == msgpack.packb(obj)  # bools stay bools, ints stay ints


def test_nan_round_trips() -> None:
    assert math.isnan(roundtrip(math.nan))


@pytest.mark.parametrize("buffer", [bytes, bytearray, memoryview])
def test_round_trip_from_any_buffer_type(buffer: type) -> None:
    for obj in ({"k": [1, 2]}, b"raw", b"r" * 300, b"r" * 70000):
        assert roundtrip(obj, buffer=buffer) == obj


def test_round_trip_from_an_mmap() -> None:
    # The Queue hands extract() its mmap, whose slices are bytes.
    kind, payload = stored(DEFAULT_CODEC, {"from": "mmap", "blob": b"q" * 5000})
    with mmap.mmap(-1, 3 * mmap.PAGESIZE) as mm:
        mm[100 : 100 + len(payload)] = payload
        out = DEFAULT_CODEC.finish(kind, extract(mm, 100, len(payload)))
    assert out == {"from": "mmap", "blob": b"q" * 5000}


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        (bytearray(b"abc"), b"abc"),
        (memoryview(b"abc"), b"abc"),
        (memoryview(bytearray(b"xabcx"))[1:4], b"abc"),
        (bytearray(), b""),
        (memoryview(array.array("i", [1, 2, 3])), array.array("i", [1, 2, 3]).tobytes()),
        (memoryview(b"abcdef").cast("B", (2, 3)), b"abcdef"),
    ],
)
def test_bytes_like_come_back_as_bytes(obj: Any, expected: bytes) -> None:
    out = roundtrip(obj)
    assert out == expected
    assert type(out) is bytes


def test_bytes_subclass_comes_back_as_bytes() -> None:
    class Tagged(bytes):
        pass

    out = roundtrip(Tagged(b"tagged"))
    assert (out, type(out)) == (b"tagged", bytes)


def test_tuples_come_back_as_lists() -> None:
    assert roundtrip((1, (2, 3), {"t": (4,)})) == [1, [2, 3], {"t": [4]}]


def test_use_list_false_gives_tuples() -> None:
    codec = Codec(unpack_options={"use_list": False})
    out = roundtrip([1, [2, 3], {"t": [4]}], codec)
    assert out == (1, (2, 3), {"t": (4,)})
    assert type(out[1]) is tuple


def test_int_map_keys_round_trip() -> None:
    # encode() accepts {1: ...}; whatever it accepts, the other side must be able to read,
    # or a Queue consumes the message and only raises DecodeError: the message is lost.
    for obj in ({1: "a", 2: "b"}, {"outer": {0: [1]}}, {-5: None}):
        try:
            out = roundtrip(obj)
        except DecodeError as e:
            pytest.fail(f"{obj!r} was encoded but cannot be decoded: {e}")
        assert out == obj


@pytest.mark.parametrize(
    "obj",
    [
        {(1, 2): "a"},
        {(): 0, (1, (2, (3, b"x")), None, 1.5, True): [[4, 5]]},
        {"outer": [{("a", "b"): {(1,): 2}}]},
        {(1, 2): "a", "s": "b", 3: "c", b"b": "d", None: "e", 2.5: "f", False: "g"},
    ],
)
def test_tuple_map_keys_come_back_as_tuples(obj: Any) -> None:
    # msgpack reads a tuple key back as a list, which cannot be a key: tuples again, equal.
    for codec in (DEFAULT_CODEC, Codec(unpack_options={"timestamp": 0})):
        assert roundtrip(obj, codec) == obj


def test_tuple_map_keys_with_the_codecs_own_hooks() -> None:
    assert roundtrip({(1, 2): [3]}, Codec(unpack_options={"use_list": False})) == {(1, 2): (3,)}
    pairs = Codec(unpack_options={"object_pairs_hook": lambda p: [(tuple(k), v) for k, v in p]})
    assert roundtrip({(1, 2): "a"}, pairs) == [((1, 2), "a")]


def _nest(depth: int, as_map: bool) -> Any:
    x: Any = {} if as_map else []
    for _ in range(depth):
        x = {"k": x} if as_map else [x]
    return x


@pytest.mark.parametrize("as_map", [False, True], ids=["lists", "maps"])
@pytest.mark.parametrize("depth", [1, 600, 1023, 1024])
def test_everything_the_packer_nests_decodes(depth: int, as_map: bool) -> None:
    # msgpack packs 1025 levels but unpacks only 1024: the outermost is read by hand.
    # (Older msgpack on CPython 3.9/3.10 packs fewer: its recursion limit counts our frames.)
    limit = packable_depth()
    obj = _nest(min(depth, limit), as_map)
    for codec in (DEFAULT_CODEC, Codec(unpack_options={"use_list": False}), Codec({}, {"raw": False})):
        out = roundtrip(obj, codec)
        assert msgpack.packb(out) == msgpack.packb(obj)  # (== on such depths overflows the C stack)
    hooked = Codec(unpack_options={"list_hook": len, "object_hook": len})
    assert roundtrip(_nest(min(1024, limit), as_map), hooked) == 1


def test_one_level_deeper_than_the_packer_is_an_encode_error() -> None:
    with pytest.raises(EncodeError):
        DEFAULT_CODEC.encode(_nest(1025, False))


def test_pack_default_converts_custom_types() -> None:
    codec = Codec(pack_options={"default": sorted})
    assert roundtrip({"s": {3, 1, 2}}, codec) == {"s": [1, 2, 3]}


def test_datetime_with_pack_and_unpack_options() -> None:
    codec = Codec(pack_options={"datetime": True}, unpack_options={"timestamp": 3})
    when = datetime.datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=datetime.timezone.utc)
    assert roundtrip({"at": when}, codec) == {"at": when}


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text()
    | st.binary(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(obj=msgpack_values)
def test_round_trip_anything_msgpack_holds(obj: Any) -> None:
    out = roundtrip(obj)
    assert out == obj
    assert msgpack.packb(out) == msgpack.packb(obj)


# -- the bytes path: prefix + body, no copy; extract strips the bin header ---------------


def test_bytes_body_is_the_callers_object() -> None:
    data = b"x" * 1000
    kind, prefix, body, n = DEFAULT_CODEC.encode(data)
    assert kind == REC_MSGPACK
    assert body is data
    assert n == len(prefix) + len(data)


@pytest.mark.parametrize("make", [bytearray, lambda b: memoryview(bytearray(b))])
def test_bytearray_and_memoryview_body_is_a_view_on_the_callers_buffer(make: Any) -> None:
    obj = make(b"y" * 1000)
    kind, prefix, body, n = DEFAULT_CODEC.encode(obj)
    assert isinstance(body, memoryview)
    owner = obj.obj if isinstance(obj, memoryview) else obj
    assert body.obj is owner
    # A view, not a copy: a change to the caller's buffer shows through.
    owner[0] = ord("Z")
    assert body[0] == ord("Z")
    assert (kind, n) == (REC_MSGPACK, len(prefix) + 1000)


def test_memoryview_body_counts_bytes_not_items() -> None:
    arr = array.array("d", [1.0, 2.0, 3.0])
    _, prefix, body, n = DEFAULT_CODEC.encode(memoryview(arr))
    assert body is not None
    assert len(body) == 24
    assert n == len(prefix) + 24


@pytest.mark.parametrize(
    ("length", "header"),
    [
        (0, b"\xc4\x00"),
        (1, b"\xc4\x01"),
        (255, b"\xc4\xff"),
        (256, b"\xc5\x01\x00"),
        (65535, b"\xc5\xff\xff"),
        (65536, b"\xc6\x00\x01\x00\x00"),
        (70000, b"\xc6\x00\x01\x11\x70"),
    ],
)
def test_bin_header_boundaries(length: int, header: bytes) -> None:
    data = bytes(i & 0xFF for i in range(length))
    for obj in (data, bytearray(data), memoryview(data)):
        kind, prefix, body, n = DEFAULT_CODEC.encode(obj)
        assert kind == REC_MSGPACK
        assert prefix == header
        # Exactly what msgpack itself writes for these bytes.
        assert prefix + bytes(body) == msgpack.packb(data, use_bin_type=True)
        assert n == len(header) + length
    payload = header + data
    got = extract(JUNK + payload + JUNK, len(JUNK), len(payload))
    assert got == (data,)  # stripped, already final: no msgpack decode afterwards
    assert DEFAULT_CODEC.finish(REC_MSGPACK, got) == data


@pytest.mark.parametrize("obj", [{"a": 1}, [b"inner bin"], "text", 7, None, [], 0.5])
def test_extract_keeps_other_payloads_whole(obj: Any) -> None:
    payload = msgpack.packb(obj, use_bin_type=True)
    got = extract(JUNK + payload + JUNK, len(JUNK), len(payload))
    assert got == payload
    assert type(got) is bytes


@pytest.mark.parametrize(
    "payload",
    [
        b"\xc4\x05ab",  # bin8 claiming more bytes than the record holds
        b"\xc4\x01ab",  # bin8 followed by extra bytes
        b"\xc5\x00\x09abc",
        b"\xc6\x00\x00\x00\x10abc",
        b"\xc4",
        b"\xc5\x00",
        b"\xc6\x00\x00",
    ],
)
def test_extract_leaves_a_mismatched_bin_header_to_the_decoder(payload: bytes) -> None:
    got = extract(JUNK + payload + JUNK, len(JUNK), len(payload))
    assert got == payload
    with pytest.raises(DecodeError):
        DEFAULT_CODEC.finish(REC_MSGPACK, got)


def test_extract_copies_exactly_the_record() -> None:
    ring = b"..\xc4\x03abcDEFG"
    assert extract(ring, 2, 5) == (b"abc",)
    # The bin8 header says 3 bytes, the record holds 2: nothing past the record is read.
    assert extract(ring, 2, 4) == b"\xc4\x03ab"
    assert extract(ring, 2, 0) == b""


# -- raw records ---------------------------------------------------------------------------


@pytest.mark.parametrize("data", [b"", b"plain", b"\x92\x01\x02"])
def test_finish_returns_raw_records_untouched(data: bytes) -> None:
    assert DEFAULT_CODEC.finish(REC_RAW, data) == data


@pytest.mark.parametrize(
    "data",
    [
        b"\xc4\x01x",
        b"\xc5\x00\x02xy",
        b"\xc6\x00\x00\x00\x01z",
        b"\xc4\x00",
        b"\xc4" + bytes([200]) + b"q" * 200,
    ],
    ids=["bin8", "bin16", "bin32", "empty-bin8", "long-bin8"],
)
def test_raw_bytes_that_look_like_a_msgpack_bin_come_back_unchanged(bus_name: str, data: bytes) -> None:
    # put_bytes() promises the caller's bytes back, whatever they contain; the
    # bin-header stripping of extract() is for msgpack records only.
    with shmbus.Queue.create(bus_name, capacity=4096) as q:
        q.put_bytes(data)
        q.put_bytes(b"after")
        assert q.get_bytes(timeout=5) == data
        assert q.get_bytes(timeout=5) == b"after"


# -- refusals ---------------------------------------------------------------------------------


class Opaque:
    pass


@pytest.mark.parametrize(
    "obj",
    [object(), {1, 2}, frozenset(), Opaque(), len, 1 + 2j, 2**64, -(2**63) - 1,
     {"deep": [1, {"set": {3}}]}, [Opaque()], {"k": object()}],
)  # fmt: skip
def test_unsupported_objects_raise_encode_error(obj: Any) -> None:
    with pytest.raises(EncodeError) as info:
        DEFAULT_CODEC.encode(obj)
    err = info.value
    assert isinstance(err, TypeError)
    assert isinstance(err, ShmbusError)
    assert "default" in str(err)  # says how to fix it
    assert err.__cause__ is not None


def test_non_contiguous_memoryview_encodes_or_raises_encode_error() -> None:
    mv = memoryview(b"abcdef")[::2]
    try:
        out = roundtrip(mv)
    except EncodeError:
        return
    except TypeError as e:
        pytest.fail(f"raised a bare {type(e).__name__} instead of shmbus.EncodeError: {e}")
    assert out == b"ace"


def test_ext_types_come_back_as_they_were_put_by_default() -> None:
    # put accepts them, so get must return them: inert (code, data) pairs, nothing looked up.
    for obj in (msgpack.ExtType(5, b"xyz"), {"a": [msgpack.ExtType(1, b"")]}):
        assert roundtrip(obj) == obj
    out = roundtrip(msgpack.ExtType(5, b"xyz"))
    assert type(out) is msgpack.ExtType


def test_an_ext_hook_that_refuses_is_a_decode_error() -> None:
    def refuse(code: int, data: bytes) -> Any:
        raise ValueError(f"ext type {code} is not ours")

    codec = Codec(unpack_options={"ext_hook": refuse})
    _, payload = stored(codec, {"a": [msgpack.ExtType(1, b"")]})
    with pytest.raises(DecodeError, match="ext type 1 is not ours") as info:
        codec.finish(REC_MSGPACK, payload)
    assert isinstance(info.value, CorruptBus)


def test_ext_types_accepted_with_an_ext_hook() -> None:
    codec = Codec(unpack_options={"ext_hook": ext_as_tuple})
    assert roundtrip({"e": msgpack.ExtType(5, b"xyz")}, codec) == {"e": (5, b"xyz")}


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\xc1",  # never used in msgpack
        b"\x92\x01",  # array of 2 with 1 element
        b"\x01\x02",  # two objects where one is expected
        b"\xa5ab",  # str of 5 with 2 bytes
        b"\xdb\xff\xff\xff\xff",  # str32 of 4 GiB: must not allocate it
        b"\xdd\xff\xff\xff\xff",  # array32 of 4 billion items
        b"\xdf\xff\xff\xff\xff",  # map32 of 4 billion pairs
        b"\xa3\xff\xfe\xfd",  # str that is not UTF-8
        b"\x81\x80\x01",  # map with a map key (a list key reads as a tuple)
        b"\x91" * 100_000,  # deeper than any sane nesting
        b"\xd6\xff\x00\x00",  # timestamp ext with a bad length
    ],
)
def test_garbage_payload_raises_decode_error(payload: bytes) -> None:
    with pytest.raises(DecodeError) as info:
        DEFAULT_CODEC.finish(REC_MSGPACK, payload)
    assert isinstance(info.value, CorruptBus)
    assert isinstance(info.value, ValueError)


@settings(max_examples=500, deadline=None)
@given(payload=st.binary(max_size=64))
def test_any_payload_decodes_or_raises_decode_error(payload: bytes) -> None:
    for codec in (DEFAULT_CODEC, Codec(unpack_options={"use_list": False})):
        # Anything but DecodeError (IndexError, UnicodeDecodeError...) fails the test.
        with contextlib.suppress(DecodeError):
            codec.finish(REC_MSGPACK, extract(payload, 0, len(payload)))


# -- the Codec object -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "codec",
    [
        Codec(),
        Codec(pack_options={"use_single_float": True}),
        Codec(unpack_options={"use_list": False}),
        Codec({"datetime": True}, {"timestamp": 3, "ext_hook": ext_as_tuple}),
    ],
)
def test_codec_pickles_and_compares_equal(codec: Codec) -> None:
    clone = pickle.loads(pickle.dumps(codec))
    assert clone == codec
    assert hash(clone) == hash(codec)
    assert clone is not codec
    assert repr(clone) == repr(codec)
    obj = {"list": [1, 2], "f": 0.5}
    assert roundtrip(obj, clone) == roundtrip(obj, codec)


def test_codec_equality() -> None:
    assert Codec() == Codec() == DEFAULT_CODEC
    assert Codec({}, {}) == Codec(None, None)
    assert Codec(unpack_options={"use_list": False}) != Codec()
    assert Codec(pack_options={"use_single_float": True}) != Codec()
    assert Codec() != "Codec()"
    assert len({Codec(), Codec(), Codec(unpack_options={"use_list": False})}) == 2


def test_codec_repr_shows_options() -> None:
    assert repr(Codec(unpack_options={"use_list": False})) == (
        "Codec(pack_options={}, unpack_options={'use_list': False})"
    )


def test_codec_keeps_its_own_copy_of_the_options() -> None:
    options: dict[str, Any] = {"use_list": False}
    codec = Codec(unpack_options=options)
    options["use_list"] = True
    assert codec.unpack_options == {"use_list": False}
    assert type(roundtrip([1], codec)) is tuple


def test_pack_options_reach_the_packer() -> None:
    _, payload = stored(Codec(pack_options={"use_single_float": True}), 0.5)
    assert payload == b"\xca\x3f\x00\x00\x00"
    _, payload = stored(DEFAULT_CODEC, 0.5)
    assert payload[0] == 0xCB
