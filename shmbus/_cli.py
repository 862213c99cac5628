"""The ``shmbus`` command line (also ``python -m shmbus``).

Rule: the CLI is a thin shell over the public API; it owns argument parsing,
output formatting and exit codes (0 success, 1 a failure of the bus, 2 bad
usage) and nothing else. Expected errors print one line to stderr naming the
path, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from . import _accel, _bridge_cli, _doctor, _export
from ._advice import cli_message, cli_os_message
from ._bus import Bus
from ._errors import BusExists, DecodeError, ShmbusError
from ._file import read_layout_of
from ._format import KIND_QUEUE, MAX_SUBSCRIBERS, ring_capacity
from ._lines import cmd_recv, cmd_send, dumps, from_json, to_json
from ._queue import Queue
from ._stats import Stats
from ._topic import Topic
from ._version import __version__

__all__ = ["main", "to_json", "from_json"]


def _cmd_create(args: argparse.Namespace) -> int:
    try:
        mode = int(args.mode, 8)
    except ValueError:
        raise ValueError(f"--mode takes octal bits such as 600 or 660, not {args.mode!r}") from None
    bus: Bus
    kind = Topic if args.topic else Queue
    try:
        if args.topic:
            slots = args.max_subscribers
            bus = Topic.create(args.path, capacity=args.capacity, max_subscribers=slots, mode=mode)
        else:
            bus = Queue.create(args.path, capacity=args.capacity, maxsize=args.maxsize, mode=mode)
        done = "created"
    except BusExists:
        if not args.exist_ok:
            raise
        bus = kind.open(args.path)  # (IncompatibleBus if it is of the other kind)
        done = "exists:"  # as it is: its capacity and limits are not changed
    print(f"{done} {type(bus).__name__} {bus.path} ({bus.capacity} bytes)")
    bus.close()
    return 0


def open_any(path: str) -> Bus:
    """Open the bus at ``path`` as whatever kind it is."""
    return Queue.open(path) if read_layout_of(path).kind == KIND_QUEUE else Topic.open(path)


def _cmd_info(args: argparse.Namespace) -> int:
    from . import _bridge_status

    with open_any(args.path) as bus:
        st = bus.stats()
        subs = bus.subscribers() if isinstance(bus, Topic) else None
    bridges = _bridge_status.routes_on(args.path)
    if args.json:
        out: dict[str, Any] = {**asdict(st), "fill": st.fill, "bridges": bridges}
        if subs is not None:
            out["oldest_seq"], out["newest_seq"] = _seq_range(st)
            out["subscribers"] = subs
        print(json.dumps(out))
    else:
        print(_format_stats(st, subs))
        for k, v in _bridge_status.render(bridges):
            print(f"{k:15} {v}")
        if not _accel.ENABLED:  # (a build that failed at install time is otherwise silent)
            print(f"note: this Python runs shmbus without its C fast path: {_accel.REASON}")
    return 0


def _cmd_doctor(args: argparse.Namespace) -> int:
    r = _doctor.report()
    print(json.dumps(r) if args.json else _doctor.render(r))
    return 0


def _seq_range(st: Stats) -> tuple[int | None, int | None]:
    """A Topic's oldest and newest sequence numbers still in the ring (None when empty)."""
    if st.put_count == st.get_count:
        return None, None
    return st.get_count, st.put_count - 1


def _format_stats(st: Stats, subs: list[dict[str, int]] | None = None) -> str:
    created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(st.created_ns / 1e9))
    rows = [
        ("path", st.path),
        ("kind", f"{st.kind} (format version {st.format_version})"),
        ("bus id", st.bus_id),
        ("created", created),
        ("capacity", f"{st.capacity} bytes"),
        ("maxsize", str(st.maxsize) if st.maxsize else "unbounded (capacity only)")
        if st.kind == "Queue"
        else ("max subscribers", str(st.max_subscribers)),
        ("fill", f"{st.used_bytes} bytes ({st.fill:.1%})"),
    ]
    if subs is None:
        rows += [
            ("messages", str(st.messages)),
            ("put / got", f"{st.put_count} / {st.get_count}"),
            ("bytes in / out", f"{st.bytes_in} / {st.bytes_out}"),
        ]
    else:
        oldest, newest = _seq_range(st)
        rows += [
            ("published", f"{st.put_count} messages, {st.bytes_in} bytes"),
            ("in the ring", f"{st.messages} messages, seq {oldest} to {newest}" if st.messages else "none"),
            ("subscribers", str(len(subs))),
        ]
        rows += [
            (
                f"  slot {s['slot']}",
                f"pid {s['pid']}  lag {s['lag']}  lost {s['lost']}  received {s['received']}",
            )
            for s in subs
        ]
    return "\n".join(f"{k:15} {v}" for k, v in rows)


