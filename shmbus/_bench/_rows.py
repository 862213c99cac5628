"""Rows (e) and (f): one dimension varied each: message size, processes per side.

Both compare shmbus with mp.Queue (and Pipe for (e)) at each step; the
Topic's row (t) is in ``_topicrow``.
"""

from __future__ import annotations

import functools
from multiprocessing.context import ForkContext
from typing import Any, Callable

from .._format import parse_size
from ._channels import Channel
from ._measure import Progress, Role, cpu_detail, cpu_s, first_start_ns, measure, median, rotations
from ._params import BenchError, Params, size_text
from ._roles import consume_bytes, consume_until_none, memcpy_into, memcpy_new, produce_bytes, produce_share

__all__ = ["SWEEP_TRANSPORTS", "SWEEP_MEMCPY", "sweep_count", "run_sweep", "MPMC_TRANSPORTS", "run_mpmc"]

SWEEP_TRANSPORTS: tuple[str, ...] = ("shmbus", "mp.Queue", "mp.Pipe")
# Each size's ceiling, as in (c): one process copying payloads of that size. A
# 16 MiB copy runs at memory speed where a 1 MiB one stays in the cache, so
# each size is compared with its own copy, not with (c)'s.
SWEEP_MEMCPY: tuple[str, ...] = ("memcpy new", "memcpy into")


