"""Signals during semaphore waits (``shmbus._sync``): real child processes, C and pure Python.

A child blocks in a wait (an empty Queue's get, a put on a full ring, a put
on a queue at its maxsize, a Topic subscription's get) with a handler that
raises: SystemExit from SIGTERM (``sys.exit``), a custom exception from
SIGALRM (``signal.setitimer``), KeyboardInterrupt from SIGINT. The child
measures the time from the handler's entry to the exception being caught
(the requirement is 50 ms), and checks that the exception came out of the
semaphore wait (its traceback passes through ``_sync``). The parent
then checks that the bus is consistent: it still puts and gets, the message
counts add up, and ``shmbus check`` passes.

Children are separate interpreters (``subprocess``), so that
``SHMBUS_PURE_PYTHON`` and ``SHMBUS_SEM_WAIT`` take effect at import. The
parent sends a signal only once the child is asleep in a futex wait (polled
in ``/proc``, see conftest.wait_until_blocked); no test sleeps to
synchronise. The SIGALRM timer is armed by the child just before it blocks,
half a second ahead: the traceback check says whether it landed in the wait.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import select
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_until_blocked

import shmbus
from shmbus import _sync

ROOT = str(Path(__file__).resolve().parent.parent)
BOUND = 0.050  # handler entry to exception caught, measured in the child
CHILD_WAIT = 30.0  # only a hang reaches it

CHILD = r"""
import json, os, signal, sys, time, traceback
import shmbus
from shmbus import _accel, _sync

path, scenario, how = sys.argv[1:4]
out = os.fdopen(1, "w", buffering=1)

class Watchdog(Exception):
    pass

entered = []

def raising(signum, frame):
    entered.append(time.monotonic())
    os.write(1, b'{"entered": true}\n')  # not ``out``: a handler must not re-enter its buffer
    if how == "term":
        sys.exit(3)
    if how == "int":
        raise KeyboardInterrupt
    raise Watchdog

calls = []

def returning(signum, frame):
    calls.append(time.monotonic())

def report(**kw):
    kw.update(c=_accel.ENABLED, wait=getattr(_sync, "WAIT_KIND", "posix_ipc"))
    out.write(json.dumps(kw) + "\n")

if scenario == "topic":
    t = shmbus.Topic.open(path)
    sub = t.subscribe()
    op = sub.get
    closer = t
else:
    q = shmbus.Queue.open(path)
    closer = q
    if scenario == "get":
        op = q.get
    else:
        op = lambda: q.put_bytes(b"x" * 1000)

if how == "returning":  # a handler that returns must not end a timed wait early
    signal.signal(signal.SIGALRM, returning)
    signal.setitimer(signal.ITIMER_REAL, 0.01, 0.01)
    t0 = time.monotonic()
    try:
        if scenario == "topic":
            sub.get(timeout=0.3)
        elif scenario == "get":
            q.get(timeout=0.3)
        else:
            q.put_bytes(b"x" * 1000, timeout=0.3)
        outcome = "returned"
    except (shmbus.Empty, shmbus.Full) as e:
        outcome = type(e).__name__
    signal.setitimer(signal.ITIMER_REAL, 0)
    report(outcome=outcome, elapsed=time.monotonic() - t0, calls=len(calls))
else:
    sig = {"term": signal.SIGTERM, "int": signal.SIGINT, "alrm": signal.SIGALRM}[how]
    signal.signal(sig, raising)
    report(ready=True)
    try:
        if how == "alrm":
            signal.setitimer(signal.ITIMER_REAL, 0.5)
        op()
        report(outcome="returned")
    except (SystemExit, KeyboardInterrupt, Watchdog) as e:
        caught = time.monotonic()
        frames = traceback.walk_tb(e.__traceback__)
        in_wait = any(f.f_code.co_filename.endswith("_sync.py") for f, _ in frames)
        # A subscription that no longer waits must not ask publishers to post it.
        flag = t._mm[sub._flag] if scenario == "topic" else 0
        report(outcome=type(e).__name__, dt=caught - entered[0], in_wait=in_wait, flag=flag)
