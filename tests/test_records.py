"""Messages in their stored form: ``Queue.get_records`` (a batch view), ``put_records``,
``Subscription.get_records`` and ``Topic.publish_records``.

The batch view's promise is the bridge's: nothing is consumed before the
batch ends, so a process killed with a batch open leaves every record in
the queue under the same sequence number.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import signal
from multiprocessing.connection import Connection
from typing import Any

import pytest
from conftest import Procs
from conftest import recv as _recv

import shmbus

pytestmark = pytest.mark.timeout(60)


def test_a_batch_is_consumed_at_its_end_only(disk_path: str) -> None:
    with shmbus.Queue.create(disk_path, capacity="64KiB") as q:
        q.put({"a": 1})
        q.put_bytes(b"xyz")
        q.put(b"bin")
        q.put(5)
        with q.get_records(3) as batch:
            assert [(r.seq, r.kind, bytes(r.data)) for r in batch] == [
                (0, "msgpack", b"\x81\xa1a\x01"), (1, "raw", b"xyz"), (2, "msgpack", b"\xc4\x03bin"),
            ]  # fmt: skip
            assert q.qsize() == 4
        assert q.qsize() == 1
        assert q.get() == 5


def test_an_exception_consumes_nothing_and_the_numbers_stay(disk_path: str) -> None:
    with shmbus.Queue.create(disk_path, capacity="64KiB") as q:
        q.put_many(list(range(5)))
        with pytest.raises(KeyError), q.get_records(10) as batch:
            first = [r.seq for r in batch]
            raise KeyError
        with q.get_records(10) as batch:
            assert [r.seq for r in batch] == first == [0, 1, 2, 3, 4]
        assert q.empty()


def test_consume_k_takes_exactly_the_first_k(disk_path: str) -> None:
    with shmbus.Queue.create(disk_path, capacity="64KiB", maxsize=10) as q:
        q.put_many(list(range(6)))
        batch = q.get_records(4)
        assert len(batch) == 4
        with pytest.raises(ValueError, match="0 to 4"):
            batch.consume(5)
        batch.consume(2)
        batch.consume(1)  # ended already: nothing more
        assert q.get_many(10) == [2, 3, 4, 5]
        q.put_many(list(range(10)))  # maxsize's slots came back for exactly the consumed ones
        assert q.full()


def test_empty_and_bad_arguments(disk_path: str) -> None:
    with shmbus.Queue.create(disk_path, capacity="64KiB") as q:
        with pytest.raises(shmbus.Empty):
            q.get_records(3, block=False)
        with pytest.raises(shmbus.Empty):
            q.get_records(3, timeout=0.01)
        with pytest.raises(ValueError, match="max_records"):
            q.get_records(0)
        with pytest.raises(ValueError, match="record kind"):
            q.put_records([("json", b"{}")])


def test_close_ends_an_open_batch_leaving_its_records(disk_path: str) -> None:
    q = shmbus.Queue.create(disk_path, capacity="64KiB")
    q.put_many([1, 2])
    batch = q.get_records(2)
    q.close()
    assert len(batch) == 2
    with shmbus.Queue.open(disk_path) as again:
        assert again.get_many(5) == [1, 2]


def test_put_records_stores_what_get_records_read(tmp_path: Any) -> None:
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    with shmbus.Queue.create(a, capacity="64KiB") as qa, shmbus.Queue.create(b, capacity="64KiB") as qb:
        msgs = [{"k": [1, 2]}, b"bytes", "text", None]
        qa.put_many(msgs)
        qa.put_bytes(b"\x00raw")
        with qa.get_records(10) as batch:
            qb.put_records(batch)
        assert qb.get_many(10) == [*msgs, b"\x00raw"]
        shmbus.unlink(a)
        shmbus.unlink(b)


def test_subscription_records_carry_sequence_numbers_and_gaps(tmp_path: Any) -> None:
    path = str(tmp_path / "t")
    with shmbus.Topic.create(path, capacity="4KiB") as t, shmbus.Topic.create(str(tmp_path / "u")) as u:
        sub = t.subscribe()
        t.publish({"a": 1})
        t.publish_bytes(b"xyz")
        recs = sub.get_records(10)
        assert [(r.seq, r.kind) for r in recs] == [(0, "msgpack"), (1, "raw")]
        for i in range(200):  # laps the 4 KiB ring
            t.publish("x" * 100 + str(i))
        recs = sub.get_records(1000)
        assert recs[-1].seq == 201 and sub.lost == recs[0].seq - 2 > 0
        with pytest.raises(shmbus.Empty):
            sub.get_records(5, timeout=0.01)
        out = u.subscribe()
        u.publish_records(recs)
        assert out.get_many(1000, block=False) == [f"{'x' * 100}{r.seq - 2}" for r in recs]
        sub.close()
        out.close()
        t.unlink()
        u.unlink()


# -- across processes: a batch in flight when its process dies ---------------------------


def _hold_a_batch(path: str, conn: Connection) -> None:
    q = shmbus.Queue.open(path)
    batch = q.get_records(50)
    conn.send([r.seq for r in batch])
    conn.recv()  # never comes: the test kills this process here


@pytest.mark.parametrize("pure", [False, True])
def test_kill_9_with_a_batch_in_flight_leaves_every_record(disk_path: str, procs: Procs,
                                                           pure: bool) -> None:  # fmt: skip
    with shmbus.Queue.create(disk_path, capacity="64KiB") as q:
        if pure:
            q._drop_fast_path()
        q.put_many(list(range(80)))
        rx, tx = mp.Pipe(duplex=True)
        child = procs.start(_hold_a_batch, disk_path, tx)
        seqs = _recv(rx, child)
        assert seqs == list(range(50))
        os.kill(child.pid, signal.SIGKILL)
        child.join(10)
        with q.get_records(100, timeout=30) as batch:  # the dead holder's lock is recovered
            assert [r.seq for r in batch] == list(range(80))
        assert q.empty()


def _consume_batches(path: str, conn: Connection) -> None:
    """Consume in batches: send each batch's numbers, consume it when the parent says so."""
    q = shmbus.Queue.open(path)
    while True:
        with q.get_records(7) as batch:
            conn.send([r.seq for r in batch])
            conn.recv()


