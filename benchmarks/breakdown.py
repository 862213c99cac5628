"""Where a small message's time goes: ``python benchmarks/breakdown.py``.

First with the C fast path (``shmbus/_cfast.c``, when built): the whole
``put`` + ``get``, the codec, the two C calls, and the Python around them.
Then the pure-Python path, step by step, on a handle without the C path:

``shmbus bench`` measures whole transfers between processes; this script
takes one ``Queue.put`` and one ``Queue.get`` of the bench's small dict apart,
in one process (no other process, so no waiting and no wake-ups: the pure
per-message cost), and times each step the fast paths take on their own:
encoding, the producer lock, the ring copy, publishing the items token, and
on the way out the token, the consumer lock, the copy out and decoding. What
the steps do not explain is the interpreter work around them (calls,
attribute loads, checks), shown as "the rest".

It reaches into private members of ``Queue`` on purpose: it is a diagnostic
for the people changing them, and will need updating when they change. Each
figure is the best of several runs of many calls (the usual rule for
micro-benchmarks: anything slower was disturbed), in nanoseconds per call.
"""

from __future__ import annotations

import argparse
import gc
import os
import pickle
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Run from a checkout without installing: the package is one directory up.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import msgpack
import posix_ipc

import shmbus
from shmbus import _accel, _ring
from shmbus._codec import extract
from shmbus._format import Q_HEAD, Q_NEXT_SEQ, RECORD_SIZE

MESSAGE = {"seq": 1, "ts": 1.7e9, "name": "sensor-17", "value": 3.14}


def best_ns(fn: Callable[[], Any], calls: int, runs: int = 5) -> float:
    """Nanoseconds per call of ``fn``: the best of ``runs`` loops of ``calls`` calls."""
    best = float("inf")
    gc.disable()
    try:
        for _ in range(runs):
            t0 = time.perf_counter_ns()
            for _ in range(calls):
                fn()
            best = min(best, (time.perf_counter_ns() - t0) / calls)
    finally:
        gc.enable()
    return best


def loop_overhead_ns(calls: int) -> float:
    """The cost of the timing loop and one call of a function that does nothing."""

    def nothing() -> None:
        pass

    return best_ns(nothing, calls)


def measure(q: shmbus.Queue, calls: int) -> list[tuple[str, float]]:
    """(step, ns per put + get) for MESSAGE on the empty queue ``q``; the first is the whole."""
    base = loop_overhead_ns(calls)

    def ns(fn: Callable[[], Any]) -> float:
        return max(best_ns(fn, calls) - base, 0.0)

    enc = q._encode(MESSAGE)
    kind, packed = enc[0], enc[1]
    head_lock, tail_lock, items = q._head_lock, q._tail_lock, q._items
    put, get, put_locked, take1 = q.put, q.get, q._put_locked, q._take1

    def whole() -> None:
        put(MESSAGE)
        get()

    def fast_paths() -> None:
        # What put and get run once encoded and before decoding, without their wrappers.
        head_lock.try_acquire()
        put_locked(enc, None)  # posts the items token
        head_lock.release()
        items.try_acquire()
        take1()  # takes and releases the consumer lock

    encode = ns(lambda: q._encode(MESSAGE))
    decode = ns(lambda: q._codec.finish(kind, packed))
    head_pair = ns(lambda: (head_lock.try_acquire(), head_lock.release()))
    token_pair = ns(lambda: (items.release(), items.try_acquire()))
    tail_pair = ns(lambda: (tail_lock.acquire(None), tail_lock.release()))
    bodies = ns(fast_paths) - head_pair - token_pair - tail_pair
    total = ns(whole)
    h, ring, cap, mm, ro = q._h64, q._ring, q._cap, q._mm, q._ro
    head, n = h[Q_HEAD], enc[3]
    inside = [
        ("  inside: _ring.place", ns(lambda: _ring.place(head, head, cap, n))),
        ("  inside: _ring.write (header + payload into the ring)",
         ns(lambda: _ring.write(ring, cap, head, head, kind, 5, packed, None))),
        ("  inside: _ring.read (one record header)", ns(lambda: _ring.read(ring, cap, head, head + 128))),
        ("  inside: extract (copy the payload out)",
         ns(lambda: extract(mm, ro + head % cap + RECORD_SIZE, n, kind))),
        ("  inside: _publish (counters, head; no token)",
         ns(lambda: q._publish(h[Q_NEXT_SEQ], 0, h[Q_HEAD], 0))),
    ]  # fmt: skip
    return [
        ("put + get, whole (pure Python)", total),
        ("codec: encode (msgpack.packb, and the record tuple)", encode),
        ("codec: decode (msgpack.unpackb)", decode),
        ("semaphore: producer lock, try_acquire + release", head_pair),
        ("semaphore: items token, post + try_acquire", token_pair),
        ("semaphore: consumer lock, acquire + release", tail_pair),
        ("fast-path bodies: _put_locked + _take1, less semaphores", bodies),
        *inside,
        ("wrappers: put() and get() around them",
         total - encode - decode - head_pair - token_pair - tail_pair - bodies),
    ]  # fmt: skip