closer.close()
"""


class Child:
    """One child interpreter running CHILD, reporting JSON lines on its stdout."""

    def __init__(self, path: str, scenario: str, how: str, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, path, scenario, how],
            stdout=subprocess.PIPE,
            env=env,
            cwd=ROOT,
        )
        self._buf = b""

    def line(self, timeout: float = CHILD_WAIT) -> dict[str, Any]:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        end = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = end - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise AssertionError(f"child {self.proc.pid} sent nothing in {timeout} s")
            chunk = os.read(fd, 4096)
            if not chunk:
                raise AssertionError(f"child {self.proc.pid} exited ({self.proc.wait()}) without a report")
            self._buf += chunk
        raw, self._buf = self._buf.split(b"\n", 1)
        return json.loads(raw)  # type: ignore[no-any-return]

    def outcome(self) -> dict[str, Any]:
        """The next report past the handler's "entered" line."""
        rep = self.line()
        return self.line() if rep.get("entered") else rep

    def finish(self) -> None:
        assert self.proc.wait(CHILD_WAIT) == 0

    def reap(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def spawn() -> Iterator[Any]:
    """Start ``Child`` processes; every one is killed (if need be) and reaped at the end."""
    children: list[Child] = []

    def start(path: str, scenario: str, how: str, pure: bool, wait: str = "") -> Child:
        env = dict(os.environ, PYTHONPATH=ROOT, SHMBUS_PURE_PYTHON="1" if pure else "0", SHMBUS_SEM_WAIT=wait)
        c = Child(path, scenario, how, env)
        children.append(c)
        return c

    yield start
    for c in children:
        c.reap()


MODES = [pytest.param(False, id="c"), pytest.param(True, id="pure")]
SIGNALS = ["term", "alrm", "int"]
SCENARIOS = ["get", "put_full", "put_slots", "topic"]
_SIGNUM = {"term": signal.SIGTERM, "int": signal.SIGINT}


def _make(scenario: str, path: str) -> tuple[Any, int]:
    """The bus a child will block on, and how many messages the parent left in it."""
    if scenario == "topic":
        return shmbus.Topic.create(path, capacity=4096), 0
    if scenario == "put_slots":
        q = shmbus.Queue.create(path, capacity=65536, maxsize=3)
    else:
        q = shmbus.Queue.create(path, capacity=4096)
    n = 0
    if scenario != "get":
        while True:  # until the ring (or maxsize) has no room for the child's 1000 bytes
            try:
                q.put_bytes(b"p" * 1000, block=False)
            except shmbus.Full:
                break
            n += 1
    return q, n


def _check_cli(path: str) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "shmbus", "check", path],
        env=dict(os.environ, PYTHONPATH=ROOT), cwd=ROOT, capture_output=True, text=True, timeout=CHILD_WAIT,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr


def _consistent(scenario: str, bus: Any, left: int, path: str) -> None:
    """The parent still puts and gets, and gets back exactly what it put (nothing from the child)."""
    if scenario == "topic":
        sub = bus.subscribe()
        bus.publish({"after": 1})
        assert sub.get(timeout=5) == {"after": 1}
        with pytest.raises(shmbus.Empty):
            sub.get(block=False)
        sub.close()
    else:
        got = [bus.get(timeout=5) for _ in range(left)]
        assert got == [b"p" * 1000] * left
        bus.put({"after": 1})
        assert bus.get(timeout=5) == {"after": 1}
        with pytest.raises(shmbus.Empty):
            bus.get(block=False)
    _check_cli(path)