def sweep_count(params: Params, size: int) -> int:
    """Messages of ``size`` bytes in one measurement: a fixed volume, within bounds."""
    return max(params.sweep_min_messages, min(params.sweep_max_messages, params.sweep_volume // size))


def run_sweep(params: Params, ctx: ForkContext, progress: Progress) -> dict[str, Any]:
    """(e) Bytes messages of each size through shmbus, mp.Queue and Pipe."""
    by_size: dict[str, Any] = {}
    for size in params.sweep_sizes:
        count = sweep_count(params, size)
        roles = [
            Role("producer", "producer", functools.partial(produce_bytes, size=size, count=count)),
            Role("consumer", "consumer", functools.partial(consume_bytes, size=size, count=count)),
        ]
        copies = _copy_roles(params, size, count)
        samples: dict[str, list[dict[str, Any]]] = {t: [] for t in (*SWEEP_TRANSPORTS, *SWEEP_MEMCPY)}
        for rep, order in enumerate(rotations((*SWEEP_TRANSPORTS, *SWEEP_MEMCPY), params.sweep_repeats)):
            for t in order:
                what = f"{size_text(size)} x {count:,}, {t}, run {rep + 1}/{params.sweep_repeats}"
                progress.step(f"(e) sizes: {what}")
                if t in copies:
                    reports = measure(copies[t], "none", params, ctx)
                    samples[t].append(_stream_sample(reports, count, size, end="producer"))
                else:
                    reports = measure(roles, t, params, ctx)
                    samples[t].append(_stream_sample(reports, count, size))
        by_size[str(size)] = {"size": size, "messages": count, **_stream_summary(samples)}
    return {"letter": "e", "title": "message-size sweep, bytes messages", "sizes": by_size}


def _copy_roles(params: Params, size: int, count: int) -> dict[str, list[Role]]:
    """The memcpy ceilings of one size: one process, no channel (the (g) copies of (c))."""
    ring = parse_size(params.capacity)
    return {
        "memcpy new": [Role("producer", "", functools.partial(memcpy_new, size=size, count=count))],
        "memcpy into": [
            Role("producer", "", functools.partial(memcpy_into, size=size, count=count, ring=ring))
        ],
    }


def _stream_sample(
    reports: dict[str, dict[str, Any]], count: int, size: int, end: str = "consumer"
) -> dict[str, Any]:
    cons = reports[end]
    if cons["count"] != count or cons["last_seq"] != count - 1:
        raise BenchError(f"sizes: received {cons['count']} messages of {size} bytes, expected {count}")
    elapsed = (cons["t_end_ns"] - first_start_ns(reports)) / 1e9
    return {
        "elapsed_s": elapsed,
        "msg_per_s": count / elapsed,
        "mb_per_s": count * size / 1e6 / elapsed,
        "cpu_us_per_msg": cpu_s(reports) / count * 1e6,
        "cpu_s": cpu_detail(reports),
    }


def _stream_summary(samples: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Each transport's medians and ratios, and the size's memcpy ceiling (the faster copy)."""
    out: dict[str, Any] = {}
    for t in SWEEP_TRANSPORTS:
        s = samples[t]
        out[t] = {k: median(s, k) for k in ("msg_per_s", "mb_per_s", "cpu_us_per_msg")}
        out[t]["samples"] = s
    copies: dict[str, Any] = {t: {"mb_per_s": median(samples[t], "mb_per_s"), "samples": samples[t]}
                              for t in SWEEP_MEMCPY}  # fmt: skip
    ceiling = max(median(samples[t], "mb_per_s") for t in SWEEP_MEMCPY)
    base = out["mp.Queue"]["msg_per_s"]
    for t in out:
        out[t]["x mp.Queue"] = out[t]["msg_per_s"] / base
        out[t]["x mp.Pipe"] = out[t]["msg_per_s"] / out["mp.Pipe"]["msg_per_s"]
        out[t]["% of memcpy"] = 100 * out[t]["mb_per_s"] / ceiling
    return {"transports": out, "memcpy": {"mb_per_s": ceiling, **copies}}


# -- (f) producers x consumers ------------------------------------------------------------------

MPMC_TRANSPORTS: tuple[str, ...] = ("shmbus", "mp.Queue")


def _send_stops(consumers: int) -> Callable[[Channel], None]:
    """The parent's part: once every producer has flushed and reported, one ``None`` per consumer."""

    def hook(channel: Channel) -> None:
        ep = channel.endpoint("producer")
        try:
            for _ in range(consumers):
                ep.send(None)
            ep.flush()
        finally:
            ep.close()

    return hook


def run_mpmc(params: Params, ctx: ForkContext, progress: Progress) -> dict[str, Any]:
    """(f) P producers and C consumers on one queue: total msg/s."""
    shapes: dict[str, Any] = {}
    for np_, nc in params.mpmc_shapes:
        share = params.mpmc_messages // np_
        roles = [
            Role(f"producer{i}", "producer", functools.partial(produce_share, index=i, share=share))
            for i in range(np_)
        ]
        roles += [Role(f"consumer{i}", "consumer", consume_until_none) for i in range(nc)]
        hook = (frozenset(r.name for r in roles[:np_]), _send_stops(nc))
        samples: dict[str, list[dict[str, Any]]] = {t: [] for t in MPMC_TRANSPORTS}
        shape = f"{np_} producer{'s' * (np_ != 1)} x {nc} consumer{'s' * (nc != 1)}"
        for rep, order in enumerate(rotations(MPMC_TRANSPORTS, params.mpmc_repeats)):
            for t in order:
                progress.step(f"(f) mpmc: {shape}, {t}, run {rep + 1}/{params.mpmc_repeats}")
                reports = measure(roles, t, params, ctx, hook=hook)
                samples[t].append(_mpmc_sample(reports, share * np_))
        result: dict[str, dict[str, Any]] = {
            t: {
                "msg_per_s": median(s, "msg_per_s"),
                "cpu_us_per_msg": median(s, "cpu_us_per_msg"),
                "samples": s,
            }
            for t, s in samples.items()
        }
        result["shmbus"]["x mp.Queue"] = result["shmbus"]["msg_per_s"] / result["mp.Queue"]["msg_per_s"]
        shapes[f"{np_}x{nc}"] = {
            "producers": np_,
            "consumers": nc,
            "messages": share * np_,
            "transports": result,
        }
    return {"letter": "f", "title": "producers x consumers on one queue, small dicts", "shapes": shapes}


def _mpmc_sample(reports: dict[str, dict[str, Any]], total: int) -> dict[str, Any]:
    consumers = [r for name, r in reports.items() if name.startswith("consumer")]
    count = sum(r["count"] for r in consumers)
    seq_sum = sum(r["seq_sum"] for r in consumers)
    if count != total or seq_sum != total * (total - 1) // 2:
        raise BenchError(f"mpmc: consumers received {count} messages (seq sum {seq_sum}), expected {total}")
    elapsed = (max(r["t_last_ns"] for r in consumers) - first_start_ns(reports)) / 1e9
    return {
        "elapsed_s": elapsed,
        "msg_per_s": total / elapsed,
        "per_consumer": [r["count"] for r in consumers],
        "cpu_us_per_msg": cpu_s(reports) / total * 1e6,
        "cpu_s": cpu_detail(reports),
    }