def measure_c(q: shmbus.Queue, calls: int) -> list[tuple[str, float]]:
    """(step, ns per put + get) through the C fast path; the first is the whole."""
    base = loop_overhead_ns(calls)

    def ns(fn: Callable[[], Any]) -> float:
        return max(best_ns(fn, calls) - base, 0.0)

    fast, part = q._fast, q._part
    assert fast is not None and part is not None
    me, tokens = part.me, part.tokens_index
    put, get = q.put, q.get
    put_obj, get_obj, held = fast.put_obj, fast.get_obj, _accel.PUT_HELD
    pack, unpack, kw = q._codec._c_parts()
    assert unpack is not None

    def whole() -> None:
        put(MESSAGE)
        get()

    total = ns(whole)

    def c_pair() -> None:
        r = put_obj(me, MESSAGE)
        if r & 3 == held:  # one put in 256 leaves the lock for a time sample
            q._finish_fast_put(r >> 2, [], None)
        get_obj(me, tokens, 0.0)

    c_calls = ns(c_pair)
    data = pack(MESSAGE)
    no_ext = kw["ext_hook"]
    codec = ns(lambda: (pack(MESSAGE), unpack(data, strict_map_key=False, ext_hook=no_ext)))
    return [
        ("put + get, whole (C fast path)", total),
        ("C: FastQueue.put_obj + .get_obj (msgpack calls included)", c_calls),
        ("Python: put() and get() around them", total - c_calls),
        ("for scale: msgpack pack + unpack, called from Python", codec),
    ]


def references(calls: int) -> list[tuple[str, float]]:
    """What some of those steps cost at the bottom, for scale."""
    base = loop_overhead_ns(calls)

    def ns(fn: Callable[[], Any]) -> float:
        return max(best_ns(fn, calls) - base, 0.0)

    raw = posix_ipc.Semaphore(None, posix_ipc.O_CREX, initial_value=1)
    try:
        raw_pair = ns(lambda: (raw.acquire(0), raw.release()))
    finally:
        raw.unlink()
        raw.close()
    return [
        ("build the dict (time.time() and 4 keys), by the caller",
         ns(lambda: {"seq": 1, "ts": time.time(), "name": "sensor-17", "value": 3.14})),
        ("msgpack.packb alone", ns(lambda: msgpack.packb(MESSAGE))),
        ("pickle.dumps + pickle.loads (what mp.Queue pays)", ns(lambda: pickle.loads(pickle.dumps(MESSAGE)))),
        ("posix_ipc sem_trywait + sem_post, bare", raw_pair),
    ]  # fmt: skip


def put_then_get_ns(q: shmbus.Queue, calls: int, runs: int = 5) -> tuple[float, float]:
    """Best ns per ``put`` over ``calls`` puts, and per ``get`` over the ``calls`` gets that follow."""
    best_put = best_get = float("inf")
    put, get = q.put, q.get
    gc.disable()
    try:
        for _ in range(runs):
            t0 = time.perf_counter_ns()
            for _ in range(calls):
                put(MESSAGE)
            t1 = time.perf_counter_ns()
            for _ in range(calls):
                get()
            t2 = time.perf_counter_ns()
            best_put = min(best_put, (t1 - t0) / calls)
            best_get = min(best_get, (t2 - t1) / calls)
    finally:
        gc.enable()
    return best_put, best_get


def _print_steps(steps: list[tuple[str, float]]) -> None:
    whole = steps[0][1]
    print(f"{'step':58} {'ns':>6} {'share':>6}")
    for step, ns in steps:
        print(f"{step:58} {ns:6.0f} {100 * ns / whole:5.0f}%")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=100_000, help="calls per timing loop")
    args = parser.parse_args(argv)
    name = f"shmbus-breakdown-{os.getpid()}"
    q = shmbus.Queue.create(name, capacity="64MiB")
    try:
        q.put(MESSAGE)  # claim the participant slot and fault in the first pages
        q.get()
        c_steps = measure_c(q, args.calls) if q._fast is not None else []
        q._drop_fast_path()
        steps = measure(q, args.calls)
    finally:
        q.close()
        shmbus.unlink(name)
    refs = references(args.calls)
    print(
        f"Python {sys.version.split()[0]}, shmbus {shmbus.__version__}: ns per put + get of one small dict,"
    )
    print(f"in one process (no waiting, no wake-ups); best of 5 loops of {args.calls:,} calls")
    print()
    if not c_steps:
        print("(the C fast path is not built here: pure Python only)\n")
    for table in (c_steps, steps):
        if table:
            _print_steps(table)
            print()
    print(f"{'for scale':58} {'ns':>6}")
    for step, ns in refs:
        print(f"{step:58} {ns:6.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
