"""``shmbus.bridge``: carry Queues and Topics across hosts through NATS JetStream.

Rule: a ``Bridge`` owns one NATS connection and the routes that share it; it
turns what the server says at start (unreachable, a TLS handshake failed,
credentials refused, a subject not allowed, a stream missing) into one
``BridgeError`` each, and stops its routes so that every round in flight
settles (see ``_bridge_routes``). While it runs it keeps a status file for
``shmbus info`` (``_bridge_status``), removed when it stops. It needs the
``nats`` extra (``pip install 'shmbus[nats]'``), imported only when a
bridge starts.

Example::

    import asyncio
    from shmbus.bridge import Bridge, Connection, Route

    async def main():
        routes = [Route("queue-to-stream", "jobs", "jobs.out", stream="JOBS")]
        async with Bridge(routes, Connection(servers=("nats://10.0.0.5:4222",))) as bridge:
            await bridge.wait()          # until stop() or a fatal error

    asyncio.run(main())

The guarantees of each route, the wire format and a production checklist are
in docs/bridge.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import ssl
from typing import Any

from ._bridge_config import DIRECTIONS, Connection, Route, load_config, read_secret
from ._bridge_errors import (
    EXIT_AUTH,
    EXIT_BUS,
    EXIT_CONFIG,
    EXIT_NO_STREAM,
    EXIT_OK,
    EXIT_PERMISSION,
    EXIT_TLS,
    EXIT_UNREACHABLE,
    AuthFailed,
    BridgeConfigError,
    BridgeError,
    PermissionDenied,
    ServerUnreachable,
    StreamNotFound,
    TLSFailed,
)
from ._bridge_routes import RouteRunner
from ._bridge_status import StatusFile, bus_key

__all__ = [
    "Bridge", "Route", "Connection", "run", "load_config", "read_secret", "DIRECTIONS",
    "BridgeError", "BridgeConfigError", "ServerUnreachable", "AuthFailed", "PermissionDenied",
    "StreamNotFound", "EXIT_OK", "EXIT_BUS", "EXIT_CONFIG", "EXIT_UNREACHABLE", "EXIT_AUTH",
    "EXIT_PERMISSION", "EXIT_NO_STREAM", "TLSFailed", "EXIT_TLS",
]  # fmt: skip

log = logging.getLogger("shmbus")
_PERMISSION = re.compile(r"permissions violation for (publish|subscription) to \"?([^\"\s]+)", re.IGNORECASE)
_STOP_GRACE = 1.0  # seconds beyond the ack timeout that stop() waits for a route's last round
_STATUS_EVERY = 1.0  # seconds between two refreshes of the status file `shmbus info` reads


class Bridge:
    """Routes between local buses and JetStream over one connection: ``start``, ``wait``, ``stop``.

    Parameters:
        routes: what to carry (``Route``); the buses must exist.
        connection: how to reach the servers (``Connection``; default: a
            local server on port 4222).

    ``start()`` raises ``ServerUnreachable``, ``TLSFailed``, ``AuthFailed``,
    ``PermissionDenied``, ``StreamNotFound`` or ``BusNotFound``; ``wait()``
    raises the error that stopped the bridge, if any. Use as ``async with``,
    and make it inside the event loop that runs it (Python 3.9 ties asyncio
    events to the loop current when they are made).
    """

    def __init__(self, routes: list[Route], connection: Connection | None = None) -> None:
        if not routes:
            raise BridgeConfigError("a bridge needs at least one route")
        self.routes = list(routes)
        self.connection = connection or Connection()
        self._nc: Any = None
        self._runners: list[RouteRunner] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()
        self._failed: BaseException | None = None
        self._done = asyncio.Event()
        self._connect_errors: list[BaseException] = []
        self._refused = asyncio.Event()
        self._status_file: StatusFile | None = None
        self._status_task: asyncio.Task[None] | None = None
        self._buses: list[tuple[str, str | None]] = []

    async def __aenter__(self) -> Bridge:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- start ---------------------------------------------------------------------

    async def start(self) -> None:
        """Connect, find (or create) each route's stream, and start every route."""
        try:
            import nats  # noqa: F401  (the optional extra: fail here, with the fix, if it is missing)
        except ImportError:
            raise BridgeError("the bridge needs nats-py: pip install 'shmbus[nats]'") from None
        self._nc = await self._connect()
        try:
            js = self._nc.jetstream()
            for route in self.routes:
                stream = await self._stream_of(js, route)
                c = self.connection
                runner = RouteRunner(
                    route, self._nc, js, stream, c.ack_timeout, c.reconnect_wait, self._stopping
                )
                self._runners.append(runner)
            for runner in self._runners:
                task = asyncio.create_task(runner.run(), name=f"shmbus bridge {runner.route.name}")
                task.add_done_callback(self._route_ended)
                self._tasks.append(task)
            self._start_status_file()
        except BaseException:
            await self._close_connection()
            raise

    def _options(self) -> dict[str, Any]:
        c = self.connection
        opts: dict[str, Any] = {
            "servers": list(c.servers), "name": "shmbus bridge", "error_cb": self._on_error,
            "disconnected_cb": self._on_disconnect, "reconnected_cb": self._on_reconnect,
            "allow_reconnect": True, "max_reconnect_attempts": -1,
            "reconnect_time_wait": c.reconnect_wait, "connect_timeout": min(c.connect_timeout, 2.0),
        }  # fmt: skip
        if c.creds:
            opts["user_credentials"] = c.creds
        if c.nkey_seed:
            opts["nkeys_seed"] = c.nkey_seed
        if c.user is not None:
            opts["user"], opts["password"] = c.user, c.password
        if c.tls_ca or c.tls_cert or any(u.startswith(("tls://", "wss://")) for u in c.servers):
            ctx = ssl.create_default_context(cafile=c.tls_ca)
            if c.tls_cert:
                ctx.load_cert_chain(c.tls_cert, c.tls_key)
            opts["tls"] = ctx
        return opts

    async def _connect(self) -> Any:
        import nats

        servers = ", ".join(self.connection.servers)
        # The client retries refused credentials like an absent server: a refusal reported
        # to the error callback (_refused) ends the wait at once.
        connecting = asyncio.ensure_future(nats.connect(**self._options()))
        refused = asyncio.ensure_future(self._refused.wait())
        try:
            await asyncio.wait({connecting, refused}, timeout=self.connection.connect_timeout,
                               return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
        finally:
            refused.cancel()
        if connecting.done():
            try:
                return connecting.result()
            except Exception as e:
                self._raise_auth_if_refused(e)
                raise ServerUnreachable(f"cannot connect to {servers}: {e}") from None
        connecting.cancel()
        with contextlib.suppress(BaseException):
            await connecting
        self._raise_auth_if_refused()
        raise ServerUnreachable(
            f"no NATS server answered at {servers} within {self.connection.connect_timeout:g} s"
        )

    def _raise_auth_if_refused(self, e: BaseException | None = None) -> None:
        for err in [e, *self._connect_errors]:
            if err is not None and _refusal(err):
                raise AuthFailed(f"the server refused the credentials ({err})") from None
            if isinstance(err, ssl.SSLError):
                raise _tls_failed(err, self.connection.servers) from None

    async def _stream_of(self, js: Any, route: Route) -> str:
        """The name of the stream for ``route`` (created if missing and asked to)."""
        import nats.errors
        import nats.js.errors

        try:
            if route.stream:
                await js.stream_info(route.stream)
                return route.stream
            return str(await js.find_stream_name_by_subject(route.subject))
        except nats.js.errors.NotFoundError:
            if not self.connection.create_stream:
                which = f"stream {route.stream}" if route.stream else f"a stream for subject {route.subject}"
                raise StreamNotFound(f"{which} does not exist: create it, or use --create-stream") from None
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError, asyncio.TimeoutError) as e:
            await asyncio.sleep(0)  # the error callback may be just behind the timeout
            self._raise_if_denied()
            raise StreamNotFound(
                f"JetStream did not answer for subject {route.subject} ({type(e).__name__}): "
                "is JetStream enabled on the server (nats-server -js)?"
            ) from None
        return await self._create_stream(js, route)

    async def _create_stream(self, js: Any, route: Route) -> str:
        name = route.stream or re.sub(r"[^A-Za-z0-9_-]", "_", route.subject).upper()
        await js.add_stream(name=name, subjects=[route.subject], duplicate_window=120.0)
        log.warning("created stream %s for subject %s", name, route.subject)
        return name

    def _start_status_file(self) -> None:
        """Tell `shmbus info` and `stats` about the routes, now and every second (see ``_bridge_status``)."""
        self._buses = [bus_key(r.bus) for r in self.routes]
        self._status_file = StatusFile()
        self.status()
        self._status_task = asyncio.create_task(self._keep_status(), name="shmbus bridge status file")

    async def _keep_status(self) -> None:
        while self._status_file is not None:
            await asyncio.sleep(_STATUS_EVERY)
            self.status()

    def _write_status_file(self, rows: list[dict[str, Any]]) -> None:
        if self._status_file is None:
            return
        self._status_file.write([
            {**row, "direction": r.direction, "subject": r.subject, "bus_path": path, "bus_id": bus_id}
            for r, (path, bus_id), row in zip(self.routes, self._buses, rows)
        ])  # fmt: skip

    def _end_status_file(self) -> None:
        f, self._status_file = self._status_file, None
        if self._status_task is not None:
            self._status_task.cancel()
        if f is not None:
            f.remove()

    # -- callbacks from the client ---------------------------------------------------

    async def _on_error(self, e: Exception) -> None:
        if self._nc is None:
            self._connect_errors.append(e)
            if _refusal(e) or isinstance(e, ssl.SSLError):  # (retrying will not change the answer)
                self._refused.set()
            return
        text = str(e)
        m = _PERMISSION.search(text)
        if m:
            verb = "publish" if m.group(1).lower() == "publish" else "subscribe"
            self._fail(PermissionDenied(f"the account may not {verb} to {m.group(2)}"))
        elif "authorization violation" in text.lower():
            self._fail(AuthFailed(f"the server refused the credentials ({text})"))
        else:
            log.warning("nats: %s", text)

    async def _on_disconnect(self) -> None:
        if not self._stopping.is_set():
            log.warning("disconnected from the NATS server; reconnecting (local buses keep their messages)")

    async def _on_reconnect(self) -> None:
        log.warning("reconnected to %s", getattr(self._nc, "connected_url", None) or "the NATS server")

    def _raise_if_denied(self) -> None:
        if isinstance(self._failed, BridgeError):
            raise self._failed

    def _fail(self, e: BaseException) -> None:
        """A fatal error: remember the first, stop every route now.

        Rounds in flight cannot succeed (their acks will not come): they are
        cancelled, which ends each with nothing released (see ``_bridge_routes``).
        """
        if self._failed is None:
            self._failed = e
        self._stopping.set()
        for task in self._tasks:
            task.cancel()

    def _route_ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None and self._failed is None:
            self._fail(task.exception())  # type: ignore[arg-type]
        if all(t.done() for t in self._tasks):
            self._done.set()

    # -- running -----------------------------------------------------------------------

    def request_stop(self) -> None:
        """Ask every route to finish its round and stop (safe from a signal handler on the loop)."""
        self._stopping.set()

    async def wait(self) -> None:
        """Wait until the bridge stops (``stop()``, ``request_stop()``, or a fatal error, raised here)."""
        await self._stopping.wait()
        await self.stop()
        if self._failed is not None:
            raise self._failed

    async def stop(self) -> None:
        """Stop: each route settles its round in flight (acked, or left in the bus), then disconnect."""
        self._stopping.set()
        if self._tasks:
            grace = self.connection.ack_timeout + _STOP_GRACE
            _done, pending = await asyncio.wait(self._tasks, timeout=grace)
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.wait(pending, timeout=grace)
        await self._close_connection()

    async def _close_connection(self) -> None:
        self._end_status_file()
        self._stopping.set()  # (what the client reports while closing is not news)
        nc, self._nc = self._nc, None
        if nc:
            try:
                await asyncio.wait_for(nc.close(), 5.0)
            except Exception as e:  # closing a connection that already broke
                log.debug("closing the NATS connection: %r", e)
            self._nc = False  # closed: callbacks after this are not about connecting

    def status(self) -> list[dict[str, Any]]:
        """One dict per route: its name, stream, state, counters and lag (see docs/bridge.md).

        ``state`` is ``reconnecting`` while the connection is down. Each call
        also refreshes the status file that ``shmbus info`` reads.
        """
        rows = [r.status() for r in self._runners]
        nc = self._nc
        if nc and not nc.is_connected and not self._stopping.is_set():
            for row in rows:
                row["state"] = "reconnecting"
        self._write_status_file(rows)
        return rows