def _cmd_rm(args: argparse.Namespace) -> int:
    from ._file import unlink

    for p in args.path:
        kept = unlink(p)
        print(f"removed {p}")
        if kept:
            print(
                f"kept {len(kept)} of its semaphores: in use (the last process to close the bus removes "
                "them), or not made by this file (`shmbus gc` removes them once unused)"
            )
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from ._check import examine

    report = examine(args.path)
    if report.problems:
        print(f"{args.path}: {report.problems[0]}")
        return 1
    n = report.subscribers
    subs = f", {n} subscriber{'s' * (n != 1)}" if report.kind == "Topic" else ""
    print(
        f"{args.path}: ok ({report.kind}, {report.messages} message{'s' * (report.messages != 1)}, "
        f"{report.used_bytes} of {report.capacity} ring bytes used{subs})"
    )
    return 0


def _cmd_recover(args: argparse.Namespace) -> int:
    with open_any(args.path) as bus:
        before = bus.stats().recoveries
        dead = bus.recover(force=args.force)
        st = bus.stats()
    print(
        f"{args.path}: {dead} dead process(es) found and cleaned up, {st.recoveries - before} lock(s) "
        f"repaired; {st.messages} messages in the bus"
    )
    from ._check import examine

    left = [p for p in examine(args.path).problems if "lock" in p.message]
    for p in left:
        print(f"{args.path}: {p.message}", file=sys.stderr)
    return 1 if left else 0


def _cmd_ls(args: argparse.Namespace) -> int:
    from . import _admin

    buses = _admin.list_buses(args.path)
    orphans = _admin.orphan_semaphores(args.path, min_age=args.min_age)
    unreadable = _admin.unreadable_files()
    if args.json:
        out = [{**asdict(b), "mode": f"{b.mode:04o}"} for b in buses]
        print(json.dumps({"buses": out, "orphan_semaphores": orphans, "unreadable_files": unreadable}))
        return 0
    rows = [("PATH", "KIND", "MODE", "OWNER", "CAPACITY", "FILL", "MESSAGES", "PROCS", "SEMS")]
    rows += [
        (b.path, b.kind, f"{b.mode:04o}", _user(b.owner), _size_text(b.capacity) if b.capacity else "-",
         f"{b.fill:.1%}" if b.capacity else "-", str(b.messages) if b.capacity else "-",
         "-" if b.participants is None else str(b.participants), str(b.semaphores))
        for b in buses
    ]  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows if buses else ():
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    for f in orphans:
        print(f"{f}  orphan: bus file gone")
    if not buses and not orphans:
        print("no buses and no orphan semaphores")
    if unreadable:
        print(f"{len(unreadable)} file(s) in /dev/shm you may not read, not listed: other users' buses, "
              "perhaps (`shmbus ls` as their owner, or as root, shows them)")  # fmt: skip
    return 0


def _cmd_gc(args: argparse.Namespace) -> int:
    from . import _admin, _bridge_status

    removed = _admin.gc(args.path, dry_run=args.dry_run, min_age=args.min_age)
    removed += _bridge_status.remove_stale(args.dry_run)  # killed bridges' status files
    for f in removed:
        print(f"{'would remove' if args.dry_run else 'removed'} {f}")
    if not removed:
        print("no orphaned anonymous buses, no orphan semaphores, no dead bridges' status files")
    return 0


def _user(uid: int) -> str:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _size_text(n: int) -> str:
    """``n`` bytes as ``create --capacity`` reads them back, exactly: in the largest unit that divides it."""
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n % scale == 0:
            return f"{n // scale}{unit}"
    return str(n)


def _cmd_tail(args: argparse.Namespace) -> int:
    with Topic.open(args.path) as topic, topic.subscribe(start=args.start) as sub:
        n = 0
        while args.count is None or n < args.count:
            try:
                batch = sub.get_many(args.count - n if args.count else 256)
            except DecodeError as e:  # print the batch's others before reporting the one that failed
                for msg in e.decoded:
                    print(dumps(msg), flush=True)
                raise
            for msg in batch:
                print(dumps(msg), flush=True)
                n += 1
    return 0


