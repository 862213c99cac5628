"""What a run measures: its constants, its workload (``Params``) and its rows.

Every count, size and repeat of a run is here, recorded whole in the JSON
output, so two runs can be compared knowing what each did.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    scale_small: int
    scale_large: int
    scale_fallback: int
    memory_bus: int


def params_for(quick: bool) -> Params:
    """The full workload, or about a tenth of each count for ``--quick``."""
    scale = 10 if quick else 1
    shapes = ((1, 1), (2, 2), (4, 1), (1, 4), (4, 4))
    return Params(
        quick=quick,
        small_messages=200_000 // scale,
        batch_size=256,
        bytes_messages=2_000 // scale,
        bytes_size=MIB,
        # One lap of the 64 MiB ring, plus one: every page of it has been touched
        # by both processes before the clock starts (see the module docstring).
        bytes_warmup=64 + 1,
        pingpong_round_trips=20_000 // scale,
        pingpong_warmup=500 // scale,
        # Fewer repeats keep --quick quick; three still give a median.
        repeats=3 if quick else 5,
        capacity="64MiB",
        # Small enough to stay in the 32 MiB L3 of the machine the figures were first taken on.
        small_ring="8MiB",
        sweep_sizes=tuple(16 << 2 * k for k in range(0, 11, 2 if quick else 1)),
        sweep_volume=(64 if quick else 1024) * MIB,
        sweep_min_messages=8 if quick else 64,
        sweep_max_messages=50_000 // scale,
        sweep_repeats=1 if quick else 3,
        mpmc_shapes=shapes[::2] if quick else tuple((p, c) for p in (1, 2, 4) for c in (1, 2, 4)),
        mpmc_messages=120_000 // scale,
        mpmc_repeats=1 if quick else 3,
        topic_messages=200_000 // scale,
        topic_subscribers=(0, 1, 3),
        topic_capacity="1MiB",
        scale_small=MIB,
        scale_large=4 * GIB,
        scale_fallback=GIB,
        memory_bus=GIB,
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
}


def size_text(size: int) -> str:
    """``size`` in the largest binary unit that divides it: "64 MiB", "16 KiB", "100 B"."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if size >= 1 << shift and size % (1 << shift) == 0:
            return f"{size >> shift} {unit}"
    return f"{size} B"
