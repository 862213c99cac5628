"""The multiprocessing drop-ins: anonymous queues, JoinableQueue, SimpleQueue, keyword-only create."""

from __future__ import annotations

import concurrent.futures
import gc
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import Procs

import shmbus
from shmbus import _admin

METHODS = [m for m in ("fork", "spawn", "forkserver") if m in mp.get_all_start_methods()]
REPO = str(Path(__file__).resolve().parent.parent)
_worker_queue: Any = None


def _echo(q: shmbus.Queue, out: shmbus.Queue) -> None:
    out.put(["child", q.get(timeout=30)])


def _remember(q: shmbus.Queue) -> None:
    global _worker_queue
    _worker_queue = q


def _put_pid(i: int) -> int:
    _worker_queue.put(i)
    return os.getpid()


@pytest.mark.parametrize("method", METHODS)
def test_an_anonymous_queue_reaches_children_by_every_start_method(method: str) -> None:
    q, out = shmbus.Queue(), shmbus.JoinableQueue(4)
    ctx = mp.get_context(method)
    p = ctx.Process(target=_echo, args=(q, out))
    p.start()
    q.put({"job": 1})
    assert out.get(timeout=30) == ["child", {"job": 1}]
    p.join(30)
    assert p.exitcode == 0
    assert os.path.exists(q.path) and os.path.exists(out.path)  # the child's exit removes nothing
    q.put("still here")
    assert q.get() == "still here"


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_pool_and_executor_initializers_take_an_anonymous_queue(method: str) -> None:
    q = shmbus.SimpleQueue()
    ctx = mp.get_context(method)
    with ctx.Pool(2, initializer=_remember, initargs=(q,)) as pool:
        pool.map(_put_pid, range(10))
    with concurrent.futures.ProcessPoolExecutor(
        2, mp_context=ctx, initializer=_remember, initargs=(q,)
    ) as ex:
        list(ex.map(_put_pid, range(10, 20)))
    assert sorted(q.get(timeout=10) for _ in range(20)) == list(range(20))
    assert q.empty()


def test_dropping_the_handle_in_its_creator_removes_the_queue_at_once() -> None:
    q = shmbus.Queue(3)
    path, bus_id = q.path, q.layout.bus_id
    assert Path(path).name.startswith("shmbus-anon-") and q.layout.anonymous and q.maxsize == 3
    assert os.stat(path).st_mode & 0o777 == 0o600
    gc.disable()  # not the cyclic collector: the last reference going is enough
    try:
        del q
        assert not os.path.exists(path)
    finally:
        gc.enable()
    assert not list(Path("/dev/shm").glob(f"sem.shmbus.{bus_id}.*"))


def test_a_forked_child_dropping_its_copy_leaves_the_queue(procs: Procs) -> None:
    q = shmbus.Queue()

    def child() -> None:
        nonlocal q
        q.put("from child")
        del q  # the inherited copy's finalizer runs here and must do nothing
        gc.collect()

    procs.start(child)
    procs.join_all()
    assert q.get(timeout=10) == "from child" and os.path.exists(q.path)


def _run(code: str, *, expect: int = 0) -> str:
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == expect, r.stderr
    return r.stdout.strip()


def test_the_creator_exiting_removes_the_queue_and_nothing_is_left() -> None:
    path = _run("import shmbus; q = shmbus.JoinableQueue(); q.put(1); print(q.path)")
    assert not os.path.exists(path)


def test_a_killed_creator_leaves_a_bus_that_gc_removes_and_only_then() -> None:
    code = (
        "import os, shmbus; q = shmbus.Queue(); q.put(1); print(q.path, q.layout.bus_id, flush=True); "
        "os.kill(os.getpid(), 9)"
    )
    path, bus_id = _run(code, expect=-signal.SIGKILL).split()
    try:
        assert os.path.exists(path)
        live = shmbus.Queue()  # our own: its creator (this process) lives
        info = {b.path: b for b in _admin.list_buses()}
        assert info[path].orphaned and not info[live.path].orphaned
        assert path in _admin.gc(dry_run=True, min_age=1e9) and os.path.exists(path)
        removed = _admin.gc(min_age=1e9)  # min_age: leave every semaphore alone but the bus's own
        assert path in removed and live.path not in removed
        assert not os.path.exists(path) and os.path.exists(live.path)
        assert not list(Path("/dev/shm").glob(f"sem.shmbus.{bus_id}.*"))
    finally:
        if os.path.exists(path):
            shmbus.unlink(path)


def test_gc_keeps_an_orphaned_anonymous_bus_while_a_process_uses_it() -> None:
    code = "import os, shmbus; q = shmbus.Queue(); print(q.path, flush=True); os.kill(os.getpid(), 9)"
    path = _run(code, expect=-signal.SIGKILL)
    try:
        with shmbus.Queue.open(path) as q:
            with pytest.raises(shmbus.Empty):
                q.get(timeout=0.01)  # a consumer that waited: a live participant
            assert not {b.path: b for b in _admin.list_buses()}[path].orphaned
            assert path not in _admin.gc(min_age=1e9)
        assert {b.path: b for b in _admin.list_buses()}[path].orphaned
    finally:
        shmbus.unlink(path)


