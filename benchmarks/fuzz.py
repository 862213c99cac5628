"""Fuzz shmbus with corrupt bus files for a long run: ``python benchmarks/fuzz.py [--cases N] [--seed S]``.

The same cases as ``tests/test_fuzz.py`` (the engine is ``tests/fuzzing.py``),
drawn from ``random`` instead of hypothesis, so a run can go on for 100000
cases and count failures instead of stopping at the first. Each case has
``--case-timeout`` seconds (SIGALRM): a case that hangs is a failure too.
Prints the cases run, the failures with the mutations that caused them (feed
them to ``fuzzing.mutate`` to reproduce), and how the cases ended.
"""

from __future__ import annotations

import argparse
import collections
import logging
import random
import signal
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

ROOT = Path(__file__).resolve().parent.parent
# Run from a checkout without installing: the package and the test engine are one directory up.
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from fuzzing import build_originals, exercise, gen_mutations, mutate  # noqa: E402


class Hang(Exception):
    """A case ran past its time limit."""


def _alarm(signum: int, frame: FrameType | None) -> None:
    raise Hang


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=int, default=100_000, help="cases to run (default 100000)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: a fresh one, printed)")
    p.add_argument("--case-timeout", type=int, default=10, help="seconds before a case counts as hung")
    p.add_argument("--show", type=int, default=10, help="failures to print in full (default 10)")
    p.add_argument("--verbose", action="store_true", help="show shmbus's log (recovery warnings)")
    args = p.parse_args(argv)
    seed = random.randrange(1 << 32) if args.seed is None else args.seed
    rng = random.Random(seed)
    draw = rng.randint
    signal.signal(signal.SIGALRM, _alarm)
    # Damaged buses make shmbus log recovery warnings by the thousand: keep the output to the results.
    logging.getLogger("shmbus").setLevel(logging.DEBUG if args.verbose else logging.CRITICAL)
    ends: collections.Counter[str] = collections.Counter()
    failures = 0
    print(f"seed {seed}, {args.cases} cases", flush=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="shmbus-fuzz-") as tmp:
        originals = build_originals(Path(tmp))
        path = str(Path(tmp) / "case")
        for n in range(1, args.cases + 1):
            o = originals[n % len(originals)]
            mutations = gen_mutations(o, draw)
            signal.alarm(args.case_timeout)
            try:
                out = exercise(o, path, mutate(o.data, mutations))
                problems = out.failures
                ends["sound" if out.sound else "opened" if out.opened else "refused"] += 1
            except Hang:
                problems = [f"hung for more than {args.case_timeout} s"]
            except Exception as e:  # the engine itself must not die on a case
                problems = [f"the case raised {type(e).__name__}: {e}"]
            finally:
                signal.alarm(0)
            if problems:
                failures += 1
                if failures <= args.show:
                    print(f"FAIL case {n} ({o.name}) mutations={mutations!r}: {'; '.join(problems)}")
            if n % 10_000 == 0:
                print(f"  {n} cases, {failures} failures, {time.monotonic() - started:.0f} s", flush=True)
    elapsed = time.monotonic() - started
    print(
        f"{args.cases} cases in {elapsed:.1f} s ({args.cases / elapsed:.0f}/s), {failures} failures; "
        f"ended: {dict(ends)} (sound: check() found nothing; opened: the damage let it open; "
        "refused: open raised an allowed error)"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
