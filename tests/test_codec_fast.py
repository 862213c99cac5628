"""msgspec as the faster coder of the same msgpack bytes (``shmbus._codec``, ``_cfast.c``'s ``plain_tree``).

With msgspec installed, the plain codec decodes with it and the C path encodes
plain messages with it. These tests prove that nothing a user sees changes:
for every type shmbus carries, both libraries write the same bytes and each
decodes the other's output to the same message; what msgspec would code
otherwise (timestamps, ext types, types msgpack refuses) goes through msgpack.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import decimal
import enum
import math
import uuid
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shmbus import Codec, DecodeError, EncodeError, Full, Queue
from shmbus._codec import DEFAULT_CODEC, FAST_DECODE, FAST_ENCODE
from shmbus._format import Q_TAIL

pytestmark = pytest.mark.skipif(FAST_ENCODE is None, reason="msgspec is not installed")

_pack = msgpack.Packer(use_bin_type=True).pack


def _unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, strict_map_key=False, ext_hook=msgpack.ExtType)


INTS = [0, 1, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1,
        -1, -32, -33, -128, -129, -(2**15), -(2**15) - 1, -(2**31), -(2**31) - 1, -(2**63)]  # fmt: skip
VALUES = [
    *INTS,
    0.0, -0.0, 1.5, 3.14, 1e308, float("inf"), float("-inf"),
    "", "a" * 31, "a" * 32, "a" * 255, "a" * 256, "a" * 65535, "a" * 65536, "é€😀",
    b"", b"x" * 255, b"x" * 256, b"x" * 65535, b"x" * 65536, b"\xd6\xff\x00\x00\x00\x01",
    None, True, False,
    [], [1] * 15, [1] * 16, [1] * 65536, (1, "two", 3.0), [[[]]],
    {}, {str(i): i for i in range(15)}, {str(i): i for i in range(16)}, {str(i): i for i in range(65536)},
    {1: "int key", b"k": "bytes key", 1.5: "float key", None: "None key", False: "bool key"},
    {(1, 2): "tuple key", (1, (2, 3)): "nested tuple key"},
    {"seq": 7, "ts": 1.7e9, "name": "sensor-17", "value": 3.14, "tags": ["a", "b"], "raw": b"\xff"},
]  # fmt: skip


def _same(a: Any, b: Any) -> bool:
    """Equal, types included (NaN equal to NaN), as a user would compare two messages."""
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return type(a) is type(b) and repr(a) == repr(b)


@pytest.mark.parametrize("obj", VALUES, ids=lambda o: type(o).__name__)
def test_both_write_the_same_bytes_and_read_each_others(obj: Any) -> None:
    assert FAST_ENCODE is not None and FAST_DECODE is not None
    ours = FAST_ENCODE(obj)
    theirs = _pack(obj)
    assert ours == theirs
    expected = DEFAULT_CODEC.finish(1, theirs)
    assert _same(FAST_DECODE(theirs), expected)
    assert _same(DEFAULT_CODEC.finish(1, ours), expected)


def test_nan_alike() -> None:
    assert FAST_ENCODE is not None
    assert FAST_ENCODE(float("nan")) == _pack(float("nan"))


class Colour(enum.Enum):
    RED = 1


@dataclasses.dataclass
class Point:
    x: int


# msgspec encodes these; msgpack refuses them, so put must still raise EncodeError.
REFUSED = [datetime.datetime(2026, 1, 1), datetime.date(2026, 1, 1), uuid.UUID(int=1), decimal.Decimal("1.5"),
           Colour.RED, {1, 2}, frozenset(), Point(1), 2**64, -(2**63) - 1]  # fmt: skip
# msgspec would write or read these otherwise (an ExtType as an array, a timestamp as a datetime).
MSGPACK_ONLY = [msgpack.ExtType(5, b"ab"), msgpack.Timestamp(1, 2), msgpack.Timestamp(2**34, 5),
                msgpack.Timestamp(-1, 0)]  # fmt: skip


@pytest.fixture(params=["C", "pure"])
def queue(request: pytest.FixtureRequest, bus_name: str) -> Any:
    q = Queue.create(bus_name, capacity="4MiB")
    if request.param == "pure":
        q._drop_fast_path()
    elif q._fast is None:
        q.close()
        pytest.skip("no C fast path")
    yield q
    q.close()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("obj", REFUSED, ids=lambda o: type(o).__name__)
def test_what_msgpack_refuses_is_refused(queue: Queue, obj: Any) -> None:
    for msg in (obj, {"in": obj}, [1, [obj]]):
        with pytest.raises(EncodeError):
            queue.put(msg)
        with pytest.raises(EncodeError):
            queue.put_many([{"ok": 1}, msg])
    assert queue.qsize() == 0


@pytest.mark.timeout(30)
@pytest.mark.parametrize("obj", MSGPACK_ONLY, ids=repr)
def test_timestamps_and_ext_types_come_back_as_msgpack_gives_them(queue: Queue, obj: Any) -> None:
    msgs = [obj, {"at": obj}, [1, obj, "x"], {"k": [obj, {"deeper": obj}]}]
    for m in msgs:
        queue.put(m)
    got = [queue.get(timeout=5) for _ in msgs]
    queue.put_many(msgs)
    got_many = queue.get_many(len(msgs), timeout=5)
    for m, a, b in zip(msgs, got, got_many):
        expected = _unpack(_pack(m))
        assert _same(a, expected) and _same(b, expected)


@pytest.mark.timeout(60)
def test_every_value_through_a_queue_as_msgpack_gives_it(queue: Queue) -> None:
    msgs = [v for v in VALUES if not isinstance(v, (bytes, list)) or len(v) < 1000]
    for m in msgs:
        queue.put(m)
        # the same bytes in the ring (a bytes message's are its data)
        assert queue.get_bytes(timeout=5) == (m if type(m) is bytes else _pack(m))
    queue.put_many(msgs)  # (one msgspec call for the batch, then cut into records: the same bytes)
    for m in msgs:
        assert queue.get_bytes(timeout=5) == (m if type(m) is bytes else _pack(m))
    for m in msgs:
        queue.put(m)
    singles = [queue.get(timeout=5) for _ in msgs]
    queue.put_many(msgs)
    batch = queue.get_many(len(msgs), timeout=5)
    for m, a, b in zip(msgs, singles, batch):
        expected = DEFAULT_CODEC.finish(1, _pack(m))
        assert _same(a, expected) and _same(b, expected)


@pytest.mark.timeout(30)
def test_a_codec_with_options_does_not_use_msgspec(bus_name: str) -> None:
    codec = Codec(pack_options={"datetime": True}, unpack_options={"timestamp": 3})
    when = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
    with Queue.create(bus_name, capacity="1MiB", codec=codec) as q:
        q.put_many([{"at": when}])
        q.put({"at": when})
        assert q.get_many(2, timeout=5) == [{"at": when}] * 2


keys = (
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=8) | st.binary(max_size=8)
)
plain = st.recursive(
    keys | st.floats() | st.text() | st.binary(),
    lambda inner: st.lists(inner, max_size=5)
    | st.tuples(inner, inner)
    | st.dictionaries(keys | st.tuples(keys, keys), inner, max_size=5),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(obj=plain)
def test_any_plain_message_same_bytes_same_message(obj: Any) -> None:
    assert FAST_ENCODE is not None and FAST_DECODE is not None
    data = _pack(obj)
    assert FAST_ENCODE(obj) == data
    assert _same(DEFAULT_CODEC.finish(1, data), DEFAULT_CODEC.finish(1, FAST_ENCODE(obj)))
    with pytest.raises(TypeError) if _has_tuple_key(obj) else contextlib.nullcontext():
        assert _same(FAST_DECODE(data), _unpack(data))


def _has_tuple_key(obj: Any) -> bool:
    """msgpack alone refuses a map with an array key (Codec.finish turns it into a tuple)."""
    if isinstance(obj, dict):
        return any(isinstance(k, tuple) for k in obj) or any(_has_tuple_key(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return any(_has_tuple_key(v) for v in obj)
    return False



@pytest.mark.timeout(120)
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(objs=st.lists(plain, min_size=1, max_size=6))
def test_c_put_many_writes_msgpacks_bytes(queue: Queue, objs: list[Any]) -> None:
    """C encodes a batch itself (no msgspec call): record by record, msgpack's bytes."""
    queue.put_many(objs)
    # (a bytes message's are its data: get_bytes gives them without the bin header)
    assert [queue.get_bytes(timeout=5) for _ in objs] == [o if type(o) is bytes else _pack(o) for o in objs]


