"""A three-stage pipeline: source -> N worker processes -> sink, through two shmbus queues.

Run it with ``python examples/pipeline.py`` (``--help`` for options). The
source puts jobs in batches, the workers square numbers and pass results on,
the sink checks that every job came back exactly once and prints messages/s.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import time

import shmbus

STOP = None  # one per worker: the end-of-stream marker


def worker(jobs_path: str, results_path: str) -> None:
    # Re-open by path: a process needs only the names to join the bus.
    with shmbus.Queue.open(jobs_path) as jobs, shmbus.Queue.open(results_path) as results:
        while True:
            batch = jobs.get_many(256)
            out = [{"id": j["id"], "square": j["x"] * j["x"]} for j in batch if j is not STOP]
            if out:
                results.put_many(out)
            stops = len(batch) - len(out)
            if stops:
                # One STOP is ours; any others belong to other workers: hand them back.
                if stops > 1:
                    jobs.put_many([STOP] * (stops - 1))
                results.put(STOP)
                return


def source(jobs_path: str, n: int, workers: int) -> None:
    with shmbus.Queue.open(jobs_path) as jobs:
        for first in range(0, n, 256):
            jobs.put_many([{"id": i, "x": i} for i in range(first, min(first + 256, n))])
        jobs.put_many([STOP] * workers)


def sink(results: shmbus.Queue, n: int, workers: int) -> int:
    """Drain results until every worker has stopped; return how many distinct jobs came back."""
    seen = bytearray(n)
    count = stops = 0
    while stops < workers:
        for r in results.get_many(1024):
            if r is STOP:
                stops += 1
                continue
            assert r["square"] == r["id"] * r["id"] and not seen[r["id"]], r
            seen[r["id"]] = 1
            count += 1
    return count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=200_000, help="messages to send (default 200000)")
    ap.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    args = ap.parse_args()

    tag = f"pipeline-{os.getpid()}"
    jobs = shmbus.Queue.create(f"{tag}-jobs", capacity="16MiB")
    results = shmbus.Queue.create(f"{tag}-results", capacity="16MiB")
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=source, args=(jobs.path, args.jobs, args.workers))]
    procs += [ctx.Process(target=worker, args=(jobs.path, results.path)) for _ in range(args.workers)]
    try:
        start = time.perf_counter()
        for p in procs:
            p.start()
        seen = sink(results, args.jobs, args.workers)
        elapsed = time.perf_counter() - start
        for p in procs:
            p.join()
        assert seen == args.jobs, f"lost messages: {args.jobs - seen}"
        rate = 2 * args.jobs / elapsed  # every job crosses two queues
        print(f"{args.jobs} jobs: source -> {args.workers} workers -> sink in {elapsed:.2f} s, "
              f"{rate:,.0f} messages/s over both queues, every job back exactly once")  # fmt: skip
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join()
        for q in (jobs, results):
            q.close()
            q.unlink()


if __name__ == "__main__":
    main()
