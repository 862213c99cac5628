"""``shmbus bench`` on the command line: options, the progress display, signals and the exit status."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from typing import Any, Callable

from ._params import ROW_LETTERS, BenchError
from ._report import format_table, write_json
from ._run import run

__all__ = ["main"]


def _progress_display(tty: bool) -> Callable[[str], None]:
    """One line rewritten in place on a terminal; plain lines for logs and pipes."""
    width = [0]

    def show(msg: str) -> None:
        if tty:
            # "\r" and padding overwrite the previous line; no scrolling log.
            sys.stderr.write("\r" + msg.ljust(width[0]))
            width[0] = max(width[0], len(msg))
        elif msg:
            sys.stderr.write(msg + "\n")
        sys.stderr.flush()

    return show


def _parse_only(value: str | None, parser: argparse.ArgumentParser) -> list[str] | None:
    if value is None:
        return None
    aliases = {k: k for k in ROW_LETTERS} | {letter: k for k, ls in ROW_LETTERS.items() for letter in ls}
    names = [n.strip().lower() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in aliases]
    if unknown or not names:
        parser.error(
            f"--only: unknown benchmark {', '.join(unknown) or value!r}; choose from "
            + ", ".join(f"{k} ({'/'.join(ls)})" for k, ls in ROW_LETTERS.items())
        )
    return [aliases[n] for n in names]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shmbus bench",
        description="Measure shmbus against multiprocessing.Queue and Pipe (and faster-fifo and pyzmq "
        "when installed) in the same run: throughput, bytes, latency, sizes, many producers and "
        "consumers, large buses, Topic fan-out; CPU per message.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="each measurement once, fewer sizes and shapes: about a minute"
    )
    parser.add_argument(
        "--json",
        metavar="PATH",
        nargs="?",
        const="-",
        help="also write the results as JSON to PATH ('-' or no PATH: stdout, and the table goes to stderr)",
    )
    parser.add_argument(
        "--only",
        metavar="NAMES",
        help="comma-separated subset: " + ",".join(ROW_LETTERS) + " (or their letters a-h, t, n)",
    )
    return parser


class _Terminated(BaseException):
    """SIGTERM, raised like Ctrl-C so that the finally blocks kill children and unlink buses."""


# The pid that installed the handlers below: the parent of every measurement.
_signal_owner = [0]


def _on_signal(signum: int, frame: Any) -> None:
    """Ctrl-C or SIGTERM: in the parent, unwind (the finally blocks clean up); in a child, just exit.

    Both signals reach the whole process group. A child forked a moment ago
    may still be inside ``os.fork()`` (running its at-fork hooks), before
    multiprocessing's ``os._exit`` guard: an exception raised there unwinds
    through the parent's frames the child inherited, and runs the parent's
    clean-up in the child (seen: a child reaping its siblings and removing
    the channel). The parent kills and reaps every child anyway.
    """
    if os.getpid() != _signal_owner[0]:
        os._exit(128 + signum)
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise _Terminated


def _run_cleanly(quick: bool, only: list[str] | None) -> dict[str, Any]:
    """``run`` with a progress display on stderr, and SIGTERM and Ctrl-C handled safely around forks."""
    tty = sys.stderr.isatty()
    progress = _progress_display(tty)
    previous: dict[int, Any] = {}
    # Only the main thread may set handlers; elsewhere the signals keep theirs.
    if threading.current_thread() is threading.main_thread():
        _signal_owner[0] = os.getpid()
        previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, _on_signal)
        # An ignored SIGINT (a background job) stays ignored.
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            previous[signal.SIGINT] = signal.signal(signal.SIGINT, _on_signal)
    try:
        return run(quick, only=only, progress=progress)
    finally:
        for signum, handler in previous.items():
            # None: the old handler was not set from Python; the default is the closest.
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        if tty:
            progress("")
            sys.stderr.write("\r")


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (``shmbus bench``); returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    only = _parse_only(args.only, parser)
    try:
        results = _run_cleanly(args.quick, only)
    except BenchError as e:
        print(f"shmbus bench: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("shmbus bench: interrupted", file=sys.stderr)
        return 130
    except _Terminated:
        print("shmbus bench: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    # With JSON on stdout the table moves to stderr, so stdout stays parseable.
    print(format_table(results), file=sys.stderr if args.json == "-" else sys.stdout)
    if args.json:
        try:
            write_json(args.json, results)
        except OSError as e:
            print(f"shmbus bench: cannot write {args.json}: {e}", file=sys.stderr)
            return 1
    return 0
