"""Telemetry through a Topic: an application publishes, sidecars read, nobody waits for anybody.

    python examples/telemetry_sidecar.py            # runs about 4 seconds
    python examples/telemetry_sidecar.py --seconds 10

The application process publishes metrics (a request counter and latency
samples) as fast as it can. Sidecar A aggregates them into per-second
statistics and prints a line a second. Sidecar B starts a second later with
``start="earliest"``, so it first catches up on what is still in the ring.
A sidecar that falls behind loses the oldest messages (``sub.lost``); the
application never slows down for it.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import time

import shmbus

END = "end"


def application(path: str, seconds: float) -> None:
    with shmbus.Topic.open(path) as topic:
        requests = 0
        stop = time.monotonic() + seconds
        while time.monotonic() < stop:
            batch = []
            for _ in range(64):
                requests += 1
                batch.append({"requests": requests, "latency_ms": random.lognormvariate(0, 0.5)})
            topic.publish_many(batch)
        topic.publish(END)


def sidecar(path: str, name: str, start: str, ready: mp.synchronize.Event) -> None:
    with shmbus.Topic.open(path) as topic, topic.subscribe(start=start) as sub:  # type: ignore[arg-type]
        ready.set()
        window_start, latencies = time.monotonic(), []
        while True:
            msgs = sub.get_many(4096)
            done = END in msgs
            latencies += [m["latency_ms"] for m in msgs if m != END]
            now = time.monotonic()
            if now - window_start >= 1.0 or done:
                _report(name, latencies, now - window_start, sub)
                window_start, latencies = now, []
            if done:
                print(f"[{name}] done: received {sub.received}, lost {sub.lost} to overwriting")
                return


def _report(name: str, latencies: list[float], elapsed: float, sub: shmbus.Subscription) -> None:
    if not latencies:
        return
    latencies.sort()
    p50 = latencies[len(latencies) // 2]
    p99 = latencies[int(len(latencies) * 0.99)]
    print(f"[{name}] {len(latencies) / elapsed:10,.0f} samples/s  p50 {p50:5.2f} ms  "
          f"p99 {p99:5.2f} ms  lost so far {sub.lost}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="how long the application publishes")
    args = ap.parse_args()
    ctx = mp.get_context("fork")
    topic = shmbus.Topic.create(f"telemetry-{os.getpid()}", capacity="4MiB")
    ready_a, ready_b = ctx.Event(), ctx.Event()
    a = ctx.Process(target=sidecar, args=(topic.path, "sidecar A", "latest", ready_a))
    b = ctx.Process(target=sidecar, args=(topic.path, "sidecar B (late, earliest)", "earliest", ready_b))
    app = ctx.Process(target=application, args=(topic.path, args.seconds))
    procs = [a, app, b]
    try:
        a.start()
        ready_a.wait(10)
        app.start()
        # B joins late on purpose: it catches up from the oldest message still in the ring.
        app.join(1.0)
        b.start()
        for p in procs:
            p.join()
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        topic.close()
        topic.unlink()


if __name__ == "__main__":
    main()
