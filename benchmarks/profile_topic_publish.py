"""Where a Topic publisher's time goes with subscribers reading: a measurement, not a test.

One publisher process publishes N small dicts one at a time while K
subscriber processes read them with ``get_many(256)`` (default spin). The
publisher times each step of ``publish`` with ``perf_counter_ns`` (the timer's
own cost is measured and taken off): encode, take the head lock, write the
record, release the lock, read the wait flags, post the sleeping subscribers'
semaphores. It counts the flag checks that found a flag set and the posts
made. Every process reports its CPU time (user + sys, ``getrusage``) and its
wall time, so the share of the 2 CPUs each got is visible.

    python benchmarks/profile_topic_publish.py [--messages 20000] [--subscribers 3] [--clock cpu]

It reaches into private members of ``Topic`` on purpose, like breakdown.py.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import sys
import time
import uuid
from typing import Any

import shmbus
from shmbus import Topic
from shmbus._format import WAIT_FLAGS

# wall: cheap (about 60 ns a read) but counts the time the publisher is preempted;
# cpu: this thread's CPU time only, but a read costs a system call (about 600 ns).
CLOCKS = {"wall": time.perf_counter_ns, "cpu": time.thread_time_ns}
STEPS = ("encode", "lock", "write", "unlock", "flag check", "posts")


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _timer_cost(clock: str) -> float:
    pc = CLOCKS[clock]
    t0 = pc()
    for _ in range(100_000):
        pc()
    return (pc() - t0) / 100_000


def publisher(path: str, n: int, clock: str, go: Any, conn: Any) -> None:
    t = Topic.open(path)
    pc, wall = CLOCKS[clock], time.perf_counter_ns
    encode, lock, write = t._encode, t._head_lock, t._write
    mm, end, none = t._mm, t._flags_end, t._no_flags
    assert mm is not None
    posts = [0]
    real = [w.release for w in t._wakers]
    for i, w in enumerate(t._wakers):  # count posts (Sem has __slots__: wrap the instances' list)
        def counting(rel: Any = real[i]) -> None:
            posts[0] += 1
            rel()
        t._wakers[i] = type("CountingSem", (), {"release": staticmethod(counting), "value": property(
            lambda self, w=w: w.value)})()
    sums = dict.fromkeys(STEPS, 0)
    flagged = 0
    go.wait()
    cpu0, w0 = _cpu_s(), wall()
    for i in range(n):
        a = pc()
        batch = [encode({"seq": i, "ts": 0.0, "name": "sensor-17", "value": 3.14})]
        b = pc()
        lock.acquire(None)
        c = pc()
        write(batch)
        d = pc()
        lock.release()
        e = pc()
        waiting = mm[WAIT_FLAGS:end] != none
        f = pc()
        if waiting:
            flagged += 1
            t._wake_waiters()
        g = pc()
        sums["encode"] += b - a
        sums["lock"] += c - b
        sums["write"] += d - c
        sums["unlock"] += e - d
        sums["flag check"] += f - e
        sums["posts"] += g - f
    elapsed, cpu = (wall() - w0) / 1e9, _cpu_s() - cpu0
    t.close()
    conn.send({"sums_ns": sums, "flagged": flagged, "posts": posts[0], "cpu_s": cpu, "wall_s": elapsed})


def subscriber(path: str, n: int, spin_us: float, ready: Any, conn: Any) -> None:
    t = Topic.open(path)
    sub = t.subscribe(spin=spin_us)
    ready.set()
    cpu0, w0 = _cpu_s(), time.perf_counter()
    last = -1
    while last != n - 1:
        last = sub.get_many(256)[-1]["seq"]
    out = {"cpu_s": _cpu_s() - cpu0, "wall_s": time.perf_counter() - w0, "received": sub.received,
           "lost": sub.lost}
    t.close()
    conn.send(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--messages", type=int, default=20_000)
    p.add_argument("--subscribers", type=int, default=3)
    p.add_argument("--spin-us", type=float, default=50.0)
    p.add_argument("--capacity", default="1MiB")
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall", help="what each step's time is")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    ctx = mp.get_context("fork")
    path = f"profile-topic-{uuid.uuid4().hex[:8]}"
    t = Topic.create(path, capacity=a.capacity)
    try:
        go = ctx.Event()
        pipes, procs, readies = [], [], []
        for _ in range(a.subscribers):
            rx, tx = ctx.Pipe(duplex=False)
            ready = ctx.Event()
            procs.append(ctx.Process(target=subscriber, args=(t.path, a.messages, a.spin_us, ready, tx)))
            pipes.append(rx)
            readies.append(ready)
        prx, ptx = ctx.Pipe(duplex=False)
        procs.append(ctx.Process(target=publisher, args=(t.path, a.messages, a.clock, go, ptx)))
        for pr in procs:
            pr.start()
        for r in readies:
            r.wait(60)
        go.set()
        pub = prx.recv()
        subs = [rx.recv() for rx in pipes]
        for pr in procs:
            pr.join(60)
    finally:
        t.close()
        shmbus.unlink(path)
    report(a, pub, subs, _timer_cost(a.clock))
    return 0


def report(a: argparse.Namespace, pub: dict[str, Any], subs: list[dict[str, Any]], timer: float) -> None:
    n = a.messages
    print(f"publisher: {n} small dicts, {a.subscribers} subscribers (spin {a.spin_us:g} us), "
          f"timer cost {timer:.0f} ns taken off each step")
    total = 0.0
    for step in STEPS:
        per = max(pub["sums_ns"][step] / n - timer, 0.0)
        total += per
        print(f"  {step:<11} {per / 1000:7.3f} us/msg ({a.clock} time, in the publisher)")
    print(f"  {'sum':<11} {total / 1000:7.3f} us/msg")
    flagged, posts = pub["flagged"] / n, pub["posts"] / n
    print(f"  flag set at the check: {flagged:.3f} per message; posts: {posts:.3f} per message")
    rows = [("publisher", pub), *((f"subscriber {i}", s) for i, s in enumerate(subs))]
    cpu_all = sum(r["cpu_s"] for _, r in rows)
    for name, r in rows:
        extra = f", received {r['received']}, lost {r['lost']}" if "lost" in r else ""
        one, share = 100 * r["cpu_s"] / r["wall_s"], 100 * r["cpu_s"] / cpu_all
        print(f"  {name:<12} CPU {r['cpu_s']:.3f} s over {r['wall_s']:.3f} s wall "
              f"({one:.0f}% of one CPU; {share:.0f}% of the run's CPU){extra}")
    print(f"  publisher CPU per message: {pub['cpu_s'] / n * 1e6:.2f} us (getrusage, timers included)")
    if a.json:
        print(json.dumps({"publisher": pub, "subscribers": subs, "timer_ns": timer}))


if __name__ == "__main__":
    sys.exit(main())