@pytest.mark.parametrize("pure", MODES)
@pytest.mark.parametrize("how", SIGNALS)
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_handler_exception_leaves_wait(
    spawn: Any, bus_name: str, scenario: str, how: str, pure: bool
) -> None:
    """A handler's exception ends the wait within 50 ms, taking nothing; the bus stays sound."""
    bus, left = _make(scenario, bus_name)
    try:
        child = spawn(bus_name, scenario, how, pure)
        ready = child.line()
        assert ready["c"] is (not pure)
        if how in _SIGNUM:
            wait_until_blocked(child.proc.pid)
            os.kill(child.proc.pid, _SIGNUM[how])
        rep = child.outcome()
        child.finish()
        exc = {"term": "SystemExit", "int": "KeyboardInterrupt", "alrm": "Watchdog"}[how]
        assert rep["outcome"] == exc
        assert rep["in_wait"], "the signal did not land in the semaphore wait"
        assert rep["dt"] < BOUND, f"{rep['dt'] * 1e3:.1f} ms from handler entry to exception"
        assert rep["flag"] == 0
        _consistent(scenario, bus, left, bus_name)
    finally:
        bus.close()
        shmbus.unlink(bus_name)


@pytest.mark.parametrize("pure", MODES)
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_returning_handler_keeps_waiting(spawn: Any, bus_name: str, scenario: str, pure: bool) -> None:
    """SIGALRM every 10 ms with a handler that returns: a 0.3 s wait still times out at 0.3 s."""
    bus, left = _make(scenario, bus_name)
    try:
        child = spawn(bus_name, scenario, "returning", pure)
        rep = child.line()
        child.finish()
        assert rep["outcome"] == ("Empty" if scenario in ("get", "topic") else "Full")
        assert rep["calls"] >= 5, rep  # the handler really ran during the wait
        assert 0.3 <= rep["elapsed"] < 2.0, rep
        _consistent(scenario, bus, left, bus_name)
    finally:
        bus.close()
        shmbus.unlink(bus_name)


@pytest.mark.parametrize("wait", ["timedwait", "posix_ipc"])
def test_fallback_waits(spawn: Any, bus_name: str, wait: str) -> None:
    """Without sem_clockwait: sem_timedwait still lets the exception out; posix_ipc (last resort) loses it."""
    if wait == "timedwait" and _sync.WAIT_KIND != "clockwait":
        pytest.skip(f"this libc's waits are already {_sync.WAIT_KIND}")
    q, _ = _make("get", bus_name)
    try:
        child = spawn(bus_name, "get", "term", False, wait)
        assert child.line()["wait"] == wait
        wait_until_blocked(child.proc.pid)
        os.kill(child.proc.pid, signal.SIGTERM)
        if wait == "timedwait":
            rep = child.outcome()
            assert rep["outcome"] == "SystemExit" and rep["in_wait"], rep
            assert rep["dt"] < BOUND, rep
            child.finish()
        else:
            # The documented limitation: posix_ipc drops the handler's SystemExit, the get
            # blocks on; a message put once the handler ran ends it.
            assert child.line() == {"entered": True}
            q.put_bytes(b"wake")
            rep = child.line()
            assert rep["outcome"] == "returned", rep
            child.finish()
        _consistent("get", q, 0, bus_name)
    finally:
        q.close()
        shmbus.unlink(bus_name)


# -- the clock ------------------------------------------------------------------------
#
# A wall-clock step cannot be made in a test without changing the machine's clock,
# and a time namespace (unshare --time) offsets only CLOCK_MONOTONIC and
# CLOCK_BOOTTIME, never CLOCK_REALTIME. So these tests look at the call: which
# clock the sleep names, and which deadline it passes.


class _Recorder:
    """Stands in for libc's sem_clockwait / sem_timedwait: records the call, sleeps to its end, times out."""

    def __init__(self) -> None:
        self.calls: list[tuple[int | None, float]] = []

    def clockwait(self, h: int, clock: int, ts: bytes) -> int:
        sec, nsec = struct.unpack("@ll", ts)
        at = sec + nsec / 1e9
        self.calls.append((clock, at))
        time.sleep(max(at - time.clock_gettime(clock), 0.0))  # what the real one would sleep
        ctypes.set_errno(errno.ETIMEDOUT)
        return -1

    def timedwait(self, h: int, ts: bytes) -> int:
        sec, nsec = struct.unpack("@ll", ts)
        at = sec + nsec / 1e9
        self.calls.append((None, at - time.time()))
        time.sleep(max(at - time.time(), 0.0))
        ctypes.set_errno(errno.ETIMEDOUT)
        return -1


