"""The shmbus benchmark: shmbus against ``multiprocessing.Queue``, ``Pipe``, faster-fifo and ZeroMQ.

Run it as ``shmbus bench [--quick] [--json PATH|-] [--only NAMES]`` (or
``python benchmarks/run.py``); ``benchmarks/plot.py`` turns the JSON into charts.

Why compare
-----------
shmbus exists to move messages between processes faster than the standard
library does, so a shmbus figure alone says little: every figure is taken for
shmbus *and* for the channels a user would otherwise pick, in the same run, on
the same machine, with the same messages and process layout, and each is
reported as a ratio to ``multiprocessing.Queue`` (``x mp.Queue``: how many
times faster; for latencies, the Queue's latency divided by the other's, so
above 1 is always better). faster-fifo (``faster_fifo.Queue``) and pyzmq
(ZeroMQ ``ipc://`` PUSH/PULL) are measured when installed (``pip install
'shmbus[bench]'``); otherwise their lines say "not installed".

Each measurement uses freshly forked processes and a fresh channel; the parent
only creates the channel, starts the children and collects their reports.

What is measured
----------------
(a) ``single``: small dicts ``{"seq", "ts", "name", "value"}`` sent one at a
    time: messages/s. pyzmq sends each dict msgpack-encoded (the codec shmbus
    uses, so the two differ only in transport); mp.Queue, Pipe and faster-fifo
    pickle, their default. (ZeroMQ's producer closes its socket only once the
    consumer has everything: its LINGER loses the tail of a stream now and
    then, see ``ZmqChannel``.)
(b) ``batch``: the same dicts in batches of 256: shmbus ``put_many``/
    ``get_many(256)``, faster-fifo ``put_many``/``get_many(max_messages_to_get=256)``.
    The ratio is to mp.Queue sending them one at a time (its only way to send
    256 separate messages). For information, mp.Queue, Pipe and pyzmq also send
    each batch as *one* message, a list of 256 (one pickle or msgpack call).
(c) ``bytes``: 1 MiB messages of bytes: MB/s (10**6 bytes/s). shmbus
    ``put_bytes``/``get_bytes`` (one copy in, one out), and shmbus zero copy:
    the producer fills ``reserve()`` in place, the consumer reads the length and
    tag in place through ``get_view()``. Pipe uses ``send_bytes``/``recv_bytes``,
    faster-fifo raw bytes (identity dumps/loads: the consumer gets a view of its
    receive buffer), pyzmq ``send``/``recv`` with ``copy=False``; mp.Queue can
    only pickle. Every channel first moves 65 untimed 1 MiB messages (one lap of
    the 64 MiB ring): a fresh ring's pages are allocated by the kernel on first
    touch, which costs about 10x the copy and would dominate a short run.
    Two [info] lines repeat shmbus with an 8 MiB ring, which stays in the
    cache (L3) where a 64 MiB one cannot: the ring size matters as much as
    the copy count.
(g) ``memcpy``, in the (c) table: one process copies the same 1 MiB payloads,
    as ``bytes(memoryview)`` (a new object, like ``get_bytes``) and as a slice
    assignment through a memoryview into a 64 MiB and an 8 MiB bytearray at
    rotating offsets (like ring writes): the ceiling; (c) shows each line as
    a % of the fastest of the three.
(d) ``pingpong``: two processes bounce one small dict 20 000 times: p50 and
    p99 of the round trip. shmbus twice: blocking (``spin_us = 0``: always sleep
    on the semaphore) and with its default spin-before-sleep.
(e) ``sizes``: bytes messages of 16 B to 16 MiB (powers of 4) through shmbus
    (``put_bytes``/``get_bytes``, 64 MiB ring), mp.Queue and Pipe
    (``send_bytes``): MB/s and msg/s. The count shrinks as the size grows (a
    fixed volume, within bounds); the same 1 MiB warm-up lap as (c) comes first.
(f) ``mpmc``: 1, 2 or 4 producers and 1, 2 or 4 consumers on one shmbus Queue
    or one mp.Queue, small dicts one at a time: total msg/s, from the first
    post-barrier stamp to the last message received. After every producer has
    reported, the parent puts one ``None`` per consumer, which ends it.
(h) ``scale``: time to create and open a large bus (4 GiB in /dev/shm, 1 GiB
    if less is free) and a 1 MiB one; and the resident memory (``VmRSS``) of a
    fresh ``python`` that imports shmbus, before and after opening a 1 GiB bus
    and putting and getting one small message, with the bus file's allocated
    size.
(t) ``topic``: a Topic publisher publishes the small dicts one at a time with
    0, 1 and 3 subscriber processes reading with ``get_many(256)``: the publish
    rate, each subscriber's receive rate and lost count. The 1 MiB ring holds
    about 16 000 of these messages, so the run laps it many times: eviction
    (the steady state of a long-lived topic) is included, and a subscriber
    that falls a ring behind loses messages, as it would in use.

``--quick`` divides the counts by about ten, measures fewer sizes and shapes,
and repeats less; the whole run takes well under a minute.

CPU time: each child reads ``getrusage(RUSAGE_SELF)`` user+sys (all of its
threads, so ``mp.Queue``'s feeder thread and ZeroMQ's I/O thread count) around
its timed section, after flushing what it sent, and reports it; the tables
show the CPU microseconds of all the processes per message (per round trip for
(d)). A channel that is fast only because it burns more CPU shows it there.

Timing: once every child is set up (channel opened, payloads built) they meet
at a barrier, so no set-up cost is timed and no sleep is used to synchronise.
Each child stamps ``CLOCK_MONOTONIC``, which is system-wide, so stamps from
different processes compare; a measurement lasts from the earliest
post-barrier stamp to the last consumer's stamp after its last message. The
parent's own clock is not used: on a small machine it may be scheduled late.

Honesty: consumers check every message's ``seq`` (for batches the first and
last of each; for bytes the length and an 8-byte tag; for (f) the count and
the sum of the seqs; for (t) received + lost = published), and the parent
checks their reports again, so a lost, duplicated or reordered message fails
the run instead of inflating it. Every measurement is repeated (five times,
three for (e) and (f); fewer with ``--quick``), rotating the order of the
variants, and the median is reported with the lowest and highest run (all
samples are in the JSON): on a small machine one run can be disturbed by
anything else that runs, which is also why the load average at the start is
shown, and on a virtual machine the placement of the virtual CPUs alone can
move a bulk-copy figure by 2x between runs.

Interrupting: Ctrl-C or SIGTERM stops the run cleanly (children killed and
reaped, buses unlinked, temporary directories removed); see ``_on_signal``
for why a child must never unwind through the frames it inherits.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import importlib
import itertools
import json
import math
import multiprocessing as mp
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from multiprocessing import connection
from multiprocessing.context import ForkContext
from multiprocessing.synchronize import Barrier
from typing import Any, Callable

from . import BusNotFound, Queue, Topic, __version__, _accel
from . import unlink as unlink_bus
from ._format import parse_size
from ._sync import SPIN_DEFAULT

__all__ = ["main", "run", "format_table", "BenchError"]

# Rows marked so run shmbus without its C fast path, to show what it brings in the same run.
_PURE = "pure Python (no C fast path)"
_NO_C = {"pure": True}  # a ShmbusChannel option

MIB = 1 << 20
GIB = 1 << 30
# A child that has not reported after this long is stuck: fail instead of hanging.
MEASUREMENT_TIMEOUT_S = 300.0
BARRIER_TIMEOUT_S = 60.0
# Distinct payloads the producer cycles through: building a fresh one per
# message would time a memcpy in the producer instead of the channel.
PAYLOAD_POOL = 16
# The optional comparisons: import name of each, and the distribution to report.
OPTIONAL = {"faster-fifo": ("faster_fifo", "faster-fifo"), "pyzmq": ("zmq", "pyzmq")}


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
    small_ring: str
    sweep_sizes: tuple[int, ...]
    sweep_volume: int
    sweep_min_messages: int
    sweep_max_messages: int
    sweep_repeats: int
    mpmc_shapes: tuple[tuple[int, int], ...]
    mpmc_messages: int
    mpmc_repeats: int
    topic_messages: int
    topic_subscribers: tuple[int, ...]
    topic_capacity: str
    scale_small: int
    scale_large: int
    scale_fallback: int
    memory_bus: int


def params_for(quick: bool) -> Params:
    """The full workload, or about a tenth of each count for ``--quick``."""
    scale = 10 if quick else 1
    shapes = ((1, 1), (2, 2), (4, 1), (1, 4), (4, 4))
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
        # Small enough to stay in the 32 MiB L3 of the machine the figures were first taken on.
        small_ring="8MiB",
        sweep_sizes=tuple(16 << 2 * k for k in range(0, 11, 2 if quick else 1)),
        sweep_volume=(64 if quick else 1024) * MIB,
        sweep_min_messages=8 if quick else 64,
        sweep_max_messages=50_000 // scale,
        sweep_repeats=1 if quick else 3,
        mpmc_shapes=shapes[::2] if quick else tuple((p, c) for p in (1, 2, 4) for c in (1, 2, 4)),
        mpmc_messages=120_000 // scale,
        mpmc_repeats=1 if quick else 3,
        topic_messages=200_000 // scale,
        topic_subscribers=(0, 1, 3),
        topic_capacity="1MiB",
        scale_small=MIB,
        scale_large=4 * GIB,
        scale_fallback=GIB,
        memory_bus=GIB,
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


def _no_stats() -> dict[str, int]:
    return {}


def _identity(x: Any) -> Any:
    return x


@dataclass
class Endpoint:
    """One child's end of a channel, as the plain callables its hot loop binds.

    Every transport fills the slots it supports, so the workloads below run
    the same code whatever they measure.
    """

    send: Callable[[Any], Any] = _cannot
    recv: Callable[[], Any] = _cannot
    send_batch: Callable[[list[Any]], Any] = _cannot
    recv_batch: Callable[[], list[Any]] = _cannot
    send_raw: Callable[[bytes], Any] = _cannot
    recv_raw: Callable[[], Any] = _cannot  # bytes, or a bytes-like view
    reserve: Callable[[int], Any] = _cannot  # a context manager yielding a writable memoryview
    get_view: Callable[[], Any] = _cannot  # a context manager yielding a read-only memoryview
    stats: Callable[[], dict[str, int]] = _no_stats
    # Waits until everything sent has left this process (mp.Queue's feeder thread).
    flush: Callable[[], None] = _no_op
    close: Callable[[], None] = _no_op


Options = Mapping[str, Any]


class Channel:
    """A link made by the parent before forking; each child opens its end by side."""

    def __init__(self, ctx: ForkContext, two_way: bool, params: Params, options: Options) -> None:
        self.two_way = two_way
        self.batch_size = params.batch_size

    def endpoint(self, side: str) -> Endpoint:
        """Open ``side``'s end ("producer" or "consumer"); called in the child, before the barrier."""
        return Endpoint()

    def close(self) -> None:
        """Release everything the parent made (idempotent)."""


