"""Shared test helpers: bus paths that clean up after themselves, process helpers, leak checks."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest

import shmbus
from shmbus import _sync

SHM = Path("/dev/shm")
# The session's pid in every name: concurrent test sessions never judge each other's buses.
TEST_PREFIX = f"shmbus-test-{os.getpid()}-"

# Every bus this session creates (in this process or a forked child) records its
# id here, so the leak check looks only at our own semaphores.
_IDS_FILE = Path(tempfile.gettempdir()) / f"shmbus-test-ids-{os.getpid()}"
_real_create_sems = _sync.create_sems


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


def leftovers() -> list[str]:
    """Bus files and semaphores this session made that are still in /dev/shm."""
    return _ours(_ids())


def pytest_sessionstart(session: pytest.Session) -> None:
    _IDS_FILE.touch()
    _IDS_FILE.chmod(0o666)  # children that drop privileges record their buses too


def pytest_sessionfinish(session: pytest.Session) -> None:
    with contextlib.suppress(FileNotFoundError):
        _IDS_FILE.unlink()


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