@pytest.fixture
def sem() -> Iterator[_sync.Sem]:
    s = _sync.create_sems(f"{os.getpid() & 0xFFFF:04x}{os.urandom(6).hex()}", {"items": 0}, 0o600)["items"]
    yield s
    s.unlink()
    s.close()


@pytest.mark.skipif(_sync.WAIT_KIND != "clockwait", reason="libc has no sem_clockwait")
def test_deadline_is_on_the_monotonic_clock(sem: _sync.Sem, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every sleep names CLOCK_MONOTONIC and the caller's time.monotonic() deadline, at most a nap ahead."""
    rec = _Recorder()
    monkeypatch.setattr(_sync, "_clockwait", rec.clockwait)
    deadline = time.monotonic() + 0.2
    assert sem.acquire(deadline) is False
    assert {c for c, _ in rec.calls} == {time.CLOCK_MONOTONIC}
    assert rec.calls[-1][1] == pytest.approx(deadline, abs=1e-6)  # the caller's deadline, unchanged
    assert all(at <= deadline + 1e-6 for _, at in rec.calls)
    assert len(rec.calls) >= 0.2 / _sync.SIGNAL_SLICE  # in naps of SIGNAL_SLICE


def test_realtime_fallback_naps_are_short(sem: _sync.Sem, monkeypatch: pytest.MonkeyPatch) -> None:
    """sem_timedwait's CLOCK_REALTIME deadline is one nap ahead at most: a clock step stretches one nap."""
    rec = _Recorder()
    monkeypatch.setattr(_sync, "WAIT_KIND", "timedwait")
    monkeypatch.setattr(_sync, "_timedwait", rec.timedwait)
    deadline = time.monotonic() + 0.2
    assert sem.acquire(deadline) is False
    assert len(rec.calls) >= 0.2 / _sync.SIGNAL_SLICE
    assert all(ahead <= _sync.SIGNAL_SLICE + 0.005 for _, ahead in rec.calls)  # seconds past "now"


# -- a handler that raises just as the semaphore is taken -----------------------------


class _Raised(Exception):
    pass


@pytest.mark.parametrize("kind", ["clockwait", "timedwait"])
def test_taken_then_raised_posts_back(sem: _sync.Sem, monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    """The sleep returns 0 (taken) with a signal pending: the handler's exception leaves, the token goes back.

    libc's ``raise(sig)`` stands in for the sleep: C code that returns 0 with
    the signal already caught by Python's C-level handler, so the Python
    handler runs as soon as the call is back, the instant a plain call would
    lose the result. The handle is the signal number (raise's only argument).
    """
    if _sync.WAIT_KIND == "posix_ipc":
        pytest.skip("no libc waits here")
    libc = ctypes.CDLL(None, use_errno=True)
    fake = libc["raise"]
    fake.restype = ctypes.c_int

    def handler(signum: int, frame: Any) -> None:
        raise _Raised

    old = signal.signal(signal.SIGUSR1, handler)
    real = sem._h
    try:
        monkeypatch.setattr(_sync, "WAIT_KIND", kind)
        monkeypatch.setattr(_sync, "_clockwait" if kind == "clockwait" else "_timedwait", fake)
        sem._h = ctypes.c_void_p(signal.SIGUSR1)
        assert sem.value == 0
        with pytest.raises(_Raised):
            sem.acquire(None)
        assert sem.value == 1  # the token the "sleep" took was posted back
    finally:
        sem._h = real
        signal.signal(signal.SIGUSR1, old)


def test_close_is_idempotent(sem: _sync.Sem) -> None:
    """close() releases the libc handle once; a second close does nothing."""
    other = _sync.open_sems(sem.name.split(".")[1], ["items"])[0]["items"]
    assert (other._h is None) == (_sync.WAIT_KIND == "posix_ipc")
    other.close()
    other.close()
    assert other._h is None
    sem.release()
    assert sem.acquire(time.monotonic() + 1)  # the bus's own handle still works
