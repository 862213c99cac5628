"""``shmbus bridge``: the command line of ``shmbus.bridge``.

Rule: this module turns flags (or ``--config``) into routes and a connection,
runs the bridge until SIGTERM or SIGINT, prints status lines, and maps each
``BridgeError`` to its one-line message and exit code; no secret is ever
taken from argv or printed. ``nats`` is imported only once a bridge runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from typing import Any

from ._bridge_config import DIRECTIONS, Connection, Route, load_config, read_secret
from ._bridge_errors import EXIT_BUS, EXIT_CONFIG, EXIT_OK, BridgeConfigError, BridgeError
from ._errors import ShmbusError

__all__ = ["register", "status_line"]

log = logging.getLogger("shmbus")

_EPILOG = """\
examples:
  shmbus bridge queue-to-stream jobs --subject jobs.out --server nats://10.0.0.5:4222
  shmbus bridge stream-to-queue jobs --subject jobs.out --durable workers --stream JOBS
  shmbus bridge --config /etc/shmbus/bridge.toml --status-interval 60
exit codes: 0 stopped by SIGTERM/SIGINT, 1 a local bus failed, 2 bad flags or config,
3 no server reachable, 4 credentials refused, 5 subject not permitted, 6 stream missing,
7 TLS handshake failed.
SIGUSR1 prints one status line per route."""


def register(sub: Any) -> None:
    """Add the ``bridge`` subcommand to the ``shmbus`` parser's subparsers ``sub``."""
    p = sub.add_parser(
        "bridge", help="carry Queues and Topics to and from NATS JetStream (needs shmbus[nats])",
        epilog=_EPILOG,
    )  # fmt: skip
    p.add_argument("direction", nargs="?", choices=DIRECTIONS, help="one route from flags (or use --config)")
    p.add_argument("bus", nargs="?", help="the local bus: a path or a bare name")
    p.add_argument("--config", help="a TOML file of [connection] and [[route]] tables")
    r = p.add_argument_group("route")
    r.add_argument("--subject", help="the NATS subject (no wildcards)")
    r.add_argument("--stream", help="the stream's name (default: the stream holding the subject)")
    r.add_argument("--durable", help="the pull consumer's durable name (in routes)")
    r.add_argument("--batch", action="store_true", help="batch framing: many records per NATS message")
    r.add_argument("--max-batch", type=int, default=1000, help="records per round (at most 4000)")
    r.add_argument("--ack-wait", type=float, default=30.0, help=(
                   "in routes: seconds before JetStream delivers an unacknowledged message again"))
    c = p.add_argument_group("connection")
    c.add_argument("--server", action="append", help="a server URL; repeat for several")
    c.add_argument("--creds", help="a credentials file (JWT and NKey seed)")
    c.add_argument("--nkey", help="a file holding an NKey seed")
    c.add_argument("--user", help="a user name (its password from --password-file or --password-env)")
    c.add_argument("--password-file", help="a file whose first line is the password")
    c.add_argument("--password-env", help="an environment variable holding the password")
    c.add_argument("--tls-ca", help="a CA file to trust")
    c.add_argument("--tls-cert", help="a client certificate file (with --tls-key)")
    c.add_argument("--tls-key", help="the client certificate's key file")
    c.add_argument("--connect-timeout", type=float, help="seconds to wait for a server at start (default: 5)")
    c.add_argument("--ack-timeout", type=float, help="seconds a publish round waits for acks (default: 5)")
    c.add_argument("--create-stream", action="store_true", help="create a missing stream")
    o = p.add_argument_group("output")
    o.add_argument("--status-interval", type=float, help="print status lines every this many seconds")
    o.add_argument("--json", action="store_true", help="status lines as JSON objects")
    p.set_defaults(func=_cmd_bridge)


def _routes_and_connection(args: argparse.Namespace) -> tuple[list[Route], Connection]:
    conn: dict[str, Any] = {}
    if args.config:
        if args.direction or args.bus:
            raise BridgeConfigError("give routes either as flags or in --config, not both")
        routes, conn = load_config(args.config)
    else:
        if not (args.direction and args.bus and args.subject):
            raise BridgeConfigError("give a direction, a bus and --subject (or --config FILE)")
        routes = [Route(args.direction, args.bus, args.subject, args.stream, args.durable, args.batch,
                        args.max_batch, args.ack_wait)]  # fmt: skip
    flags = {
        "servers": tuple(args.server) if args.server else None, "creds": args.creds, "nkey_seed": args.nkey,
        "user": args.user, "tls_ca": args.tls_ca, "tls_cert": args.tls_cert, "tls_key": args.tls_key,
        "connect_timeout": args.connect_timeout, "ack_timeout": args.ack_timeout,
        "create_stream": args.create_stream or None,
    }  # fmt: skip
    conn.update({k: v for k, v in flags.items() if v is not None})
    password = read_secret(args.password_file, args.password_env)
    if password is not None:
        conn["password"] = password
    try:
        return routes, Connection(**conn)
    except TypeError as e:
        raise BridgeConfigError(str(e)) from None


def status_line(row: dict[str, Any], as_json: bool) -> str:
    """One route's status as one line: ``key=value`` pairs, or a JSON object."""
    if as_json:
        return json.dumps(row, sort_keys=True)
    rest = " ".join(f"{k}={v}" for k, v in row.items() if k != "route")
    return f"{row['route']}: {rest}"


def _cmd_bridge(args: argparse.Namespace) -> int:
    _log_to_stderr()
    try:
        routes, conn = _routes_and_connection(args)
        return asyncio.run(_serve(routes, conn, args.status_interval, args.json))
    except BridgeError as e:
        print(f"shmbus bridge: {e}", file=sys.stderr)
        return e.exit_code
    except (ShmbusError, OSError) as e:  # a bus not found, say
        print(f"shmbus bridge: {e}", file=sys.stderr)
        return EXIT_BUS
    except ValueError as e:
        print(f"shmbus bridge: {e}", file=sys.stderr)
        return EXIT_CONFIG


def _log_to_stderr() -> None:
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("shmbus bridge: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.WARNING)


async def _serve(routes: list[Route], conn: Connection, interval: float | None, as_json: bool) -> int:
    from .bridge import Bridge

    bridge = Bridge(routes, conn)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, bridge.request_stop)
    loop.add_signal_handler(signal.SIGUSR1, _print_status, bridge, as_json)
    await bridge.start()
    ticker = asyncio.create_task(_tick(bridge, interval, as_json)) if interval else None
    try:
        await bridge.wait()
    finally:
        if ticker is not None:
            ticker.cancel()
        await bridge.stop()
        _print_status(bridge, as_json)
    return EXIT_OK


def _print_status(bridge: Any, as_json: bool) -> None:
    for row in bridge.status():
        print(status_line(row, as_json), flush=True)


async def _tick(bridge: Any, interval: float, as_json: bool) -> None:
    while True:
        await asyncio.sleep(interval)
        _print_status(bridge, as_json)