def _cmd_last(args: argparse.Namespace) -> int:
    with Topic.open(args.path) as topic:
        msg = topic.last()  # (Empty when it holds none: reported as an error, exit 1)
    print(dumps(msg), flush=True)
    return 0


def _cmd_stats(args: argparse.Namespace) -> int:
    from . import _live

    return _live.run(args.path, args.interval, args.count, sys.stdout)


def _cmd_bench(args: argparse.Namespace) -> int:
    from . import _bench

    return _bench.main(args.rest)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="shmbus",
        description="Inspect and manage shmbus buses (memory-mapped message queues).",
        epilog="A PATH with no '/' is a name in /dev/shm. Example: shmbus info jobs",
    )
    c_path = "C fast path on" if _accel.ENABLED else "pure Python: see `shmbus doctor`"
    p.add_argument("--version", action="version", version=f"shmbus {__version__} ({c_path})")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_SubParser)
    bus = "the bus: a bare name is a file in /dev/shm, a path with a '/' a file anywhere"

    c = sub.add_parser(
        "create", help="create a Queue (or a Topic)", epilog="example: shmbus create jobs --capacity 64MiB"
    )
    c.add_argument("path", help=bus)
    c.add_argument("--topic", action="store_true", help="create a broadcast Topic instead of a Queue")
    c.add_argument("--max-subscribers", type=_slots, default=32, metavar="N",
                   help=f"a Topic's subscriber slots, 1 to {MAX_SUBSCRIBERS}")  # fmt: skip
    c.add_argument("--capacity", default="64MiB", type=_capacity, metavar="SIZE",
                   help="ring size, such as 64MiB or 1GB (rounded up to 4KiB; 4KiB to 1TiB)")  # fmt: skip
    c.add_argument("--maxsize", default=0, type=_maxsize, metavar="N",
                   help="a Queue's most messages held at once (0: only the capacity bounds them)",
                   )  # fmt: skip
    c.add_argument("--mode", default="600", metavar="OCTAL",
                   help="permission bits of the file and its semaphores (660: shared with the group)",
                   )  # fmt: skip
    c.add_argument("--exist-ok", action="store_true",
                   help="a bus of this kind already at PATH is fine: use it as it is (exit 0)")  # fmt: skip
    c.set_defaults(func=_cmd_create)

    i = sub.add_parser(
        "info", help="show a bus's header and counters", epilog="example: shmbus info jobs --json"
    )
    i.add_argument("path", help=bus)
    i.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    i.set_defaults(func=_cmd_info)

    t = sub.add_parser(
        "tail",
        help="follow a Topic, printing each message as a JSON line",
        epilog='example: shmbus tail metrics --from earliest --count 10  (bytes print as {"$bytes": base64})',
    )
    t.add_argument("path", help=bus)
    t.add_argument("--from", dest="start", choices=["latest", "earliest"], default="latest",
                   help="latest: only new messages; earliest: also those still in the ring")  # fmt: skip
    t.add_argument("--count", type=_count, metavar="N", help="stop after N messages (default: until Ctrl-C)")
    t.set_defaults(func=_cmd_tail)

    la = sub.add_parser(
        "last",
        help="print a Topic's newest message as a JSON line, without subscribing",
        epilog="example: shmbus last metrics  (exit 1 when the topic holds no message)",
    )
    la.add_argument("path", help=bus)
    la.set_defaults(func=_cmd_last)

    raw = _Formatter
    se = sub.add_parser(
        "send", help="put (Queue) or publish (Topic) JSON values: the arguments, or each line of stdin",
        formatter_class=raw, epilog="examples:\n"
        "  shmbus send jobs '{\"task\": 1}' '[1, 2.5, null]'\n"
        "  producer | shmbus send jobs          # one JSON value a line; blank lines skipped\n"
        "  shmbus send frames --raw < lines.txt # each line as bytes, without its newline\n"
        'bytes are written {"$bytes": "<base64>"}, NaN and infinities {"$float": "nan"}.\n'
        "A full Queue makes send wait. A line that is not JSON stops it (exit 1): the lines\n"
        "before it were sent.",
    )  # fmt: skip
    se.add_argument("path", help=bus)
    se.add_argument("values", nargs="*", metavar="JSON",
                    help="messages (none: read one a line from stdin)")  # fmt: skip
    se.add_argument("--raw", action="store_true", help="send each line or argument as raw bytes, not JSON")
    se.set_defaults(func=cmd_send)

    rc = sub.add_parser(
        "recv", help="take messages from a Queue, printing each as a JSON line",
        formatter_class=raw, epilog="examples:\n"
        "  shmbus recv jobs --count 10\n"
        "  shmbus recv jobs --timeout 0 > backlog.jsonl   # drain what is there, then stop\n"
        "  shmbus recv jobs | jq .task                    # until Ctrl-C (exit 130)\n"
        "  shmbus recv frames --raw                       # messages sent with send --raw, as text\n"
        'bytes print as {"$bytes": "<base64>"}, NaN and infinities as {"$float": "nan"}; map\n'
        "keys that are not strings as their JSON text. Ctrl-C never loses a message taken.",
    )  # fmt: skip
    rc.add_argument("path", help=bus)
    rc.add_argument("--count", type=_count, metavar="N", help="stop after N messages (default: no limit)")
    rc.add_argument("--timeout", type=_seconds, metavar="S",
                    help="stop when nothing arrives for S seconds (default: wait until Ctrl-C)")  # fmt: skip
    rc.add_argument("--raw", action="store_true",
                    help='print each message\'s bytes as a line of text (UTF-8 with no newline; other '
                    'bytes as {"$bytes": "<base64>"}), not as JSON')  # fmt: skip
    rc.set_defaults(func=cmd_recv)

    sa = sub.add_parser(
        "stats", help="watch a bus live: rates in and out, fill, backlog, oldest message, processes",
        formatter_class=raw, epilog="examples:\n"
        "  shmbus stats jobs                 # refreshed in place every second, until Ctrl-C\n"
        "  shmbus stats metrics --interval 5 --count 12 > stats.log\n"
        "Rates are the counters' change between refreshes; for a Topic each subscriber's\n"
        "own rate. The oldest message's age is bounded from samples taken every 256th\n"
        "message, so it may read as a range ('2.0s to 9.1s'), 'at most' or 'over'.",
    )  # fmt: skip
    sa.add_argument("path", help=bus)
    sa.add_argument("--interval", type=_seconds, default=1.0, metavar="S", help="seconds between refreshes")
    sa.add_argument("--count", type=_count, metavar="N", help="stop after N refreshes (default: Ctrl-C)")
    sa.set_defaults(func=_cmd_stats)

    r = sub.add_parser("rm", help="remove a bus and its semaphores", epilog="example: shmbus rm jobs")
    r.add_argument("path", nargs="+", help="the buses (bare names are files in /dev/shm)")
    r.set_defaults(func=_cmd_rm)

    ck = sub.add_parser(
        "check", help="check a bus file without trusting it: header, counters, every record",
        epilog="example: shmbus check jobs  (exit 0 if sound, 1 with the first problem and its byte "
        "offset; reads only, takes no lock: check a bus at rest)",
    )  # fmt: skip
    ck.add_argument("path", help=bus)
    ck.set_defaults(func=_cmd_check)

    rc = sub.add_parser(
        "recover", help="mend what processes that died left in a bus, now",
        epilog="example: shmbus recover jobs  (the next process to take a lock does this by itself; "
        "this is for a bus nobody is using; exit 1 if a lock still needs --force)",
    )  # fmt: skip
    rc.add_argument("path", help=bus)
    rc.add_argument(
        "--force", action="store_true",
        help="also re-initialize a lock held by a thread that does not exist in this PID namespace, "
        "or left unusable: only when no process uses the bus",
    )  # fmt: skip
    rc.set_defaults(func=_cmd_recover)

    from ._admin import GRACE

    grace = "younger semaphores are never orphans: their bus may be in creation (default: %(default)g)"
    ls = sub.add_parser(
        "ls", help="list the buses in /dev/shm (and at PATHs) and orphan semaphores",
        epilog="example: shmbus ls /var/lib/app/jobs.bus --json  (name your disk buses: their "
        "semaphores are in /dev/shm and would otherwise look orphaned)",
    )  # fmt: skip
    ls.add_argument("path", nargs="*", help="bus files outside /dev/shm to include")
    ls.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    ls.add_argument("--min-age", type=float, default=GRACE, metavar="SECONDS", help=grace)
    ls.set_defaults(func=_cmd_ls)

    g = sub.add_parser(
        "gc", help="remove semaphores whose bus file is gone, anonymous buses whose creator died, and "
        "dead bridges' status files",
        epilog="example: shmbus gc /var/lib/app/jobs.bus --dry-run  (PATHs: disk buses whose "
        "semaphores must be kept; only the buses in /dev/shm and at PATHs are known)",
    )  # fmt: skip
    g.add_argument("path", nargs="*", help="bus files outside /dev/shm whose semaphores to keep")
    g.add_argument("--dry-run", action="store_true", help="print what would be removed, remove nothing")
    g.add_argument("--min-age", type=float, default=GRACE, metavar="SECONDS", help=grace)
    g.set_defaults(func=_cmd_gc)

    d = sub.add_parser(
        "doctor",
        help="versions, the C fast path (and why it is off), /dev/shm space, semaphore and file limits",
        epilog="example: shmbus doctor --json",
    )
    d.add_argument("--json", action="store_true", help="print one JSON object")
    d.set_defaults(func=_cmd_doctor)

    _export.register(sub)

    b = sub.add_parser(
        "bench", help="compare shmbus with multiprocessing.Queue and Pipe", add_help=False,
        epilog="example: shmbus bench --quick",
    )  # fmt: skip
    b.add_argument("rest", nargs=argparse.REMAINDER, help="the benchmark's options: shmbus bench --help")
    b.set_defaults(func=_cmd_bench)
    _bridge_cli.register(sub)
    for command in sub.choices.values():
        command.set_defaults(command_parser=command)  # main reports stray arguments with it
    return p


