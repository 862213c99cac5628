"""What a bridge is told: its routes and how to reach the NATS servers.

Rule: everything a bridge is configured with is read and checked here, before
any connection is made, and a mistake is one ``BridgeConfigError`` line.
Secrets (a password, an NKey seed, a credentials file's content) are read
from files or environment variables, never from the command line, and are
never part of a ``repr`` or a message.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Final

from ._bridge_errors import BridgeConfigError

__all__ = ["DIRECTIONS", "MAX_BATCH", "Route", "Connection", "load_config", "read_secret"]

# The four routes: which side is local and which way messages go.
DIRECTIONS: Final = ("queue-to-stream", "stream-to-queue", "topic-to-stream", "stream-to-topic")
_SUBJECT = re.compile(r"[^\s.*>]+(\.[^\s.*>]+)*\Z")  # a concrete subject: no wildcards
_NAME = re.compile(r"[A-Za-z0-9_-]+\Z")  # a stream or consumer name
# Records per round at most: a round's publishes fit in the client's window of unacknowledged
# publishes (nats-py's publish_async_max_pending, 4000), so sending never waits for it.
MAX_BATCH: Final = 4000


@dataclass(frozen=True)
class Route:
    """One direction between a local bus and a subject of a JetStream stream.

    Parameters:
        direction: one of ``DIRECTIONS`` ("queue-to-stream"...).
        bus: the local bus's path or bare name (it must exist).
        subject: the NATS subject published to or consumed from (no wildcards).
        stream: the stream's name (None: the stream that holds ``subject``).
        durable: the pull consumer's durable name (stream-to-queue: default
            derived from the subject; several bridges on one durable share
            the work); stream-to-topic: None makes a consumer of this run only.
        batch: batch framing, many records per NATS message (out routes;
            in routes read both forms).
        max_batch: the most records taken, published or fetched in one round.
        ack_wait: in routes: seconds JetStream waits for the bridge's ack
            before delivering a message again; what a killed bridge held
            comes back after it. An existing durable consumer is updated
            to it.
    """

    direction: str
    bus: str
    subject: str
    stream: str | None = None
    durable: str | None = None
    batch: bool = False
    max_batch: int = 1000
    ack_wait: float = 30.0

    def __post_init__(self) -> None:
        if self.direction not in DIRECTIONS:
            choices = ", ".join(DIRECTIONS)
            raise BridgeConfigError(f"route direction must be one of {choices}, not {self.direction!r}")
        if not self.bus:
            raise BridgeConfigError("a route needs a bus")
        if not _SUBJECT.match(self.subject or ""):
            raise BridgeConfigError(f"subject {self.subject!r} is not a NATS subject without wildcards")
        for what in ("stream", "durable"):
            value = getattr(self, what)
            if value is not None and not _NAME.match(value):
                raise BridgeConfigError(f"{what} name {value!r} may hold only letters, digits, '-' and '_'")
        if not 1 <= self.max_batch <= MAX_BATCH:
            raise BridgeConfigError(f"max_batch must be from 1 to {MAX_BATCH}, not {self.max_batch}")
        if not self.ack_wait > 0:
            raise BridgeConfigError(f"ack_wait must be above 0 seconds, not {self.ack_wait}")

    @property
    def outbound(self) -> bool:
        """True when messages go from the local bus to the stream."""
        return self.direction.endswith("-to-stream")

    @property
    def queue(self) -> bool:
        """True when the local bus is a Queue (else a Topic)."""
        return "queue" in self.direction

    @property
    def name(self) -> str:
        """How status lines and logs name the route."""
        arrow = f"{self.bus} -> {self.subject}" if self.outbound else f"{self.subject} -> {self.bus}"
        return f"{self.direction} {arrow}"

    def durable_name(self) -> str | None:
        """The durable consumer this in-route reads (None: a consumer of this run only)."""
        if self.durable is not None or self.direction != "stream-to-queue":
            return self.durable
        return "shmbus-" + re.sub(r"[^A-Za-z0-9_-]", "_", self.subject)


@dataclass(frozen=True)
class Connection:
    """How to reach and log in to the NATS servers (secrets are never shown by ``repr``).

    Parameters:
        servers: server URLs; the client moves between them on failures.
        creds: a credentials file (JWT and NKey seed), read by the client.
        nkey_seed: a file holding an NKey seed.
        user: a user name; its ``password`` comes from ``read_secret``.
        tls_ca, tls_cert, tls_key: files for TLS (a CA to trust; a client
            certificate and its key).
        connect_timeout: seconds to wait at start for a server before giving up.
        reconnect_wait: the longest pause between reconnect attempts (the
            first ones come sooner).
        ack_timeout: seconds a publish round waits for JetStream's acks.
        create_stream: create a missing stream (else a missing one is an error).
    """

    servers: tuple[str, ...] = ("nats://127.0.0.1:4222",)
    creds: str | None = None
    nkey_seed: str | None = None
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    connect_timeout: float = 5.0
    reconnect_wait: float = 2.0
    ack_timeout: float = 5.0
    create_stream: bool = False

    def __post_init__(self) -> None:
        if not self.servers:
            raise BridgeConfigError("give at least one server URL")
        for url in self.servers:
            if not re.match(r"(nats|tls|ws|wss)://\S+\Z", url):
                raise BridgeConfigError(f"server {url!r} is not a nats://, tls://, ws:// or wss:// URL")
        for what in ("creds", "nkey_seed", "tls_ca", "tls_cert", "tls_key"):
            path = getattr(self, what)
            if path is not None and not os.path.isfile(path):
                raise BridgeConfigError(f"{what.replace('_', '-')} file {path!r} does not exist")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise BridgeConfigError("a TLS client certificate needs its key, and the key its certificate")
        if (self.user is None) != (self.password is None):
            raise BridgeConfigError("a user needs a password (from a file or an environment variable)")
        if sum(x is not None for x in (self.creds, self.nkey_seed, self.user)) > 1:
            raise BridgeConfigError("give one way to log in: a credentials file, an NKey seed, or a user")
        for what in ("connect_timeout", "reconnect_wait", "ack_timeout"):
            if not getattr(self, what) > 0:
                raise BridgeConfigError(f"{what.replace('_', '-')} must be above 0 seconds")


def read_secret(file: str | None, env: str | None) -> str | None:
    """A password from a file (its first line) or an environment variable; None if neither is given."""
    if file is not None and env is not None:
        raise BridgeConfigError("give the password in a file or in an environment variable, not both")
    if file is not None:
        try:
            with open(file, encoding="utf-8") as f:
                return f.readline().rstrip("\r\n")
        except OSError as e:
            raise BridgeConfigError(f"cannot read the password file {file!r}: {e.strerror}") from None
    if env is not None:
        value = os.environ.get(env)
        if value is None:
            raise BridgeConfigError(f"environment variable {env} (the password) is not set")
        return value
    return None


_CONNECTION_KEYS: Final = {
    "servers", "creds", "nkey_seed", "user", "password_file", "password_env", "tls_ca", "tls_cert",
    "tls_key", "connect_timeout", "reconnect_wait", "ack_timeout", "create_stream",
}  # fmt: skip
_ROUTE_KEYS: Final = {"direction", "bus", "subject", "stream", "durable", "batch", "max_batch", "ack_wait"}


def load_config(path: str) -> tuple[list[Route], dict[str, Any]]:
    """Read a bridge's TOML file: its routes, and its ``[connection]`` table as ``Connection`` keywords.

    ``password_file`` / ``password_env`` become ``password`` (read now);
    every other key is checked by name. Raises ``BridgeConfigError``.
    """
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - the nats extra installs tomli there
        import tomli as tomllib
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise BridgeConfigError(f"cannot read {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise BridgeConfigError(f"{path} is not valid TOML: {e}") from None
    unknown = set(data) - {"connection", "route"}
    if unknown:
        first = sorted(unknown)[0]
        raise BridgeConfigError(f"{path}: unknown table {first!r} (expected [connection], [[route]])")
    conn = dict(data.get("connection", {}))
    bad = set(conn) - _CONNECTION_KEYS
    if bad:
        raise BridgeConfigError(f"{path}: unknown [connection] key {sorted(bad)[0]!r}")
    conn["password"] = read_secret(conn.pop("password_file", None), conn.pop("password_env", None))
    if "servers" in conn:
        servers = conn["servers"]
        conn["servers"] = (servers,) if isinstance(servers, str) else tuple(servers)
    routes = []
    for i, table in enumerate(data.get("route", [])):
        bad = set(table) - _ROUTE_KEYS
        if bad:
            raise BridgeConfigError(f"{path}: route {i + 1}: unknown key {sorted(bad)[0]!r}")
        try:
            routes.append(Route(**table))
        except TypeError as e:
            raise BridgeConfigError(f"{path}: route {i + 1}: {e}") from None
        except BridgeConfigError as e:
            raise BridgeConfigError(f"{path}: route {i + 1}: {e}") from None
    if not routes:
        raise BridgeConfigError(f"{path} has no [[route]]")
    return routes, conn
