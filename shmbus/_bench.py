"""The shmbus benchmark: shmbus against ``multiprocessing.Queue`` and ``multiprocessing.Pipe``.

Run it as ``shmbus bench [--quick] [--json PATH|-] [--only NAMES]`` (or
``python benchmarks/run.py``).

Why these three
---------------
shmbus exists to move messages between processes faster than the standard
library does, so a shmbus figure alone says little: every figure is taken for
shmbus *and* for the two stdlib channels a user would otherwise pick, in the
same run, on the same machine, with the same messages and the same process
layout, and shmbus is reported as a ratio to each. Each measurement uses one
freshly forked producer process and one consumer process and a fresh channel;
the parent process only creates the channel, starts the children and collects
their reports.

What is measured
----------------
(a) ``single``: 200 000 small dicts ``{"seq", "ts", "name", "value"}`` sent one
    ``put``/``get`` (``send``/``recv``) at a time: messages/s. This is the
    per-message overhead a typical event stream pays.
(b) ``batch``: the same dicts in batches of 256. shmbus uses
    ``put_many``/``get_many(256)``; ``mp.Queue`` and ``Pipe`` have no batch
    API, so the fair equivalent is sending a list of 256 dicts as one message
    (one pickle, one write): messages (dicts) per second.
(c) ``bytes``: 2 000 messages of 1 MiB of bytes: MB/s (10**6 bytes per
    second). shmbus uses ``put_bytes`` into a 64 MiB ring, ``Pipe`` uses
    ``send_bytes``/``recv_bytes`` (no pickling), ``mp.Queue`` has only
    ``put(bytes)``. This is the copy cost of bulk data. Every channel first
    sends 65 untimed messages (one lap of the ring): a fresh bus's pages are
    allocated by the kernel on first touch, which costs about 10x the copy
    itself, and would otherwise dominate a short run; the figure is the
    steady state of a long-lived bus.
(d) ``pingpong``: two processes bounce one small dict back and forth 20 000
    times (after a short unmeasured warm-up); p50 and p99 of the round trip in
    microseconds. This is the wake-up latency of request/reply traffic. shmbus
    and ``mp.Queue`` use one queue per direction, ``Pipe`` one duplex pipe, as
    each is used for request/reply.
``--quick`` uses a tenth of every count but the (c) warm-up, which must fill the ring.

CPU time: each child reads ``getrusage(RUSAGE_SELF)`` user+sys (all of its
threads, so ``mp.Queue``'s feeder thread counts) around its timed section,
after flushing what it sent, and reports it; the table shows producer plus
consumer CPU microseconds per message (per round trip for (d)). A channel that
is fast only because it burns more CPU shows it there.

Timing: once both children are set up (channel opened, payloads built) they
meet at a barrier, so no set-up cost is timed and no sleep is used to
synchronise. Each child stamps ``CLOCK_MONOTONIC``, which is system-wide, so
stamps from different processes compare; a measurement lasts from the earlier
post-barrier stamp to the consumer's stamp right after it received the last
message. The parent's own clock is not used: with two cores and three
processes the parent may be scheduled late and would shorten the interval.

Honesty: the consumer checks every message's ``seq`` in order (for batches the
first and last of each batch; for 1 MiB payloads the length and an 8-byte tag),
and reports its count and last ``seq``, which the parent checks again, so a
lost, duplicated or reordered message fails the run instead of inflating it.
Every measurement is repeated (five times, three with ``--quick``), rotating
the order of the three channels, and the median is reported (all samples are
in the JSON): on a small machine one run can be disturbed by anything else
that runs, which is also why the load average at the start is shown.

Ratios are shmbus divided by the other channel: above 1 means shmbus is faster
for (a)-(c); for the latencies of (d), below 1 means shmbus is faster.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import itertools
import json
import math
import multiprocessing as mp
import os
import platform
import resource
import signal
import statistics
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from importlib import metadata
from multiprocessing import connection
from multiprocessing.context import ForkContext
from multiprocessing.synchronize import Barrier
from typing import Any, Callable

from . import BusNotFound, Queue, __version__
from . import unlink as unlink_bus

__all__ = ["main", "run", "format_table", "BenchError"]

TRANSPORTS: tuple[str, ...] = ("shmbus", "mp.Queue", "mp.Pipe")
ROLES: tuple[str, str] = ("producer", "consumer")

MIB = 1 << 20
# A child that has not reported after this long is stuck: fail instead of hanging.
MEASUREMENT_TIMEOUT_S = 300.0
BARRIER_TIMEOUT_S = 60.0
# Distinct 1 MiB payloads the producer cycles through: building a fresh one per
# message would time a 1 MiB memcpy in the producer instead of the channel.
PAYLOAD_POOL = 16


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


def params_for(quick: bool) -> Params:
    """The full workload, or about a tenth of each count for ``--quick``."""
    scale = 10 if quick else 1
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
    )


# -- clocks -----------------------------------------------------------------------


def _now_ns() -> int:
    # CLOCK_MONOTONIC is one clock for the whole machine, so the producer's
    # start and the consumer's end stamps can be subtracted.
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def _cpu() -> tuple[float, float]:
    """User and system CPU seconds of this process, all threads included."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime, ru.ru_stime