def _tls_failed(e: ssl.SSLError, servers: tuple[str, ...]) -> TLSFailed:
    """The one line for a failed TLS handshake: what was wrong and which option to look at."""
    where = ", ".join(servers)
    if isinstance(e, ssl.SSLCertVerificationError):
        return TLSFailed(f"the certificate of {where} is not trusted ({e.verify_message}): check --tls-ca")
    return TLSFailed(f"TLS with {where} failed ({e.reason or e}): check --tls-cert and --tls-key")


def _refusal(e: BaseException) -> bool:
    """True if the client's error says the server refused the credentials."""
    text = str(e).lower()
    return "authorization violation" in text or "authentication" in text


async def run(routes: list[Route], connection: Connection | None = None,
              stop: asyncio.Event | None = None) -> None:  # fmt: skip
    """Run a bridge until ``stop`` is set (or for ever); raise the error that stopped it, if any."""
    bridge = Bridge(routes, connection)
    await bridge.start()
    watcher = asyncio.create_task(_stop_on(stop, bridge)) if stop is not None else None
    try:
        await bridge.wait()
    finally:
        if watcher is not None:
            watcher.cancel()
        await bridge.stop()


async def _stop_on(stop: asyncio.Event, bridge: Bridge) -> None:
    await stop.wait()
    bridge.request_stop()
