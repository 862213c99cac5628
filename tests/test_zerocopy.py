"""Zero-copy access: reserve/commit and get_view, for Queue and Topic, in one process and across two."""

from __future__ import annotations

import struct
from typing import Any

import pytest
from conftest import Procs

import shmbus

CAP = 8192


def test_reserve_commits_on_exit_and_abandons_on_error(bus_name: str) -> None:
    with shmbus.Queue.create(bus_name, capacity=CAP) as q:
        with q.reserve(8) as buf:
            assert isinstance(buf, memoryview) and not buf.readonly and len(buf) == 8
            struct.pack_into("<d", buf, 0, 3.25)
            assert q.qsize() == 0  # nothing visible before the block ends
        assert q.qsize() == 1
        with pytest.raises(RuntimeError), q.reserve(100) as buf:
            buf[:4] = b"junk"
            raise RuntimeError("abandon")
        assert q.qsize() == 1
        assert q.get_nowait() == struct.pack("<d", 3.25)
        with pytest.raises(shmbus.MessageTooLarge):
            q.reserve(CAP)


def test_get_view_consumes_on_exit_and_keeps_the_message_on_error(bus_name: str) -> None:
    with shmbus.Queue.create(bus_name, capacity=CAP) as q:
        q.put_many([b"raw", {"k": [1, 2]}, "third"])
        with q.get_view() as v:
            assert v.readonly and bytes(v) == b"raw"
        view = q.get_view()
        with view as v:
            assert view.kind == "msgpack" and view.valid()
            assert shmbus.Codec().finish(1, bytes(v)) == {"k": [1, 2]}
        with pytest.raises(ValueError), q.get_view() as v:
            raise ValueError("not consumed")
        assert q.get_nowait() == "third"
        with pytest.raises(shmbus.Empty):
            q.get_view(block=False)


def test_reserve_and_view_wrap_around_many_times(bus_name: str) -> None:
    with shmbus.Queue.create(bus_name, capacity=4096) as q:
        for i in range(3000):
            n = (i * 37) % 1500
            with q.reserve(n) as buf:
                buf[:] = bytes([i % 251]) * n
            with q.get_view() as v:
                assert bytes(v) == bytes([i % 251]) * n
        assert q.stats().messages == 0


def _fill_in_place(path: str, count: int) -> None:
    with shmbus.Queue.open(path) as q:
        for i in range(count):
            with q.reserve(1024) as buf:
                struct.pack_into("<q", buf, 0, i)
                buf[8:] = bytes([i % 256]) * 1016


def test_a_reservation_filled_in_another_process_arrives_whole(bus_name: str, procs: Procs) -> None:
    with shmbus.Queue.create(bus_name, capacity=16 * 1024) as q:
        procs.start(_fill_in_place, q.path, 500)  # 500 KiB through a 16 KiB ring
        for i in range(500):
            with q.get_view(timeout=30) as v:
                assert struct.unpack_from("<q", v)[0] == i
                assert bytes(v[8:]) == bytes([i % 256]) * 1016
        procs.join_all()


def test_topic_reserve_and_subscription_view(bus_name: str) -> None:
    with shmbus.Topic.create(bus_name, capacity=CAP) as t:
        sub = t.subscribe()
        with t.reserve(5) as buf:
            buf[:] = b"hello"
        t.publish({"x": 1})
        with sub.get_view() as v:
            assert bytes(v) == b"hello"
        assert sub.get() == {"x": 1}
        assert (sub.received, sub.lost) == (2, 0)


def test_a_lapped_topic_view_says_so_and_counts_as_lost(bus_name: str) -> None:
    with shmbus.Topic.create(bus_name, capacity=CAP) as t:
        sub = t.subscribe()
        t.publish(b"A" * 3000)
        view: Any = sub.get_view()
        with pytest.raises(shmbus.Overwritten), view as v:
            assert bytes(v[:1]) == b"A" and view.valid()
            for _ in range(4):
                t.publish(b"B" * 3000)  # laps the reader
            assert not view.valid()
        assert sub.lost >= 1 and sub.received == 0
        got = sub.get_many(10, block=False)
        assert got and all(m == b"B" * 3000 for m in got)
        assert sub.received + sub.lost == 5
