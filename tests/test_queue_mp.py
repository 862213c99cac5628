"""Cross-process tests of ``shmbus.Queue``: real processes, real files, real semaphores.

Synchronisation between the test and its children goes through ``mp.Event``,
pipes and the queue itself, never through sleeps. When a test needs a child to
be *asleep* in a semaphore wait (to prove that a wake-up really wakes it), it
first receives the child's "about to block" event and then polls
``/proc/<pid>`` until the kernel reports the child asleep in a futex wait
(``_wait_until_blocked``): that poll waits for an observable state, with a
deadline, and is never a guess at how long something takes.

Every time bound is generous: the machine has 2 cores shared by every process a
test starts, and a test that fails one run in twenty is a bug.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import random
import signal
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import msgpack
import posix_ipc
import pytest
from conftest import recv as _recv
from conftest import wait_until_blocked as _wait_until_blocked

import shmbus
from shmbus import _ring
from shmbus._format import Q_HEAD

# Far above anything a healthy run needs; only a hang or a lost wake-up reaches them.
CHILD_TIMEOUT = 60.0
WAKE_BOUND = 2.0  # a woken waiter must return this soon after the event that wakes it


# -- helpers ------------------------------------------------------------------------


def _join_ok(proc: Any, timeout: float = CHILD_TIMEOUT) -> None:
    proc.join(timeout)
    assert not proc.is_alive(), f"child {proc.pid} did not finish in time"
    assert proc.exitcode == 0, f"child {proc.pid} failed with exit code {proc.exitcode}"


# -- child bodies (module level, so that the spawn context can import them) -----------


def _child_put_range(q: shmbus.Queue, n: int) -> None:
    for i in range(n):
        q.put({"i": i})


def _child_put_tagged(q: shmbus.Queue, n: int) -> None:
    """Put ``n`` messages naming this process and the bus path it sees, then close."""
    pid = os.getpid()
    for i in range(n):
        q.put({"pid": pid, "path": q.path, "i": i})
    q.close()


def _child_fifo_consumer(q: shmbus.Queue, n: int, conn: Connection) -> None:
    expected = 0
    for _ in range(n):
        msg = q.get(timeout=CHILD_TIMEOUT)
        assert msg == {"i": expected}, f"expected seq {expected}, got {msg!r}"
        expected += 1
    leftover = q.get(timeout=0.05) if q.qsize() else None
    conn.send((expected, leftover))


def _child_mpmc_producer(path: str, p: int, n: int) -> None:
    q = shmbus.Queue.open(path)
    put = q.put
    for i in range(n):
        put({"p": p, "i": i})
    q.close()


def _child_mpmc_consumer(path: str, c: int, out: str) -> None:
    """Take batches until a sentinel (None); write every (p, i) received to ``out``."""
    q = shmbus.Queue.open(path)
    ps: list[int] = []
    is_: list[int] = []
    sentinels = 0
    while not sentinels:
        batch = q.get_many(_batch_size(c, len(ps)), timeout=CHILD_TIMEOUT)
        for msg in batch:
            if msg is None:
                sentinels += 1
                continue
            # Sentinels are put after every producer finished: no data may follow one.
            assert not sentinels, f"consumer {c}: data {msg!r} after a sentinel"
            ps.append(msg["p"])
            is_.append(msg["i"])
    # One sentinel per consumer: give back the ones this batch took for others.
    for _ in range(sentinels - 1):
        q.put(None)
    q.close()
    with open(out, "wb") as f:
        f.write(msgpack.packb([ps, is_]))


def _batch_size(c: int, k: int) -> int:
    """A batch size that varies between consumers and over time (deterministic)."""
    return 1 + (k * 7 + c * 13) % 300


def _child_get_and_report(q: shmbus.Queue, ready: Any, conn: Connection, many: int = 0) -> None:
    ready.set()
    got = q.get_many(many, timeout=CHILD_TIMEOUT) if many else q.get(timeout=CHILD_TIMEOUT)
    conn.send((got, time.monotonic()))


def _child_put_and_report(q: shmbus.Queue, msg: Any, ready: Any, conn: Connection) -> None:
    ready.set()
    q.put(msg, timeout=CHILD_TIMEOUT)
    conn.send(time.monotonic())


def _child_open_put_get(path: str, n_put: int, n_get: int, conn: Connection) -> None:
    q = shmbus.Queue.open(path)
    for i in range(n_put):
        q.put({"i": i, "pad": "x" * (i % 50)})
    got = [q.get(timeout=CHILD_TIMEOUT)["i"] for _ in range(n_get)]
    q.flush()
    q.close()
    conn.send(got)


def _child_open_get(path: str, n_get: int, conn: Connection) -> None:
    q = shmbus.Queue.open(path)
    got = [q.get(timeout=CHILD_TIMEOUT)["i"] for _ in range(n_get)]
    conn.send((got, q.qsize()))
    q.close()


# -- 1. FIFO, one producer and one consumer ----------------------------------------------


def test_fifo_one_producer_one_consumer(bus_name: str, procs: Any) -> None:
    n = 20_000
    # 64 KiB: about 30 bytes a record, so the ring wraps ~9 times and the
    # producer has to wait for space whenever it gets ahead.
    q = shmbus.Queue.create(bus_name, capacity="64KiB")
    rx, tx = procs.ctx.Pipe(duplex=False)
    consumer = procs.start(_child_fifo_consumer, q, n, tx)
    procs.start(_child_put_range, q, n)
    count, leftover = _recv(rx, consumer)
    procs.join_all()
    assert count == n
    assert leftover is None
    assert q.qsize() == 0
    with pytest.raises(shmbus.Empty):
        q.get_nowait()
    q.close()


# -- 2. Many producers, many consumers -----------------------------------------------


def test_mpmc_every_message_exactly_once(bus_name: str, procs: Any, tmp_path: Path) -> None:
    # The full size asked for: 4 x 100 000 messages take ~1.5 s here (~5 s with
    # two more copies of this file running alongside on the 2 cores).
    n_prod, n_cons, per_producer = 4, 4, 100_000
    q = shmbus.Queue.create(bus_name, capacity="1MiB")
    outs = [str(tmp_path / f"consumer{c}.msgpack") for c in range(n_cons)]
    consumers = [procs.start(_child_mpmc_consumer, q.path, c, outs[c]) for c in range(n_cons)]
    producers = [procs.start(_child_mpmc_producer, q.path, p, per_producer) for p in range(n_prod)]
    for p in producers:
        _join_ok(p)
    # Every data message is committed: the sentinels come after all of them.
    for _ in range(n_cons):
        q.put(None)
    for c in consumers:
        _join_ok(c)
    procs.join_all()

    seen: list[list[int]] = [[] for _ in range(n_prod)]
    for c, out in enumerate(outs):
        with open(out, "rb") as f:
            ps, is_ = msgpack.unpackb(f.read())
        last = [-1] * n_prod
        for p, i in zip(ps, is_):
            # FIFO per producer, as one consumer sees it.
            assert i > last[p], f"consumer {c}: producer {p} seq {i} after {last[p]}"
            last[p] = i
            seen[p].append(i)
    for p in range(n_prod):
        got = sorted(seen[p])
        assert len(got) == per_producer, f"producer {p}: {len(got)} delivered, not {per_producer}"
        assert got == list(range(per_producer)), f"producer {p}: duplicates or gaps"
    assert q.qsize() == 0
    assert q.get_many(10, block=False) == []
    q.close()


# -- 3. A blocked get wakes on a put -------------------------------------------------


@pytest.mark.parametrize("many", [0, 5], ids=["get", "get_many"])
def test_blocked_get_wakes_on_put(bus_name: str, procs: Any, many: int) -> None:
    q = shmbus.Queue.create(bus_name, capacity="64KiB")
    ready = procs.ctx.Event()
    rx, tx = procs.ctx.Pipe(duplex=False)
    child = procs.start(_child_get_and_report, q, ready, tx, many)
    assert ready.wait(CHILD_TIMEOUT)
    _wait_until_blocked(child.pid)
    t_put = time.monotonic()
    q.put({"wake": "up"})
    got, t_woke = _recv(rx, child)
    procs.join_all()
    assert got == ([{"wake": "up"}] if many else {"wake": "up"})
    assert 0 <= t_woke - t_put < WAKE_BOUND
    assert q.qsize() == 0
    q.close()


# -- 4. A blocked put wakes on a get -------------------------------------------------


@pytest.mark.parametrize("bound", ["capacity", "maxsize"])
def test_blocked_put_wakes_on_get(bus_name: str, procs: Any, bound: str) -> None:
    if bound == "capacity":
        # 1000 bytes encode to 1003 (bin16 header), a 1024-byte record: 4 fill the ring.
        q = shmbus.Queue.create(bus_name, capacity=4096)
        msgs = [bytes([k]) * 1000 for k in range(5)]
    else:
        q = shmbus.Queue.create(bus_name, capacity="64KiB", maxsize=4)
        msgs = [{"k": k} for k in range(5)]
    for m in msgs[:4]:
        q.put_nowait(m)
    assert q.full()
    with pytest.raises(shmbus.Full):
        q.put_nowait(msgs[4])
    ready = procs.ctx.Event()
    rx, tx = procs.ctx.Pipe(duplex=False)
    child = procs.start(_child_put_and_report, q, msgs[4], ready, tx)
    assert ready.wait(CHILD_TIMEOUT)
    _wait_until_blocked(child.pid)
    assert q.qsize() == 4  # the child's put is still waiting
    t_get = time.monotonic()
    assert q.get(timeout=CHILD_TIMEOUT) == msgs[0]
    t_woke = _recv(rx, child)
    procs.join_all()
    assert 0 <= t_woke - t_get < WAKE_BOUND
    assert [q.get(timeout=5) for _ in range(4)] == msgs[1:]
    assert q.qsize() == 0
    q.close()


# -- 5. Timeouts ---------------------------------------------------------------------


def _timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[BaseException, float]:
    t0 = time.monotonic()
    try:
        fn(*args, **kwargs)
    except Exception as e:
        return e, time.monotonic() - t0
    raise AssertionError(f"{fn.__name__} returned instead of raising")


def test_get_timeout_and_nowait_on_empty_queue(bus_name: str) -> None:
    q = shmbus.Queue.create(bus_name, capacity="64KiB")
    for fn in (q.get, lambda timeout: q.get_many(3, timeout=timeout)):
        err, took = _timed(fn, timeout=0.2)
        assert isinstance(err, shmbus.Empty)
        assert isinstance(err, queue.Empty)
        assert 0.2 <= took < 0.5, took
    err, took = _timed(q.get_nowait)
    assert isinstance(err, shmbus.Empty) and isinstance(err, queue.Empty)
    assert took < 0.15, took
    err, took = _timed(q.get, block=False)
    assert isinstance(err, queue.Empty)
    assert took < 0.15, took
    assert q.get_many(5, block=False) == []
    # The failed waits took no token: the queue still works.
    q.put("after")
    assert q.get(timeout=1) == "after"
    q.close()


@pytest.mark.parametrize("bound", ["capacity", "maxsize"])
def test_put_timeout_and_nowait_on_full_queue(bus_name: str, bound: str) -> None:
    if bound == "capacity":
        q = shmbus.Queue.create(bus_name, capacity=4096)
        msgs = [bytes([k]) * 1000 for k in range(4)]
    else:
        q = shmbus.Queue.create(bus_name, capacity="64KiB", maxsize=4)
        msgs = [{"k": k} for k in range(4)]
    for m in msgs:
        q.put(m, timeout=1)
    extra = msgs[0]
    for fn in (q.put, lambda m, timeout: q.put_many([m], timeout=timeout)):
        err, took = _timed(fn, extra, timeout=0.2)
        assert isinstance(err, shmbus.Full)
        assert isinstance(err, queue.Full)
        assert getattr(err, "sent", 0) == 0
        assert 0.2 <= took < 0.5, took
    err, took = _timed(q.put_nowait, extra)
    assert isinstance(err, shmbus.Full) and isinstance(err, queue.Full)
    assert took < 0.15, took
    err, took = _timed(q.put, extra, block=False)
    assert isinstance(err, queue.Full)
    assert took < 0.15, took
    # Nothing was written by the failed puts, and space freed is usable again.
    assert q.qsize() == 4
    assert q.get(timeout=1) == msgs[0]
    q.put_nowait("fits")
    assert [q.get(timeout=1) for _ in range(4)] == [*msgs[1:], "fits"]
    with pytest.raises(shmbus.Empty):
        q.get_nowait()
    q.close()


# -- 6. A disk-backed queue outlives its processes ----------------------------------


def test_reopen_disk_queue_after_every_process_exited(disk_path: str, procs: Any) -> None:
    q = shmbus.Queue.create(disk_path, capacity="64KiB")
    q.close()  # from here on, no process holds the bus open between the steps

    rx, tx = procs.ctx.Pipe(duplex=False)
    writer = procs.start(_child_open_put_get, disk_path, 500, 100, tx)
    assert _recv(rx, writer) == list(range(100))
    _join_ok(writer)

    rx, tx = procs.ctx.Pipe(duplex=False)
    reader = procs.start(_child_open_get, disk_path, 150, tx)
    got, left = _recv(rx, reader)
    _join_ok(reader)
    assert got == list(range(100, 250))
    assert left == 250

    q = shmbus.Queue.open(disk_path)
    assert q.qsize() == 250
    assert [q.get(timeout=5)["i"] for _ in range(250)] == list(range(250, 500))
    with pytest.raises(shmbus.Empty):
        q.get_nowait()
    q.close()
    procs.join_all()


def test_reopen_disk_queue_after_semaphores_vanished(disk_path: str, procs: Any) -> None:
    """A reboot wipes /dev/shm but not the file: opening rebuilds the semaphores."""
    q = shmbus.Queue.create(disk_path, capacity="64KiB", maxsize=100)
    bus_id = q.layout.bus_id
    q.close()
    rx, tx = procs.ctx.Pipe(duplex=False)
    writer = procs.start(_child_open_put_get, disk_path, 60, 10, tx)
    assert _recv(rx, writer) == list(range(10))
    _join_ok(writer)

    for role in ("items", "space", "slots"):
        posix_ipc.unlink_semaphore(f"/shmbus.{bus_id}.{role}")

    rx, tx = procs.ctx.Pipe(duplex=False)
    reader = procs.start(_child_open_get, disk_path, 20, tx)
    got, left = _recv(rx, reader)
    _join_ok(reader)
    assert got == list(range(10, 30))
    assert left == 30

    q = shmbus.Queue.open(disk_path)
    assert [q.get(timeout=5)["i"] for _ in range(30)] == list(range(30, 60))
    with pytest.raises(shmbus.Empty):
        q.get_nowait()
    # The rebuilt 'slots' counts the free slots: exactly maxsize puts fit.
    for i in range(100):
        q.put_nowait(i)
    with pytest.raises(shmbus.Full):
        q.put_nowait(100)
    q.close()
    procs.join_all()


# -- 7. A Queue handed to a multiprocessing child --------------------------------------


@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_queue_passed_to_child(bus_name: str, procs: Any, method: str) -> None:
    q = shmbus.Queue.create(bus_name, capacity="64KiB")
    procs.ctx = mp.get_context(method)  # spawn pickles q as its path; fork inherits it
    n = 300
    child = procs.start(_child_put_tagged, q, n)
    got = [q.get(timeout=CHILD_TIMEOUT) for _ in range(n)]
    procs.join_all()
    assert got == [{"pid": child.pid, "path": q.path, "i": i} for i in range(n)]
    assert not q.closed  # the child's close() closed its own handle only
    q.put("still open")
    assert q.get(timeout=1) == "still open"
    q.close()


# -- 8. put_many / get_many with random sizes, many times around a small ring -----------


def _random_messages(seed: int, n: int) -> list[Any]:
    rng = random.Random(seed)
    msgs: list[Any] = []
    for k in range(n):
        size = rng.choice([0, 1, rng.randint(0, 3000), 3000])
        if rng.random() < 0.5:
            msgs.append(rng.randbytes(size))
        else:
            msgs.append({"k": k, "s": "é" * (size // 4), "b": rng.randbytes(size // 2), "l": [k]})
    return msgs


def _span(msg: Any) -> int:
    """Ring bytes one message takes: 16-byte record header, payload, padding to 16."""
    return (16 + len(msgpack.packb(msg)) + 15) & ~15


def _batch_plan(msgs: list[Any], seed: int, plan: str, capacity: int) -> list[int]:
    """Batch sizes for ``put_many`` covering ``msgs``.

    ``fit``: random sizes 1..20 cut short so a batch takes at most half the
    ring (with the wrap padding, a batch then always fits once older records
    are consumed). ``any``: random sizes 1..20 regardless, so many batches are
    larger than the whole ring and the producer must wait for space midway.
    """
    rng = random.Random(seed)
    sizes: list[int] = []
    k = 0
    while k < len(msgs):
        n = min(rng.randint(1, 20), len(msgs) - k)
        if plan == "fit":
            used, m = 0, 0
            while m < n and (m == 0 or used + _span(msgs[k + m]) <= capacity // 2):
                used += _span(msgs[k + m])
                m += 1
            n = m
        sizes.append(n)
        k += n
    return sizes


def _put_batches(q: shmbus.Queue, msgs: list[Any], sizes: list[int]) -> None:
    k = 0
    for n in sizes:
        # 10 s per batch: ample for a healthy run, short enough to fail fast on a stall.
        q.put_many(msgs[k : k + n], timeout=10)
        k += n


def _get_batches(q: shmbus.Queue, n_total: int, seed: int, peer: Any) -> list[Any]:
    """get_many with random sizes until ``n_total`` arrived; fail fast if ``peer`` dies."""
    rng = random.Random(seed)
    got: list[Any] = []
    deadline = time.monotonic() + CHILD_TIMEOUT
    while len(got) < n_total:
        try:
            got.extend(q.get_many(rng.randint(1, 20), timeout=1))
        except shmbus.Empty:
            if peer is not None and peer.exitcode is not None:
                raise AssertionError(
                    f"producer exited (code {peer.exitcode}) after {len(got)} of {n_total}"
                ) from None
            assert time.monotonic() < deadline, f"stalled after {len(got)} of {n_total}"
    return got


def _child_get_batches(q: shmbus.Queue, n_total: int, seed: int, conn: Connection) -> None:
    conn.send(_get_batches(q, n_total, seed, None))


@pytest.mark.parametrize("plan", ["fit", "any"])
@pytest.mark.parametrize("producer", ["child", "parent"])
def test_batches_wrap_around_small_ring(bus_name: str, procs: Any, producer: str, plan: str) -> None:
    seed = 20240611 + 2 * (producer == "parent") + (plan == "any")
    msgs = _random_messages(seed, 3000)
    q = shmbus.Queue.create(bus_name, capacity=8192)
    sizes = _batch_plan(msgs, seed, plan, q.capacity)
    assert sum(sizes) == len(msgs)
    assert sum(_span(m) for m in msgs) > 200 * q.capacity  # many times around the ring
    if producer == "child":
        child = procs.start(_put_batches, q, msgs, sizes)
        got = _get_batches(q, len(msgs), seed + 1, child)
    else:
        rx, tx = procs.ctx.Pipe(duplex=False)
        child = procs.start(_child_get_batches, q, len(msgs), seed + 1, tx)
        _put_batches(q, msgs, sizes)
        got = _recv(rx, child)
    procs.join_all()
    assert len(got) == len(msgs)
    for k, (a, b) in enumerate(zip(got, msgs)):
        assert a == b, f"message {k} differs"
    assert q.qsize() == 0
    with pytest.raises(shmbus.Empty):
        q.get_nowait()
    q.close()


def _child_put_large(q: shmbus.Queue, sizes: list[int]) -> None:
    for i, n in enumerate(sizes):
        q.put_bytes(_large(i, n), timeout=CHILD_TIMEOUT)


def _large(i: int, n: int) -> bytes:
    return (i.to_bytes(4, "little") * (n // 4 + 1))[:n]


def test_large_messages_wrap_early_and_arrive_intact_across_processes(bus_name: str, procs: Any) -> None:
    """Records go back to the ring's start when it is free and nearly empty (_ring.HOT_WINDOW)."""
    rng = random.Random(7)
    sizes = [rng.randint(64 << 10, 1 << 20) for _ in range(300)]
    q = shmbus.Queue.create(bus_name, capacity="16MiB")
    procs.start(_child_put_large, q, sizes)
    for i, n in enumerate(sizes):
        assert q.get_bytes(timeout=CHILD_TIMEOUT) == _large(i, n), f"message {i}"
    procs.join_all()
    assert q.qsize() == 0 and q.stats().bytes_out == sum(sizes)
    # One process, one message at a time: the ring's first few MiB are reused.
    cap = q.capacity
    for i in range(40):
        q.put_bytes(_large(i, 1 << 20))
        assert q._h64[Q_HEAD] % cap < _ring.HOT_WINDOW + (2 << 20)
        assert q.get_bytes() == _large(i, 1 << 20)
    q.close()


