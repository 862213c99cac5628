"""``Topic.last()`` (``_last``): the newest message, read without a lock, never torn.

The cross-process test lets a publisher lap a small ring many times while
readers call ``last()`` as fast as they can: every message they get must
carry a matching checksum, and their sequence numbers never go back.
"""

from __future__ import annotations

import struct
import zlib
from typing import Any

import numpy as np
import pytest
from conftest import result as _result
from conftest import run as _run

import shmbus
from shmbus import Topic, _last
from shmbus._format import Q_HEAD, Q_TAIL

pytestmark = pytest.mark.timeout(120)


def _ring_bytes(t: Topic) -> memoryview:
    assert t._ring is not None
    return t._ring


def test_an_empty_topic_raises_empty(bus_name: str) -> None:
    with Topic.create(bus_name, capacity=4096) as t:
        with pytest.raises(shmbus.Empty, match="holds no message"):
            t.last()
        t.unlink()


def test_last_is_the_newest_message_across_many_laps(bus_name: str) -> None:
    with Topic.create(bus_name, capacity=4096) as t:
        for i in range(2000):
            t.publish({"i": i, "pad": "x" * (i % 97)})  # varied sizes: wrap markers on every lap
            assert t.last() == {"i": i, "pad": "x" * (i % 97)}
        assert t.stats().put_count == 2000
        t.unlink()


def test_every_kind_of_message_comes_back_as_a_subscriber_gets_it(bus_name: str) -> None:
    with Topic.create(bus_name, capacity=8192) as t:
        for m in (b"bytes", "text", [1, 2], None):
            t.publish(m)
            assert t.last() == m
        t.publish_bytes(b"raw")
        assert t.last() == b"raw"
        t.publish(np.arange(5))
        assert (t.last() == np.arange(5)).all()
        t.unlink()


def test_last_does_not_move_any_subscriber(bus_name: str) -> None:
    with Topic.create(bus_name, capacity=8192) as t:
        sub = t.subscribe()
        t.publish_many(range(10))
        assert t.last() == 9
        assert sub.get_many(100, block=False) == list(range(10))
        t.unlink()


def test_a_subscriber_cursor_starts_the_walk_and_a_bad_one_is_only_a_hint(bus_name: str) -> None:
    with Topic.create(bus_name, capacity=1 << 16) as t:
        sub = t.subscribe()
        t.publish_many(range(100))
        sub.get_many(90, block=False)
        walked: list[int] = []
        real = _last._walk

        def counting(h64: Any, ring: Any, cap: int, pos: int, head: int) -> Any:
            walked.append(pos)
            return real(h64, ring, cap, pos, head)

        _last._walk = counting  # type: ignore[assignment]
        try:
            assert t.last() == 99
            assert walked[0] > t._h64[Q_TAIL]  # from the cursor, not from tail
            t._h64[t._slot_base(sub.slot) + 1] += 16  # a cursor inside a record: a damaged hint
            t._last_pos = 0
            walked.clear()
            assert t.last() == 99
            assert walked[-1] == t._h64[Q_TAIL]  # the walk from tail decided
        finally:
            _last._walk = real  # type: ignore[assignment]
        t.unlink()


def test_a_damaged_record_raises_corruptbus_without_reading_out_of_bounds(bus_name: str) -> None:
    with Topic.create(bus_name, capacity=4096) as t:
        t.publish_many(range(3))
        ring = _ring_bytes(t)
        struct.pack_into("<I", ring, 0, 1 << 30)  # the first record claims a gigabyte
        with pytest.raises(shmbus.CorruptBus):
            t.last()
        t._h64[Q_HEAD] = t._h64[Q_TAIL] + 8  # a head off the 16-byte grid
        with pytest.raises(shmbus.CorruptBus):
            t.last()
        t._h64[Q_HEAD] = t._h64[Q_TAIL] + 2 * t.capacity  # a head a ring past tail
        with pytest.raises(shmbus.CorruptBus):
            t.last()
        t.unlink()


def test_a_reader_lapped_every_time_raises_overwritten(bus_name: str, monkeypatch: Any) -> None:
    with Topic.create(bus_name, capacity=4096) as t:
        t.publish_many(range(3))

        def lapped(*args: Any) -> Any:
            raise _last._Lapped

        monkeypatch.setattr(_last, "_walk", lapped)
        with pytest.raises(shmbus.Overwritten):
            t.last()
        t.unlink()


# -- across processes ------------------------------------------------------------------


def _publish_checksummed(path: str, n: int) -> int:
    t = Topic.open(path)
    for i in range(n):
        body = bytes([i & 255]) * (i % 300)
        t.publish([i, zlib.crc32(body), body])
    t.close()
    return n


def _read_last_until(path: str, n: int) -> dict[str, int]:
    """Call last() until it returns message n - 1; check every message it returns."""
    t = Topic.open(path)
    seen = overwritten = empty = 0
    prev = -1
    while prev != n - 1:
        try:
            i, crc, body = t.last()
        except shmbus.Overwritten:
            overwritten += 1
            continue
        except shmbus.Empty:
            empty += 1
            continue
        if zlib.crc32(body) != crc or len(body) != max(i, 0) % 300:
            raise AssertionError(f"message {i} is torn: {len(body)} bytes, crc mismatch")
        if i < prev:
            raise AssertionError(f"last() went back from {prev} to {i}")
        prev = i
        seen += 1
    t.close()
    return {"seen": seen, "overwritten": overwritten, "empty": empty}


def test_readers_in_other_processes_never_see_a_torn_message(bus_name: str, procs: Any) -> None:
    n = 100_000
    t = Topic.create(bus_name, capacity="16KiB")  # about 50 messages: lapped all the time
    t.publish([-1, zlib.crc32(b""), b""])
    readers = []
    for _ in range(2):
        rx, tx = procs.ctx.Pipe(duplex=False)
        readers.append((procs.start(_run, tx, _read_last_until, t.path, n), rx))
    prx, ptx = procs.ctx.Pipe(duplex=False)
    pub = procs.start(_run, ptx, _publish_checksummed, t.path, n)
    assert _result(prx, pub) == n
    results = [_result(rx, p) for p, rx in readers]
    procs.join_all()
    for r in results:
        assert r["seen"] > 0, r
    assert t.last()[0] == n - 1
    t.close()
