"""Nothing accepted that cannot come back, and a decode failure costs only its own message.

The rule, checked by property: for any object ``put``/``publish`` accepts,
``get`` returns an equal value up to the documented conversions (tuple ->
list, bytes-like -> bytes, subclasses -> their base type; NaN equals NaN);
an object it could not return, ``put`` refuses with ``EncodeError`` and
writes nothing. Through a Queue (with the C fast path and without) and a
Topic subscription, by ``get`` and by ``get_many``.

Then decode failures inside batches: an array message read where numpy is
missing (a child process that cannot import it) or with a hostile header
raises ``DecodeError``, and the batch's other messages are in ``decoded``.
"""

from __future__ import annotations

import datetime
import enum
import json
import math
import os
import struct
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import shmbus
from shmbus import _accel

try:
    import numpy as np
    from hypothesis.extra import numpy as hnp
except ImportError:  # the numpy parts are skipped
    np = None  # type: ignore[assignment]

needs_numpy = pytest.mark.skipif(np is None, reason="numpy is not installed")
SETTINGS = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
NEXT = "the next message"


# -- what to send ----------------------------------------------------------------------


class Color(enum.IntEnum):
    RED = 1


class Name(str):
    pass


class Blob(bytes):
    pass


class Record(dict):  # type: ignore[type-arg]
    pass


def _keys() -> st.SearchStrategy[Any]:
    """Map keys of every hashable kind msgpack writes, tuples of them included."""
    scalar = (
        st.text(max_size=4)
        | st.integers(-(2**63), 2**64 - 1)
        | st.binary(max_size=4)
        | st.floats(allow_nan=False)  # a NaN key is never equal to itself, even in the same dict
        | st.booleans()
        | st.none()
    )
    return st.recursive(scalar, lambda inner: st.tuples(inner) | st.tuples(inner, inner), max_leaves=4)


_good_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=8)
    | st.binary(max_size=8).map(bytearray)
    | st.binary(max_size=8).map(memoryview)
    | st.binary(max_size=4).map(Blob)
    | st.text(max_size=4).map(Name)
    | st.just(Color.RED)
    | st.builds(msgpack.Timestamp, st.integers(0, 2**34), st.integers(0, 999_999_999))
    | st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=4))  # (ExtType takes 0..127)
)
_bad_scalars = (  # msgpack cannot encode them: refused
    st.integers(2**64, 2**70)
    | st.integers(-(2**70), -(2**63) - 1)
    | st.text(st.characters(categories=["Cs"]), min_size=1, max_size=2)  # lone surrogates
    | st.just(datetime.datetime(2024, 1, 2))  # no datetime option
    | st.frozensets(st.integers(), max_size=2)
    | st.sets(st.integers(), max_size=2)
)