# -- channels -----------------------------------------------------------------------


def _cannot(*_: Any) -> Any:
    raise RuntimeError("this end of the channel does not go that way")


def _no_op() -> None:
    pass


@dataclass
class Endpoint:
    """One child's end of a channel, as the plain callables its hot loop binds.

    Every transport fills the same slots, so the workloads below run the same
    code whatever they measure.
    """

    send: Callable[[Any], Any] = _cannot
    recv: Callable[[], Any] = _cannot
    send_batch: Callable[[list[Any]], Any] = _cannot
    recv_batch: Callable[[], list[Any]] = _cannot
    send_raw: Callable[[bytes], Any] = _cannot
    recv_raw: Callable[[], bytes] = _cannot
    # Waits until everything sent has left this process (mp.Queue's feeder thread).
    flush: Callable[[], None] = _no_op
    close: Callable[[], None] = _no_op


class Channel:
    """A one-way (or, for ping-pong, two-way) link made by the parent before forking."""

    def __init__(self, ctx: ForkContext, two_way: bool, params: Params) -> None:
        self.two_way = two_way
        self.batch_size = params.batch_size

    def endpoint(self, role: str) -> Endpoint:
        """Open ``role``'s end; called in the child, before the barrier."""
        raise NotImplementedError

    def close(self) -> None:
        """Release everything the parent made (idempotent)."""


def _directions(role: str, fwd: Any, back: Any) -> tuple[Any, Any]:
    """(what ``role`` sends on, what it receives on): the producer sends forward."""
    return (fwd, back) if role == "producer" else (back, fwd)


_bus_numbers = itertools.count()


def _bus_name() -> str:
    # pid and counter: two benchmarks at once, or one bus per measurement, never collide.
    return f"shmbus-bench-{os.getpid()}-{next(_bus_numbers)}"


class ShmbusChannel(Channel):
    """One shmbus Queue per direction; children open them by name, as real users do."""

    def __init__(self, ctx: ForkContext, two_way: bool, params: Params) -> None:
        super().__init__(ctx, two_way, params)
        self.paths: list[str] = []
        try:
            for _ in range(2 if two_way else 1):
                path = _bus_name()
                Queue.create(path, capacity=params.capacity).close()
                self.paths.append(path)
        except BaseException:
            self.close()
            raise

    def endpoint(self, role: str) -> Endpoint:
        back = self.paths[1] if self.two_way else None
        tx_path, rx_path = _directions(role, self.paths[0], back)
        tx = Queue.open(tx_path) if tx_path else None
        rx = Queue.open(rx_path) if rx_path else None
        ep = Endpoint()
        if tx is not None:
            ep.send, ep.send_batch, ep.send_raw = tx.put, tx.put_many, tx.put_bytes
        if rx is not None:
            ep.recv, ep.recv_raw = rx.get, rx.get_bytes
            ep.recv_batch = functools.partial(rx.get_many, self.batch_size)

        def close() -> None:
            for q in (tx, rx):
                if q is not None:
                    q.close()

        ep.close = close
        return ep

    def close(self) -> None:
        paths, self.paths = self.paths, []
        for path in paths:
            with contextlib.suppress(BusNotFound):
                unlink_bus(path)


