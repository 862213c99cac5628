"""Rows (a)-(d): the same messages through each variant, one producer to one consumer.

A ``PairRow`` names its variants (transport, workload, options, label);
``run_pair_row`` measures each, repeated in rotated order, and summarises
them as medians with every variant's ratio to mp.Queue.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from multiprocessing.context import ForkContext
from typing import Any, Callable

from .._format import parse_size
from .._sync import SPIN_DEFAULT
from ._measure import Progress, Role, cpu_detail, cpu_s, first_start_ns, measure, median, rotations
from ._params import MIB, BenchError, Params, size_text
from ._roles import (
    RoleFn,
    consume_batch,
    consume_bytes,
    consume_single,
    consume_viewed,
    echo,
    memcpy_into,
    memcpy_new,
    ping,
    produce_batch,
    produce_bytes,
    produce_reserved,
    produce_single,
)

__all__ = ["Variant", "PairRow", "PAIR_ROWS", "run_pair_row", "pair_steps"]

# Rows marked so run shmbus without its C fast path, to show what it brings in the same run.
_PURE = "pure Python (no C fast path)"
_NO_C = {"pure": True}  # a ShmbusChannel option


@dataclass(frozen=True)
class Variant:
    """One line of a pairwise table: a transport, how it is used, and its label."""

    key: str
    label: str
    transport: str
    producer: RoleFn
    consumer: RoleFn | None  # None: one process and no channel (the memcpy ceiling)
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PairRow:
    """A row of (a)-(d): the same messages through each variant, producer to consumer."""

    key: str
    letter: str
    title: Callable[[Params], str]
    unit: str
    variants: Callable[[Params], list[Variant]]
    messages: Callable[[Params], int]
    two_way: bool = False
    # Besides mp.Queue, ratios to these variants get their own columns.
    also_ratio_to: tuple[str, ...] = ("mp.Pipe",)


def _single_variants(p: Params) -> list[Variant]:
    prod, cons = produce_single, consume_single
    return [
        Variant("shmbus", "shmbus put/get", "shmbus", prod, cons),
        Variant("shmbus pure", f"[info] shmbus put/get in {_PURE}", "shmbus", prod, cons, _NO_C),
        Variant("mp.Queue", "mp.Queue put/get (pickle)", "mp.Queue", prod, cons),
        Variant("mp.Pipe", "mp.Pipe send/recv (pickle)", "mp.Pipe", prod, cons),
        Variant("faster-fifo", "faster-fifo put/get (pickle)", "faster-fifo", prod, cons),
        Variant("pyzmq", "pyzmq ipc PUSH/PULL send/recv (msgpack)", "pyzmq", prod, cons),
    ]


def _batch_variants(p: Params) -> list[Variant]:
    prod, cons = produce_batch, consume_batch
    b = p.batch_size
    return [
        Variant("shmbus", f"shmbus put_many/get_many({b})", "shmbus", prod, cons),
        Variant("shmbus pure", f"[info] shmbus put_many/get_many({b}), {_PURE}", "shmbus", prod, cons, _NO_C),
        Variant("faster-fifo", f"faster-fifo put_many/get_many({b}) (pickle)", "faster-fifo", prod, cons),
        Variant(
            "mp.Queue",
            "mp.Queue put/get, one at a time (baseline)",
            "mp.Queue",
            produce_single,
            consume_single,
        ),
        Variant("mp.Queue list", f"[info] mp.Queue, list of {b} as one message", "mp.Queue", prod, cons),
        Variant("mp.Pipe list", f"[info] mp.Pipe, list of {b} as one message", "mp.Pipe", prod, cons),
        Variant("pyzmq list", f"[info] pyzmq, list of {b} as one msgpack message", "pyzmq", prod, cons),
    ]


def _bytes_variants(p: Params) -> list[Variant]:
    size, count = p.bytes_size, p.bytes_messages
    prod = functools.partial(produce_bytes, size=size, count=count)
    cons = functools.partial(consume_bytes, size=size, count=count)
    zprod = functools.partial(produce_reserved, size=size, count=count)
    zcons = functools.partial(consume_viewed, size=size, count=count)
    small, big = parse_size(p.small_ring), parse_size(p.capacity)
    ring = f"{size_text(small)} ring"
    opts = {"capacity": small}
    return [
        Variant("shmbus", "shmbus put_bytes/get_bytes", "shmbus", prod, cons),
        Variant("shmbus zero-copy", "shmbus reserve()/get_view() (zero copy)", "shmbus", zprod, zcons),
        Variant("shmbus put", "[info] shmbus put(bytes)/get(), what a user writes first", "shmbus",
                prod, cons, {"bytes_as_objects": True}),
        Variant("shmbus small", f"[info] shmbus put_bytes/get_bytes, {ring}", "shmbus", prod, cons, opts),
        Variant("shmbus zero-copy small", f"[info] shmbus zero copy, {ring}", "shmbus", zprod, zcons, opts),
        Variant("mp.Queue", "mp.Queue put/get (pickle)", "mp.Queue", prod, cons),
        Variant("mp.Pipe", "mp.Pipe send_bytes/recv_bytes", "mp.Pipe", prod, cons),
        Variant("faster-fifo", "faster-fifo put/get (raw bytes)", "faster-fifo", prod, cons, {"raw": True}),
        Variant("pyzmq", "pyzmq ipc PUSH/PULL (copy=False)", "pyzmq", prod, cons),
        Variant("memcpy new", "(g) memcpy: bytes(memoryview)", "none",
                functools.partial(memcpy_new, size=size, count=count), None),
        Variant("memcpy into", f"(g) memcpy: slice assignment, rotating in {size_text(big)}", "none",
                functools.partial(memcpy_into, size=size, count=count, ring=big), None),
        Variant("memcpy into small", f"(g) memcpy: slice assignment, rotating in {size_text(small)}", "none",
                functools.partial(memcpy_into, size=size, count=count, ring=small), None),
    ]  # fmt: skip


def _pingpong_variants(p: Params) -> list[Variant]:
    spin = f"spin {SPIN_DEFAULT * 1e6:g} us (default)"
    return [
        Variant("shmbus blocking", "shmbus, blocking (spin_us=0)", "shmbus", ping, echo, {"spin_us": 0}),
        Variant("shmbus spin", f"shmbus, {spin}", "shmbus", ping, echo),
        Variant("shmbus spin pure", f"[info] shmbus, {spin}, {_PURE}", "shmbus", ping, echo, _NO_C),
        Variant("mp.Pipe", "mp.Pipe (duplex)", "mp.Pipe", ping, echo),
        Variant("mp.Queue", "mp.Queue (one per direction)", "mp.Queue", ping, echo),
    ]


PAIR_ROWS: tuple[PairRow, ...] = (
    PairRow(
        "single",
        "a",
        lambda p: f"{p.small_messages:,} small dicts, one at a time",
        "msg/s",
        _single_variants,
        lambda p: p.small_messages,
        also_ratio_to=("mp.Pipe", "pyzmq"),
    ),
    PairRow(
        "batch",
        "b",
        lambda p: f"{p.small_messages:,} small dicts, batches of {p.batch_size}",
        "msg/s",
        _batch_variants,
        lambda p: p.small_messages,
        also_ratio_to=("mp.Queue list", "faster-fifo"),
    ),
    PairRow(
        "bytes",
        "c",
        lambda p: f"{p.bytes_messages:,} x {p.bytes_size // MIB} MiB bytes",
        "MB/s",
        _bytes_variants,
        lambda p: p.bytes_messages,
        also_ratio_to=("mp.Pipe",),
    ),
    PairRow(
        "pingpong",
        "d",
        lambda p: f"ping-pong, {p.pingpong_round_trips:,} round trips after {p.pingpong_warmup}",
        "us",
        _pingpong_variants,
        lambda p: p.pingpong_warmup + p.pingpong_round_trips,
        two_way=True,
    ),
)


def _pair_roles(v: Variant) -> list[Role]:
    if v.consumer is None:
        return [Role("producer", "", v.producer)]
    return [Role("producer", "producer", v.producer), Role("consumer", "consumer", v.consumer)]


def _pair_sample(
    row: PairRow, v: Variant, params: Params, reports: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """Check one measurement's reports and turn them into its figures."""
    expected = row.messages(params)
    end = reports["consumer" if v.consumer is not None else "producer"]
    checker = reports["producer"] if row.key == "pingpong" else end
    if checker["count"] != expected or checker["last_seq"] != expected - 1:
        raise BenchError(
            f"{row.key}/{v.key}: received {checker['count']} messages up to seq "
            f"{checker['last_seq']}, expected {expected} up to {expected - 1}"
        )
    elapsed = (end["t_end_ns"] - first_start_ns(reports)) / 1e9
    sample: dict[str, Any] = {
        "elapsed_s": elapsed,
        "messages": expected,
        "cpu_us_per_msg": cpu_s(reports) / expected * 1e6,
        "cpu_s": cpu_detail(reports),
    }
    if "mean_batch" in end:
        sample["consumer_mean_batch"] = end["mean_batch"]
    if row.key == "pingpong":
        # The echo time includes the warm-up trips; the latency figures do not.
        sample.update({k: checker[k] for k in ("p50_us", "p99_us", "min_us", "max_us", "mean_us")})
    elif row.unit == "MB/s":
        sample["value"] = expected * params.bytes_size / 1e6 / elapsed
    else:
        sample["value"] = expected / elapsed
    return sample


