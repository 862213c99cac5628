"""put_many/get_many of small dicts against pickling the list, in instructions: a measurement.

``shmbus bench`` row (b) compares a batch through shmbus with the same list
sent as one pickled message through ``multiprocessing.Pipe``. Between two
processes on a loaded machine its figures swing too much to show a change of
a few tens of nanoseconds a message; instruction counts under callgrind do not
depend on the load. This script runs, in one process, what each transport's
two ends do besides the system calls, on the bench's small dict:

- ``shmbus``: ``Queue.put_many(list)``, then ``Queue.get_many(256)``;
- ``pickle``: ``pickle.dumps(list)``, then ``pickle.loads``;
- ``pipe``: what ``Connection.send``/``recv`` call around the write and read:
  ``ForkingPickler.dumps`` (a ``BytesIO`` and a pickler object) and ``loads``.

Each end is called through a builtin of its own (``sorted`` for the producer,
``min`` for the consumer), so that callgrind's inclusive cost of
``builtin_sorted`` and of ``min_max`` is that end's cost. Two runs of
different lengths, subtracted, take off imports and set-up:

    python benchmarks/callgrind_batch.py shmbus          # runs valgrind twice, prints per message
    python benchmarks/callgrind_batch.py pickle pipe shmbus --rounds 40 200
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
import subprocess
import sys
import tempfile
import time
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from typing import Any

# Run from a checkout without installing: the package is one directory up.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

BATCH = 256
_ONE = [0]  # what the trampolines iterate over: one call of each end


def _batch() -> list[dict[str, Any]]:
    now = time.time()
    return [{"seq": i, "ts": now + i, "name": "sensor-17", "value": 3.14} for i in range(BATCH)]


def run(kind: str, rounds: int) -> None:
    """``rounds`` batches through ``kind``, each end called through its builtin."""
    msgs = _batch()
    if kind == "shmbus":
        import shmbus

        q = shmbus.Queue(capacity="4MiB")
        put_many, get_many = q.put_many, q.get_many

        def produce(_: int) -> int:
            put_many(msgs)
            return 0

        def consume(_: int) -> int:
            got = get_many(BATCH)
            assert len(got) == BATCH
            return 0

        try:
            for _ in range(rounds):
                sorted(_ONE, key=produce)
                min(_ONE, key=consume)
        finally:
            q.close()
        return
    dumps = ForkingPickler.dumps if kind == "pipe" else pickle.dumps
    loads = ForkingPickler.loads if kind == "pipe" else pickle.loads
    box: list[Any] = [b""]

    def produce_p(_: int) -> int:
        box[0] = dumps(msgs)  # (ForkingPickler's: a memoryview of its BytesIO, as send writes it)
        return 0

    def consume_p(_: int) -> int:
        data = box[0]
        got = loads(data)
        assert len(got) == BATCH
        return 0

    for _ in range(rounds):
        sorted(_ONE, key=produce_p)
        min(_ONE, key=consume_p)


def _inclusive(out: Path) -> dict[str, int]:
    """Inclusive Ir of the two trampolines (and the total) from a callgrind output file."""
    text = subprocess.run(
        ["callgrind_annotate", "--inclusive=yes", "--threshold=100", str(out)],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    costs = {}
    for name, key in (("builtin_sorted", "produce"), ("min_max", "consume")):
        m = re.search(r"^\s*([\d,]+)\s*\([^)]*\)\s+\S*:" + name + r"\b", text, re.M)
        costs[key] = int(m.group(1).replace(",", "")) if m else 0
    return costs


def measure(kind: str, rounds: tuple[int, int]) -> dict[str, float]:
    """Per-message instructions of each end: the difference of two runs of different lengths."""
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in rounds:
            out = Path(tmp) / f"cg.{kind}.{r}"
            subprocess.run(
                ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable,
                 __file__, "--inner", kind, str(r)],
                check=True, capture_output=True, env={**os.environ, "PYTHONHASHSEED": "0"},
            )  # fmt: skip
            runs.append(_inclusive(out))
    n = (rounds[1] - rounds[0]) * BATCH
    return {k: (runs[1][k] - runs[0][k]) / n for k in runs[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("kinds", nargs="*", default=["pickle", "pipe", "shmbus"])
    ap.add_argument("--rounds", nargs=2, type=int, default=[20, 100], help="the two runs' batches")
    ap.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.inner:
        run(args.kinds[0], int(args.kinds[1]))
        return
    print(f"{'':8} {'producer':>10} {'consumer':>10}   instructions a message, {BATCH} a batch")
    for kind in args.kinds:
        c = measure(kind, tuple(args.rounds))
        print(f"{kind:8} {c['produce']:10.1f} {c['consume']:10.1f}")


if __name__ == "__main__":
    main()
