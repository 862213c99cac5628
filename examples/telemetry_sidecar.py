"""Telemetry through a Topic: an application publishes, sidecars read, nobody waits for anybody.

    python examples/telemetry_sidecar.py            # runs about 4 seconds
    python examples/telemetry_sidecar.py --seconds 10

The application process publishes metrics (a request counter and the
latency of each request it served; here simulated, drawn at random) as fast
as it can, each batch stamped with the time it was published. Sidecar A
aggregates them into per-second statistics and prints a line a second: the
samples per second, the application's request latency (those simulated
figures, not shmbus's), and the time each sample spent between its publish
and this sidecar taking it, which is the bus's, measured (a monotonic clock
shared by the processes; it includes the sidecar's own time per batch).
Sidecar B starts a second later with ``start="earliest"``, so it first
catches up on what is still in the ring: its samples waited that long.
A sidecar that falls behind loses the oldest messages (``sub.lost``); the
application never slows down for it.

Ctrl-C stops it with one line and exit status 130, children included. The
terminal sends SIGINT to every process of the group; here SIGINT and SIGTERM
are blocked in every process and looked for between two bus calls, never in
the middle of one (an exception that cuts a bus call short leaves its lock
to be repaired, with a warning, by the next process). The main process sees
Ctrl-C, asks each child to stop with SIGTERM, and removes the topic.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import multiprocessing.connection
import os
import random
import signal
import sys
import time
from collections.abc import Sequence

import shmbus

END = "end"
SLICE = 0.1  # seconds a wait lasts before looking for a stop request


def stop_requested() -> bool:
    """True once SIGTERM arrived (a child's stop request; it stays blocked, so it interrupts nothing)."""
    return signal.SIGTERM in signal.sigpending()


def check_interrupt() -> None:
    """Raise KeyboardInterrupt here, at a point between bus calls, once Ctrl-C arrived."""
    if signal.SIGINT in signal.sigpending():
        signal.sigwait({signal.SIGINT})
        raise KeyboardInterrupt


def wait_for(procs: Sequence[mp.process.BaseProcess], seconds: float | None = None) -> None:
    """Wait until every process exited (or ``seconds`` passed), looking for Ctrl-C meanwhile."""
    end = math.inf if seconds is None else time.monotonic() + seconds
    while any(p.is_alive() for p in procs) and time.monotonic() < end:
        multiprocessing.connection.wait([p.sentinel for p in procs], timeout=SLICE)
        check_interrupt()


def stop(p: mp.process.BaseProcess) -> None:
    """Ask a child that still runs to stop (it returns at its next look), and reap it."""
    if p.is_alive():
        p.terminate()  # SIGTERM: blocked in the child, which looks for it between bus calls
        p.join(10)
        if p.is_alive():  # (stuck outside Python: a last resort, its locks then need repair)
            p.kill()
    p.join()


def application(path: str, seconds: float) -> None:
    with shmbus.Topic.open(path) as topic:
        requests = 0
        until = time.monotonic() + seconds
        while time.monotonic() < until and not stop_requested():
            batch = []
            for _ in range(64):
                requests += 1
                batch.append({"requests": requests, "latency_ms": random.lognormvariate(0, 0.5)})
            sent = time.monotonic()  # CLOCK_MONOTONIC: one clock for every process of the machine
            for m in batch:
                m["sent"] = sent
            topic.publish_many(batch)
        topic.publish(END)


def sidecar(path: str, name: str, start: str, ready: mp.synchronize.Event) -> None:
    with shmbus.Topic.open(path) as topic, topic.subscribe(start=start) as sub:  # type: ignore[arg-type]
        ready.set()
        window_start, latencies, delays = time.monotonic(), [], []
        while not stop_requested():
            try:
                msgs = sub.get_many(4096, timeout=SLICE)
            except shmbus.Empty:
                continue
            now = time.monotonic()
            done = END in msgs
            samples = [m for m in msgs if m != END]
            latencies += [m["latency_ms"] for m in samples]
            delays += [(now - m["sent"]) * 1e3 for m in samples]
            if now - window_start >= 1.0 or done:
                _report(name, latencies, delays, now - window_start, sub)
                window_start, latencies, delays = now, [], []
            if done:
                print(f"[{name}] done: received {sub.received}, lost {sub.lost} to overwriting", flush=True)
                return


def _p50_p99(values: list[float]) -> str:
    values.sort()
    return f"p50 {values[len(values) // 2]:.2f} p99 {values[int(len(values) * 0.99)]:.2f} ms"


def _report(
    name: str, latencies: list[float], delays: list[float], elapsed: float, sub: shmbus.Subscription
) -> None:
    if not latencies:
        return
    print(f"[{name}] {len(latencies) / elapsed:,.0f} samples/s | app latency (simulated) "
          f"{_p50_p99(latencies)} | publish to receipt {_p50_p99(delays)} | lost so far {sub.lost}",
          flush=True)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="how long the application publishes")
    args = ap.parse_args()
    # Blocked before the children fork: they inherit the mask, so no signal reaches them early.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    ctx = mp.get_context("fork")
    topic = shmbus.Topic.create(f"telemetry-{os.getpid()}", capacity="4MiB")
    ready_a, ready_b = ctx.Event(), ctx.Event()
    a = ctx.Process(target=sidecar, args=(topic.path, "sidecar A", "latest", ready_a))
    b = ctx.Process(target=sidecar, args=(topic.path, "sidecar B (late, earliest)", "earliest", ready_b))
    app = ctx.Process(target=application, args=(topic.path, args.seconds))
    procs = [a, app, b]
    try:
        a.start()
        while not ready_a.wait(SLICE) and a.is_alive():
            check_interrupt()
        app.start()
        # B joins late on purpose: it catches up from the oldest message still in the ring.
        wait_for([app], 1.0)
        b.start()
        wait_for(procs)
    except KeyboardInterrupt:
        print("interrupted: sidecars and application stopped", file=sys.stderr)
        sys.exit(130)
    finally:
        for p in procs:
            stop(p)
        topic.close()
        topic.unlink()


if __name__ == "__main__":
    main()