def _speedup(metric: str, mine: float, other: float) -> float:
    """How many times better ``mine`` is: a rate's ratio, a latency's inverse ratio."""
    return other / mine if metric.endswith("_us") else mine / other


def _pair_summary(
    row: PairRow, params: Params, samples: dict[str, list[dict[str, Any]]], missing: Mapping[str, str]
) -> dict[str, Any]:
    """Medians over repeats per variant, and every variant's ratio to mp.Queue (and to the others named)."""
    metrics = ("p50_us", "p99_us") if row.key == "pingpong" else ("value",)
    results: dict[str, dict[str, Any]] = {}
    for v in row.variants(params):
        entry: dict[str, Any] = {"label": v.label, "transport": v.transport}
        if v.transport in missing:
            entry.update(available=False, note=missing[v.transport])
        else:
            s = samples[v.key]
            entry.update({m: median(s, m) for m in metrics})
            # The spread shows when a median hides runs that differ (on a VM, by core placement).
            entry["range"] = {m: [min(x[m] for x in s), max(x[m] for x in s)] for m in metrics}
            entry.update(available=True, cpu_us_per_msg=median(s, "cpu_us_per_msg"), samples=s)
        results[v.key] = entry
    for entry in results.values():
        if entry["available"]:
            entry["ratios"] = {
                f"x {other}": {m: _speedup(m, entry[m], results[other][m]) for m in metrics}
                for other in ("mp.Queue", *row.also_ratio_to)
                if other in results and results[other]["available"]
            }
    return {"letter": row.letter, "title": row.title(params), "unit": row.unit, "variants": results}


def run_pair_row(
    row: PairRow, params: Params, ctx: ForkContext, progress: Progress, missing: Mapping[str, str]
) -> dict[str, Any]:
    """Measure every variant of ``row``, ``params.repeats`` times each."""
    variants = row.variants(params)
    by_key = {v.key: v for v in variants}
    runnable = [v.key for v in variants if v.transport not in missing]
    samples: dict[str, list[dict[str, Any]]] = {k: [] for k in runnable}
    for rep, order in enumerate(rotations(runnable, params.repeats)):
        for key in order:
            v = by_key[key]
            progress.step(f"({row.letter}) {row.key}: {v.label}, run {rep + 1}/{params.repeats}")
            reports = measure(
                _pair_roles(v),
                v.transport if v.consumer else "none",
                params,
                ctx,
                two_way=row.two_way,
                options=v.options,
            )
            samples[key].append(_pair_sample(row, v, params, reports))
    return _pair_summary(row, params, samples, missing)


def pair_steps(row: PairRow, params: Params, missing: Mapping[str, str]) -> int:
    return params.repeats * sum(v.transport not in missing for v in row.variants(params))