class MpQueueChannel(Channel):
    """One ``multiprocessing.Queue`` per direction."""

    def __init__(self, ctx: ForkContext, two_way: bool, params: Params) -> None:
        super().__init__(ctx, two_way, params)
        self.queues = [ctx.Queue() for _ in range(2 if two_way else 1)]

    def endpoint(self, role: str) -> Endpoint:
        back = self.queues[1] if self.two_way else None
        tx, rx = _directions(role, self.queues[0], back)
        ep = Endpoint()
        if tx is not None:
            # No batch or bytes API: a list, or a bytes object, is one pickled message.
            ep.send = ep.send_batch = ep.send_raw = tx.put

            def flush() -> None:
                # put() only hands the object to a feeder thread; close + join_thread
                # waits until it has pickled and written everything (its CPU counts).
                tx.close()
                tx.join_thread()

            ep.flush = flush
        if rx is not None:
            ep.recv = ep.recv_batch = ep.recv_raw = rx.get
        return ep

    def close(self) -> None:
        for q in self.queues:
            q.close()
            q.join_thread()
        self.queues = []


class MpPipeChannel(Channel):
    """``multiprocessing.Pipe``: one-way (os.pipe) for streams, duplex for ping-pong."""

    def __init__(self, ctx: ForkContext, two_way: bool, params: Params) -> None:
        super().__init__(ctx, two_way, params)
        self.conns: dict[str, tuple[Any, Any]]
        if two_way:
            a, b = ctx.Pipe(duplex=True)  # the usual request/reply set-up
            self.conns = {"producer": (a, a), "consumer": (b, b)}
        else:
            r, w = ctx.Pipe(duplex=False)
            self.conns = {"producer": (w, None), "consumer": (None, r)}

    def endpoint(self, role: str) -> Endpoint:
        tx, rx = self.conns[role]
        ep = Endpoint()
        if tx is not None:
            ep.send = ep.send_batch = tx.send
            ep.send_raw = tx.send_bytes  # raw bytes, no pickling: Pipe's best case
        if rx is not None:
            ep.recv = ep.recv_batch = rx.recv
            ep.recv_raw = rx.recv_bytes
        return ep

    def close(self) -> None:
        for tx, rx in self.conns.values():
            for c in (tx, rx):
                if c is not None:
                    c.close()
        self.conns = {}


CHANNELS: dict[str, type[Channel]] = {
    "shmbus": ShmbusChannel,
    "mp.Queue": MpQueueChannel,
    "mp.Pipe": MpPipeChannel,
}


# -- workloads (run in the children) ------------------------------------------------

# A workload role gets its endpoint, the parameters and ``go``, which it calls
# once its set-up is done: ``go`` waits at the barrier and starts the clocks.
# It returns what it wants the parent to check (count, last seq) or report.
RoleFn = Callable[[Endpoint, Params, Callable[[], None]], dict[str, Any]]


class Mismatch(Exception):
    """The consumer did not receive what the producer sent."""


def _message(i: int) -> dict[str, Any]:
    return {"seq": i, "ts": time.time(), "name": "sensor-17", "value": 3.14}


def _produce_single(ep: Endpoint, p: Params, go: Callable[[], None]) -> dict[str, Any]:
    send, now = ep.send, time.time
    go()
    for i in range(p.small_messages):
        # The dict is built inline, as a real producer would: the same cost for every channel.
        send({"seq": i, "ts": now(), "name": "sensor-17", "value": 3.14})
    return {}


def _consume_single(ep: Endpoint, p: Params, go: Callable[[], None]) -> dict[str, Any]:
    recv = ep.recv
    count, last = 0, -1
    go()
    for _ in range(p.small_messages):
        last = recv()["seq"]
        if last != count:
            raise Mismatch(f"message {count} has seq {last}")
        count += 1
    return {"count": count, "last_seq": last}