def _containers(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return (
        st.lists(inner, max_size=4)
        | st.lists(inner, max_size=3).map(tuple)
        | st.dictionaries(_keys(), inner, max_size=4)
        | st.dictionaries(st.text(max_size=3), inner, max_size=3).map(Record)
    )


# Mostly what is accepted, sometimes with one thing that is not somewhere inside.
plain = st.recursive(_good_scalars, _containers, max_leaves=12)
plain_with_a_bad_leaf = st.recursive(_good_scalars | _bad_scalars, _containers, max_leaves=6)


if np is not None:

    def _odd_dtypes() -> list[Any]:
        return [
            np.dtype([(("a title", "a"), "<i2"), ("b", ">f8")]),
            np.dtype([(("t", "x"), "u1"), ("y", [("z", "<m8[s]")])]),
            np.dtype([("a", "u1"), ("b", "<i8")], align=True),
            np.dtype({"names": ["a", "b"], "formats": ["<i4", "<i4"], "offsets": [4, 0]}),  # out of order
            np.dtype({"names": ["a", "b"], "formats": ["<i4", "<i2"], "offsets": [0, 0]}),  # overlapping
            np.dtype([("when", ">M8[ms]"), ("v", "<u2", (2, 3))]),  # subarray, non-native datetime
            np.dtype([("o", "O"), ("i", "i4")]),  # objects inside a struct: refused
            np.dtype("O"),  # refused
            np.dtype("V0"),
            np.dtype([]),
        ]

    _dtypes = (
        hnp.scalar_dtypes()
        | hnp.integer_dtypes(endianness=">")
        | hnp.floating_dtypes(endianness=">")
        | hnp.datetime64_dtypes(endianness="?")
        | hnp.timedelta64_dtypes(endianness="?")
        | hnp.byte_string_dtypes()
        | hnp.unicode_string_dtypes(endianness="?")
        | hnp.nested_dtypes(max_itemsize=64)
        | hnp.array_dtypes(allow_subarrays=True)
        | st.sampled_from(_odd_dtypes())
    )

    @st.composite
    def _arrays(draw: st.DrawFn) -> Any:
        dtype = draw(_dtypes)
        shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=3))
        if dtype.hasobject:
            return np.empty(shape, dtype)
        size = math.prod(shape) * dtype.itemsize
        # Any bit pattern: the data travels as bytes (NaN, NaT and padding included).
        raw = draw(st.binary(min_size=size, max_size=size))
        if not dtype.itemsize:
            return np.zeros(shape, dtype)
        arr = np.frombuffer(raw, dtype=dtype).reshape(shape).copy()
        if draw(st.booleans()) and arr.ndim:
            arr = arr[::-1]  # not contiguous: copied to C order
        return arr

    arrays = _arrays()
    # an array inside a list: refused
    messages = plain | plain_with_a_bad_leaf | arrays | st.lists(arrays, min_size=1, max_size=2)
else:
    messages = plain | plain_with_a_bad_leaf


# -- what must come back ---------------------------------------------------------------


def expected(obj: Any) -> Any:
    """``obj`` after the documented conversions."""
    if np is not None and type(obj) is np.ndarray:
        return obj
    if type(obj) is msgpack.ExtType:  # a tuple, but one that comes back as it is
        return obj
    if isinstance(obj, dict):
        return {k: expected(v) for k, v in obj.items()}  # keys as they were (tuples stay tuples)
    if isinstance(obj, (list, tuple)):
        return [expected(v) for v in obj]
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return bytes(obj)
    for base in (bool, int, float, str):
        if isinstance(obj, base):
            return base(obj)
    return obj


def _same_dtype(a: Any, b: Any) -> bool:
    """Equal dtypes, up to the documented conversion: an aligned struct loses its ``align`` flag.

    Its layout (offsets, itemsize, padding) comes back the same: only numpy's
    flag saying it was built with ``align=True`` does not travel.
    """
    if a == b:
        return True
    from numpy.lib.format import dtype_to_descr

    return bool(a.isalignedstruct != b.isalignedstruct and dtype_to_descr(a) == dtype_to_descr(b))


def same(a: Any, b: Any) -> bool:
    """Equal, types included, with NaN equal to NaN and arrays equal bit for bit."""
    if type(a) is not type(b):
        return False
    if np is not None and type(a) is np.ndarray:
        if not (_same_dtype(a.dtype, b.dtype) and a.shape == b.shape):
            return False
        if a.dtype.names:  # a struct's padding is not data: numpy need not copy it
            from numpy.lib.recfunctions import repack_fields

            return bool(repack_fields(a).tobytes() == repack_fields(b).tobytes())
        return a.tobytes() == b.tobytes()
    if isinstance(a, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, dict):
        return len(a) == len(b) and all(k in b and same(v, b[k]) for k, v in a.items())
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return bool(a == b)


