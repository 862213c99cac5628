"""Shared test helpers: bus paths that clean up after themselves, process helpers, leak checks."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import shutil
import tempfile
import time
import traceback
import uuid
from collections.abc import Iterator
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, Callable

import pytest

# Real nats-server fixtures for any test file (imported: pytest_plugins belongs in the rootdir's conftest).
from natsserver import nats_auth_server, nats_cluster, nats_server, nats_server_factory  # noqa: F401

import shmbus
from shmbus import _sync

SHM = Path("/dev/shm")
# The session's pid in every name: concurrent test sessions never judge each other's buses.
TEST_PREFIX = f"shmbus-test-{os.getpid()}-"

# Every bus this session creates (in this process or a forked child) records its
# id here, so the leak check looks only at our own semaphores.
# (A random part too: a session in another pid namespace may have our pid. Children inherit
# the name through the environment, spawned ones included.)
_IDS_NAME = f"shmbus-test-ids-{os.getpid()}-{uuid.uuid4().hex[:8]}"
_IDS_FILE = Path(os.environ.setdefault("SHMBUS_TEST_IDS_FILE", f"{tempfile.gettempdir()}/{_IDS_NAME}"))
_real_create_sems = _sync.create_sems
# Bridges started by tests (and killed by some) keep their status files under a directory of this
# session's, one per test (see bridge_status_dir), removed at the end: never in the machine's shared one.
_BRIDGE_STATUS_ROOT = tempfile.mkdtemp(prefix="shmbus-test-bridges-")


def _recording_create_sems(bus_id: str, initial: dict[str, int], mode: int) -> Any:
    # A child that dropped privileges cannot always write here; its buses go unrecorded.
    with contextlib.suppress(OSError), open(_IDS_FILE, "a") as f:
        f.write(bus_id + "\n")
    return _real_create_sems(bus_id, initial, mode)


_sync.create_sems = _recording_create_sems


def _ids() -> list[str]:
    try:
        return _IDS_FILE.read_text().split()
    except FileNotFoundError:
        return []


def _ours(ids: list[str]) -> list[str]:
    """Our bus files, and the semaphores of the given bus ids, that are in /dev/shm now."""
    sems = {f"sem.shmbus.{i}." for i in ids}
    return sorted(
        n for n in os.listdir(SHM)
        if n.startswith((TEST_PREFIX, "." + TEST_PREFIX)) or n[: len("sem.shmbus.") + 17] in sems
    )  # fmt: skip


def session_sems() -> set[str]:
    """The semaphore files in /dev/shm that belong to buses this session created."""
    return {n for n in _ours(_ids()) if n.startswith("sem.")}


def leftovers() -> list[str]:
    """Bus files and semaphores this session made that are still in /dev/shm."""
    return _ours(_ids())


def pytest_sessionstart(session: pytest.Session) -> None:
    _IDS_FILE.touch()
    _IDS_FILE.chmod(0o666)  # children that drop privileges record their buses too


def pytest_sessionfinish(session: pytest.Session) -> None:
    with contextlib.suppress(FileNotFoundError):
        _IDS_FILE.unlink()
    shutil.rmtree(_BRIDGE_STATUS_ROOT, ignore_errors=True)


@pytest.fixture(autouse=True)
def bridge_status_dir(monkeypatch: pytest.MonkeyPatch) -> str:
    """Each test's own directory of bridge status files (made when a bridge writes one): a bridge a
    test killed leaves its file for that test alone to see. Child processes inherit it."""
    path = os.path.join(_BRIDGE_STATUS_ROOT, uuid.uuid4().hex[:12])
    monkeypatch.setenv("SHMBUS_BRIDGE_STATUS_DIR", path)
    return path


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """Fail any test that leaves a bus file or semaphore of its own in /dev/shm."""
    before = set(_ours(_ids()))
    first = len(_ids())
    yield
    leaked = sorted(set(_ours(_ids()[first:])) - before)
    assert not leaked, f"test leaked entries in /dev/shm: {leaked}"


@pytest.fixture
def bus_name() -> Iterator[str]:
    """A fresh bare bus name (lives in /dev/shm); the bus is unlinked after the test if it exists."""
    name = f"{TEST_PREFIX}{uuid.uuid4().hex[:12]}"
    yield name
    _unlink_quiet(name)


@pytest.fixture
def disk_path(tmp_path: Path) -> Iterator[str]:
    """A fresh bus path on disk (pytest's tmp dir); unlinked with its semaphores after the test."""
    p = str(tmp_path / "bus")
    yield p
    _unlink_quiet(p)


def _unlink_quiet(path: str) -> None:
    with contextlib.suppress(shmbus.BusNotFound, shmbus.NotABus):
        shmbus.unlink(path)


class Procs:
    """Starts processes and always reaps them: a test never leaves children behind."""

    def __init__(self) -> None:
        self.ctx = mp.get_context("fork")
        self.procs: list[Any] = []

    def start(self, target: Callable[..., Any], *args: Any) -> Any:
        p = self.ctx.Process(target=target, args=args, daemon=True)
        p.start()
        self.procs.append(p)
        return p

    def join_all(self, timeout: float = 60.0) -> None:
        """Join every child; fail if one is still running or exited non-zero."""
        for p in self.procs:
            p.join(timeout)
        stuck = [p.pid for p in self.procs if p.is_alive()]
        assert not stuck, f"child processes did not finish in time: {stuck}"
        bad = [(p.pid, p.exitcode) for p in self.procs if p.exitcode != 0]
        assert not bad, f"child processes failed (pid, exit code): {bad}"

    def reap(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.kill()
            p.join(5)


@pytest.fixture
def procs() -> Iterator[Procs]:
    """A ``Procs`` whose children are killed and reaped when the test ends."""
    ps = Procs()
    yield ps
    ps.reap()


# -- talking to child processes --------------------------------------------------------

CHILD_WAIT = 60.0


def recv(conn: Connection, proc: Any, timeout: float = CHILD_WAIT) -> Any:
    """Receive one object from a child, failing fast if the child dies first."""
    ready = wait([conn, proc.sentinel], timeout)
    if conn.poll():
        return conn.recv()
    if not ready:
        raise AssertionError(f"child {proc.pid} sent nothing in {timeout} s")
    proc.join(5)
    raise AssertionError(f"child {proc.pid} exited (code {proc.exitcode}) without sending")


def run(conn: Connection, body: Callable[..., Any], *args: Any) -> None:
    """A child's main: send ``("ok", result)`` or ``("error", traceback)``."""
    try:
        result = body(*args)
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        raise
    conn.send(("ok", result))


def result(conn: Connection, proc: Any, timeout: float = CHILD_WAIT) -> Any:
    """The result ``run`` sent, or the child's traceback as a test failure."""
    status, value = recv(conn, proc, timeout)
    if status != "ok":
        raise AssertionError(f"child {proc.pid} failed:\n{value}")
    return value


def proc_state(pid: int) -> tuple[str, str]:
    """The scheduler state letter and the wait channel of ``pid``."""
    with open(f"/proc/{pid}/stat") as f:
        state = f.read().rsplit(")", 1)[1].split()[0]
    try:
        with open(f"/proc/{pid}/wchan") as f:
            wchan = f.read()
    except OSError:  # unreadable: trust the state letter alone
        wchan = "futex"
    return state, wchan


def wait_until_blocked(pid: int, timeout: float = 20.0) -> None:
    """Return once ``pid`` sleeps in a futex wait (the semaphore wait it announced).

    Call only after the child's "about to block" event was received: from then
    on the only futex the child can sleep on is the bus's semaphore. This polls
    the kernel's view of the child; it is not a guess at how long to sleep.
    """
    deadline = time.monotonic() + timeout
    while True:
        state, wchan = proc_state(pid)
        if state == "S" and "futex" in wchan:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"child {pid} never blocked (state {state}, wchan {wchan!r})")
        time.sleep(0.001)


def packable_depth(margin: int = 40) -> int:
    """How many containers deep msgpack's packer nests from about here, less ``margin`` frames.

    1025 with msgpack 1.2 on CPython 3.11 and later; with older msgpack on 3.9
    and 3.10 the packer stops at Python's recursion limit, which counts the
    caller's frames too (so call it where the message will be packed).
    """
    import msgpack

    def fits(depth: int) -> bool:
        x: Any = []
        for _ in range(depth):
            x = [x]
        try:
            msgpack.packb(x)
        except (ValueError, RecursionError):
            return False
        return True

    lo, hi = 0, 1025  # fits(lo); the answer is at most hi
    if fits(hi):
        return hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return max(lo - margin, 1)