def _produce_batch(ep: Endpoint, p: Params, go: Callable[[], None]) -> dict[str, Any]:
    send, now, n, size = ep.send_batch, time.time, p.small_messages, p.batch_size
    go()
    for start in range(0, n, size):
        stop = min(start + size, n)
        send([{"seq": i, "ts": now(), "name": "sensor-17", "value": 3.14} for i in range(start, stop)])
    return {}


def _consume_batch(ep: Endpoint, p: Params, go: Callable[[], None]) -> dict[str, Any]:
    recv, n = ep.recv_batch, p.small_messages
    count, last = 0, -1
    go()
    while count < n:
        msgs = recv()
        first, last = msgs[0]["seq"], msgs[-1]["seq"]
        if first != count or last != count + len(msgs) - 1:
            raise Mismatch(f"after {count} messages got a batch of {len(msgs)} with seq {first}..{last}")
        count += len(msgs)
    return {"count": count, "last_seq": last}


def _tagged(tag: int, size: int) -> bytes:
    return tag.to_bytes(8, "little") + bytes(size - 8)


def _bytes_tag(i: int, n: int) -> int:
    # Messages cycle through the pool's tags; the last one has its own, its seq.
    return n - 1 if i == n - 1 else i % PAYLOAD_POOL


def _produce_bytes(ep: Endpoint, p: Params, go: Callable[[], None]) -> dict[str, Any]:
    send, n = ep.send_raw, p.bytes_messages
    pool = [_tagged(k, p.bytes_size) for k in range(PAYLOAD_POOL)]
    last = _tagged(n - 1, p.bytes_size)
    for i in range(p.bytes_warmup):
        send(pool[i % PAYLOAD_POOL])
    go()
    for i in range(n - 1):
        send(pool[i % PAYLOAD_POOL])
    send(last)
    return {}


def _consume_bytes(ep: Endpoint, p: Params, go: Callable[[], None]) -> dict[str, Any]:
    recv, n, size = ep.recv_raw, p.bytes_messages, p.bytes_size
    count, last = 0, -1
    from_bytes = int.from_bytes
    for _ in range(p.bytes_warmup):
        recv()
    go()
    for i in range(n):
        data = recv()
        last = from_bytes(data[:8], "little")
        if len(data) != size or last != _bytes_tag(i, n):
            raise Mismatch(f"message {i}: {len(data)} bytes, tag {last}")
        count += 1
    # The last message's tag is its seq, n - 1.
    return {"count": count, "last_seq": last}


def _ping(ep: Endpoint, p: Params, go: Callable[[], None]) -> dict[str, Any]:
    send, recv, clock = ep.send, ep.recv, time.perf_counter_ns
    total = p.pingpong_warmup + p.pingpong_round_trips
    rtts: list[int] = []
    go()
    for i in range(total):
        msg = _message(i)  # built before the clock starts: only the trip is timed
        t0 = clock()
        send(msg)
        back = recv()
        t1 = clock()
        if back["seq"] != i:
            raise Mismatch(f"round trip {i} came back with seq {back['seq']}")
        rtts.append(t1 - t0)
    # The warm-up trips (first page faults, cold caches) are not part of the figures.
    return {"count": total, "last_seq": total - 1, **_latency_stats(rtts[p.pingpong_warmup :])}


def _echo(ep: Endpoint, p: Params, go: Callable[[], None]) -> dict[str, Any]:
    send, recv = ep.send, ep.recv
    total = p.pingpong_warmup + p.pingpong_round_trips
    go()
    for _ in range(total):
        send(recv())
    return {}


def _percentile(ordered: list[int], q: float) -> int:
    """Nearest-rank percentile of a sorted list."""
    return ordered[max(math.ceil(q * len(ordered)) - 1, 0)]


def _latency_stats(rtts_ns: list[int]) -> dict[str, float]:
    ordered = sorted(rtts_ns)
    return {
        "p50_us": _percentile(ordered, 0.50) / 1e3,
        "p99_us": _percentile(ordered, 0.99) / 1e3,
        "min_us": ordered[0] / 1e3,
        "max_us": ordered[-1] / 1e3,
        "mean_us": statistics.fmean(ordered) / 1e3,
    }