def _directions(side: str, fwd: Any, back: Any) -> tuple[Any, Any]:
    """(what ``side`` sends on, what it receives on): the producer sends forward."""
    return (fwd, back) if side == "producer" else (back, fwd)


_bus_numbers = itertools.count()


def _bus_name() -> str:
    # pid and counter: two benchmarks at once, or one bus per measurement, never collide.
    return f"shmbus-bench-{os.getpid()}-{next(_bus_numbers)}"


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(BusNotFound):
        unlink_bus(path)


class ShmbusChannel(Channel):
    """One shmbus Queue per direction; children open them by name, as real users do.

    Options: ``capacity`` (default: the run's), ``spin_us`` (default: the library's),
    ``pure`` (True: without the C fast path, to show what it brings in the same run).
    """

    def __init__(self, ctx: ForkContext, two_way: bool, params: Params, options: Options) -> None:
        super().__init__(ctx, two_way, params, options)
        self.paths: list[str] = []
        self.spin_us: float | None = options.get("spin_us")
        self.pure: bool = options.get("pure", False)
        try:
            for _ in range(2 if two_way else 1):
                path = _bus_name()
                Queue.create(path, capacity=options.get("capacity", params.capacity)).close()
                self.paths.append(path)
        except BaseException:
            self.close()
            raise

    def endpoint(self, side: str) -> Endpoint:
        back = self.paths[1] if self.two_way else None
        tx_path, rx_path = _directions(side, self.paths[0], back)
        tx = Queue.open(tx_path) if tx_path else None
        rx = Queue.open(rx_path) if rx_path else None
        ep = Endpoint()
        for q in (tx, rx):
            if q is not None and self.spin_us is not None:
                q.spin_us = self.spin_us
            if q is not None and self.pure:
                _accel.drop_fast_path(q)
        if tx is not None:
            ep.send, ep.send_batch, ep.send_raw = tx.put, tx.put_many, tx.put_bytes
            ep.reserve = tx.reserve
        if rx is not None:
            ep.recv, ep.recv_raw, ep.get_view = rx.get, rx.get_bytes, rx.get_view
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
            _unlink_quietly(path)


class MpQueueChannel(Channel):
    """One ``multiprocessing.Queue`` per direction."""

    def __init__(self, ctx: ForkContext, two_way: bool, params: Params, options: Options) -> None:
        super().__init__(ctx, two_way, params, options)
        self.queues = [ctx.Queue() for _ in range(2 if two_way else 1)]

    def endpoint(self, side: str) -> Endpoint:
        back = self.queues[1] if self.two_way else None
        tx, rx = _directions(side, self.queues[0], back)
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

    def __init__(self, ctx: ForkContext, two_way: bool, params: Params, options: Options) -> None:
        super().__init__(ctx, two_way, params, options)
        self.conns: dict[str, tuple[Any, Any]]
        if two_way:
            a, b = ctx.Pipe(duplex=True)  # the usual request/reply set-up
            self.conns = {"producer": (a, a), "consumer": (b, b)}
        else:
            r, w = ctx.Pipe(duplex=False)
            self.conns = {"producer": (w, None), "consumer": (None, r)}

    def endpoint(self, side: str) -> Endpoint:
        tx, rx = self.conns[side]
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


class FasterFifoChannel(Channel):
    """``faster_fifo.Queue`` (pickle for objects; identity dumps/loads with ``raw``).

    Its buffer is as large as shmbus's ring, so neither waits for room sooner.
    """

    def __init__(self, ctx: ForkContext, two_way: bool, params: Params, options: Options) -> None:
        super().__init__(ctx, two_way, params, options)
        import faster_fifo  # type: ignore[import-not-found, unused-ignore]

        size = parse_size(params.capacity)
        extra = {"dumps": _identity, "loads": _identity} if options.get("raw") else {}
        self.queue: Any = faster_fifo.Queue(max_size_bytes=size, **extra)

    def endpoint(self, side: str) -> Endpoint:
        q, ep, wait = self.queue, Endpoint(), MEASUREMENT_TIMEOUT_S
        # Its timeout defaults to 10 s: a stall must fail the same way as for the others.
        if side == "producer":
            ep.send = ep.send_raw = functools.partial(q.put, block=True, timeout=wait)
            ep.send_batch = functools.partial(q.put_many, block=True, timeout=wait)
        else:
            ep.recv = ep.recv_raw = functools.partial(q.get, block=True, timeout=wait)
            ep.recv_batch = functools.partial(
                q.get_many, block=True, timeout=wait, max_messages_to_get=self.batch_size
            )
        return ep

    def close(self) -> None:
        self.queue = None  # its shared memory goes with the last reference


class ZmqChannel(Channel):
    """ZeroMQ PUSH/PULL over ``ipc://`` in a private temporary directory.

    Objects are msgpack-encoded (the codec shmbus uses); raw bytes go as frames
    with ``copy=False``. Sockets are made in the children: a ZeroMQ context
    must not cross a fork.

    The producer closes only once the consumer has everything (``received``):
    ``LINGER = -1`` does not guarantee delivery when the receiver is at its
    high-water mark, and the tail of the stream was lost in about 6% of runs
    here (libzmq 4.3.5; zeromq/libzmq#4660 and #3774, open).
    """

    def __init__(self, ctx: ForkContext, two_way: bool, params: Params, options: Options) -> None:
        super().__init__(ctx, two_way, params, options)
        self.received = ctx.Event()
        self.dir: str | None = tempfile.mkdtemp(prefix="shmbus-bench-zmq-")
        self.address = f"ipc://{self.dir}/push-pull"

    def endpoint(self, side: str) -> Endpoint:
        import msgpack
        import zmq

        zctx = zmq.Context()
        ep = Endpoint()
        if side == "producer":
            sock = zctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.RECONNECT_IVL, 5)  # ms; the consumer may bind after we connect
            sock.connect(self.address)
            # Block until the consumer is there, before the barrier: its first
            # connection attempt must not be timed.
            sock.send(b"hello")
            pack, send = msgpack.packb, sock.send
            ep.send = ep.send_batch = lambda obj: send(pack(obj))
            ep.send_raw = functools.partial(sock.send, copy=False)
        else:
            sock = zctx.socket(zmq.PULL)
            sock.bind(self.address)
            sock.recv()
            unpack, recv = msgpack.unpackb, sock.recv
            ep.recv = ep.recv_batch = lambda: unpack(recv())
            ep.recv_raw = lambda: recv(copy=False).buffer

        def flush() -> None:
            # The producer's I/O thread has sent everything when the consumer has
            # it all: its CPU is counted, as mp.Queue's feeder thread's is.
            if side == "producer":
                self.received.wait(MEASUREMENT_TIMEOUT_S)
            else:
                self.received.set()

        def close() -> None:
            if not sock.closed:
                sock.close(linger=0)
                zctx.term()

        ep.flush, ep.close = flush, close
        return ep

    def close(self) -> None:
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)  # libzmq leaves the socket file
            self.dir = None


class TopicChannel(Channel):
    """A shmbus Topic: the producer side publishes, each consumer side subscribes."""

    def __init__(self, ctx: ForkContext, two_way: bool, params: Params, options: Options) -> None:
        super().__init__(ctx, two_way, params, options)
        self.path: str | None = _bus_name()
        Topic.create(self.path, capacity=params.topic_capacity).close()

    def endpoint(self, side: str) -> Endpoint:
        assert self.path is not None
        topic = Topic.open(self.path)
        ep = Endpoint()
        if side == "producer":
            ep.send = topic.publish
        else:
            sub = topic.subscribe()  # before the barrier: it sees every message published
            ep.recv_batch = functools.partial(sub.get_many, self.batch_size)
            ep.stats = lambda: {"lost": sub.lost, "received": sub.received}
        ep.close = topic.close  # closes the subscription too
        return ep

    def close(self) -> None:
        path, self.path = self.path, None
        if path is not None:
            _unlink_quietly(path)


class ScratchBusChannel(Channel):
    """No channel, only a bus name a child creates; the parent removes it whatever happens."""

    def __init__(self, ctx: ForkContext, two_way: bool, params: Params, options: Options) -> None:
        super().__init__(ctx, two_way, params, options)
        self.path: str = options["path"]

    def close(self) -> None:
        _unlink_quietly(self.path)