@pytest.mark.timeout(120)
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(objs=st.lists(plain, min_size=2, max_size=6))
def test_c_get_many_decodes_as_msgpack(queue: Queue, objs: list[Any]) -> None:
    """C decodes a batch itself (no decoder call): each message as Codec.finish gives it."""
    queue.put_many(objs)
    got = queue.get_many(len(objs), timeout=5)
    assert len(got) == len(objs)
    for o, g in zip(objs, got):
        assert _same(g, DEFAULT_CODEC.finish(1, _pack(o)))


@pytest.mark.timeout(30)
def test_short_strings_decoded_alike_are_told_apart(queue: Queue) -> None:
    """C shares the str of short ASCII strings met before: never one for another."""
    words = ["", "a", "b", "ab", "ba", "a" * 7, "a" * 8, "a" * 9, "abcdefgh", "hgfedcba", "seq", "qes",
             "0123456789abcdef", "0123456789abcdeF", "0123456x89abcdef", "x" * 16, "x" * 17,
             "é", "\x7f"]  # fmt: skip
    msgs = [{w: [w, i]} for i, w in enumerate(words)] + [{"k": w} for w in reversed(words)]
    for _ in range(3):
        queue.put_many(msgs)
        assert queue.get_many(len(msgs), timeout=5) == msgs