def test_kill_9_at_random_instants_loses_and_repeats_nothing_beyond_the_open_batch(
    disk_path: str, procs: Procs
) -> None:
    rng = random.Random(1)
    n = 3000
    with shmbus.Queue.create(disk_path, capacity="256KiB") as q:
        q.put_many(list(range(n)))
        seen: list[int] = []
        for _round in range(6):
            rx, tx = mp.Pipe(duplex=True)
            child = procs.start(_consume_batches, disk_path, tx)
            for _ in range(rng.randrange(1, 20)):
                seen.extend(_recv(rx, child))
                rx.send("consume")
            held = _recv(rx, child)  # an open batch: killed before its end, it must all stay
            seen.extend(held)
            if rng.random() < 0.5:
                rx.send("consume")  # or killed just as it is consumed: either way, not twice
                held = []
            os.kill(child.pid, signal.SIGKILL)
            child.join(10)
            if held:  # the dead holder's lock is recovered, and its batch is still first in line
                first = q.get_records(1, timeout=30)
                assert first.records[0].seq == held[0]
                first.consume(0)
        rest = []
        while True:
            try:
                batch = q.get_records(1000, timeout=1.0)  # (long enough to heal a dead child's tokens)
            except shmbus.Empty:
                break
            with batch:
                rest.extend(r.seq for r in batch)
        # What the parent heard of may or may not have been consumed before the kill;
        # what was consumed was heard of, and what was not is still there, in order.
        assert set(seen) | set(rest) == set(range(n))
        assert rest == list(range(rest[0], n)) and rest[0] <= max(seen) + 1


def test_stray_tokens_are_dropped_and_an_all_stray_take_waits_again(disk_path: str) -> None:
    with shmbus.Queue.create(disk_path, capacity="64KiB") as q:
        q.put(1)
        q._items.release()  # a token with no record, as a crash can leave
        with q.get_records(5) as batch:
            assert [r.seq for r in batch] == [0]
        q._items.release()
        with pytest.raises(shmbus.Empty):
            q.get_records(5, timeout=0.05)
        q.put(2)
        with q.get_records(5, timeout=5) as batch:
            assert [r.seq for r in batch] == [1]