@dataclass(frozen=True)
class Bench:
    """One row of the table: what runs in each child and how its result is read."""

    key: str
    letter: str
    title: str
    unit: str
    producer: RoleFn
    consumer: RoleFn
    two_way: bool = False

    def messages(self, p: Params) -> int:
        """Messages the consumer must receive (round trips for ping-pong)."""
        if self.key == "bytes":
            return p.bytes_messages
        if self.key == "pingpong":
            return p.pingpong_warmup + p.pingpong_round_trips
        return p.small_messages


BENCHES: tuple[Bench, ...] = (
    Bench("single", "a", "small dicts, one at a time", "msg/s", _produce_single, _consume_single),
    Bench("batch", "b", "small dicts, batches of 256 [1]", "msg/s", _produce_batch, _consume_batch),
    Bench("bytes", "c", "1 MiB bytes messages [2]", "MB/s", _produce_bytes, _consume_bytes),
    Bench("pingpong", "d", "ping-pong round trip", "us", _ping, _echo, two_way=True),
)


# -- one measurement (parent side) ----------------------------------------------------


def _child(
    role: str,
    fn: RoleFn,
    channel: Channel,
    params: Params,
    barrier: Barrier,
    report_to: connection.Connection,
) -> None:
    """Body of a child process: run one role and send a report to the parent, always."""
    report: dict[str, Any] = {"role": role, "pid": os.getpid()}
    start: dict[str, Any] = {}

    def go() -> None:
        barrier.wait(BARRIER_TIMEOUT_S)
        start["t_ns"] = _now_ns()
        start["cpu"] = _cpu()

    try:
        ep = channel.endpoint(role)
        try:
            report.update(fn(ep, params, go))
            t_end = _now_ns()
            ep.flush()
            user, sys_ = _cpu()
        finally:
            ep.close()
        report.update(
            t_start_ns=start["t_ns"],
            t_end_ns=t_end,
            cpu_user_s=user - start["cpu"][0],
            cpu_sys_s=sys_ - start["cpu"][1],
        )
    except BaseException:
        report["error"] = traceback.format_exc()
        barrier.abort()  # the partner must not wait at the barrier for a child that will never come
    try:
        report_to.send(report)
    finally:
        report_to.close()


def _collect(procs: dict[str, Any], conns: dict[str, connection.Connection]) -> dict[str, dict[str, Any]]:
    """Wait for both children's reports; raise BenchError at the first failure."""
    deadline = time.monotonic() + MEASUREMENT_TIMEOUT_S
    pending = {c: role for role, c in conns.items()}
    reports: dict[str, dict[str, Any]] = {}
    while pending:
        left = deadline - time.monotonic()
        ready = connection.wait(list(pending), left) if left > 0 else []
        if not ready:
            raise BenchError(
                f"no report from the {', '.join(pending.values())} after {MEASUREMENT_TIMEOUT_S:.0f} s: stuck"
            )
        for c in ready:
            assert isinstance(c, connection.Connection)
            role = pending.pop(c)
            try:
                rep = c.recv()
            except EOFError:
                procs[role].join(1)
                raise BenchError(
                    f"the {role} died without a report (exit code {procs[role].exitcode})"
                ) from None
            if "error" in rep:
                raise BenchError(f"the {role} failed:\n{rep['error']}")
            reports[role] = rep
    return reports


def _reap(procs: dict[str, Any], grace: float) -> None:
    """Join every child, killing those still alive after ``grace`` seconds."""
    for p in procs.values():
        p.join(grace)
        if p.is_alive():
            p.kill()
            p.join()
        p.close()