def _nested(depth: int) -> Any:
    obj: Any = "leaf"
    for _ in range(depth):
        obj = [obj]
    return obj


@pytest.mark.timeout(30)
def test_c_put_many_leaves_to_python_what_it_does_not_encode(queue: Queue) -> None:
    """Too deep for C, a str msgpack refuses, a subclass: Python encodes (or refuses) the batch."""
    deep = [_nested(40), {"k": _nested(40)}]
    queue.put_many(deep)
    assert [queue.get_bytes(timeout=5) for _ in deep] == [_pack(o) for o in deep]
    for bad in ("\ud800", {"k": "\udfff"}, [2**64]):
        with pytest.raises(EncodeError):
            queue.put_many([{"ok": 1}, bad])
    queue.put_many([{"ok": 1}, Colour.RED.value, True, -(2**63), 2**64 - 1, "é" * 40, b"\x00" * 300])
    assert queue.qsize() == 7


@pytest.mark.timeout(30)
def test_a_batch_larger_than_the_room_goes_in_part_by_c_and_the_rest_by_python(queue: Queue) -> None:
    """put_many of more than fits: C writes the first ones, Python the rest once room is made."""
    big = {"pad": "x" * 100_000}
    msgs = [dict(big, n=i) for i in range(60)]  # about 6 MB through a 4 MiB ring
    got: list[Any] = []
    with pytest.raises(Full) as e:
        queue.put_many(msgs, timeout=0.2)
    sent = e.value.sent
    assert 0 < sent < len(msgs)
    while len(got) < sent:
        got += queue.get_many(100, timeout=5)
    queue.put_many(msgs[sent:])  # room enough now
    while len(got) < len(msgs):
        got += queue.get_many(100, timeout=5)
    assert got == msgs


@pytest.mark.timeout(30)
def test_a_handlers_exception_while_c_decodes_is_raised_and_nothing_is_lost(bus_name: str) -> None:
    """A KeyboardInterrupt from decoding (an ext hook lets handlers run) reaches get; the messages stay."""
    with Queue.create(bus_name, capacity="1MiB") as q:
        if q._fast is None:
            pytest.skip("no C fast path")
        pack, unpack, kw, fast_pack, *_ = DEFAULT_CODEC._c_parts()

        def interrupted(data: Any) -> Any:
            raise KeyboardInterrupt

        q._fast.set_codec(pack, unpack, kw, q._max_payload, fast_pack, interrupted)
        # (an ext type: C does not decode the batch itself, it calls the decoder)
        msgs = [{"n": i, "x": msgpack.ExtType(5, b"ab")} for i in range(5)]
        q.put_many(msgs)
        with pytest.raises(KeyboardInterrupt):
            q.get_many(10, timeout=5)
        assert q.get_many(10, timeout=5) == msgs  # kept, handed out first
        q.put({"n": 5})
        with pytest.raises(KeyboardInterrupt):
            q.get(timeout=5)
        assert q.get(timeout=5) == {"n": 5}


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "first, why",
    [(0x80, "one object, then more"), (0x82, "an object cut short"), (0xC1, "a byte msgpack never uses")],
)
def test_a_bad_record_in_a_batch_decoded_in_one_call_fails_alone(queue: Queue, first: int, why: str) -> None:
    """C decodes a batch of msgpack records in one call over their bytes; a record that is not
    exactly one object must not shift its neighbours: it fails alone, as one by one."""
    queue.put_many([{"a": 1}, {"b": 2}, {"c": 3}])  # payloads of 4 bytes: records of 32 bytes
    queue._ring[32 + 16] = first  # the second's first payload byte (a fixmap of 1)
    with pytest.raises(DecodeError) as e:
        queue.get_many(3, timeout=5)
    assert e.value.decoded == [{"a": 1}, {"c": 3}], why
    assert queue.qsize() == 0


@pytest.mark.timeout(30)
def test_without_msgspec_c_decodes_a_batch_with_one_msgpack_call_alike(bus_name: str) -> None:
    """Without msgspec, C decodes a batch with msgpack's unpackb over the whole array: the same messages,
    timestamps and tuple keys included, and a bad record still fails alone."""
    with Queue.create(bus_name, capacity="1MiB") as q:
        if q._fast is None:
            pytest.skip("no C fast path")
        pack, unpack, kw, fast_pack, *_ = DEFAULT_CODEC._c_parts()
        q._fast.set_codec(pack, unpack, kw, q._max_payload, fast_pack, None)
        msgs = [{"a": 1}, {"at": msgpack.Timestamp(1, 2)}, {(1, 2): "tuple key"}, [1.5, None, "x"]]
        q.put_many(msgs)
        assert q.get_many(10, timeout=5) == msgs
        q.put_many([{"a": 1}, {"b": 2}, {"c": 3}])
        q._ring[q._h64[Q_TAIL] % len(q._ring) + 32 + 16] = 0x80  # the second: one object, then more
        with pytest.raises(DecodeError) as e:
            q.get_many(3, timeout=5)
        assert e.value.decoded == [{"a": 1}, {"c": 3}]
