"""A three-stage pipeline: source -> N worker processes -> sink, through two shmbus queues.

Run it with ``python examples/pipeline.py`` (``--help`` for options). The
source puts jobs in batches, the workers square numbers and pass results on,
the sink checks that every job came back exactly once and prints messages/s.

Ctrl-C stops it with one line and exit status 130, children included. The
terminal sends SIGINT to every process of the group; here SIGINT and SIGTERM
are blocked in every process and looked for between two bus calls, never in
the middle of one (an exception that cuts a bus call short leaves its lock
to be repaired, with a warning, by the next process). The main process sees
Ctrl-C, asks each child to stop with SIGTERM, and removes both queues.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import multiprocessing.connection
import os
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

import shmbus

STOP = None  # one per worker: the end-of-stream marker
SLICE = 0.1  # seconds a bus call waits before looking for a stop request


def stop_requested() -> bool:
    """True once SIGTERM arrived (a child's stop request; it stays blocked, so it interrupts nothing)."""
    return signal.SIGTERM in signal.sigpending()


def check_interrupt() -> None:
    """Raise KeyboardInterrupt here, at a point between bus calls, once Ctrl-C arrived."""
    if signal.SIGINT in signal.sigpending():
        signal.sigwait({signal.SIGINT})
        raise KeyboardInterrupt


def get_some(q: shmbus.Queue, n: int) -> list[Any] | None:
    """Up to ``n`` messages, as soon as there are some; None once asked to stop."""
    while not stop_requested():
        try:
            return q.get_many(n, timeout=SLICE)
        except shmbus.Empty:
            pass
    return None


def put_all(q: shmbus.Queue, msgs: list[Any]) -> bool:
    """Put every message, waiting for room as long as needed; False if asked to stop first."""
    while True:
        try:
            q.put_many(msgs, timeout=SLICE)
            return True
        except shmbus.Full as e:
            msgs = msgs[e.sent :]
        if stop_requested():
            return False


def worker(jobs_path: str, results_path: str) -> None:
    # Re-open by path: a process needs only the names to join the bus.
    with shmbus.Queue.open(jobs_path) as jobs, shmbus.Queue.open(results_path) as results:
        while True:
            batch = get_some(jobs, 256)
            if batch is None:
                return
            out = [{"id": j["id"], "square": j["x"] * j["x"]} for j in batch if j is not STOP]
            if out and not put_all(results, out):
                return
            stops = len(batch) - len(out)
            if stops:
                # One STOP is ours; any others belong to other workers: hand them back.
                if stops > 1:
                    put_all(jobs, [STOP] * (stops - 1))
                put_all(results, [STOP])
                return


def source(jobs_path: str, n: int, workers: int) -> None:
    with shmbus.Queue.open(jobs_path) as jobs:
        for first in range(0, n, 256):
            if not put_all(jobs, [{"id": i, "x": i} for i in range(first, min(first + 256, n))]):
                return
        put_all(jobs, [STOP] * workers)


def sink(results: shmbus.Queue, n: int, workers: int, progress: list[int]) -> int:
    """Drain results until every worker has stopped; return how many distinct jobs came back.

    ``progress[0]`` counts them as they come, and a line a second says how far it is.
    """
    seen = bytearray(n)
    count = stops = 0
    report = time.monotonic()
    while stops < workers:
        check_interrupt()
        if time.monotonic() >= report:
            print(f"{count} of {n} jobs back", flush=True)
            report += 1.0
        try:
            batch = results.get_many(1024, timeout=SLICE)
        except shmbus.Empty:
            continue
        for r in batch:
            if r is STOP:
                stops += 1
                continue
            assert r["square"] == r["id"] * r["id"] and not seen[r["id"]], r
            seen[r["id"]] = 1
            count += 1
        progress[0] = count
    return count


def wait_for(procs: Sequence[mp.process.BaseProcess]) -> None:
    """Wait until every process exited, looking for Ctrl-C meanwhile."""
    while any(p.is_alive() for p in procs):
        multiprocessing.connection.wait([p.sentinel for p in procs], timeout=SLICE)
        check_interrupt()
    for p in procs:
        p.join()


def stop(p: mp.process.BaseProcess) -> None:
    """Ask a child that still runs to stop (it returns at its next look), and reap it."""
    if p.is_alive():
        p.terminate()  # SIGTERM: blocked in the child, which looks for it between bus calls
        p.join(10)
        if p.is_alive():  # (stuck outside Python: a last resort, its locks then need repair)
            p.kill()
    p.join()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=200_000, help="messages to send (default 200000)")
    ap.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    args = ap.parse_args()

    # Blocked before the children fork: they inherit the mask, so no signal reaches them early.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    tag = f"pipeline-{os.getpid()}"
    jobs = shmbus.Queue.create(f"{tag}-jobs", capacity="16MiB")
    results = shmbus.Queue.create(f"{tag}-results", capacity="16MiB")
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=source, args=(jobs.path, args.jobs, args.workers))]
    procs += [ctx.Process(target=worker, args=(jobs.path, results.path)) for _ in range(args.workers)]
    progress = [0]
    try:
        start = time.perf_counter()
        for p in procs:
            p.start()
        seen = sink(results, args.jobs, args.workers, progress)
        elapsed = time.perf_counter() - start
        wait_for(procs)
        assert seen == args.jobs, f"lost messages: {args.jobs - seen}"
        rate = 2 * args.jobs / elapsed  # every job crosses two queues
        print(f"{args.jobs} jobs: source -> {args.workers} workers -> sink in {elapsed:.2f} s, "
              f"{rate:,.0f} messages/s over both queues, every job back exactly once")  # fmt: skip
    except KeyboardInterrupt:
        print(f"interrupted: {progress[0]} of {args.jobs} jobs back", file=sys.stderr)
        sys.exit(130)
    finally:
        for p in procs:
            stop(p)
        for q in (jobs, results):
            q.close()
            q.unlink()


if __name__ == "__main__":
    main()