CHANNELS: dict[str, type[Channel]] = {
    "shmbus": ShmbusChannel,
    "mp.Queue": MpQueueChannel,
    "mp.Pipe": MpPipeChannel,
    "faster-fifo": FasterFifoChannel,
    "pyzmq": ZmqChannel,
    "topic": TopicChannel,
    "none": Channel,
    "scratch": ScratchBusChannel,
}


# -- workloads (run in the children) ------------------------------------------------

# A workload role gets its endpoint, the parameters and ``go``, which it calls
# once its set-up is done: ``go`` waits at the barrier and starts the clocks.
# It returns what it wants the parent to check (count, last seq) or report.
# Workloads that need more than Params get it bound with functools.partial.
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
    count, last, calls = 0, -1, 0
    go()
    while count < n:
        msgs = recv()
        first, last = msgs[0]["seq"], msgs[-1]["seq"]
        if first != count or last != count + len(msgs) - 1:
            raise Mismatch(f"after {count} messages got a batch of {len(msgs)} with seq {first}..{last}")
        count += len(msgs)
        calls += 1
    # A consumer that keeps up gets small batches, and pays its per-call cost more often.
    return {"count": count, "last_seq": last, "mean_batch": count / calls}


def _tagged(tag: int, size: int) -> bytes:
    return tag.to_bytes(8, "little") + bytes(size - 8)