def must_accept(obj: Any) -> bool:
    """Whether the docs promise ``obj`` is accepted (so refusing everything cannot pass)."""
    if obj is None or type(obj) in (bool, float, bytes):
        return True
    if type(obj) is int:
        return -(2**63) <= obj < 2**64
    if type(obj) is str:
        return all(not 0xD800 <= ord(c) <= 0xDFFF for c in obj)
    if type(obj) in (list, tuple):
        return all(must_accept(v) for v in obj)
    if type(obj) is dict:
        return all(must_accept(k) and must_accept(v) for k, v in obj.items())
    return False


# -- the property ----------------------------------------------------------------------


@pytest.fixture(params=["C", "pure"])
def queue(request: pytest.FixtureRequest, bus_name: str) -> Iterator[shmbus.Queue]:
    if request.param == "C" and not _accel.ENABLED:
        pytest.skip("the C fast path is not built (or SHMBUS_PURE_PYTHON is set)")
    with shmbus.Queue.create(bus_name, capacity="1MiB") as q:
        if request.param == "pure":
            q._drop_fast_path()
        yield q
        q.unlink()


@pytest.fixture
def subscription(bus_name: str) -> Iterator[tuple[shmbus.Topic, Any]]:
    with shmbus.Topic.create(bus_name + "-t", capacity="1MiB") as t, t.subscribe() as sub:
        yield t, sub
        t.unlink()


def _refused_or_equal(put: Any, count: Any, get_back: Any, obj: Any) -> None:
    before = count()
    kind = type(obj).__name__ if np is None or type(obj) is not np.ndarray else f"ndarray {obj.dtype.kind}"
    try:
        put(obj)
    except shmbus.EncodeError:
        event(f"refused {kind}")
        assert not must_accept(obj), f"refused {obj!r}"
        assert count() == before, "a refused put wrote something"
        put(NEXT)
        assert get_back(1) == [NEXT]
        return
    event(f"accepted {kind}")
    put(NEXT)
    got = get_back(2)
    assert len(got) == 2 and got[1] == NEXT
    assert same(got[0], expected(obj)), f"put {obj!r}, got {got[0]!r}"


@given(obj=messages, batch=st.booleans())
@SETTINGS
def _check_queue(q: shmbus.Queue, obj: Any, batch: bool) -> None:
    def get_back(n: int) -> list[Any]:
        return q.get_many(n, timeout=5) if batch else [q.get(timeout=5) for _ in range(n)]

    _refused_or_equal(q.put, q.qsize, get_back, obj)
    assert q.empty()


def test_a_queue_returns_what_it_accepts(queue: shmbus.Queue) -> None:
    _check_queue(queue)


@given(obj=messages, batch=st.booleans())
@SETTINGS
def _check_topic(t: shmbus.Topic, sub: Any, obj: Any, batch: bool) -> None:
    def get_back(n: int) -> list[Any]:
        return sub.get_many(n, timeout=5) if batch else [sub.get(timeout=5) for _ in range(n)]

    _refused_or_equal(t.publish, lambda: t.stats().put_count, get_back, obj)


def test_a_subscription_returns_what_the_topic_accepts(subscription: tuple[shmbus.Topic, Any]) -> None:
    _check_topic(*subscription)


def test_the_deepest_message_the_packer_takes_comes_back(queue: shmbus.Queue) -> None:
    deepest: Any = {(1, 2): "leaf"}  # the 1 and 2 at level 1025, the packer's limit
    for _ in range(1022):
        deepest = [deepest]
    queue.put_many(["a", deepest, "b"])
    got = queue.get_many(3, timeout=5)
    assert got[0] == "a" and got[2] == "b"
    assert msgpack.packb(got[1]) == msgpack.packb(deepest)  # (== overflows at this depth)
    with pytest.raises(shmbus.EncodeError):
        queue.put([deepest])
    assert queue.empty()


# -- decode failures inside batches ------------------------------------------------------


