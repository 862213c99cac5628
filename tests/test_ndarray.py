"""NumPy arrays travel without pickle: dtype and shape kept, data copied once, or viewed in place."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import Procs

import shmbus


@pytest.mark.parametrize(
    "arr",
    [
        np.arange(12, dtype=np.float32).reshape(3, 4),
        np.arange(10, dtype=np.int64)[::3],  # not contiguous: copied to C order
        np.zeros((0, 5), dtype=np.uint8),
        np.array(7.5),  # 0-d
        np.ones((2, 3, 4), dtype=">i4"),  # big-endian dtype survives
        np.array([1 + 2j], dtype=np.complex128),
        np.array([(1, 2.5)], dtype=[("a", "<i2"), ("b", "<f8")]),
        np.array([(1, 2)], dtype=[(("the title", "a"), "<i2"), ("b", ">i4")]),
        np.array(["2024-01-02T03:04", "NaT"], dtype="datetime64[m]"),
        np.array([5, -3], dtype=">m8[us]"),
        np.array([("2024-01-02", [1, 2])], dtype=[("when", "M8[D]"), ("v", "u1", (2,))]),
        np.zeros(2, dtype=np.dtype([("a", "u1"), ("b", "<i8")], align=True)),
        np.zeros(3, dtype="V0"),  # itemsize 0: no data at all
    ],
    ids=[
        "2d",
        "strided",
        "empty",
        "0d",
        "big-endian",
        "complex",
        "structured",
        "titled",
        "datetime64",
        "timedelta64",
        "struct-with-datetime",
        "aligned",
        "itemsize-0",
    ],
)
def test_an_array_comes_back_equal_and_writable(bus_name: str, arr: np.ndarray) -> None:
    with shmbus.Queue.create(bus_name, capacity="1MiB") as q:
        q.put(arr)
        got = q.get(timeout=1)
        assert isinstance(got, np.ndarray)
        assert got.dtype == arr.dtype and got.shape == arr.shape
        np.testing.assert_array_equal(got, arr)
        assert got.flags.writeable


def test_array_view_reads_in_place(bus_name: str) -> None:
    arr = np.arange(1000, dtype=np.float64)
    with shmbus.Queue.create(bus_name, capacity="1MiB") as q:
        q.put(arr)
        with q.get_view() as buf:
            view = shmbus.array_view(buf)
            assert not view.flags.writeable and view.sum() == arr.sum()
            del view  # (the view must not outlive the block)
        assert q.empty()


def test_object_arrays_are_refused(bus_name: str) -> None:
    with shmbus.Queue.create(bus_name, capacity="64KiB") as q:
        with pytest.raises(shmbus.EncodeError, match="pickle"):
            q.put(np.array([object()]))
        assert q.empty()


def _send_frames(path: str, n: int) -> None:
    with shmbus.Queue.open(path) as q:
        for i in range(n):
            q.put(np.full((64, 64), i, dtype=np.uint16))


def test_arrays_cross_processes(bus_name: str, procs: Procs) -> None:
    with shmbus.Queue.create(bus_name, capacity="256KiB") as q:
        procs.start(_send_frames, q.path, 200)  # 1.6 MiB of frames through a 256 KiB ring
        for i in range(200):
            frame = q.get(timeout=30)
            assert frame.shape == (64, 64) and frame.dtype == np.uint16 and (frame == i).all()
        procs.join_all()


def test_a_malformed_array_header_is_a_decode_error(bus_name: str) -> None:
    with shmbus.Queue.create(bus_name, capacity="64KiB") as q:
        q.put(np.arange(4))
        with q.get_view() as buf:
            raw = bytes(buf)
        bad = bytearray(raw)
        bad[0] = 0xFF  # header length past the payload
        with pytest.raises(shmbus.DecodeError):
            shmbus.array_view(memoryview(bytes(bad)))


@pytest.mark.parametrize(
    "dtype",
    [
        np.dtype({"names": ["a", "b"], "formats": ["<i4", "<i4"], "offsets": [4, 0]}),  # out of order
        np.dtype({"names": ["a", "b"], "formats": ["<i4", "<i2"], "offsets": [0, 0]}),  # overlapping
    ],
    ids=["out-of-order", "overlapping"],
)
def test_struct_arrays_numpy_cannot_describe_are_refused(bus_name: str, dtype: np.dtype) -> None:
    with shmbus.Queue.create(bus_name, capacity="64KiB") as q:
        q.put("before")
        with pytest.raises(shmbus.EncodeError, match="repack_fields"):
            q.put(np.zeros(2, dtype=dtype))
        q.put("after")
        assert q.get_many(5, timeout=1) == ["before", "after"]


def _header(descr: object, shape: object, data: bytes = b"") -> bytes:
    import struct

    import msgpack

    meta = msgpack.packb([descr, shape])
    size = (4 + len(meta) + 15) & ~15
    return (struct.pack("<HH", size, len(meta)) + meta).ljust(size, b"\0") + data


def _deep(n: int) -> object:
    x: object = "<i4"
    for _ in range(n):
        x = [["f", x]]
    return x


@pytest.mark.parametrize(
    "payload",
    [
        _header("<i4", [float("inf")]),  # OverflowError in int()
        _header("<i4", [1e300], b"\0" * 4),
        _header("<i4", "abc"),  # ValueError
        _header("<i4", [1] * 100, b"\0" * 4),  # more dimensions than numpy allows
        _header(_deep(500), [1], b"\0" * 4),  # a dtype nested past the recursion limit
        _header(["nonsense"], [1]),
        _header({"a": 1}, [1]),
        _header("|O", [1], b"\0" * 8),  # objects: refused even if the sizes match
        b"\x10\x00\xff\xff",
        b"",
    ],
)
def test_a_hostile_array_header_is_a_decode_error(payload: bytes) -> None:
    with pytest.raises(shmbus.DecodeError):
        shmbus.array_view(memoryview(payload))
    from shmbus._codec import DEFAULT_CODEC
    from shmbus._format import REC_NDARRAY

    with pytest.raises(shmbus.DecodeError):
        DEFAULT_CODEC.finish(REC_NDARRAY, bytearray(payload))
