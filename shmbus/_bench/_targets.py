"""The project's targets: each a figure looked up in a run's results, a limit, and what it measures."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

from ._params import MIB

__all__ = ["lookup", "Figure", "MEMCPY_VARIANTS", "TARGETS", "row_of", "evaluate_targets"]


def lookup(d: Mapping[str, Any], *path: str) -> Any:
    """``d[path[0]][path[1]]...``, or None where anything is missing."""
    cur: Any = d
    for k in path:
        if not isinstance(cur, Mapping) or k not in cur:
            return None
        cur = cur[k]
    return cur


Figure = Callable[[Mapping[str, Any]], "float | None"]


def _ratio(row: str, variant: str, other: str, metric: str = "value") -> Figure:
    return lambda b: lookup(b, row, "variants", variant, "ratios", f"x {other}", metric)


def _rate_ratio(row: str, variant: str, other: str) -> Figure:
    """``variant``'s rate over ``other``'s, for a pair the table has no column for."""

    def ratio(b: Mapping[str, Any]) -> float | None:
        mine, theirs = (lookup(b, row, "variants", v, "value") for v in (variant, other))
        return None if not mine or not theirs else mine / theirs

    return ratio


def _figure(*path: str) -> Figure:
    return lambda b: lookup(b, *path)


def _pct_of_memcpy(variant: str) -> Figure:
    def pct(b: Mapping[str, Any]) -> float | None:
        mine = lookup(b, "bytes", "variants", variant, "value")
        ceiling = [lookup(b, "bytes", "variants", k, "value") for k in MEMCPY_VARIANTS]
        best = max((c for c in ceiling if c), default=None)
        return None if mine is None or best is None else 100 * mine / best

    return pct


MEMCPY_VARIANTS = ("memcpy new", "memcpy into", "memcpy into small")


def _sweep_pct_of_memcpy(size: int) -> Figure:
    """(e): shmbus at ``size`` as a % of a memcpy of that same size (None when the size was not run)."""
    return _figure("sizes", "sizes", str(size), "transports", "shmbus", "% of memcpy")


def _rss_growth_mib(b: Mapping[str, Any]) -> float | None:
    grown = lookup(b, "scale", "memory", "rss_delta_bytes")
    return None if grown is None else grown / MIB


def _topic(config: str, *path: str) -> Figure:
    return lambda b: lookup(b, "topic", "configs", config, *path)


def _topic_lost(config: str) -> Figure:
    return _topic(config, "lost_total")


# The targets: (what it measures, the target, its figure in a run, comparison, limit).
# A name starting "[info]" is not a target, only a figure worth watching. Each
# figure comes from one row, the first key of its path (see ``row_of``).
TARGETS: tuple[tuple[str, str, Figure, str, float], ...] = (
    ("small dicts one at a time: rate", "(a) shmbus >= 3x mp.Queue",
     _ratio("single", "shmbus", "mp.Queue"), ">=", 3),
    ("small dicts one at a time: rate", "(a) shmbus >= 4x mp.Queue",
     _ratio("single", "shmbus", "mp.Queue"), ">=", 4),
    ("small dicts one at a time: rate", "(a) shmbus ahead of pyzmq (x pyzmq > 1)",
     _ratio("single", "shmbus", "pyzmq"), ">", 1),
    ("small dicts in batches of 256: rate", "(b) shmbus batches >= 5x mp.Queue one at a time",
     _ratio("batch", "shmbus", "mp.Queue"), ">=", 5),
    ("small dicts in batches of 256: rate", "(b) shmbus batches >= 8x mp.Queue one at a time",
     _ratio("batch", "shmbus", "mp.Queue"), ">=", 8),
    ("small dicts in batches of 256 against one big message: rate",
     "(b) shmbus batches ahead of mp.Pipe's list as one message",
     _rate_ratio("batch", "shmbus", "mp.Pipe list"), ">=", 1),
    ("small dicts in batches of 256: rate", "(b) shmbus batches >= 2x faster-fifo get_many",
     _ratio("batch", "shmbus", "faster-fifo"), ">=", 2),
    ("1 MiB bytes messages: rate", "(c) shmbus put_bytes/get_bytes >= 10x mp.Queue",
     _ratio("bytes", "shmbus", "mp.Queue"), ">=", 10),
    ("1 MiB bytes messages: rate", "(c) shmbus put_bytes/get_bytes >= 25x mp.Queue",
     _ratio("bytes", "shmbus", "mp.Queue"), ">=", 25),
    ("1 MiB bytes through put/get: rate", "(c) shmbus put(bytes)/get() >= 25x mp.Queue",
     _ratio("bytes", "shmbus put", "mp.Queue"), ">=", 25),
    ("1 MiB zero-copy messages: rate", "(c) shmbus zero copy >= 25x mp.Queue",
     _ratio("bytes", "shmbus zero-copy", "mp.Queue"), ">=", 25),
    ("1 MiB bytes messages: share of memcpy", "(c) shmbus put_bytes/get_bytes >= 90% of memcpy",
     _pct_of_memcpy("shmbus"), ">=", 90),
    ("1 MiB zero-copy messages: share of memcpy", "(c) shmbus zero copy >= 90% of memcpy",
     _pct_of_memcpy("shmbus zero-copy"), ">=", 90),
    ("[info] small ring, 1 MiB bytes: rate", "(c) small ring: shmbus put_bytes/get_bytes >= 25x mp.Queue",
     _ratio("bytes", "shmbus small", "mp.Queue"), ">=", 25),
    ("[info] small ring, 1 MiB zero copy: rate", "(c) small ring: shmbus zero copy >= 25x mp.Queue",
     _ratio("bytes", "shmbus zero-copy small", "mp.Queue"), ">=", 25),
    ("[info] small ring, 1 MiB bytes: memcpy share",
     "(c) small ring: shmbus put_bytes/get_bytes >= 90% of memcpy",
     _pct_of_memcpy("shmbus small"), ">=", 90),
    ("[info] small ring, 1 MiB zero copy: memcpy share", "(c) small ring: shmbus zero copy >= 90% of memcpy",
     _pct_of_memcpy("shmbus zero-copy small"), ">=", 90),
    ("4 MiB bytes messages: share of a 4 MiB memcpy", "(e) shmbus 4 MiB >= 60% of memcpy",
     _sweep_pct_of_memcpy(4 * MIB), ">=", 60),
    ("16 MiB bytes messages: share of a 16 MiB memcpy", "(e) shmbus 16 MiB >= 60% of memcpy",
     _sweep_pct_of_memcpy(16 * MIB), ">=", 60),
    ("round-trip latency, blocking", "(d) shmbus blocking p50 no worse than mp.Pipe (x mp.Pipe >= 1)",
     _ratio("pingpong", "shmbus blocking", "mp.Pipe", "p50_us"), ">=", 1),
    ("round-trip latency, spinning", "(d) shmbus with spin: p50 <= 5 us",
     _figure("pingpong", "variants", "shmbus spin", "p50_us"), "<=", 5),
    ("round-trip latency, spinning", "(d) shmbus with spin: p99 <= 20 us",
     _figure("pingpong", "variants", "shmbus spin", "p99_us"), "<=", 20),
    ("CPU per small message, both sides", "(a) producer+consumer CPU <= 1.5 us per small message",
     _figure("single", "variants", "shmbus", "cpu_us_per_msg"), "<=", 1.5),
    ("memory of a large idle bus", "(h) a 1 GiB bus + one small message: VmRSS growth <= 4 MiB",
     _rss_growth_mib, "<=", 4),
    ("Topic publish rate with subscribers", "(t) 3 subscribers: publish rate >= 80% of 0 subscribers",
     _topic("3", "pct_of_0_subscribers"), ">=", 80),
    ("Topic publish rate, no subscriber", "(t) publish, 0 subscribers >= 5x mp.Queue one at a time",
     _topic("0", "x mp.Queue", "publish"), ">=", 5),
    ("Topic publisher CPU, no subscriber", "(t) publisher CPU <= 1.5 us per message, 0 subscribers",
     _topic("0", "publisher_cpu_us_per_msg"), "<=", 1.5),
    ("Topic fan-out to 1 subscriber: rate", "(t) 1 subscriber receives >= 4x mp.Queue one at a time",
     _topic("1", "x mp.Queue", "receive_slowest"), ">=", 4),
    ("Topic fan-out to 1 subscriber: losses", "(t) 1 subscriber keeping up: 0 messages lost",
     _topic_lost("1"), "<=", 0),
    ("Topic fan-out to 3 subscribers: rate", "(t) 3 subscribers: each receives >= 2x mp.Queue",
     _topic("3", "x mp.Queue", "receive_slowest"), ">=", 2),
    ("Topic fan-out to 3 subscribers: losses", "(t) 3 subscribers: 0 messages lost",
     _topic_lost("3"), "<=", 0),
    ("Topic batches of 256: rate", "(t) publish_many/get_many(256) >= 8x mp.Queue one at a time",
     _topic("batch", "x mp.Queue", "receive_slowest"), ">=", 8),
    ("Topic round-trip latency, spinning", "(t) Topic ping-pong, default spin: p50 <= 5 us",
     _topic("pingpong", "p50_us"), "<=", 5),
    ("Topic round-trip latency, spinning", "(t) Topic ping-pong, default spin: p99 <= 20 us",
     _topic("pingpong", "p99_us"), "<=", 20),
    ("bridge end to end, one record per NATS message: rate",
     "(n) bridge one per message >= 80% of the plain nats-py pair",
     _figure("bridge", "variants", "single", "pct_of_nats_py"), ">=", 80),
    ("bridge end to end, batch framing: rate", "(n) bridge batch framing >= 500,000 small msg/s",
     _figure("bridge", "variants", "batch", "value"), ">=", 500_000),
)  # fmt: skip

# The row each target's figure comes from, by the letter in its text.
_ROW_OF_LETTER = {
    "a": "single", "b": "batch", "c": "bytes", "d": "pingpong", "e": "sizes", "h": "scale", "t": "topic",
    "n": "bridge",
}  # fmt: skip


def row_of(target: str) -> str:
    """The row key a target (its text, "(a) ...") is measured by."""
    return _ROW_OF_LETTER[target[1]]


def evaluate_targets(b: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The targets of the rows in ``b`` (those run), each with its figure and whether it is met.

    A target whose row ran but whose figure is missing (an optional
    comparison not installed) is listed as not measured (``met`` None).
    """
    out = []
    for measures, what, figure, op, limit in TARGETS:
        if row_of(what) not in b:
            continue
        value = figure(b)
        met = None if value is None else {">=": value >= limit, ">": value > limit, "<=": value <= limit}[op]
        out.append(
            {"measures": measures, "target": what, "value": value, "op": op, "limit": limit, "met": met}
        )
    return out
