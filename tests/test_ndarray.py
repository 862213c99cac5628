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
    ],
    ids=["2d", "strided", "empty", "0d", "big-endian", "complex", "structured"],
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