def _count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number from 1 up, not {text!r}")
    return n


def _seconds(text: str) -> float:
    try:
        s = float(text)
    except ValueError:
        s = math.nan
    if not (0 <= s < math.inf):
        raise argparse.ArgumentTypeError(f"expected a number of seconds, 0 or more, not {text!r}")
    return s


def _capacity(text: str) -> int:
    try:
        return ring_capacity(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(
            f"expected a size from 4KiB to 1TiB, such as 65536, 64KiB, 64MiB or 1.5GB, not {text!r}"
        ) from None


def _whole(text: str, low: int, high: int) -> int:
    try:
        n = int(text)
    except ValueError:
        n = low - 1
    if not low <= n <= high:
        raise argparse.ArgumentTypeError(f"expected a whole number from {low} to {high}, not {text!r}")
    return n


def _maxsize(text: str) -> int:
    return _whole(text, 0, 2**31 - 1)


def _slots(text: str) -> int:
    return _whole(text, 1, MAX_SUBSCRIBERS)


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Each option's default after its help; epilogs (the examples) kept as written.

    Left out: a default of None (the help says what no value means), a
    flag's False, and a help that states its default itself.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        stated = "default" in text
        if action.default is None or action.default is False or not action.option_strings or stated:
            return text
        return super()._get_help_string(action) or text


class _SubParser(argparse.ArgumentParser):
    """A subcommand's parser: options anywhere, even among its positional arguments, as shell users expect.

    ``shmbus send jobs --raw TEXT``: plain argparse gives ``jobs`` to PATH and
    nothing to JSON before it reads ``--raw``, and then refuses ``TEXT``.
    """

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(**kwargs)
        self._intermixing = False

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        # argparse's intermixed parsing calls back into this method: the guard
        # sends those calls to the plain parser. It cannot take REMAINDER (bench).
        if self._intermixing or any(a.nargs == argparse.REMAINDER for a in self._actions):
            return super().parse_known_args(args, namespace)
        self._intermixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``shmbus`` command with ``argv`` (default: ``sys.argv[1:]``); return the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        # The benchmark parses its own options (argparse's REMAINDER would
        # reject them after a subcommand).
        from . import _bench

        return _bench.main(argv[1:])
    args, stray = _parser().parse_known_args(argv)
    if stray:  # under the command's name and usage (argparse would give the top level's)
        args.command_parser.error(f"unrecognized arguments: {' '.join(stray)}")
    try:
        code = int(args.func(args))
        sys.stdout.flush()  # here, where a closed pipe is caught, rather than at exit
        return code
    except ShmbusError as e:
        print(f"shmbus {args.command}: {cli_message(e, args.command)}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader left (`shmbus ls | head -1`): not an error worth a line, as for any
        # Unix tool; stdout goes to /dev/null so that the flush at exit does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a command ended by a closed pipe
    except OSError as e:
        print(f"shmbus {args.command}: {cli_os_message(e)}", file=sys.stderr)
        return 1
    except (ValueError, TypeError) as e:  # a value argparse could not check (mode, maxsize...)
        print(f"shmbus {args.command}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
