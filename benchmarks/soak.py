"""Crash soak: SIGKILL random shmbus workers at random instants, thousands of times.

Usage::

    python benchmarks/soak.py --kills 2000 [--topic-kills 500] [--round-kills 100] [--seed N]

The scenario is the random killer of ``tests/test_crash.py`` (the engines
``queue_killer_round`` and ``topic_killer_round`` live there, so the suite and
the soak check exactly the same rules), run in rounds of ``--round-kills``
kills on a fresh bus each, so that the id logs of one round stay small.

Queue rounds: 2 producers and 2 consumers. Each producer logs every id after
its put returned, each consumer every id right after its get returned. The
killer SIGKILLs one of them at a random instant and starts a replacement. At
the end of a round everyone stops, the queue is drained, and every id is
accounted for: none delivered twice, none torn (CRC), none lost except the
ids in flight in killed consumers (at most consumer kills x batch size).

Topic rounds: 2 publishers and 3 subscribers. Every surviving subscriber must
have received + lost == published since it subscribed, in increasing seq
order, intact, and all of them agree on the message at each seq.

Printed at the end: kills survived, messages checked, the longest recovery
(from a kill of a lock holder to the next operation under that lock, by
whichever process waited for it), the longest operation that had no reason to
wait, duplicates and lost-in-flight. The exit status is 1 if any rule broke.

Signals and pauses (the engines of ``tests/test_signals.py``, with its rules)::

    python benchmarks/soak.py --kills 0 --term-rounds 4000 --int-count 8000 --pause-rounds 600

``--term-rounds``: SIGTERM storms (workers with a ``sys.exit`` handler,
restarted after each SIGTERM), spread over C / pure Python, producer /
consumer, alone / competing, ``--storm-batch`` rounds per fresh bus.
``--int-count``: SIGINT storms (workers that catch KeyboardInterrupt and
go on), spread likewise. ``--pause-rounds``: a lock holder SIGSTOPped at its
after-lock step while another participant is SIGKILLed and recovery runs,
for a Queue producer, a Queue consumer and a Topic publisher. ``--modes``
picks the modes. Each batch must end unwedged, ``shmbus check`` clean, with
no duplicate and no torn message; consumers' losses (the window after
``get`` removed a message and before the caller had it) are printed apart.
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from test_crash import (  # noqa: E402
    LOADED_BOUND,
    KillerRound,
    queue_killer_round,
    topic_killer_round,
)
from test_signals import check_exit, in_mode, paused_verdict, storm_verdict  # noqa: E402

import shmbus  # noqa: E402


def _rounds(
    kind: str, total: int, per_round: int, seed: int, workroot: Path, verbose: bool, stop_on_failure: bool
) -> list[KillerRound]:
    """Rounds of ``per_round`` kills, each on a fresh bus, until ``total`` kills."""
    results: list[KillerRound] = []
    done = 0
    n = 0
    while done < total:
        kills = min(per_round, total - done)
        name = f"shmbus-soak-{os.getpid()}-{kind}-{n}"
        workdir = workroot / f"{kind}{n}"
        workdir.mkdir()
        if kind == "queue":
            bus: shmbus.Queue | shmbus.Topic = shmbus.Queue.create(name, capacity="256KiB")
        else:
            bus = shmbus.Topic.create(name, capacity="256KiB", max_subscribers=8)
        try:
            runner = queue_killer_round if kind == "queue" else topic_killer_round
            res = runner(bus.path, workdir, kills, seed=seed + n)
        finally:
            bus.close()
            shmbus.unlink(name)
        results.append(res)
        done += res.kills
        n += 1
        if verbose or res.problems:
            print(
                f"  {kind} round {n}: {res.kills} kills {res.kills_by_role}, lock holders {res.lock_kills}, "
                f"{res.checked} checked, {res.lost_in_flight} lost in flight, longest recovery "
                f"{res.longest_recovery:.3f} s, longest op {res.longest_op:.3f} s, {res.seconds:.1f} s",
                flush=True,
            )
        for p in res.problems:
            print(f"    PROBLEM: {p[:1500]}", flush=True)
        for note in res.notes:
            print(f"    slow: {note[:1500]}", flush=True)
        if (res.problems and stop_on_failure) or res.kills == 0:
            break
    return results


def _report(kind: str, results: list[KillerRound]) -> bool:
    kills = sum(r.kills for r in results)
    by_role: dict[str, int] = {}
    locks: dict[str, int] = {}
    for r in results:
        for k, v in r.kills_by_role.items():
            by_role[k] = by_role.get(k, 0) + v
        for k, v in r.lock_kills.items():
            locks[k] = locks.get(k, 0) + v
    recoveries = sorted(x for r in results for x in r.recoveries)
    problems = [p for r in results for p in r.problems]
    longest_recovery = recoveries[-1] if recoveries else 0.0
    longest_op = max((r.longest_op for r in results), default=0.0)
    median = recoveries[len(recoveries) // 2] if recoveries else 0.0
    print(f"{kind}:")
    print(
        f"  kills survived        {kills} {by_role} in {len(results)} rounds, "
        f"{sum(r.seconds for r in results):.0f} s"
    )
    print(f"  kills of lock holders {sum(locks.values())} {locks}")
    print(
        f"  messages checked      {sum(r.checked for r in results)} "
        f"({sum(r.returned for r in results)} puts/publishes returned)"
    )
    print(
        f"  longest recovery      {longest_recovery:.3f} s (median {median:.3f} s over "
        f"{len(recoveries)} lock-holder kills; kill -> next operation under that lock)"
    )
    print(
        f"  longest wait          {longest_op:.3f} s (of "
        f"{sum(r.measured_ops for r in results)} operations that had no reason to wait)"
    )
    print(f"  duplicates            {sum(r.duplicates for r in results)}")
    print(f"  torn                  {sum(r.torn for r in results)}")
    print(f"  lost in flight        {sum(r.lost_in_flight for r in results)} (in killed consumers)")
    broken = sum(1 for r in results if r.problems)
    print(f"  rounds with problems  {broken} of {len(results)} ({len(problems)} problems)")
    slow = longest_recovery >= LOADED_BOUND or longest_op >= LOADED_BOUND
    if slow:
        print(f"  SLOW: over the {LOADED_BOUND} s bound")
    return not problems and not slow


def _signal_batches(
    sig: str, total: int, batch: int, modes: list[str], seed: int, workroot: Path, verbose: bool
) -> bool:
    """``total`` SIGTERM rounds or SIGINT interrupts, in batches on fresh buses, over every case."""
    cases = [(m, t, c) for m in modes for t in ("producer", "consumer") for c in (False, True)]
    per_case = -(-total // len(cases))
    ok = True
    for mode, target, competing in cases:
        sums = {"rounds": 0, "lost": 0, "duplicates": 0, "torn": 0, "ignored": 0, "returned": 0}
        broken: list[str] = []
        t0 = time.monotonic()
        for n in itertools.count():
            done = sums["rounds"]
            if done >= per_case:
                break
            count = min(batch, per_case - done)
            name = f"shmbus-soak-{os.getpid()}-{sig.lower()}-{mode}-{target}-{int(competing)}-{n}"
            workdir = workroot / name
            workdir.mkdir()
            path = shmbus.Queue.create(name, capacity="16KiB").path
            try:
                res = in_mode(
                    mode, "storm", timeout=count * 2.5 + 120, path=path, workdir=str(workdir), sig=sig,
                    target=target, competing=competing, count=count, seed=seed + n, budget=count * 2.0 + 60,
                )  # fmt: skip
                verdict = storm_verdict(res, sig, target, count, check_exit(path))
            except AssertionError as e:  # the driver hung or died: the batch says so, the soak goes on
                broken.append(str(e)[:2000])
                break
            finally:
                shmbus.unlink(path)
            for k in sums:
                sums[k] += res[k]
            broken += verdict
            if verbose or verdict:
                print(f"    {sig} {mode} {target} competing={competing} batch {n}: {res['rounds']} rounds, "
                      f"lost {res['lost']}, problems {verdict}", flush=True)  # fmt: skip
            if res["rounds"] == 0:
                break
        what = "SIGTERM rounds" if sig == "TERM" else "SIGINT interrupts"
        print(
            f"  {mode:6} {target:8} {'competing' if competing else 'alone':9}: {sums['rounds']} {what}, "
            f"{sums['returned']} puts returned, {sums['duplicates']} duplicates, {sums['torn']} torn, "
            f"{sums['ignored']} ignored, {sums['lost']} lost in consumers' window, "
            f"{len(broken)} problems, {time.monotonic() - t0:.0f} s",
            flush=True,
        )
        for p in broken[:5]:
            print(f"    PROBLEM: {p[:1500]}", flush=True)
        ok &= not broken
    return ok


def _pause_batches(total: int, batch: int, modes: list[str], seed: int, verbose: bool) -> bool:
    """``total`` paused-holder rounds over the three kinds and the modes, ``batch`` per fresh bus."""
    cases = [(m, k) for m in modes for k in ("producer", "consumer", "publisher")]
    per_case = -(-total // len(cases))
    ok = True
    for mode, kind in cases:
        rounds, broken, t0 = 0, [], time.monotonic()
        for n in itertools.count():
            if rounds >= per_case:
                break
            count = min(batch, per_case - rounds)
            name = f"shmbus-soak-{os.getpid()}-pause-{mode}-{kind}-{n}"
            if kind == "publisher":
                path = shmbus.Topic.create(name, capacity="64KiB", max_subscribers=8).path
            else:
                # a consumer's rounds take two messages each from what the first child puts
                path = shmbus.Queue.create(name, capacity="256KiB").path
            try:
                res = in_mode(mode, "paused", timeout=count * 10 + 120, path=path, kind=kind, rounds=count,
                              seed=seed + n)  # fmt: skip
                verdict = paused_verdict(res, count, check_exit(path))
            except AssertionError as e:
                broken.append(str(e)[:2000])
                break
            finally:
                shmbus.unlink(path)
            rounds += res["rounds"]
            broken += verdict
            if verbose or verdict:
                print(
                    f"    pause {mode} {kind} batch {n}: {res['rounds']} rounds, problems {verdict}",
                    flush=True,
                )
            if res["rounds"] == 0:
                break
        print(f"  {mode:6} {kind:9}: {rounds} paused rounds, {len(broken)} problems, "
              f"{time.monotonic() - t0:.0f} s", flush=True)  # fmt: skip
        for p in broken[:5]:
            print(f"    PROBLEM: {p[:1500]}", flush=True)
        ok &= not broken
    return ok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=2000, help="kills on Queue rounds (default 2000)")
    ap.add_argument("--topic-kills", type=int, default=0, help="kills on Topic rounds (default 0)")
    ap.add_argument(
        "--round-kills", type=int, default=100, help="kills per round, each on a fresh bus (default 100)"
    )
    ap.add_argument("--term-rounds", type=int, default=0, help="SIGTERM storm rounds in all (default 0)")
    ap.add_argument("--int-count", type=int, default=0, help="SIGINT storm interrupts in all (default 0)")
    ap.add_argument("--pause-rounds", type=int, default=0, help="paused-holder rounds in all (default 0)")
    ap.add_argument(
        "--storm-batch",
        type=int,
        default=200,
        help="storm rounds (or pause rounds / 4) per fresh bus (default 200)",
    )
    ap.add_argument("--modes", default="c,python", help="c, python or both (default c,python)")
    ap.add_argument("--seed", type=int, default=None, help="random seed (default: random, printed)")
    ap.add_argument("-v", "--verbose", action="store_true", help="a line per round")
    ap.add_argument(
        "--stop-on-failure", action="store_true", help="stop at the first round that breaks a rule"
    )
    args = ap.parse_args(argv)
    seed = random.randrange(1 << 30) if args.seed is None else args.seed
    print(f"shmbus crash soak: seed {seed}, recovery interval {shmbus._sync.SLICE} s", flush=True)
    ok = True
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="shmbus-soak-") as tmp:
        if args.kills:
            ok &= _report(
                "queue",
                _rounds(
                    "queue", args.kills, args.round_kills, seed, Path(tmp), args.verbose, args.stop_on_failure
                ),
            )
        if args.topic_kills:
            results = _rounds(
                "topic",
                args.topic_kills,
                args.round_kills,
                seed + 1_000_000,
                Path(tmp),
                args.verbose,
                args.stop_on_failure,
            )
            ok &= _report("topic", results)
        modes = [m for m in args.modes.split(",") if m != "c" or shmbus._accel.ENABLED]
        if args.term_rounds:
            print("SIGTERM storms (handler sys.exit(0), worker restarted after each):", flush=True)
            ok &= _signal_batches(
                "TERM", args.term_rounds, args.storm_batch, modes, seed, Path(tmp), args.verbose
            )
        if args.int_count:
            print("SIGINT storms (KeyboardInterrupt caught, worker goes on):", flush=True)
            ok &= _signal_batches(
                "INT", args.int_count, args.storm_batch, modes, seed, Path(tmp), args.verbose
            )
        if args.pause_rounds:
            print("Paused lock holders (SIGSTOP at after-lock, another participant SIGKILLed):", flush=True)
            ok &= _pause_batches(args.pause_rounds, max(args.storm_batch // 4, 1), modes, seed, args.verbose)
    print(f"{'OK' if ok else 'FAILED'} in {time.monotonic() - t0:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
