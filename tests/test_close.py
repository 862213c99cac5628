"""close() while another thread (or a signal handler) of the process is blocked on the handle.

Each scenario runs in a child interpreter, so a crash (SIGSEGV) is a failed
test, not a dead test runner. In the child a thread blocks in the call (the
kernel's view of that thread proves it sleeps: ``_blocked``), the main thread
closes the handle, and the child reports what the call raised and how long it
took. The parent then checks the bus: ``shmbus check`` passes, the messages
add up, no lock is held, and a fresh handle can put and get.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator

import pytest

import shmbus
from shmbus import _accel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = ["pure"] + (["c"] if _accel.ENABLED else [])
BOUND = 2.0  # seconds a blocked call may take to raise BusClosed after close()

# Shared by every child: wait until a thread sleeps in a futex (semaphore or mutex wait).
PRELUDE = textwrap.dedent("""
    import asyncio, json, os, signal, sys, threading, time
    import shmbus

    def _blocked(tid, timeout=20.0):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with open(f"/proc/self/task/{tid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
            try:
                with open(f"/proc/self/task/{tid}/wchan") as f:
                    wchan = f.read()
            except OSError:
                wchan = "futex"
            if state == "S" and "futex" in wchan:
                return
            time.sleep(0.001)
        raise AssertionError("the thread never blocked")

    def run_blocked(call, closer):
        out = {}
        ready = threading.Event()
        def body():
            out["tid"] = threading.get_native_id()
            ready.set()
            try:
                call()
                out["result"] = "returned"
            except BaseException as e:
                out["result"] = type(e).__name__
                out["sent"] = getattr(e, "sent", None)
            out["t"] = time.monotonic()
        t = threading.Thread(target=body, daemon=True)
        t.start()
        ready.wait()
        _blocked(out["tid"])
        time.sleep(0.05)  # (settle: it keeps sleeping; checked again below)
        _blocked(out["tid"])
        t0 = time.monotonic()
        closer()
        t.join(10)
        out["elapsed"] = out.get("t", float("inf")) - t0
        out.pop("t", None)
        return out
""")


def _child(body: str, mode: str, timeout: float = 60.0) -> dict:
    env = dict(os.environ)
    env["SHMBUS_PURE_PYTHON"] = "1" if mode == "pure" else "0"
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    code = PRELUDE + textwrap.dedent(body)
    p = subprocess.run(
        [sys.executable, "-X", "faulthandler", "-c", code], env=env, cwd=ROOT,
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    assert p.returncode == 0, f"child exited with {p.returncode}\n{p.stdout}\n{p.stderr}"
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    return json.loads(lines[-1]) if lines else {}


def _check(path: str) -> None:
    p = subprocess.run(
        [sys.executable, "-m", "shmbus", "check", path], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert p.returncode == 0, p.stdout + p.stderr


def _no_lock_held(bus: shmbus.Queue | shmbus.Topic) -> None:
    for lk in bus._locks:
        tid, _, _ = lk.state()
        assert tid == 0, f"the {lk.role} lock is held by {tid}"


@pytest.fixture
def name() -> Iterator[str]:
    n = f"shmbus-close-{uuid.uuid4().hex[:10]}"
    yield n
    for kind in (shmbus.Queue, shmbus.Topic):
        try:
            b = kind.open(n)
        except (shmbus.BusNotFound, shmbus.IncompatibleBus):
            continue
        b.unlink()
        b.close()


def _full_queue(name: str, maxsize: int = 0) -> int:
    """A queue whose ring (or maxsize) is full of bytes messages; return how many it holds."""
    q = shmbus.Queue.create(name, capacity=4096, maxsize=maxsize)
    n = 0
    while True:
        try:
            q.put_bytes(b"%06d" % n + b"." * 494, block=False)
        except shmbus.Full:
            break
        n += 1
    q.close()
    return n


def _assert_queue_sound(name: str, before: int) -> None:
    """``before`` messages, in order, untouched; no lock held; another handle puts and gets."""
    path = shmbus._file.resolve_path(name)
    _check(path)
    with shmbus.Queue.open(name) as q:
        _no_lock_held(q)
        assert q.qsize() == before
        got = [q.get_bytes(timeout=5) for _ in range(before)]
        assert [g[:6] for g in got] == [b"%06d" % i for i in range(before)]
        q.put({"after": 1})
        assert q.get(timeout=5) == {"after": 1}
        assert q.qsize() == 0
        with pytest.raises(shmbus.Empty):
            q.get(timeout=0.3)  # no stray items token left behind
        _no_lock_held(q)
    _check(path)


GETS = {
    "get": "q.get()",
    "get_many": "q.get_many(5)",
    "get_bytes": "q.get_bytes()",
    "get_view": "q.get_view().end_unused()",
    "get_timeout": "q.get(timeout=60)",
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("call", sorted(GETS))
def test_get_waiting_for_a_message(name: str, mode: str, call: str) -> None:
    shmbus.Queue.create(name, capacity=4096).close()
    out = _child(f"""
        q = shmbus.Queue.open({name!r})
        print(json.dumps(run_blocked(lambda: {GETS[call]}, q.close)))
        q.close()  # twice: nothing happens
        try:
            q.get(block=False)
        except shmbus.BusClosed:
            print("refused")
    """, mode)  # fmt: skip
    assert out["result"] == "BusClosed", out
    assert out["elapsed"] < BOUND
    _assert_queue_sound(name, 0)


PUTS = {
    "put": "q.put(b'x' * 500)",
    "put_bytes": "q.put_bytes(b'x' * 500)",
    "put_many": "q.put_many([b'x' * 500] * 3)",
    "reserve": "q.reserve(500).end_unused()",
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("call", sorted(PUTS))
@pytest.mark.parametrize("bound", ["bytes", "maxsize"])
def test_put_waiting_for_room(name: str, mode: str, call: str, bound: str) -> None:
    n = _full_queue(name, maxsize=3 if bound == "maxsize" else 0)
    out = _child(f"""
        q = shmbus.Queue.open({name!r})
        print(json.dumps(run_blocked(lambda: {PUTS[call]}, q.close)))
    """, mode)  # fmt: skip
    assert out["result"] == "BusClosed", out
    assert out["elapsed"] < BOUND
    assert out["sent"] == 0
    _assert_queue_sound(name, n)


def test_put_many_says_what_went_in(name: str) -> None:
    """A batch cut short by close: exactly ``sent`` messages are in, the first ones."""
    q = shmbus.Queue.create(name, capacity=4096)
    q.close()
    out = _child(f"""
        q = shmbus.Queue.open({name!r})
        batch = [b"%06d" % i + b"." * 494 for i in range(20)]
        print(json.dumps(run_blocked(lambda: q.put_many(batch), q.close)))
    """, "pure")  # fmt: skip
    assert out["result"] == "BusClosed", out
    assert 0 < out["sent"] < 20
    _assert_queue_sound(name, out["sent"])


HOLDER = textwrap.dedent("""
    import sys, time, shmbus
    q = shmbus.Queue.open(sys.argv[1])
    blk = q.reserve(8) if sys.argv[2] == "head" else q.get_view()
    print("holding", flush=True)
    sys.stdin.readline()
    blk.end_unused()
    q.close()
""")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("lock", "call"), [("head", "q.put(1)"), ("head", "q.put_many([1, 2])"),
                                            ("tail", "q.get()"), ("tail", "q.get_many(3)")])  # fmt: skip
def test_waiting_for_a_lock_another_process_holds(name: str, mode: str, lock: str, call: str) -> None:
    with shmbus.Queue.create(name, capacity=4096) as q:
        for i in range(3):
            q.put_bytes(b"%06d" % i)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, name, lock], cwd=ROOT, stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": ROOT},
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "holding"
        out = _child(f"""
            q = shmbus.Queue.open({name!r})
            print(json.dumps(run_blocked(lambda: {call}, q.close)))
        """, mode)  # fmt: skip
    finally:
        holder.communicate("go\n", timeout=30)
    assert holder.returncode == 0
    assert out["result"] == "BusClosed", out
    assert out["elapsed"] < BOUND
    _assert_queue_sound(name, 3)


SUB_GETS = {
    "get": "sub.get()",
    "get_many": "sub.get_many(4)",
    "get_view": "sub.get_view().end_unused()",
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("call", sorted(SUB_GETS))
@pytest.mark.parametrize("closer", ["topic", "subscription"])
def test_subscription_waiting(name: str, mode: str, call: str, closer: str) -> None:
    shmbus.Topic.create(name, capacity=4096).close()
    out = _child(f"""
        t = shmbus.Topic.open({name!r})
        sub = t.subscribe()
        closer = t.close if {closer!r} == "topic" else sub.close
        print(json.dumps(run_blocked(lambda: {SUB_GETS[call]}, closer)))
        t.close()
    """, mode)  # fmt: skip
    assert out["result"] == "BusClosed", out
    assert out["elapsed"] < BOUND
    _check(shmbus._file.resolve_path(name))
    with shmbus.Topic.open(name) as t:
        assert t.subscribers() == []  # the slot was freed
        sub = t.subscribe()
        t.publish("x")
        assert sub.get(timeout=5) == "x"
        _no_lock_held(t)


@pytest.mark.parametrize("call", ["t.publish(1)", "t.reserve(8).end_unused()"])
def test_publisher_waiting_for_the_lock(name: str, call: str) -> None:
    shmbus.Topic.create(name, capacity=4096).close()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER.replace("Queue", "Topic"), name, "head"], cwd=ROOT,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": ROOT},
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "holding"
        out = _child(f"""
            t = shmbus.Topic.open({name!r})
            print(json.dumps(run_blocked(lambda: {call}, t.close)))
        """, "pure")  # fmt: skip
    finally:
        holder.communicate("go\n", timeout=30)
    assert out["result"] == "BusClosed", out
    assert out["elapsed"] < BOUND
    with shmbus.Topic.open(name) as t:
        assert t.stats().put_count == 0
        _no_lock_held(t)
    _check(shmbus._file.resolve_path(name))


ASYNC = {
    "aget": ("empty", "q.aget()"),
    "aget_many": ("empty", "q.aget_many(3)"),
    "aput": ("full", "q.aput(b'x' * 500)"),
    "aput_many": ("full", "q.aput_many([b'x' * 500] * 2)"),
    "sub.aget": ("topic", "sub.aget()"),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("call", sorted(ASYNC))
def test_asyncio_calls(name: str, mode: str, call: str) -> None:
    state, expr = ASYNC[call]
    n = 0
    if state == "full":
        n = _full_queue(name)
    elif state == "empty":
        shmbus.Queue.create(name, capacity=4096).close()
    else:
        shmbus.Topic.create(name, capacity=4096).close()
    kind = "Topic" if state == "topic" else "Queue"
    out = _child(f"""
        q = t = shmbus.{kind}.open({name!r})
        sub = t.subscribe() if {kind!r} == "Topic" else None
        async def main():
            loop = asyncio.get_running_loop()
            # close from another thread once the call waits (its helper thread sleeps)
            timer = threading.Timer(0.3, q.close)
            timer.start()
            t0 = time.monotonic()
            try:
                await asyncio.wait_for({expr}, 10)
                r = "returned"
            except BaseException as e:
                r = type(e).__name__
            timer.join()
            return {{"result": r, "elapsed": time.monotonic() - t0 - 0.3}}
        print(json.dumps(asyncio.run(main())))
    """, mode)  # fmt: skip
    assert out["result"] == "BusClosed", out
    assert out["elapsed"] < BOUND
    if kind == "Queue":
        _assert_queue_sound(name, n)
    else:
        _check(shmbus._file.resolve_path(name))


@pytest.mark.parametrize("mode", MODES)
def test_leaving_with_while_a_daemon_thread_waits(name: str, mode: str) -> None:
    shmbus.Queue.create(name, capacity=4096).close()
    _child(f"""
        with shmbus.Queue.open({name!r}) as q:
            ready = threading.Event()
            def body():
                ready.set()
                q.get()
            t = threading.Thread(target=body, daemon=True)
            t.start()
            ready.wait()
            _blocked(t.native_id)
        print("{{}}")
    """, mode)  # fmt: skip
    _assert_queue_sound(name, 0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("call", ["q.get()", "q.put(b'x' * 500)", "q.get_many(2)"])
def test_close_in_a_signal_handler(name: str, mode: str, call: str) -> None:
    n = _full_queue(name) if "put" in call else 0
    if not n:
        shmbus.Queue.create(name, capacity=4096).close()
    out = _child(f"""
        q = shmbus.Queue.open({name!r})
        signal.signal(signal.SIGUSR1, lambda *a: q.close())
        main = threading.get_native_id()
        def kick():
            _blocked(main)
            os.kill(os.getpid(), signal.SIGUSR1)
        threading.Thread(target=kick).start()
        t0 = time.monotonic()
        try:
            {call}
            r = "returned"
        except BaseException as e:
            r = type(e).__name__
        print(json.dumps({{"result": r, "closed": q.closed}}))
    """, mode)  # fmt: skip
    assert out == {"result": "BusClosed", "closed": True}
    _assert_queue_sound(name, n)


@pytest.mark.parametrize("mode", MODES)
def test_calls_after_close_refuse_at_once(name: str, mode: str) -> None:
    shmbus.Queue.create(name, capacity=4096).close()
    out = _child(f"""
        q = shmbus.Queue.open({name!r})
        q.put_bytes(b"000000")
        q.close()
        q.close()
        res = {{}}
        for label, f in [("get", q.get), ("get_nowait", q.get_nowait), ("put", lambda: q.put(2)),
                         ("put_many", lambda: q.put_many([2])), ("put_bytes", lambda: q.put_bytes(b"2")),
                         ("get_many", lambda: q.get_many(2)), ("get_bytes", q.get_bytes),
                         ("get_view", q.get_view), ("reserve", lambda: q.reserve(4)), ("qsize", q.qsize)]:
            t0 = time.monotonic()
            try:
                f()
                res[label] = "returned"
            except BaseException as e:
                res[label] = type(e).__name__
            assert time.monotonic() - t0 < 0.5
        print(json.dumps(res))
    """, mode)  # fmt: skip
    assert set(out.values()) == {"BusClosed"}, out
    _assert_queue_sound(name, 1)


def test_a_kept_message_goes_back_on_close(name: str) -> None:
    """A message a signal handler's exception kept from the caller is put back by close()."""
    with shmbus.Queue.create(name, capacity=4096) as q:
        q.put("a")
        q.put("b")
        q._kept.append(q._take(1)[0])  # as Queue._keep leaves it
        q._in_hand = []
    with shmbus.Queue.open(name) as q:
        assert [q.get(timeout=5), q.get(timeout=5)] == ["b", "a"]


def test_close_waits_for_a_block_open_in_another_thread(name: str) -> None:
    """A reservation open in another thread keeps its lock; close() leaves it to that thread."""
    import threading

    q = shmbus.Queue.create(name, capacity=4096)
    res = q.reserve(3)
    done = threading.Event()

    def closer() -> None:
        q.close()
        done.set()

    threading.Thread(target=closer).start()
    assert done.wait(5)
    assert q._unreleased != []  # still mapped: the block is in progress
    with res as buf:
        buf[:] = b"abc"
    assert q._unreleased == []  # released by the block's end
    with shmbus.Queue.open(name) as q2:
        assert q2.get(timeout=5) == b"abc"
        _no_lock_held(q2)