def _pool_size(size: int) -> int:
    # 16 distinct payloads, but no more than 64 MiB of them (2 of 16 MiB... 4 at most).
    return max(2, min(PAYLOAD_POOL, 64 * MIB // size))


def _bytes_tag(i: int, n: int, pool: int) -> int:
    # Messages cycle through the pool's tags; the last one has its own, its seq.
    return n - 1 if i == n - 1 else i % pool


def _payloads(size: int, count: int) -> tuple[list[bytes], bytes]:
    """The pool of payloads to cycle through, and the last message (tagged with its seq)."""
    return [_tagged(k, size) for k in range(_pool_size(size))], _tagged(count - 1, size)


def _produce_bytes(
    ep: Endpoint, p: Params, go: Callable[[], None], *, size: int, count: int
) -> dict[str, Any]:
    send = ep.send_raw
    pool, last = _payloads(size, count)
    k = len(pool)
    warm = _tagged(0, MIB)  # the warm-up lap is in 1 MiB messages whatever the size
    for _ in range(p.bytes_warmup):
        send(warm)
    go()
    for i in range(count - 1):
        send(pool[i % k])
    send(last)
    return {}


def _consume_bytes(
    ep: Endpoint, p: Params, go: Callable[[], None], *, size: int, count: int
) -> dict[str, Any]:
    recv, k = ep.recv_raw, _pool_size(size)
    n, last = 0, -1
    from_bytes = int.from_bytes
    for _ in range(p.bytes_warmup):
        recv()
    go()
    for i in range(count):
        data = recv()
        last = from_bytes(data[:8], "little")
        if len(data) != size or last != _bytes_tag(i, count, k):
            raise Mismatch(f"message {i}: {len(data)} bytes, tag {last}")
        n += 1
    # The last message's tag is its seq, count - 1.
    return {"count": n, "last_seq": last}


def _produce_reserved(
    ep: Endpoint, p: Params, go: Callable[[], None], *, size: int, count: int
) -> dict[str, Any]:
    """Zero copy in: each payload is copied once, straight into the ring."""
    reserve = ep.reserve
    pool, last = _payloads(size, count)
    k = len(pool)
    warm = _tagged(0, MIB)
    for _ in range(p.bytes_warmup):
        with reserve(MIB) as buf:
            buf[:] = warm  # every byte: the lap must touch every page of the ring
    go()
    for i in range(count - 1):
        with reserve(size) as buf:
            buf[:] = pool[i % k]
    with reserve(size) as buf:
        buf[:] = last
    return {}


def _consume_viewed(
    ep: Endpoint, p: Params, go: Callable[[], None], *, size: int, count: int
) -> dict[str, Any]:
    """Zero copy out: the length and tag are read in the ring, nothing is copied."""
    get_view, k = ep.get_view, _pool_size(size)
    n, last = 0, -1
    from_bytes = int.from_bytes
    for _ in range(p.bytes_warmup):
        with get_view():
            pass
    go()
    for i in range(count):
        with get_view() as view:
            length = len(view)
            last = from_bytes(view[:8], "little")
        if length != size or last != _bytes_tag(i, count, k):
            raise Mismatch(f"message {i}: {length} bytes, tag {last}")
        n += 1
    return {"count": n, "last_seq": last}


def _memcpy_new(ep: Endpoint, p: Params, go: Callable[[], None], *, size: int, count: int) -> dict[str, Any]:
    """(g) ``bytes(memoryview)``: a new object per copy, as ``get_bytes`` returns."""
    pool, last = _payloads(size, count)
    views = [memoryview(b) for b in pool]
    k = len(views)
    data = b""
    go()
    for i in range(count - 1):
        data = bytes(views[i % k])
    data = bytes(memoryview(last))
    return {"count": count, "last_seq": int.from_bytes(data[:8], "little")}


def _memcpy_into(
    ep: Endpoint, p: Params, go: Callable[[], None], *, size: int, count: int, ring: int
) -> dict[str, Any]:
    """(g) Slice assignment into a ``ring``-byte buffer at rotating offsets, as a ring write.

    Through a memoryview, as shmbus writes its ring: ``bytearray[a:b] = x``
    itself was measured 40% slower here.
    """
    pool, last = _payloads(size, count)
    k = len(pool)
    slots = max(ring // size, 1)
    buf = memoryview(bytearray(slots * size))
    for j in range(slots):  # touch every page first, as the channels' warm-up lap does
        buf[j * size : (j + 1) * size] = pool[0]
    go()
    for i in range(count - 1):
        off = i % slots * size
        buf[off : off + size] = pool[i % k]
    off = (count - 1) % slots * size
    buf[off : off + size] = last
    return {"count": count, "last_seq": int.from_bytes(buf[off : off + 8], "little")}


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


def _produce_share(
    ep: Endpoint, p: Params, go: Callable[[], None], *, index: int, share: int
) -> dict[str, Any]:
    """(f) One of several producers: its own range of seqs, one message at a time."""
    send, now = ep.send, time.time
    go()
    for i in range(index * share, (index + 1) * share):
        send({"seq": i, "ts": now(), "name": "sensor-17", "value": 3.14})
    return {"count": share}


def _consume_until_none(ep: Endpoint, p: Params, go: Callable[[], None]) -> dict[str, Any]:
    """(f) One of several consumers: count and sum seqs until the parent's ``None``."""
    recv, clock = ep.recv, _now_ns
    count = total = t_last = 0
    go()
    while True:
        msg = recv()
        if msg is None:
            break
        total += msg["seq"]
        count += 1
        t_last = clock()  # the end is the last *data* message, not the parent's None
    return {"count": count, "seq_sum": total, "t_last_ns": t_last}


def _publish(ep: Endpoint, p: Params, go: Callable[[], None]) -> dict[str, Any]:
    """(t) The publisher: small dicts, one ``publish`` at a time, never waiting."""
    send, now = ep.send, time.time
    go()
    for i in range(p.topic_messages):
        send({"seq": i, "ts": now(), "name": "sensor-17", "value": 3.14})
    return {"count": p.topic_messages}


def _subscribe(ep: Endpoint, p: Params, go: Callable[[], None]) -> dict[str, Any]:
    """(t) A subscriber: ``get_many`` until the last seq (never evicted: nothing follows it)."""
    recv, n = ep.recv_batch, p.topic_messages
    received, nxt, last = 0, 0, -1
    go()
    while last != n - 1:
        msgs = recv()
        first, last = msgs[0]["seq"], msgs[-1]["seq"]
        # Gaps are allowed (lost messages), going back or repeating is not.
        if first < nxt or last - first < len(msgs) - 1:
            raise Mismatch(f"after seq {nxt - 1} got a batch of {len(msgs)} with seq {first}..{last}")
        nxt = last + 1
        received += len(msgs)
    t_last = _now_ns()
    return {"received": received, "t_last_ns": t_last, **ep.stats()}


def _create_open(
    ep: Endpoint, p: Params, go: Callable[[], None], *, path: str, capacity: int
) -> dict[str, Any]:
    """(h) Create a bus and open a second handle on it, as a second process would."""
    go()
    t0 = time.perf_counter_ns()
    q = Queue.create(path, capacity=capacity)
    try:
        Queue.open(path).close()
        t1 = time.perf_counter_ns()
    finally:
        q.close()
    return {"create_open_s": (t1 - t0) / 1e9, "allocated_bytes": os.stat(q.path).st_blocks * 512}


# -- one measurement (parent side) ----------------------------------------------------


@dataclass(frozen=True)
class Role:
    """One child of a measurement: its name (unique), which end it opens, what it runs."""

    name: str
    side: str
    fn: RoleFn


def _child(
    role: Role,
    channel: Channel,
    params: Params,
    barrier: Barrier,
    report_to: connection.Connection,
) -> None:
    """Body of a child process: run one role and send a report to the parent, always."""
    report: dict[str, Any] = {"role": role.name, "pid": os.getpid()}
    start: dict[str, Any] = {}

    def go() -> None:
        barrier.wait(BARRIER_TIMEOUT_S)
        start["t_ns"] = _now_ns()
        start["cpu"] = _cpu()

    try:
        ep = channel.endpoint(role.side)
        try:
            report.update(role.fn(ep, params, go))
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
        barrier.abort()  # the others must not wait at the barrier for a child that will never come
    try:
        report_to.send(report)
    finally:
        report_to.close()


# Called by the parent once every named role has reported (with the channel).
Hook = tuple[frozenset[str], Callable[[Channel], None]]


def _collect(
    procs: dict[str, Any], conns: dict[str, connection.Connection], channel: Channel, hook: Hook | None
) -> dict[str, dict[str, Any]]:
    """Wait for every child's report; raise BenchError at the first failure."""
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
        if hook is not None and hook[0] <= reports.keys():
            hook[1](channel)
            hook = None
    return reports


def _reap(procs: dict[str, Any], grace: float) -> None:
    """Join every child, killing those still alive after ``grace`` seconds."""
    for p in procs.values():
        p.join(grace)
        if p.is_alive():
            p.kill()
            p.join()
        p.close()


def measure(
    roles: Sequence[Role],
    transport: str,
    params: Params,
    ctx: ForkContext,
    *,
    two_way: bool = False,
    options: Options | None = None,
    hook: Hook | None = None,
) -> dict[str, dict[str, Any]]:
    """Run ``roles`` once, each in its own child, over a fresh channel; return their reports."""
    channel = CHANNELS[transport](ctx, two_way, params, options or {})
    procs: dict[str, Any] = {}
    conns: dict[str, connection.Connection] = {}
    ok = False
    try:
        barrier = ctx.Barrier(len(roles))
        for role in roles:
            r, w = ctx.Pipe(duplex=False)
            conns[role.name] = r
            proc = ctx.Process(
                target=_child,
                args=(role, channel, params, barrier, w),
                name=f"shmbus-bench-{role.name}",
                daemon=True,
            )
            try:
                proc.start()
            finally:
                # Only the child holds the write end now, so its death reads as EOF.
                w.close()
            procs[role.name] = proc
        reports = _collect(procs, conns, channel, hook)
        ok = True
    finally:
        # A healthy child exits right after reporting; after a failure nobody waits.
        _reap(procs, 10.0 if ok else 0.0)
        for c in conns.values():
            c.close()
        channel.close()
    return reports


def _cpu_s(reports: Mapping[str, Mapping[str, Any]]) -> float:
    return float(sum(r["cpu_user_s"] + r["cpu_sys_s"] for r in reports.values()))


def _cpu_detail(reports: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    return {name: {"user": r["cpu_user_s"], "sys": r["cpu_sys_s"]} for name, r in reports.items()}


def _t0(reports: Mapping[str, Mapping[str, Any]]) -> int:
    return min(int(r["t_start_ns"]) for r in reports.values())


# -- progress ------------------------------------------------------------------------------


class Progress:
    """Counts the measurements of a run and shows which one runs now."""

    def __init__(self, total: int, show: Callable[[str], None] | None) -> None:
        self.total = total
        self.done = 0
        self.show = show

    def step(self, what: str) -> None:
        self.done += 1
        if self.show is not None:
            self.show(f"[{self.done}/{self.total}] {what}")


# -- rows (a)-(d): variants of one producer and one consumer ---------------------------------


@dataclass(frozen=True)
class Variant:
    """One line of a pairwise table: a transport, how it is used, and its label."""

    key: str
    label: str
    transport: str
    producer: RoleFn
    consumer: RoleFn | None  # None: one process and no channel (the memcpy ceiling)
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PairRow:
    """A row of (a)-(d): the same messages through each variant, producer to consumer."""

    key: str
    letter: str
    title: Callable[[Params], str]
    unit: str
    variants: Callable[[Params], list[Variant]]
    messages: Callable[[Params], int]
    two_way: bool = False
    # Besides mp.Queue, ratios to these variants get their own columns.
    also_ratio_to: tuple[str, ...] = ("mp.Pipe",)


def _single_variants(p: Params) -> list[Variant]:
    prod, cons = _produce_single, _consume_single
    return [
        Variant("shmbus", "shmbus put/get", "shmbus", prod, cons),
        Variant("shmbus pure", f"[info] shmbus put/get in {_PURE}", "shmbus", prod, cons, _NO_C),
        Variant("mp.Queue", "mp.Queue put/get (pickle)", "mp.Queue", prod, cons),
        Variant("mp.Pipe", "mp.Pipe send/recv (pickle)", "mp.Pipe", prod, cons),
        Variant("faster-fifo", "faster-fifo put/get (pickle)", "faster-fifo", prod, cons),
        Variant("pyzmq", "pyzmq ipc PUSH/PULL send/recv (msgpack)", "pyzmq", prod, cons),
    ]


def _batch_variants(p: Params) -> list[Variant]:
    prod, cons = _produce_batch, _consume_batch
    b = p.batch_size
    return [
        Variant("shmbus", f"shmbus put_many/get_many({b})", "shmbus", prod, cons),
        Variant("shmbus pure", f"[info] shmbus put_many/get_many({b}), {_PURE}", "shmbus", prod, cons, _NO_C),
        Variant("faster-fifo", f"faster-fifo put_many/get_many({b}) (pickle)", "faster-fifo", prod, cons),
        Variant(
            "mp.Queue",
            "mp.Queue put/get, one at a time (baseline)",
            "mp.Queue",
            _produce_single,
            _consume_single,
        ),
        Variant("mp.Queue list", f"[info] mp.Queue, list of {b} as one message", "mp.Queue", prod, cons),
        Variant("mp.Pipe list", f"[info] mp.Pipe, list of {b} as one message", "mp.Pipe", prod, cons),
        Variant("pyzmq list", f"[info] pyzmq, list of {b} as one msgpack message", "pyzmq", prod, cons),
    ]


def _bytes_variants(p: Params) -> list[Variant]:
    size, count = p.bytes_size, p.bytes_messages
    prod = functools.partial(_produce_bytes, size=size, count=count)
    cons = functools.partial(_consume_bytes, size=size, count=count)
    zprod = functools.partial(_produce_reserved, size=size, count=count)
    zcons = functools.partial(_consume_viewed, size=size, count=count)
    small, big = parse_size(p.small_ring), parse_size(p.capacity)
    ring = f"{_size_text(small)} ring"
    opts = {"capacity": small}
    return [
        Variant("shmbus", "shmbus put_bytes/get_bytes", "shmbus", prod, cons),
        Variant("shmbus zero-copy", "shmbus reserve()/get_view() (zero copy)", "shmbus", zprod, zcons),
        Variant("shmbus small", f"[info] shmbus put_bytes/get_bytes, {ring}", "shmbus", prod, cons, opts),
        Variant("shmbus zero-copy small", f"[info] shmbus zero copy, {ring}", "shmbus", zprod, zcons, opts),
        Variant("mp.Queue", "mp.Queue put/get (pickle)", "mp.Queue", prod, cons),
        Variant("mp.Pipe", "mp.Pipe send_bytes/recv_bytes", "mp.Pipe", prod, cons),
        Variant("faster-fifo", "faster-fifo put/get (raw bytes)", "faster-fifo", prod, cons, {"raw": True}),
        Variant("pyzmq", "pyzmq ipc PUSH/PULL (copy=False)", "pyzmq", prod, cons),
        Variant("memcpy new", "(g) memcpy: bytes(memoryview)", "none",
                functools.partial(_memcpy_new, size=size, count=count), None),
        Variant("memcpy into", f"(g) memcpy: slice assignment, rotating in {_size_text(big)}", "none",
                functools.partial(_memcpy_into, size=size, count=count, ring=big), None),
        Variant("memcpy into small", f"(g) memcpy: slice assignment, rotating in {_size_text(small)}", "none",
                functools.partial(_memcpy_into, size=size, count=count, ring=small), None),
    ]  # fmt: skip


def _pingpong_variants(p: Params) -> list[Variant]:
    spin = f"spin {SPIN_DEFAULT * 1e6:g} us (default)"
    return [
        Variant("shmbus blocking", "shmbus, blocking (spin_us=0)", "shmbus", _ping, _echo, {"spin_us": 0}),
        Variant("shmbus spin", f"shmbus, {spin}", "shmbus", _ping, _echo),
        Variant("shmbus spin pure", f"[info] shmbus, {spin}, {_PURE}", "shmbus", _ping, _echo, _NO_C),
        Variant("mp.Pipe", "mp.Pipe (duplex)", "mp.Pipe", _ping, _echo),
        Variant("mp.Queue", "mp.Queue (one per direction)", "mp.Queue", _ping, _echo),
    ]


PAIR_ROWS: tuple[PairRow, ...] = (
    PairRow(
        "single",
        "a",
        lambda p: f"{p.small_messages:,} small dicts, one at a time",
        "msg/s",
        _single_variants,
        lambda p: p.small_messages,
        also_ratio_to=("mp.Pipe", "pyzmq"),
    ),
    PairRow(
        "batch",
        "b",
        lambda p: f"{p.small_messages:,} small dicts, batches of {p.batch_size}",
        "msg/s",
        _batch_variants,
        lambda p: p.small_messages,
        also_ratio_to=("mp.Queue list", "faster-fifo"),
    ),
    PairRow(
        "bytes",
        "c",
        lambda p: f"{p.bytes_messages:,} x {p.bytes_size // MIB} MiB bytes",
        "MB/s",
        _bytes_variants,
        lambda p: p.bytes_messages,
        also_ratio_to=("mp.Pipe",),
    ),
    PairRow(
        "pingpong",
        "d",
        lambda p: f"ping-pong, {p.pingpong_round_trips:,} round trips after {p.pingpong_warmup}",
        "us",
        _pingpong_variants,
        lambda p: p.pingpong_warmup + p.pingpong_round_trips,
        two_way=True,
    ),
)


def _pair_roles(v: Variant) -> list[Role]:
    if v.consumer is None:
        return [Role("producer", "", v.producer)]
    return [Role("producer", "producer", v.producer), Role("consumer", "consumer", v.consumer)]


def _pair_sample(
    row: PairRow, v: Variant, params: Params, reports: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """Check one measurement's reports and turn them into its figures."""
    expected = row.messages(params)
    end = reports["consumer" if v.consumer is not None else "producer"]
    checker = reports["producer"] if row.key == "pingpong" else end
    if checker["count"] != expected or checker["last_seq"] != expected - 1:
        raise BenchError(
            f"{row.key}/{v.key}: received {checker['count']} messages up to seq "
            f"{checker['last_seq']}, expected {expected} up to {expected - 1}"
        )
    elapsed = (end["t_end_ns"] - _t0(reports)) / 1e9
    sample: dict[str, Any] = {
        "elapsed_s": elapsed,
        "messages": expected,
        "cpu_us_per_msg": _cpu_s(reports) / expected * 1e6,
        "cpu_s": _cpu_detail(reports),
    }
    if "mean_batch" in end:
        sample["consumer_mean_batch"] = end["mean_batch"]
    if row.key == "pingpong":
        # The echo time includes the warm-up trips; the latency figures do not.
        sample.update({k: checker[k] for k in ("p50_us", "p99_us", "min_us", "max_us", "mean_us")})
    elif row.unit == "MB/s":
        sample["value"] = expected * params.bytes_size / 1e6 / elapsed
    else:
        sample["value"] = expected / elapsed
    return sample


def _median(samples: Sequence[Mapping[str, Any]], key: str) -> float:
    return float(statistics.median(s[key] for s in samples))


def _speedup(metric: str, mine: float, other: float) -> float:
    """How many times better ``mine`` is: a rate's ratio, a latency's inverse ratio."""
    return other / mine if metric.endswith("_us") else mine / other


def _pair_summary(
    row: PairRow, params: Params, samples: dict[str, list[dict[str, Any]]], missing: Mapping[str, str]
) -> dict[str, Any]:
    """Medians over repeats per variant, and every variant's ratio to mp.Queue (and to the others named)."""
    metrics = ("p50_us", "p99_us") if row.key == "pingpong" else ("value",)
    results: dict[str, dict[str, Any]] = {}
    for v in row.variants(params):
        entry: dict[str, Any] = {"label": v.label, "transport": v.transport}
        if v.transport in missing:
            entry.update(available=False, note=missing[v.transport])
        else:
            s = samples[v.key]
            entry.update({m: _median(s, m) for m in metrics})
            # The spread shows when a median hides runs that differ (on a VM, by core placement).
            entry["range"] = {m: [min(x[m] for x in s), max(x[m] for x in s)] for m in metrics}
            entry.update(available=True, cpu_us_per_msg=_median(s, "cpu_us_per_msg"), samples=s)
        results[v.key] = entry
    for entry in results.values():
        if entry["available"]:
            entry["ratios"] = {
                f"x {other}": {m: _speedup(m, entry[m], results[other][m]) for m in metrics}
                for other in ("mp.Queue", *row.also_ratio_to)
                if other in results and results[other]["available"]
            }
    return {"letter": row.letter, "title": row.title(params), "unit": row.unit, "variants": results}


def _medians(samples: Sequence[Mapping[str, Any]], key: str) -> list[float]:
    """Element-wise medians of a list-valued figure (one value per subscriber)."""
    return [float(statistics.median(column)) for column in zip(*(s[key] for s in samples))]


def _rotations(keys: Sequence[str], repeats: int) -> list[list[str]]:
    """The order of each repeat: rotated, so no variant always runs first (cold) or last."""
    n = len(keys)
    return [list(keys[r % n :]) + list(keys[: r % n]) for r in range(repeats)] if n else []


def run_pair_row(
    row: PairRow, params: Params, ctx: ForkContext, progress: Progress, missing: Mapping[str, str]
) -> dict[str, Any]:
    """Measure every variant of ``row``, ``params.repeats`` times each."""
    variants = row.variants(params)
    by_key = {v.key: v for v in variants}
    runnable = [v.key for v in variants if v.transport not in missing]
    samples: dict[str, list[dict[str, Any]]] = {k: [] for k in runnable}
    for rep, order in enumerate(_rotations(runnable, params.repeats)):
        for key in order:
            v = by_key[key]
            progress.step(f"({row.letter}) {row.key}: {v.label}, run {rep + 1}/{params.repeats}")
            reports = measure(
                _pair_roles(v),
                v.transport if v.consumer else "none",
                params,
                ctx,
                two_way=row.two_way,
                options=v.options,
            )
            samples[key].append(_pair_sample(row, v, params, reports))
    return _pair_summary(row, params, samples, missing)


def _pair_steps(row: PairRow, params: Params, missing: Mapping[str, str]) -> int:
    return params.repeats * sum(v.transport not in missing for v in row.variants(params))


# -- (e) the size sweep ----------------------------------------------------------------------

SWEEP_TRANSPORTS: tuple[str, ...] = ("shmbus", "mp.Queue", "mp.Pipe")


def sweep_count(params: Params, size: int) -> int:
    """Messages of ``size`` bytes in one measurement: a fixed volume, within bounds."""
    return max(params.sweep_min_messages, min(params.sweep_max_messages, params.sweep_volume // size))


def run_sweep(params: Params, ctx: ForkContext, progress: Progress) -> dict[str, Any]:
    """(e) Bytes messages of each size through shmbus, mp.Queue and Pipe."""
    by_size: dict[str, Any] = {}
    for size in params.sweep_sizes:
        count = sweep_count(params, size)
        roles = [
            Role("producer", "producer", functools.partial(_produce_bytes, size=size, count=count)),
            Role("consumer", "consumer", functools.partial(_consume_bytes, size=size, count=count)),
        ]
        samples: dict[str, list[dict[str, Any]]] = {t: [] for t in SWEEP_TRANSPORTS}
        for rep, order in enumerate(_rotations(SWEEP_TRANSPORTS, params.sweep_repeats)):
            for t in order:
                what = f"{_size_text(size)} x {count:,}, {t}, run {rep + 1}/{params.sweep_repeats}"
                progress.step(f"(e) sizes: {what}")
                reports = measure(roles, t, params, ctx)
                samples[t].append(_stream_sample(reports, count, size))
        by_size[str(size)] = {"size": size, "messages": count, "transports": _stream_summary(samples)}
    return {"letter": "e", "title": "message-size sweep, bytes messages", "sizes": by_size}


def _stream_sample(reports: dict[str, dict[str, Any]], count: int, size: int) -> dict[str, Any]:
    cons = reports["consumer"]
    if cons["count"] != count or cons["last_seq"] != count - 1:
        raise BenchError(f"sizes: received {cons['count']} messages of {size} bytes, expected {count}")
    elapsed = (cons["t_end_ns"] - _t0(reports)) / 1e9
    return {
        "elapsed_s": elapsed,
        "msg_per_s": count / elapsed,
        "mb_per_s": count * size / 1e6 / elapsed,
        "cpu_us_per_msg": _cpu_s(reports) / count * 1e6,
        "cpu_s": _cpu_detail(reports),
    }


def _stream_summary(samples: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for t, s in samples.items():
        out[t] = {k: _median(s, k) for k in ("msg_per_s", "mb_per_s", "cpu_us_per_msg")}
        out[t]["samples"] = s
    base = out["mp.Queue"]["msg_per_s"]
    for t in out:
        out[t]["x mp.Queue"] = out[t]["msg_per_s"] / base
        out[t]["x mp.Pipe"] = out[t]["msg_per_s"] / out["mp.Pipe"]["msg_per_s"]
    return out


def _size_text(size: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if size >= 1 << shift and size % (1 << shift) == 0:
            return f"{size >> shift} {unit}"
    return f"{size} B"


# -- (f) producers x consumers ------------------------------------------------------------------

MPMC_TRANSPORTS: tuple[str, ...] = ("shmbus", "mp.Queue")


def _send_stops(consumers: int) -> Callable[[Channel], None]:
    """The parent's part: once every producer has flushed and reported, one ``None`` per consumer."""

    def hook(channel: Channel) -> None:
        ep = channel.endpoint("producer")
        try:
            for _ in range(consumers):
                ep.send(None)
            ep.flush()
        finally:
            ep.close()

    return hook


def run_mpmc(params: Params, ctx: ForkContext, progress: Progress) -> dict[str, Any]:
    """(f) P producers and C consumers on one queue: total msg/s."""
    shapes: dict[str, Any] = {}
    for np_, nc in params.mpmc_shapes:
        share = params.mpmc_messages // np_
        roles = [
            Role(f"producer{i}", "producer", functools.partial(_produce_share, index=i, share=share))
            for i in range(np_)
        ]
        roles += [Role(f"consumer{i}", "consumer", _consume_until_none) for i in range(nc)]
        hook = (frozenset(r.name for r in roles[:np_]), _send_stops(nc))
        samples: dict[str, list[dict[str, Any]]] = {t: [] for t in MPMC_TRANSPORTS}
        shape = f"{np_} producer{'s' * (np_ != 1)} x {nc} consumer{'s' * (nc != 1)}"
        for rep, order in enumerate(_rotations(MPMC_TRANSPORTS, params.mpmc_repeats)):
            for t in order:
                progress.step(f"(f) mpmc: {shape}, {t}, run {rep + 1}/{params.mpmc_repeats}")
                reports = measure(roles, t, params, ctx, hook=hook)
                samples[t].append(_mpmc_sample(reports, share * np_))
        result: dict[str, dict[str, Any]] = {
            t: {
                "msg_per_s": _median(s, "msg_per_s"),
                "cpu_us_per_msg": _median(s, "cpu_us_per_msg"),
                "samples": s,
            }
            for t, s in samples.items()
        }
        result["shmbus"]["x mp.Queue"] = result["shmbus"]["msg_per_s"] / result["mp.Queue"]["msg_per_s"]
        shapes[f"{np_}x{nc}"] = {
            "producers": np_,
            "consumers": nc,
            "messages": share * np_,
            "transports": result,
        }
    return {"letter": "f", "title": "producers x consumers on one queue, small dicts", "shapes": shapes}


def _mpmc_sample(reports: dict[str, dict[str, Any]], total: int) -> dict[str, Any]:
    consumers = [r for name, r in reports.items() if name.startswith("consumer")]
    count = sum(r["count"] for r in consumers)
    seq_sum = sum(r["seq_sum"] for r in consumers)
    if count != total or seq_sum != total * (total - 1) // 2:
        raise BenchError(f"mpmc: consumers received {count} messages (seq sum {seq_sum}), expected {total}")
    elapsed = (max(r["t_last_ns"] for r in consumers) - _t0(reports)) / 1e9
    return {
        "elapsed_s": elapsed,
        "msg_per_s": total / elapsed,
        "per_consumer": [r["count"] for r in consumers],
        "cpu_us_per_msg": _cpu_s(reports) / total * 1e6,
        "cpu_s": _cpu_detail(reports),
    }


# -- (t) Topic fan-out --------------------------------------------------------------------------


def run_topic(params: Params, ctx: ForkContext, progress: Progress) -> dict[str, Any]:
    """(t) Publish rate with 0, 1 and 3 subscriber processes, and what each subscriber got."""
    configs: dict[str, Any] = {}
    keys = [str(k) for k in params.topic_subscribers]
    samples: dict[str, list[dict[str, Any]]] = {k: [] for k in keys}
    for rep, order in enumerate(_rotations(keys, params.repeats)):
        for key in order:
            k = int(key)
            progress.step(f"(t) topic: {k} subscriber{'s' * (k != 1)}, run {rep + 1}/{params.repeats}")
            roles = [Role("publisher", "producer", _publish)]
            roles += [Role(f"subscriber{i}", "consumer", _subscribe) for i in range(k)]
            samples[key].append(_topic_sample(measure(roles, "topic", params, ctx), params.topic_messages))
    for key, s in samples.items():
        configs[key] = {
            "subscribers": int(key),
            "publish_msg_per_s": _median(s, "publish_msg_per_s"),
            "cpu_us_per_msg": _median(s, "cpu_us_per_msg"),
            "receive_msg_per_s": _medians(s, "receive_msg_per_s"),
            "lost": _medians(s, "lost"),
            "samples": s,
        }
    base = configs[keys[0]]["publish_msg_per_s"]
    ring = parse_size(params.topic_capacity)
    for c in configs.values():
        c["pct_of_0_subscribers"] = 100 * c["publish_msg_per_s"] / base
    return {
        "letter": "t",
        "title": f"Topic, {params.topic_messages:,} small dicts, {_size_text(ring)} ring",
        "configs": configs,
    }


def _topic_sample(reports: dict[str, dict[str, Any]], n: int) -> dict[str, Any]:
    pub = reports.pop("publisher")
    subs = [reports[name] for name in sorted(reports)]
    for s in subs:
        if s["received"] + s["lost"] != n:
            raise BenchError(f"topic: a subscriber received {s['received']} and lost {s['lost']} of {n}")
    t0 = min([pub["t_start_ns"], *(s["t_start_ns"] for s in subs)])
    everyone = {"publisher": pub, **reports}
    return {
        "publish_elapsed_s": (pub["t_end_ns"] - pub["t_start_ns"]) / 1e9,
        "publish_msg_per_s": n / ((pub["t_end_ns"] - pub["t_start_ns"]) / 1e9),
        "receive_msg_per_s": [s["received"] / ((s["t_last_ns"] - t0) / 1e9) for s in subs],
        "received": [s["received"] for s in subs],
        "lost": [s["lost"] for s in subs],
        "cpu_us_per_msg": _cpu_s(everyone) / n * 1e6,
        "cpu_s": _cpu_detail(everyone),
    }


# -- (h) scale: large buses -------------------------------------------------------------------


_MEMORY_PROBE = r"""
import json, sys

def status():
    keys = ("VmRSS", "RssAnon", "RssFile", "RssShmem")
    with open("/proc/self/status") as f:
        pairs = (line.split(":", 1) for line in f)
        return {k: int(v.split()[0]) * 1024 for k, v in pairs if k in keys}

import shmbus
before = status()
q = shmbus.Queue.open(sys.argv[1])
q.put({"seq": 0, "ts": 0.0, "name": "sensor-17", "value": 3.14})
ok = q.get()["seq"] == 0
after = status()
q.close()
print(json.dumps({"before": before, "after": after, "ok": ok}))
"""


def _large_capacity(params: Params) -> tuple[int, str]:
    """The large bus size: 4 GiB if /dev/shm has it free (with a margin), else the fallback."""
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return params.scale_fallback, "/dev/shm not found: fell back"
    free = st.f_bavail * st.f_frsize
    if free >= params.scale_large + 256 * MIB:
        return params.scale_large, f"{free / GIB:.1f} GiB free in /dev/shm"
    return params.scale_fallback, f"only {free / GIB:.1f} GiB free in /dev/shm: fell back"


def run_scale(params: Params, ctx: ForkContext, progress: Progress) -> dict[str, Any]:
    """(h) Create+open time of a small and a large bus; memory of a process using a 1 GiB bus."""
    large, why = _large_capacity(params)
    create: dict[str, Any] = {}
    for cap in (params.scale_small, large):
        s = []
        for rep in range(params.repeats):
            progress.step(f"(h) scale: create+open a {_size_text(cap)} bus, run {rep + 1}/{params.repeats}")
            path = _bus_name()
            role = Role("creator", "", functools.partial(_create_open, path=path, capacity=cap))
            s.append(measure([role], "scratch", params, ctx, options={"path": path})["creator"])
        create[str(cap)] = {
            "capacity": cap,
            "create_open_ms": 1e3 * _median(s, "create_open_s"),
            "allocated_bytes": _median(s, "allocated_bytes"),
            "samples": [{k: r[k] for k in ("create_open_s", "allocated_bytes")} for r in s],
        }
    memory = [_memory_probe(params, rep, progress) for rep in range(params.repeats)]
    return {
        "letter": "h",
        "title": "scale: large buses",
        "large_capacity": large,
        "large_note": why,
        "create_open": create,
        "memory": {
            "bus_capacity": params.memory_bus,
            **{k: _median(memory, k) for k in memory[0] if k != "detail"},
            "samples": memory,
        },
    }


def _memory_probe(params: Params, rep: int, progress: Progress) -> dict[str, Any]:
    """One fresh ``python``: VmRSS after ``import shmbus``, then after opening a bus and a put/get."""
    progress.step(
        f"(h) scale: memory of a process using a {_size_text(params.memory_bus)} bus, "
        f"run {rep + 1}/{params.repeats}"
    )
    path = _bus_name()
    try:
        Queue.create(path, capacity=params.memory_bus).close()
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        path_var = os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "PYTHONPATH": path_var}
        real = os.path.join("/dev/shm", path)
        done = subprocess.run(
            [sys.executable, "-c", _MEMORY_PROBE, real],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if done.returncode != 0:
            raise BenchError(f"the memory probe failed:\n{done.stderr}")
        out = json.loads(done.stdout)
        allocated = os.stat(real).st_blocks * 512
    finally:
        _unlink_quietly(path)
    if not out["ok"]:
        raise BenchError("the memory probe got another message back")
    b, a = out["before"], out["after"]
    return {
        "rss_fresh_bytes": b["VmRSS"],
        "rss_after_bytes": a["VmRSS"],
        "rss_delta_bytes": a["VmRSS"] - b["VmRSS"],
        "shmem_delta_bytes": a.get("RssShmem", 0) - b.get("RssShmem", 0),
        "bus_allocated_bytes": allocated,
        "detail": out,
    }


# -- the whole run ----------------------------------------------------------------------

# Every row, by key, with its letter(s) for --only.
ROW_LETTERS: dict[str, tuple[str, ...]] = {
    "single": ("a",),
    "batch": ("b",),
    "bytes": ("c", "g"),
    "pingpong": ("d",),
    "sizes": ("e",),
    "mpmc": ("f",),
    "scale": ("h",),
    "topic": ("t",),
}


def _optional_missing() -> dict[str, str]:
    """The optional comparisons that cannot run here, with why."""
    missing: dict[str, str] = {}
    for transport, (module, _dist) in OPTIONAL.items():
        try:
            importlib.import_module(module)
        except ImportError as e:
            broken = not isinstance(e, ModuleNotFoundError)
            missing[transport] = f"import failed: {e}" if broken else "not installed"
    return missing


def _steps(keys: Sequence[str], params: Params, missing: Mapping[str, str]) -> int:
    n = 0
    for row in PAIR_ROWS:
        if row.key in keys:
            n += _pair_steps(row, params, missing)
    if "sizes" in keys:
        n += len(params.sweep_sizes) * len(SWEEP_TRANSPORTS) * params.sweep_repeats
    if "mpmc" in keys:
        n += len(params.mpmc_shapes) * len(MPMC_TRANSPORTS) * params.mpmc_repeats
    if "scale" in keys:
        n += 3 * params.repeats
    if "topic" in keys:
        n += len(params.topic_subscribers) * params.repeats
    return n


def run(
    quick: bool, only: Sequence[str] | None = None, progress: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Run the benchmarks (all, or the row keys in ``only``) and return the results as JSON-able data.

    Raises ``BenchError`` if a measurement fails. ``progress`` is called with a
    short description before each measurement.
    """
    params = params_for(quick)
    ctx = mp.get_context("fork")
    keys = [k for k in ROW_LETTERS if only is None or k in only]
    missing = _optional_missing()
    prog = Progress(_steps(keys, params, missing), progress)
    started = time.monotonic()
    out: dict[str, Any] = {
        "started_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "params": {
            **asdict(params),
            "start_method": "fork",
            "message": {"seq": "i", "ts": "time.time()", "name": "sensor-17", "value": 3.14},
            "optional_missing": missing,
        },
        "benchmarks": {},
    }
    runners: dict[str, Callable[[], dict[str, Any]]] = {
        row.key: functools.partial(run_pair_row, row, params, ctx, prog, missing) for row in PAIR_ROWS
    }
    runners.update(
        sizes=functools.partial(run_sweep, params, ctx, prog),
        mpmc=functools.partial(run_mpmc, params, ctx, prog),
        scale=functools.partial(run_scale, params, ctx, prog),
        topic=functools.partial(run_topic, params, ctx, prog),
    )
    for key in keys:
        out["benchmarks"][key] = runners[key]()
    out["duration_s"] = round(time.monotonic() - started, 2)
    out["targets"] = evaluate_targets(out["benchmarks"])
    return out


def machine_info() -> dict[str, Any]:
    """Where the figures come from: they mean little without it."""

    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"

    try:
        usable: int | None = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = None
    info = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "shmbus": __version__,
        "shmbus_source": _source_revision(),
        "shmbus_c_fast_path": _accel.ENABLED,
        "msgpack": version("msgpack"),
        "posix_ipc": version("posix_ipc"),
        **{name: version(dist) for name, (_m, dist) in OPTIONAL.items()},
        # Other work on the machine moves every figure: say how busy it was.
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    return info


def _source_revision() -> str | None:
    """The git commit of a checkout (with "+modified" for local changes), or None when installed."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        rev = subprocess.run(
            ["git", "-C", here, "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", here, "status", "--porcelain", "--", "."],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{rev}+modified" if dirty else rev


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# -- targets ---------------------------------------------------------------------------------


def _get(d: Mapping[str, Any], *path: str) -> Any:
    """``d[path[0]][path[1]]...``, or None where anything is missing."""
    cur: Any = d
    for k in path:
        if not isinstance(cur, Mapping) or k not in cur:
            return None
        cur = cur[k]
    return cur


Figure = Callable[[Mapping[str, Any]], "float | None"]


def _ratio(row: str, variant: str, other: str, metric: str = "value") -> Figure:
    return lambda b: _get(b, row, "variants", variant, "ratios", f"x {other}", metric)


def _figure(*path: str) -> Figure:
    return lambda b: _get(b, *path)


def _pct_of_memcpy(variant: str) -> Figure:
    def pct(b: Mapping[str, Any]) -> float | None:
        mine = _get(b, "bytes", "variants", variant, "value")
        ceiling = [_get(b, "bytes", "variants", k, "value") for k in MEMCPY_VARIANTS]
        best = max((c for c in ceiling if c), default=None)
        return None if mine is None or best is None else 100 * mine / best

    return pct


MEMCPY_VARIANTS = ("memcpy new", "memcpy into", "memcpy into small")


def _rss_growth_mib(b: Mapping[str, Any]) -> float | None:
    grown = _get(b, "scale", "memory", "rss_delta_bytes")
    return None if grown is None else grown / MIB


# The project's targets (issues 2 and 6): (source, target, its figure in a run, comparison, limit).
TARGETS: tuple[tuple[str, str, Figure, str, float], ...] = (
    ("issue 2", "(a) shmbus >= 3x mp.Queue", _ratio("single", "shmbus", "mp.Queue"), ">=", 3),
    ("issue 6", "(a) shmbus >= 4x mp.Queue", _ratio("single", "shmbus", "mp.Queue"), ">=", 4),
    ("issue 6", "(a) shmbus ahead of pyzmq (x pyzmq > 1)", _ratio("single", "shmbus", "pyzmq"), ">", 1),
    (
        "issue 2",
        "(b) shmbus batches >= 5x mp.Queue one at a time",
        _ratio("batch", "shmbus", "mp.Queue"),
        ">=",
        5,
    ),
    (
        "issue 6",
        "(b) shmbus batches >= 8x mp.Queue one at a time",
        _ratio("batch", "shmbus", "mp.Queue"),
        ">=",
        8,
    ),
    (
        "issue 6",
        "(b) shmbus batches >= 2x faster-fifo get_many",
        _ratio("batch", "shmbus", "faster-fifo"),
        ">=",
        2,
    ),
    (
        "issue 2",
        "(c) shmbus put_bytes/get_bytes >= 10x mp.Queue",
        _ratio("bytes", "shmbus", "mp.Queue"),
        ">=",
        10,
    ),
    (
        "issue 6",
        "(c) shmbus put_bytes/get_bytes >= 25x mp.Queue",
        _ratio("bytes", "shmbus", "mp.Queue"),
        ">=",
        25,
    ),
    (
        "issue 6",
        "(c) shmbus zero copy >= 25x mp.Queue",
        _ratio("bytes", "shmbus zero-copy", "mp.Queue"),
        ">=",
        25,
    ),
    ("issue 6", "(c) shmbus put_bytes/get_bytes >= 90% of memcpy", _pct_of_memcpy("shmbus"), ">=", 90),
    ("issue 6", "(c) shmbus zero copy >= 90% of memcpy", _pct_of_memcpy("shmbus zero-copy"), ">=", 90),
    (
        "[info]",
        "(c) small ring: shmbus put_bytes/get_bytes >= 25x mp.Queue",
        _ratio("bytes", "shmbus small", "mp.Queue"),
        ">=",
        25,
    ),
    (
        "[info]",
        "(c) small ring: shmbus zero copy >= 25x mp.Queue",
        _ratio("bytes", "shmbus zero-copy small", "mp.Queue"),
        ">=",
        25,
    ),
    (
        "[info]",
        "(c) small ring: shmbus put_bytes/get_bytes >= 90% of memcpy",
        _pct_of_memcpy("shmbus small"),
        ">=",
        90,
    ),
    (
        "[info]",
        "(c) small ring: shmbus zero copy >= 90% of memcpy",
        _pct_of_memcpy("shmbus zero-copy small"),
        ">=",
        90,
    ),
    (
        "issues",
        "(d) shmbus blocking p50 no worse than mp.Pipe (x mp.Pipe >= 1)",
        _ratio("pingpong", "shmbus blocking", "mp.Pipe", "p50_us"),
        ">=",
        1,
    ),
    (
        "issues",
        "(d) shmbus with spin: p50 <= 5 us",
        _figure("pingpong", "variants", "shmbus spin", "p50_us"),
        "<=",
        5,
    ),
    (
        "issues",
        "(d) shmbus with spin: p99 <= 20 us",
        _figure("pingpong", "variants", "shmbus spin", "p99_us"),
        "<=",
        20,
    ),
    (
        "issues",
        "(a) producer+consumer CPU <= 1.5 us per small message",
        _figure("single", "variants", "shmbus", "cpu_us_per_msg"),
        "<=",
        1.5,
    ),
    ("issues", "(h) a 1 GiB bus + one small message: VmRSS growth <= 4 MiB", _rss_growth_mib, "<=", 4),
    (
        "issues",
        "(t) 3 subscribers: publish rate >= 80% of 0 subscribers",
        _figure("topic", "configs", "3", "pct_of_0_subscribers"),
        ">=",
        80,
    ),
)


def evaluate_targets(b: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Each target with its figure from this run and whether it is met (None: not measured)."""
    out = []
    for source, what, figure, op, limit in TARGETS:
        value = figure(b)
        met = None if value is None else {">=": value >= limit, ">": value > limit, "<=": value <= limit}[op]
        out.append({"source": source, "target": what, "value": value, "op": op, "limit": limit, "met": met})
    return out


# -- output ------------------------------------------------------------------------------


def _num(value: float, digits: int = 0) -> str:
    return f"{value:,.{digits}f}"


def _x(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}x"


def _render(rows: list[list[str]]) -> list[str]:
    """Align the columns: the first left, the others right; a rule under the header."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]

    def line(r: list[str]) -> str:
        return "  ".join([r[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(r[1:], widths[1:]))]).rstrip()

    return [line(rows[0]), "  ".join("-" * w for w in widths), *(line(r) for r in rows[1:])]


def _pair_table(key: str, b: Mapping[str, Any]) -> list[str]:
    unit, variants = b["unit"], b["variants"]
    head = f"({b['letter']}) {b['title']}"
    others = [k for k in next((v["ratios"] for v in variants.values() if v.get("ratios")), {})]
    if key == "pingpong":
        header = [head, "p50 us", "p99 us", "p50 of runs", *(f"{o} p50" for o in others), "CPU us/trip"]
    else:
        memcpy_col = ["% of memcpy"] if key == "bytes" else []
        header = [head, unit, "runs: min-max", *others, *memcpy_col, "CPU us/msg"]
    memcpy = max((variants[k].get("value", 0) for k in MEMCPY_VARIANTS if k in variants), default=0)
    rows = [header]
    for v in variants.values():
        if not v["available"]:
            rows.append([v["label"], v["note"], *([""] * (len(header) - 2))])
            continue
        r = v.get("ratios", {})
        if key == "pingpong":
            lo, hi = v["range"]["p50_us"]
            cells = [_num(v["p50_us"], 1), _num(v["p99_us"], 1), f"{lo:.1f}-{hi:.1f}",
                     *(_x(_get(r, o, "p50_us")) for o in others)]  # fmt: skip
        else:
            lo, hi = v["range"]["value"]
            cells = [_num(v["value"]), f"{_num(lo)}-{_num(hi)}", *(_x(_get(r, o, "value")) for o in others)]
            if key == "bytes":
                cells.append(f"{100 * v['value'] / memcpy:.0f}%" if memcpy else "")
        rows.append([v["label"], *cells, _num(v["cpu_us_per_msg"], 2)])
    return _render(rows)


def _sweep_table(b: Mapping[str, Any]) -> list[str]:
    title = f"({b['letter']}) {b['title']}"
    header = [title, "count", "transport", "MB/s", "msg/s", "x mp.Queue", "x mp.Pipe", "CPU us/msg"]
    rows = [header]
    for s in b["sizes"].values():
        for i, (t, r) in enumerate(s["transports"].items()):
            first = i == 0
            rows.append([
                _size_text(s["size"]) if first else "", _num(s["messages"]) if first else "", t,
                _num(r["mb_per_s"]), _num(r["msg_per_s"]), _x(r["x mp.Queue"]), _x(r["x mp.Pipe"]),
                _num(r["cpu_us_per_msg"], 2),
            ])  # fmt: skip
    return _render(rows)


def _mpmc_table(b: Mapping[str, Any]) -> list[str]:
    header = [
        f"({b['letter']}) {b['title']}",
        "messages",
        "shmbus msg/s",
        "mp.Queue msg/s",
        "x mp.Queue",
        "CPU us/msg: shmbus / mp.Queue",
    ]
    rows = [header]
    for name, s in b["shapes"].items():
        tr = s["transports"]
        p, c = name.split("x")
        rows.append(
            [
                f"{p} producer{'s' * (p != '1')} x {c} consumer{'s' * (c != '1')}",
                _num(s["messages"]),
                _num(tr["shmbus"]["msg_per_s"]),
                _num(tr["mp.Queue"]["msg_per_s"]),
                _x(tr["shmbus"]["x mp.Queue"]),
                f"{tr['shmbus']['cpu_us_per_msg']:.2f} / {tr['mp.Queue']['cpu_us_per_msg']:.2f}",
            ]
        )
    return _render(rows)


def _topic_table(b: Mapping[str, Any], queue_rate: float | None) -> list[str]:
    header = [
        f"({b['letter']}) {b['title']}",
        "publish msg/s",
        "% of 0 subs",
        "x mp.Queue (a)",
        "receive msg/s, each subscriber",
        "lost, each",
        "CPU us/msg",
    ]
    rows = [header]
    for c in b["configs"].values():
        n = c["subscribers"]
        rows.append(
            [
                f"{n} subscriber{'s' * (n != 1)}",
                _num(c["publish_msg_per_s"]),
                f"{c['pct_of_0_subscribers']:.0f}%",
                _x(c["publish_msg_per_s"] / queue_rate if queue_rate else None),
                " / ".join(_num(x) for x in c["receive_msg_per_s"]) or "-",
                " / ".join(_num(x) for x in c["lost"]) or "-",
                _num(c["cpu_us_per_msg"], 2),
            ]
        )
    return _render(rows)


def _scale_table(b: Mapping[str, Any]) -> list[str]:
    rows = [[f"({b['letter']}) {b['title']}", "value", "note"]]
    for c in b["create_open"].values():
        rows.append(
            [
                f"create + open a {_size_text(c['capacity'])} bus",
                f"{c['create_open_ms']:.2f} ms",
                f"file allocated after: {c['allocated_bytes'] / 1024:,.0f} KiB",
            ]
        )
    m = b["memory"]
    size = _size_text(m["bus_capacity"])
    rows += [
        ["VmRSS, fresh python + import shmbus", f"{m['rss_fresh_bytes'] / MIB:.1f} MiB", "baseline"],
        [
            f"VmRSS after opening a {size} bus + put/get 1 msg",
            f"{m['rss_after_bytes'] / MIB:.1f} MiB",
            f"+{m['rss_delta_bytes'] / MIB:.2f} MiB (shared memory: +{m['shmem_delta_bytes'] / MIB:.2f} MiB)",
        ],
        [
            f"/dev/shm memory used by that {size} bus",
            f"{m['bus_allocated_bytes'] / 1024:,.0f} KiB",
            "allocated blocks of the file",
        ],
    ]
    if b["large_capacity"] != 4 * GIB:
        rows.append(["large bus size", _size_text(b["large_capacity"]), b["large_note"]])
    return _render(rows)


def _targets_table(targets: list[dict[str, Any]]) -> list[str]:
    rows = [["targets (from the project's issues)", "source", "this run", "verdict"]]
    for t in targets:
        value = "not measured" if t["value"] is None else f"{t['value']:,.2f}"
        verdict = {True: "met", False: "MISSED", None: "-"}[t["met"]]
        rows.append([t["target"], t["source"], value, verdict])
    return _render(rows)


_NOTES = [
    "x Y = how many times faster than Y, from the same run (rates: mine / Y's; latencies: Y's / mine).",
    "CPU = user+sys time of all the processes (producers, consumers, their threads) per message",
    "(per round trip for (d)). MB = 10**6 bytes. [info] lines are not targets' baselines: they",
    "send a whole batch as one message. Method and caveats: the docstring of shmbus/_bench.py.",
]


def format_table(results: dict[str, Any]) -> str:
    """The plain-text report: machine lines, parameters, one table per row, targets, notes."""
    m, p, b = results["machine"], results["params"], results["benchmarks"]
    kind = "quick" if p["quick"] else "full"
    src = f" ({m['shmbus_source']})" if m.get("shmbus_source") else ""
    text = [
        f"machine: {m['platform']}, {m['cpu_model']}, {m['cpu_count']} CPUs ({m['cpus_usable']} usable), "
        f"{m['memory_bytes'] / GIB:.0f} GiB; {m['python_implementation']} {m['python']}",
        f"shmbus {m['shmbus']}{src}, msgpack {m['msgpack']}, posix_ipc {m['posix_ipc']}, "
        f"faster-fifo {m['faster-fifo']}, pyzmq {m['pyzmq']}; "
        f"load average {' '.join(map(str, m['load_average_at_start']))} at start",
        f"{kind} run, {results['duration_s']:.0f} s; medians of {p['repeats']} runs "
        f"({p['sweep_repeats']} for (e), {p['mpmc_repeats']} for (f)); fork start method; "
        f"shmbus Queue capacity {p['capacity']}",
    ]
    for key in ROW_LETTERS:
        if key not in b:
            continue
        text.append("")
        if key in ("single", "batch", "bytes", "pingpong"):
            text += _pair_table(key, b[key])
        elif key == "sizes":
            text += _sweep_table(b[key])
        elif key == "mpmc":
            text += _mpmc_table(b[key])
        elif key == "topic":
            text += _topic_table(b[key], _get(b, "single", "variants", "mp.Queue", "value"))
        else:
            text += _scale_table(b[key])
    text += ["", *_targets_table(results["targets"]), "", *_NOTES]
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


def _progress_display(tty: bool) -> Callable[[str], None]:
    """One line rewritten in place on a terminal; plain lines for logs and pipes."""
    width = [0]

    def show(msg: str) -> None:
        if tty:
            # "\r" and padding overwrite the previous line; no scrolling log.
            sys.stderr.write("\r" + msg.ljust(width[0]))
            width[0] = max(width[0], len(msg))
        elif msg:
            sys.stderr.write(msg + "\n")
        sys.stderr.flush()

    return show


def _parse_only(value: str | None, parser: argparse.ArgumentParser) -> list[str] | None:
    if value is None:
        return None
    aliases = {k: k for k in ROW_LETTERS} | {letter: k for k, ls in ROW_LETTERS.items() for letter in ls}
    names = [n.strip().lower() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in aliases]
    if unknown or not names:
        parser.error(
            f"--only: unknown benchmark {', '.join(unknown) or value!r}; choose from "
            + ", ".join(f"{k} ({'/'.join(ls)})" for k, ls in ROW_LETTERS.items())
        )
    return [aliases[n] for n in names]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shmbus bench",
        description="Measure shmbus against multiprocessing.Queue and Pipe (and faster-fifo and pyzmq "
        "when installed) in the same run: throughput, bytes, latency, sizes, many producers and "
        "consumers, large buses, Topic fan-out; CPU per message.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="fewer messages, sizes and repeats: under a minute"
    )
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
        help="comma-separated subset: " + ",".join(ROW_LETTERS) + " (or their letters a-h, t)",
    )
    return parser


class _Terminated(BaseException):
    """SIGTERM, raised like Ctrl-C so that the finally blocks kill children and unlink buses."""


# The pid that installed the handlers below: the parent of every measurement.
_signal_owner = [0]


def _on_signal(signum: int, frame: Any) -> None:
    """Ctrl-C or SIGTERM: in the parent, unwind (the finally blocks clean up); in a child, just exit.

    Both signals reach the whole process group. A child forked a moment ago
    may still be inside ``os.fork()`` (running its at-fork hooks), before
    multiprocessing's ``os._exit`` guard: an exception raised there unwinds
    through the parent's frames the child inherited, and runs the parent's
    clean-up in the child (seen: a child reaping its siblings and removing
    the channel). The parent kills and reaps every child anyway.
    """
    if os.getpid() != _signal_owner[0]:
        os._exit(128 + signum)
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise _Terminated


def _run_cleanly(quick: bool, only: list[str] | None) -> dict[str, Any]:
    """``run`` with a progress display on stderr, and SIGTERM and Ctrl-C handled safely around forks."""
    tty = sys.stderr.isatty()
    progress = _progress_display(tty)
    previous: dict[int, Any] = {}
    # Only the main thread may set handlers; elsewhere the signals keep theirs.
    if threading.current_thread() is threading.main_thread():
        _signal_owner[0] = os.getpid()
        previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, _on_signal)
        # An ignored SIGINT (a background job) stays ignored.
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            previous[signal.SIGINT] = signal.signal(signal.SIGINT, _on_signal)
    try:
        return run(quick, only=only, progress=progress)
    finally:
        for signum, handler in previous.items():
            # None: the old handler was not set from Python; the default is the closest.
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        if tty:
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
