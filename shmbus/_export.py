"""``shmbus export``: the buses' Prometheus metrics over HTTP, or in a node_exporter textfile.

Rule: this module owns the command's arguments and its loop (serve, or write
every N seconds, or once); the metrics themselves are ``shmbus.metrics``'s,
imported only when the command runs, so the command line works without the
``metrics`` extra.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Any

__all__ = ["register"]

log = logging.getLogger("shmbus")

DEFAULT_LISTEN = "127.0.0.1:9464"  # (shmbus.metrics.DEFAULT_ADDR and DEFAULT_PORT; a test checks they agree)


def register(sub: Any) -> None:
    """Add the ``export`` subcommand to the ``shmbus`` parser's subparsers ``sub``."""
    e = sub.add_parser(
        "export", help="serve the buses' metrics to Prometheus over HTTP, or write a node_exporter textfile",
        epilog="examples:\n"
        "  shmbus export                              # every bus in /dev/shm, on http://127.0.0.1:9464/metrics\n"
        "  shmbus export jobs /var/lib/app --listen 0.0.0.0:9464\n"
        "  shmbus export --textfile /var/lib/node_exporter/textfile/shmbus.prom --interval 15\n"
        "  shmbus export --once                       # print the metrics once and exit\n"
        "Needs prometheus-client: pip install 'shmbus[metrics]'. Reading a bus never changes it.\n"
        "A file that cannot be read is skipped, counted in shmbus_export_errors_total{reason}\n"
        "and logged once. See docs/metrics.md.",
    )  # fmt: skip
    e.add_argument(
        "buses", nargs="*", metavar="PATH",
        help="bus names or paths, and directories whose buses to export (default: every bus in /dev/shm)",
    )  # fmt: skip
    e.add_argument(
        "--listen", type=_address, default=DEFAULT_LISTEN, metavar="HOST:PORT",
        help="where to serve http://HOST:PORT/metrics (port 0: any free port)",
    )  # fmt: skip
    e.add_argument(
        "--textfile", metavar="FILE",
        help="write the metrics to FILE instead of serving them (a .prom file in node_exporter's "
        "--collector.textfile.directory), replaced atomically",
    )  # fmt: skip
    e.add_argument(
        "--interval", type=_interval, default=15.0, metavar="S",
        help="seconds between two writes of --textfile",
    )  # fmt: skip
    e.add_argument(
        "--once", action="store_true",
        help="write --textfile once and exit; without --textfile, print the metrics to stdout and exit",
    )  # fmt: skip
    e.set_defaults(func=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> int:
    try:
        from . import metrics
    except ImportError as err:  # its sentence names the extra to install
        print(f"shmbus export: {err}", file=sys.stderr)
        return 1
    buses = args.buses or None
    if args.textfile is None and not args.once:
        return _serve(metrics, args.listen, buses)
    registry = metrics.new_registry(buses)
    if args.textfile is None:
        sys.stdout.write(metrics.text(registry))
        return 0
    metrics.write_textfile(args.textfile, registry)  # a first failure ends the command (exit 1)
    while not args.once:
        time.sleep(args.interval)
        try:
            metrics.write_textfile(args.textfile, registry)
        except OSError as err:  # a later one (a full disk) is reported and retried
            log.warning("shmbus export: %s", err)
    return 0


def _serve(metrics: Any, listen: tuple[str, int], buses: list[str] | None) -> int:
    host, port = listen
    try:
        server, _ = metrics.start_http_server(port, host, buses=buses)
    except OSError as err:
        raise OSError(err.errno, f"cannot listen on {_url(host, port)}: {err.strerror}") from None
    what = ", ".join(buses) if buses else "every bus in /dev/shm"
    print(f"serving the metrics of {what} on {_url(host, server.server_port)}/metrics", flush=True)
    while True:  # until Ctrl-C (exit 130) or SIGTERM; the server runs in a daemon thread
        time.sleep(3600)


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _address(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[IPv6]:PORT``, or ``PORT`` alone (on 127.0.0.1)."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host = "127.0.0.1"
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not port.isdigit() or int(port) > 65535 or not host:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT such as 127.0.0.1:9464, not {text!r}")
    return host, int(port)


def _interval(text: str) -> float:
    try:
        s = float(text)
    except ValueError:
        s = 0.0
    if not s > 0 or s == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of seconds above 0, not {text!r}")
    return s