def measure(bench: Bench, transport: str, params: Params, ctx: ForkContext) -> dict[str, Any]:
    """Run ``bench`` once over a fresh ``transport`` channel and return one sample."""
    channel = CHANNELS[transport](ctx, bench.two_way, params)
    procs: dict[str, Any] = {}
    conns: dict[str, connection.Connection] = {}
    ok = False
    try:
        barrier = ctx.Barrier(2)
        for role, fn in zip(ROLES, (bench.producer, bench.consumer)):
            r, w = ctx.Pipe(duplex=False)
            conns[role] = r
            proc = ctx.Process(
                target=_child,
                args=(role, fn, channel, params, barrier, w),
                name=f"shmbus-bench-{bench.key}-{role}",
                daemon=True,
            )
            try:
                proc.start()
            finally:
                # Only the child holds the write end now, so its death reads as EOF.
                w.close()
            procs[role] = proc
        reports = _collect(procs, conns)
        ok = True
    finally:
        # A healthy child exits right after reporting; after a failure nobody waits.
        _reap(procs, 10.0 if ok else 0.0)
        for c in conns.values():
            c.close()
        channel.close()
    return _sample(bench, params, reports)


def _sample(bench: Bench, params: Params, reports: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Check the reports and turn them into the figures of one measurement."""
    expected = bench.messages(params)
    checker = reports["producer" if bench.key == "pingpong" else "consumer"]
    if checker["count"] != expected or checker["last_seq"] != expected - 1:
        raise BenchError(
            f"{bench.key}: received {checker['count']} messages up to seq "
            f"{checker['last_seq']}, expected {expected} up to {expected - 1}"
        )
    t0 = min(r["t_start_ns"] for r in reports.values())
    elapsed = (reports["consumer"]["t_end_ns"] - t0) / 1e9
    cpu = sum(r["cpu_user_s"] + r["cpu_sys_s"] for r in reports.values())
    sample: dict[str, Any] = {
        "elapsed_s": elapsed,
        "messages": expected,
        "cpu_us_per_msg": cpu / expected * 1e6,
        "cpu_s": {r["role"]: {"user": r["cpu_user_s"], "sys": r["cpu_sys_s"]} for r in reports.values()},
    }
    if bench.key == "pingpong":
        # The echo time includes the warm-up trips; the latency figures do not.
        stats = ("p50_us", "p99_us", "min_us", "max_us", "mean_us")
        sample.update({k: checker[k] for k in stats})
    elif bench.unit == "MB/s":
        sample["value"] = expected * params.bytes_size / 1e6 / elapsed
    else:
        sample["value"] = expected / elapsed
    return sample


# -- the whole run ----------------------------------------------------------------------


def _median(samples: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(s[key] for s in samples))


def _summary(bench: Bench, samples: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Medians over repeats per channel, and shmbus's ratios to the other two."""
    metrics = ("p50_us", "p99_us") if bench.key == "pingpong" else ("value",)
    results: dict[str, dict[str, Any]] = {}
    for t, s in samples.items():
        results[t] = {m: _median(s, m) for m in metrics}
        results[t].update(cpu_us_per_msg=_median(s, "cpu_us_per_msg"), samples=s)
    ratios = {
        f"shmbus/{other}": {m: results["shmbus"][m] / results[other][m] for m in metrics}
        for other in TRANSPORTS[1:]
    }
    return {"title": bench.title, "unit": bench.unit, "results": results, "ratios": ratios}


def machine_info() -> dict[str, Any]:
    """Where the figures come from: they mean little without it."""

    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "unknown"

    try:
        usable: int | None = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = None
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "shmbus": __version__,
        "msgpack": version("msgpack"),
        "posix_ipc": version("posix_ipc"),
        # Other work on the machine moves every figure: say how busy it was.
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run(
    quick: bool, only: Sequence[str] | None = None, progress: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Run the benchmarks (all, or the keys in ``only``) and return the results as JSON-able data.

    Raises ``BenchError`` if a measurement fails. ``progress`` is called with a
    short description before each measurement.
    """
    params = params_for(quick)
    ctx = mp.get_context("fork")
    benches = [b for b in BENCHES if only is None or b.key in only]
    started = time.monotonic()
    out: dict[str, Any] = {
        "started_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "params": {
            **asdict(params),
            "start_method": "fork",
            "transports": list(TRANSPORTS),
            "message": {"seq": "i", "ts": "time.time()", "name": "sensor-17", "value": 3.14},
        },
        "benchmarks": {},
    }
    steps = len(benches) * params.repeats * len(TRANSPORTS)
    step = 0
    for bench in benches:
        samples: dict[str, list[dict[str, Any]]] = {t: [] for t in TRANSPORTS}
        for rep in range(params.repeats):
            # Rotate the order so no channel always runs first (cold) or last.
            order = TRANSPORTS[rep % len(TRANSPORTS) :] + TRANSPORTS[: rep % len(TRANSPORTS)]
            for transport in order:
                step += 1
                if progress is not None:
                    progress(
                        f"[{step}/{steps}] ({bench.letter}) {bench.key}: {transport}, "
                        f"run {rep + 1}/{params.repeats}"
                    )
                samples[transport].append(measure(bench, transport, params, ctx))
        out["benchmarks"][bench.key] = _summary(bench, samples)
    out["duration_s"] = round(time.monotonic() - started, 2)
    return out


# -- output ------------------------------------------------------------------------------


def _fmt(value: float, unit: str) -> str:
    return f"{value:,.1f}" if unit == "us" else f"{value:,.0f}"


def _table_rows(results: dict[str, Any]) -> list[list[str]]:
    rows: list[list[str]] = []
    for bench in BENCHES:
        b = results["benchmarks"].get(bench.key)
        if b is None:
            continue
        res, ratios = b["results"], b["ratios"]
        cpu = " / ".join(f"{res[t]['cpu_us_per_msg']:.2f}" for t in TRANSPORTS)
        pingpong = [(", p50", "p50_us"), (", p99", "p99_us")]
        metrics = pingpong if bench.key == "pingpong" else [("", "value")]
        for i, (suffix, m) in enumerate(metrics):
            rows.append(
                [
                    f"({bench.letter}) {bench.title}{suffix}",
                    "us RTT" if bench.key == "pingpong" else bench.unit,
                    *(_fmt(res[t][m], bench.unit) for t in TRANSPORTS),
                    *(f"{ratios[f'shmbus/{o}'][m]:.2f}x" for o in TRANSPORTS[1:]),
                    cpu if i == 0 else "",  # one CPU figure per measurement
                ]
            )
    return rows


def _render(rows: list[list[str]]) -> list[str]:
    """Align the columns: text left, numbers right, the last column as is."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]

    def line(r: list[str]) -> str:
        cells = [r[0].ljust(widths[0]), r[1].ljust(widths[1])]
        cells += [c.rjust(w) for c, w in zip(r[2:-1], widths[2:-1])]
        return "  ".join([*cells, r[-1]]).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return [line(rows[0]), rule, *(line(r) for r in rows[1:])]


# Plain ASCII on purpose: the table must print in any locale, log and CI console.
_HEADER = [
    "benchmark",
    "unit",
    "shmbus",
    "mp.Queue",
    "mp.Pipe",
    "ratio vs Queue",
    "ratio vs Pipe",
    "CPU us/msg: shmbus / Queue / Pipe",
]

_NOTES = [
    "ratio = shmbus figure / other figure, from the same run: above 1 means shmbus is faster",
    "for (a)-(c); below 1 means shmbus is faster for the latencies of (d).",
    "CPU = producer + consumer user+sys time per message (per round trip for (d)).",
    "[1] shmbus put_many/get_many(256); mp.Queue and Pipe have no batch API, so each sends",
    "    a list of 256 dicts as one message, the fair equivalent.",
    "[2] MB = 10**6 bytes. shmbus put_bytes; Pipe send_bytes/recv_bytes (no pickling);",
    "    mp.Queue put(bytes) (pickled: its only API).",
]


def format_table(results: dict[str, Any]) -> str:
    """The plain-text report: machine line, parameters, table, footnotes."""
    m, p = results["machine"], results["params"]
    runs = f"median of {p['repeats']} runs each" if p["repeats"] > 1 else "1 run each"
    kind = "quick" if p["quick"] else "full"
    text = [
        f"machine: {m['platform']}, {m['cpu_model']}, {m['cpu_count']} CPUs "
        f"({m['cpus_usable']} usable), {m['python_implementation']} {m['python']}; "
        f"shmbus {m['shmbus']}, msgpack {m['msgpack']}, posix_ipc {m['posix_ipc']}; "
        f"load average {' '.join(map(str, m['load_average_at_start']))} at start",
        f"{kind} run, {runs}, {results['duration_s']:.0f} s: "
        f"(a),(b) {p['small_messages']:,} dicts; "
        f"(c) {p['bytes_messages']:,} x {p['bytes_size'] // MIB} MiB after {p['bytes_warmup']} "
        f"untimed; (d) {p['pingpong_round_trips']:,} round trips after "
        f"{p['pingpong_warmup']} untimed; shmbus capacity {p['capacity']}",
        "",
        *_render([_HEADER, *_table_rows(results)]),
        "",
        *_NOTES,
    ]
    return "\n".join(text)


def _write_json(path: str, results: dict[str, Any]) -> None:
    text = json.dumps(results, indent=2) + "\n"
    if path == "-":
        sys.stdout.write(text)
        return
    # Written aside and renamed, so a crash never leaves a half-written file.
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def _progress_line() -> Callable[[str], None]:
    width = [0]

    def show(msg: str) -> None:
        # "\r" and padding overwrite the previous line; one line, no scrolling log.
        sys.stderr.write("\r" + msg.ljust(width[0]))
        sys.stderr.flush()
        width[0] = max(width[0], len(msg))

    return show


def _parse_only(value: str | None, parser: argparse.ArgumentParser) -> list[str] | None:
    if value is None:
        return None
    aliases = {b.letter: b.key for b in BENCHES} | {b.key: b.key for b in BENCHES}
    names = [n.strip().lower() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in aliases]
    if unknown or not names:
        parser.error(
            f"--only: unknown benchmark {', '.join(unknown) or value!r}; choose from "
            + ", ".join(f"{b.key} ({b.letter})" for b in BENCHES)
        )
    return [aliases[n] for n in names]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shmbus bench",
        description="Measure shmbus against multiprocessing.Queue and multiprocessing.Pipe "
        "in the same run: throughput, 1 MiB messages, round-trip latency and CPU per message.",
    )
    parser.add_argument("--quick", action="store_true", help="about a tenth of the counts: a few seconds")
    parser.add_argument(
        "--json",
        metavar="PATH",
        nargs="?",
        const="-",
        help="also write the results as JSON to PATH ('-' or no PATH: stdout, and the table goes to stderr)",
    )
    parser.add_argument(
        "--only",
        metavar="NAMES",
        help="comma-separated subset: single,batch,bytes,pingpong (or a,b,c,d)",
    )
    return parser


class _Terminated(BaseException):
    """SIGTERM, raised like Ctrl-C so that the finally blocks kill children and unlink buses."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise _Terminated


def _run_cleanly(quick: bool, only: list[str] | None) -> dict[str, Any]:
    """``run`` with a progress line on a terminal and SIGTERM turned into an exception."""
    progress = _progress_line() if sys.stderr.isatty() else None
    # Only the main thread may set handlers; elsewhere SIGTERM keeps its default.
    own = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if own else None
    try:
        return run(quick, only=only, progress=progress)
    finally:
        if own:
            # None: the old handler was not set from Python; the default is the closest.
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
        if progress is not None:
            progress("")
            sys.stderr.write("\r")


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (``shmbus bench``); returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    only = _parse_only(args.only, parser)
    try:
        results = _run_cleanly(args.quick, only)
    except BenchError as e:
        print(f"shmbus bench: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("shmbus bench: interrupted", file=sys.stderr)
        return 130
    except _Terminated:
        print("shmbus bench: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    # With JSON on stdout the table moves to stderr, so stdout stays parseable.
    print(format_table(results), file=sys.stderr if args.json == "-" else sys.stdout)
    if args.json:
        try:
            _write_json(args.json, results)
        except OSError as e:
            print(f"shmbus bench: cannot write {args.json}: {e}", file=sys.stderr)
            return 1
    return 0
