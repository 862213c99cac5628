"""The ``shmbus`` command line (also ``python -m shmbus``).

Rule: the CLI is a thin shell over the public API; it owns argument parsing,
output formatting and exit codes (0 success, 1 a failure of the bus, 2 bad
usage) and nothing else. Expected errors print one line to stderr naming the
path, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from ._bus import Stats, read_layout_of
from ._errors import ShmbusError
from ._format import KIND_NAMES, KIND_QUEUE, parse_size
from ._queue import Queue

__all__ = ["main"]


def _cmd_create(args: argparse.Namespace) -> int:
    mode = int(args.mode, 8)
    q = Queue.create(args.path, capacity=args.capacity, maxsize=args.maxsize, mode=mode)
    print(f"created {KIND_NAMES[KIND_QUEUE]} {q.path} ({q.capacity} bytes)")
    q.close()
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    layout = read_layout_of(args.path)
    with Queue.open(args.path) if layout.kind == KIND_QUEUE else _unsupported(layout.kind) as bus:
        st = bus.stats()
    if args.json:
        print(json.dumps({**asdict(st), "fill": st.fill}))
    else:
        print(_format_stats(st))
    return 0


def _unsupported(kind: int) -> Any:
    raise ShmbusError(f"this shmbus cannot open a bus of kind {KIND_NAMES.get(kind, kind)}")


def _format_stats(st: Stats) -> str:
    created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(st.created_ns / 1e9))
    rows = [
        ("path", st.path),
        ("kind", f"{st.kind} (format version {st.format_version})"),
        ("bus id", st.bus_id),
        ("created", created),
        ("capacity", f"{st.capacity} bytes"),
        ("maxsize", str(st.maxsize) if st.maxsize else "unbounded (capacity only)"),
        ("fill", f"{st.used_bytes} bytes ({st.fill:.1%})"),
        ("messages", str(st.messages)),
        ("put / got", f"{st.put_count} / {st.get_count}"),
        ("bytes in / out", f"{st.bytes_in} / {st.bytes_out}"),
    ]
    return "\n".join(f"{k:15} {v}" for k, v in rows)


def _cmd_rm(args: argparse.Namespace) -> int:
    from ._bus import unlink

    for p in args.path:
        unlink(p)
        print(f"removed {p}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from . import _bench

    return _bench.main(args.rest)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="shmbus",
        description="Inspect and manage shmbus buses (memory-mapped message queues).",
        epilog="A PATH with no '/' is a name in /dev/shm. Example: shmbus info jobs",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser("create", help="create a Queue", epilog="example: shmbus create jobs --capacity 64MiB")
    c.add_argument("path")
    c.add_argument("--capacity", default="64MiB", type=_size, help="ring size, e.g. 64MiB (default)")
    c.add_argument("--maxsize", default=0, type=int, help="most messages held at once (0: no bound)")
    c.add_argument("--mode", default="600", help="octal permission bits (default 600; 660 for a group)")
    c.set_defaults(func=_cmd_create)

    i = sub.add_parser(
        "info", help="show a bus's header and counters", epilog="example: shmbus info jobs --json"
    )
    i.add_argument("path")
    i.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    i.set_defaults(func=_cmd_info)

    r = sub.add_parser("rm", help="remove a bus and its semaphores", epilog="example: shmbus rm jobs")
    r.add_argument("path", nargs="+")
    r.set_defaults(func=_cmd_rm)

    b = sub.add_parser(
        "bench", help="compare shmbus with multiprocessing.Queue and Pipe", add_help=False,
        epilog="example: shmbus bench --quick",
    )  # fmt: skip
    b.add_argument("rest", nargs=argparse.REMAINDER)
    b.set_defaults(func=_cmd_bench)
    return p


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except (TypeError, ValueError) as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``shmbus`` command with ``argv`` (default: ``sys.argv[1:]``); return the exit code."""
    args = _parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ShmbusError, OSError) as e:
        print(f"shmbus {args.command}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
