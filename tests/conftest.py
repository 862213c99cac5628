"""Shared test helpers: bus paths that clean up after themselves, process helpers, leak checks."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest

import shmbus

SHM = Path("/dev/shm")
TEST_PREFIX = "shmbus-test-"


def _ours() -> set[str]:
    """Entries of /dev/shm that this project makes: bus files named by the tests and semaphores."""
    return {n for n in os.listdir(SHM) if n.startswith(("sem.shmbus.", TEST_PREFIX, ".shmbus-test-"))}


# What was there before the suite started (another program's buses are not our leak).
SESSION_START = frozenset()


def pytest_sessionstart(session: pytest.Session) -> None:
    global SESSION_START
    SESSION_START = frozenset(_ours())


def leftovers() -> list[str]:
    """Entries of ours in /dev/shm that were not there when the suite started."""
    return sorted(_ours() - SESSION_START)


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """Fail any test that leaves a bus file or semaphore of ours in /dev/shm.

    Only entries that appeared during the test count. Nothing is deleted here:
    another program's live bus may appear meanwhile, and removing it would
    break that program (run one test session at a time for a clean verdict).
    """
    before = _ours()
    yield
    leaked = _ours() - before
    assert not leaked, f"test leaked entries in /dev/shm: {sorted(leaked)}"


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
