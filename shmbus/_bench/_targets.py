"""The project's targets (issues 2 and 6), each a figure looked up in a run's results and a limit."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

from ._params import MIB

__all__ = ["lookup", "Figure", "MEMCPY_VARIANTS", "TARGETS", "evaluate_targets"]


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


def _rss_growth_mib(b: Mapping[str, Any]) -> float | None:
    grown = lookup(b, "scale", "memory", "rss_delta_bytes")
    return None if grown is None else grown / MIB


# The project's targets (issues 2 and 6): (source, target, its figure in a run, comparison, limit).
TARGETS: tuple[tuple[str, str, Figure, str, float], ...] = (
    ("issue 2", "(a) shmbus >= 3x mp.Queue", _ratio("single", "shmbus", "mp.Queue"), ">=", 3),
    ("issue 6", "(a) shmbus >= 4x mp.Queue", _ratio("single", "shmbus", "mp.Queue"), ">=", 4),
    ("issue 6", "(a) shmbus ahead of pyzmq (x pyzmq > 1)", _ratio("single", "shmbus", "pyzmq"), ">", 1),
    (
        "issue 2",
        "(b) shmbus batches >= 5x mp.Queue one at a time",
        _ratio("batch", "shmbus", "mp.Queue"),
        ">=",
        5,
    ),
    (
        "issue 6",
        "(b) shmbus batches >= 8x mp.Queue one at a time",
        _ratio("batch", "shmbus", "mp.Queue"),
        ">=",
        8,
    ),
    (
        "[info]",
        "(b) shmbus batches ahead of mp.Pipe's list as one message",
        _rate_ratio("batch", "shmbus", "mp.Pipe list"),
        ">=",
        1,
    ),
    (
        "issue 6",
        "(b) shmbus batches >= 2x faster-fifo get_many",
        _ratio("batch", "shmbus", "faster-fifo"),
        ">=",
        2,
    ),
    (
        "issue 2",
        "(c) shmbus put_bytes/get_bytes >= 10x mp.Queue",
        _ratio("bytes", "shmbus", "mp.Queue"),
        ">=",
        10,
    ),
    (
        "issue 6",
        "(c) shmbus put_bytes/get_bytes >= 25x mp.Queue",
        _ratio("bytes", "shmbus", "mp.Queue"),
        ">=",
        25,
    ),
    (
        "issue 6",
        "(c) shmbus zero copy >= 25x mp.Queue",
        _ratio("bytes", "shmbus zero-copy", "mp.Queue"),
        ">=",
        25,
    ),
    ("issue 6", "(c) shmbus put_bytes/get_bytes >= 90% of memcpy", _pct_of_memcpy("shmbus"), ">=", 90),
    ("issue 6", "(c) shmbus zero copy >= 90% of memcpy", _pct_of_memcpy("shmbus zero-copy"), ">=", 90),
    (
        "[info]",
        "(c) shmbus put(bytes)/get() >= 25x mp.Queue",
        _ratio("bytes", "shmbus put", "mp.Queue"),
        ">=",
        25,
    ),
    (
        "[info]",
        "(c) small ring: shmbus put_bytes/get_bytes >= 25x mp.Queue",
        _ratio("bytes", "shmbus small", "mp.Queue"),
        ">=",
        25,
    ),
    (
        "[info]",
        "(c) small ring: shmbus zero copy >= 25x mp.Queue",
        _ratio("bytes", "shmbus zero-copy small", "mp.Queue"),
        ">=",
        25,
    ),
    (
        "[info]",
        "(c) small ring: shmbus put_bytes/get_bytes >= 90% of memcpy",
        _pct_of_memcpy("shmbus small"),
        ">=",
        90,
    ),
    (
        "[info]",
        "(c) small ring: shmbus zero copy >= 90% of memcpy",
        _pct_of_memcpy("shmbus zero-copy small"),
        ">=",
        90,
    ),
    (
        "issues",
        "(d) shmbus blocking p50 no worse than mp.Pipe (x mp.Pipe >= 1)",
        _ratio("pingpong", "shmbus blocking", "mp.Pipe", "p50_us"),
        ">=",
        1,
    ),
    (
        "issues",
        "(d) shmbus with spin: p50 <= 5 us",
        _figure("pingpong", "variants", "shmbus spin", "p50_us"),
        "<=",
        5,
    ),
    (
        "issues",
        "(d) shmbus with spin: p99 <= 20 us",
        _figure("pingpong", "variants", "shmbus spin", "p99_us"),
        "<=",
        20,
    ),
    (
        "issues",
        "(a) producer+consumer CPU <= 1.5 us per small message",
        _figure("single", "variants", "shmbus", "cpu_us_per_msg"),
        "<=",
        1.5,
    ),
    ("issues", "(h) a 1 GiB bus + one small message: VmRSS growth <= 4 MiB", _rss_growth_mib, "<=", 4),
    (
        "issues",
        "(t) 3 subscribers: publish rate >= 80% of 0 subscribers",
        _figure("topic", "configs", "3", "pct_of_0_subscribers"),
        ">=",
        80,
    ),
)


def evaluate_targets(b: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Each target with its figure from this run and whether it is met (None: not measured)."""
    out = []
    for source, what, figure, op, limit in TARGETS:
        value = figure(b)
        met = None if value is None else {">=": value >= limit, ">": value > limit, "<=": value <= limit}[op]
        out.append({"source": source, "target": what, "value": value, "op": op, "limit": limit, "met": met})
    return out