def test_put_many_larger_than_ring_completes_with_a_consumer(bus_name: str, procs: Any) -> None:
    """One put_many of 3x the ring's bytes: a consumer in another process drains it meanwhile."""
    q = shmbus.Queue.create(bus_name, capacity=4096)
    msgs = [bytes([k]) * 1000 for k in range(12)]  # 12 records of 1024 bytes
    rx, tx = procs.ctx.Pipe(duplex=False)
    consumer = procs.start(_child_get_batches, q, len(msgs), 1, tx)
    q.put_many(msgs, timeout=10)
    assert _recv(rx, consumer) == msgs
    procs.join_all()
    assert q.qsize() == 0
    q.close()


# -- 9. A consumer killed in its wait takes nothing with it -----------------------------


def test_consumer_killed_while_blocked_loses_nothing(bus_name: str, procs: Any) -> None:
    q = shmbus.Queue.create(bus_name, capacity="64KiB")
    victims = []
    for many in (0, 10):  # one killed in get(), one in get_many()
        ready = procs.ctx.Event()
        _, tx = procs.ctx.Pipe(duplex=False)
        v = procs.start(_child_get_and_report, q, ready, tx, many)
        assert ready.wait(CHILD_TIMEOUT)
        victims.append(v)
    ready = procs.ctx.Event()
    rx, tx = procs.ctx.Pipe(duplex=False)
    survivor = procs.start(_child_get_and_report, q, ready, tx)
    assert ready.wait(CHILD_TIMEOUT)
    for p in [*victims, survivor]:
        _wait_until_blocked(p.pid)

    for v in victims:
        os.kill(v.pid, signal.SIGKILL)
        v.join(CHILD_TIMEOUT)
        assert v.exitcode == -signal.SIGKILL

    q.put({"for": "survivor"})
    got, _ = _recv(rx, survivor)
    _join_ok(survivor)
    assert got == {"for": "survivor"}
    # No token was lost or left behind by the dead waiters.
    assert q.qsize() == 0
    with pytest.raises(shmbus.Empty):
        q.get_nowait()
    q.put_many([1, 2, 3])
    assert q.get_many(10, timeout=1) == [1, 2, 3]
    with pytest.raises(shmbus.Empty):
        q.get(timeout=0.05)
    q.close()