@needs_numpy
def test_a_hostile_array_header_costs_only_its_message(
    queue: shmbus.Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    from shmbus import _ndarray

    real = _ndarray.encode

    def hostile(arr: Any, pack_meta: Any) -> Any:
        _, body = real(arr, pack_meta)
        meta = msgpack.packb(["<i4", [float("inf")]])  # the OverflowError of int(inf)
        size = (4 + len(meta) + 15) & ~15
        return (struct.pack("<HH", size, len(meta)) + meta).ljust(size, b"\0"), body

    monkeypatch.setattr(_ndarray, "encode", hostile)
    queue.put_many(["a", np.arange(4, dtype="<i4"), "b"])
    with pytest.raises(shmbus.DecodeError) as info:
        queue.get_many(3, timeout=5)
    assert info.value.decoded == ["a", "b"]
    queue.put_many(["a", np.arange(4, dtype="<i4"), "b"])
    assert queue.get(timeout=5) == "a"
    with pytest.raises(shmbus.DecodeError):
        queue.get(timeout=5)
    assert queue.get(timeout=5) == "b"


_WITHOUT_NUMPY = textwrap.dedent(
    """
    import json, sys
    sys.modules["numpy"] = None  # import numpy fails from here on, as if it were not installed
    import shmbus
    from shmbus import _accel

    out = {}
    with shmbus.Queue.open(sys.argv[1]) as q:
        if sys.argv[3] == "pure":
            q._drop_fast_path()
        try:
            q.get_many(3, timeout=5)
        except shmbus.DecodeError as e:
            out["batch"] = e.decoded
        out["one"] = [q.get(timeout=5)]
        try:
            q.get(timeout=5)
        except shmbus.DecodeError as e:
            out["one"].append(repr(e.__cause__))
        out["one"].append(q.get(timeout=5))
    with shmbus.Topic.open(sys.argv[2]) as t, t.subscribe(start="earliest") as sub:
        # (A batch may end early: C hands the array's record to Python on the next call.)
        got, failed = [], False
        while len(got) < 2 and not failed:
            try:
                got += sub.get_many(3, timeout=5)
            except shmbus.DecodeError as e:
                got += e.decoded
                failed = True
        out["topic"] = got if failed else "no DecodeError"
    print(json.dumps(out))
    """
)


@needs_numpy
def test_an_array_where_numpy_is_missing_costs_only_its_message(queue: shmbus.Queue, bus_name: str) -> None:
    arr = np.arange(6, dtype=">f4").reshape(2, 3)
    with shmbus.Topic.create(bus_name + "-t", capacity="64KiB") as t:
        try:
            queue.put_many(["a", arr, "b", "a", arr, "b"])
            t.publish_many(["a", arr, "b"])
            mode = "pure" if queue._fast is None else "C"
            child = subprocess.run(
                [sys.executable, "-c", _WITHOUT_NUMPY, queue.path, t.path, mode],
                capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": _src()},
            )  # fmt: skip
        finally:
            t.unlink()
    assert child.returncode == 0, child.stderr
    out = json.loads(child.stdout)
    assert out["batch"] == ["a", "b"] and out["topic"] == ["a", "b"]
    assert out["one"][0] == "a" and "ModuleNotFoundError" in out["one"][1] and out["one"][2] == "b"
    assert queue.empty()


def _src() -> str:
    """The directory holding the shmbus under test, first on the child's path."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(shmbus.__file__)))
    return os.pathsep.join([here, os.environ.get("PYTHONPATH", "")])


def test_without_numpy_plain_messages_still_round_trip() -> None:
    code = textwrap.dedent(
        """
        import sys, uuid
        sys.modules["numpy"] = None
        import shmbus
        name = "shmbus-test-nonumpy-" + uuid.uuid4().hex[:8]
        with shmbus.Queue.create(name, capacity="64KiB") as q:
            try:
                q.put_many([{(1, 2): [b"x", 1.5]}, "b"])
                assert q.get_many(2) == [{(1, 2): [b"x", 1.5]}, "b"]
            finally:
                q.unlink()
        """
    )
    child = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": _src()},
    )  # fmt: skip
    assert child.returncode == 0, child.stderr