# -- JoinableQueue ------------------------------------------------------------------------


def _worker(q: shmbus.JoinableQueue, die_on: Any) -> None:
    for item in iter(q.get, None):
        if item == die_on:
            os.kill(os.getpid(), signal.SIGKILL)  # took the task, will never call task_done
        time.sleep(0.001)
        q.task_done()
    q.task_done()


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_join_waits_for_task_done_in_other_processes(method: str) -> None:
    q = shmbus.JoinableQueue()
    ctx = mp.get_context(method)
    workers = [ctx.Process(target=_worker, args=(q, None)) for _ in range(3)]
    for p in workers:
        p.start()
    for i in range(60):
        q.put(i)
    assert q.join(timeout=60) is True and q.unfinished_tasks == 0
    for _ in workers:
        q.put(None)
    for p in workers:
        p.join(30)
        assert p.exitcode == 0
    q.join()
    with pytest.raises(ValueError, match="too many times"):
        q.task_done()
    assert q.unfinished_tasks == 0


def test_join_when_a_worker_dies_holding_a_task(procs: Procs) -> None:
    """As in multiprocessing, the dead worker's task stays unfinished: join(timeout) is the way out."""
    q = shmbus.JoinableQueue()
    for i in range(5):
        q.put(i)
    p = procs.start(_worker, q, 2)
    p.join(30)
    assert p.exitcode == -signal.SIGKILL
    assert q.unfinished_tasks == 5 - 2  # task 2 was taken, never done; 3 and 4 still queued
    start = time.monotonic()
    assert q.join(timeout=0.2) is False
    assert 0.15 < time.monotonic() - start < 5
    assert [q.get(), q.get()] == [3, 4]
    q.task_done()
    q.task_done()
    assert q.unfinished_tasks == 1 and q.join(timeout=0.05) is False
    q.task_done()  # the supervisor accounts for the lost task
    assert q.join(timeout=5) is True


def test_join_lets_a_signal_handlers_exception_out() -> None:
    q = shmbus.JoinableQueue()
    q.put("never done")

    def boom(*_: object) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGALRM, boom)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.1)
        start = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            q.join()
        assert time.monotonic() - start < 2
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def test_a_named_joinable_queue_counts_across_handles(bus_name: str) -> None:
    with shmbus.JoinableQueue.create(bus_name, maxsize=2) as a, shmbus.JoinableQueue.open(bus_name) as b:
        a.put_many([1, 2])
        assert b.unfinished_tasks == 2
        assert b.get() == 1
        b.task_done()
        assert a.unfinished_tasks == 1 and a.join(timeout=0.01) is False
        assert a.get() == 2
        a.task_done()
        assert b.join(timeout=1)
    with pytest.raises(shmbus.BusClosed):
        a.task_done()


# -- SimpleQueue, the no-op thread methods, the constructor line ----------------------------


def test_simple_queue_and_the_thread_methods() -> None:
    q = shmbus.SimpleQueue()
    assert q.empty()
    q.put(("a", 1))
    assert not q.empty() and q.get() == ["a", 1]
    q.close()
    q.join_thread()
    q.cancel_join_thread()
    q.close()
    with pytest.raises(ValueError, match="is closed"):
        q.put(1)
    with pytest.raises(TypeError):
        shmbus.SimpleQueue(4)  # type: ignore[call-arg,misc]


def test_create_takes_its_options_by_keyword_only(bus_name: str) -> None:
    with pytest.raises(TypeError):
        shmbus.Queue.create(bus_name, 6)  # type: ignore[misc]
    with pytest.raises(TypeError):
        shmbus.Topic.create(bus_name, "1MiB")  # type: ignore[misc]
    assert not os.path.exists(f"/dev/shm/{bus_name}")


@pytest.mark.parametrize("capacity", [1, 6, 4095, "4000", "1KiB"])
def test_a_capacity_below_one_page_is_refused(bus_name: str, capacity: Any) -> None:
    for make in (
        lambda: shmbus.Queue.create(bus_name, capacity=capacity),
        lambda: shmbus.Topic.create(bus_name, capacity=capacity),
        lambda: shmbus.Queue(capacity=capacity),
    ):
        with pytest.raises(ValueError, match="below the minimum of 4096 bytes"):
            make()
    assert not os.path.exists(f"/dev/shm/{bus_name}")


def test_the_smallest_capacity_is_one_page_and_larger_ones_round_up_to_a_page() -> None:
    assert shmbus.Queue(capacity=4096).capacity == 4096
    assert shmbus.Queue(capacity=5000).capacity == 8192
    assert shmbus.Queue().capacity == 16 * 1024 * 1024


@pytest.mark.parametrize("maxsize", [-1, 1.5, True, 1 << 31])
def test_a_bad_maxsize_is_refused(maxsize: Any) -> None:
    with pytest.raises(ValueError, match="maxsize"):
        shmbus.Queue(maxsize)
