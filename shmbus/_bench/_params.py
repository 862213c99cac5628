"""What a run measures: its constants, its workload (``Params``) and its rows.

Every count, size and repeat of a run is here, recorded whole in the JSON
output, so two runs can be compared knowing what each did.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "MIB",
    "GIB",
    "MEASUREMENT_TIMEOUT_S",
    "BARRIER_TIMEOUT_S",
    "PAYLOAD_POOL",
    "OPTIONAL",
    "BenchError",
    "Params",
    "params_for",
    "ROW_LETTERS",
    "size_text",
    "QUICK_SWEEP_SIZES",
    "quick_caveat",
]

MIB = 1 << 20
GIB = 1 << 30
# A child that has not reported after this long is stuck: fail instead of hanging.
MEASUREMENT_TIMEOUT_S = 300.0
BARRIER_TIMEOUT_S = 60.0
# Distinct payloads the producer cycles through: building a fresh one per
# message would time a memcpy in the producer instead of the channel.
PAYLOAD_POOL = 16
# The optional comparisons: import name of each, and the distribution to report.
OPTIONAL = {"faster-fifo": ("faster_fifo", "faster-fifo"), "pyzmq": ("zmq", "pyzmq")}


# (e) in a quick run: every other power of 4 from 16 B, and 4 MiB, which a target names.
QUICK_SWEEP_SIZES = (16, 256, 4096, 65536, MIB, 4 * MIB, 16 * MIB)


class BenchError(Exception):
    """A measurement failed: a child crashed, hung, or did not receive every message."""


@dataclass(frozen=True)
class Params:
    """The exact workload of a run (recorded in the JSON output)."""

    quick: bool
    small_messages: int
    batch_size: int
    bytes_messages: int
    bytes_size: int
    bytes_warmup: int
    pingpong_round_trips: int
    pingpong_warmup: int
    repeats: int
    capacity: str
    small_ring: str
    sweep_sizes: tuple[int, ...]
    sweep_volume: int
    sweep_min_messages: int
    sweep_max_messages: int
    sweep_repeats: int
    mpmc_shapes: tuple[tuple[int, int], ...]
    mpmc_messages: int
    mpmc_repeats: int
    topic_messages: int
    topic_subscribers: tuple[int, ...]
    topic_capacity: str
    bridge_messages: int
    bridge_batch_messages: int
    bridge_repeats: int
    scale_small: int
    scale_large: int
    scale_fallback: int
    memory_bus: int


def params_for(quick: bool) -> Params:
    """The full workload, or ``--quick``'s: the same measurements, each taken once.

    Quick keeps every count of the full run (runs a tenth as long measured
    other figures: see the package's docstring), takes each measurement once
    instead of five (or three) times, and runs fewer sizes and shapes of (e)
    and (f).
    """
    shapes = ((1, 1), (2, 2), (4, 1), (1, 4), (4, 4))
    return Params(
        quick=quick,
        small_messages=200_000,
        batch_size=256,
        bytes_messages=2_000,
        bytes_size=MIB,
        # One lap of the 64 MiB ring, plus one: every page of it has been touched
        # by both processes before the clock starts (see the module docstring).
        bytes_warmup=64 + 1,
        pingpong_round_trips=20_000,
        pingpong_warmup=500,
        repeats=1 if quick else 5,
        capacity="64MiB",
        # Small enough to stay in the 32 MiB L3 of the machine the figures were first taken on.
        small_ring="8MiB",
        sweep_sizes=QUICK_SWEEP_SIZES if quick else tuple(16 << 2 * k for k in range(11)),
        sweep_volume=1024 * MIB,
        sweep_min_messages=64,
        sweep_max_messages=50_000,
        sweep_repeats=1 if quick else 3,
        mpmc_shapes=shapes[::2] if quick else tuple((p, c) for p in (1, 2, 4) for c in (1, 2, 4)),
        mpmc_messages=120_000,
        mpmc_repeats=1 if quick else 3,
        topic_messages=200_000,
        topic_subscribers=(0, 1, 3),
        topic_capacity="1MiB",
        # One per message moves tens of thousands a second, batch framing hundreds of thousands:
        # a few seconds each. Every bridge measurement starts two processes, so fewer repeats.
        bridge_messages=100_000,
        bridge_batch_messages=1_000_000,
        bridge_repeats=1 if quick else 3,
        scale_small=MIB,
        scale_large=4 * GIB,
        scale_fallback=GIB,
        memory_bus=GIB,
    )


def quick_caveat(p: Mapping[str, Any]) -> str | None:
    """What a quick run (its recorded params) cannot reproduce of the full run, or None for a full run."""
    if not p["quick"]:
        return None
    return (
        "quick run: the full run's messages, but each measurement taken once (the full run reports "
        "the median of 5; 3 for (e), (f) and (n)), so a disturbed run shows as it is; (e) measures "
        f"{len(p['sweep_sizes'])} of the full run's 11 sizes, (f) {len(p['mpmc_shapes'])} of its 9 shapes."
    )


# Every row, by key, with its letter(s) for --only.
ROW_LETTERS: dict[str, tuple[str, ...]] = {
    "single": ("a",),
    "batch": ("b",),
    "bytes": ("c", "g"),
    "pingpong": ("d",),
    "sizes": ("e",),
    "mpmc": ("f",),
    "scale": ("h",),
    "topic": ("t",),
    "bridge": ("n",),
}


def size_text(size: int) -> str:
    """``size`` in the largest binary unit that divides it: "64 MiB", "16 KiB", "100 B"."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if size >= 1 << shift and size % (1 << shift) == 0:
            return f"{size >> shift} {unit}"
    return f"{size} B"
