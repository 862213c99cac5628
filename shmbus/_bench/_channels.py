"""The transports compared, each behind one ``Endpoint``: plain callables a child's hot loop binds.

The parent makes a ``Channel`` before forking; each child opens its own end
with ``endpoint(side)``. Only this module knows how each library sends and
receives, so the workloads in ``_roles`` run the same code whatever they measure.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from multiprocessing.context import ForkContext
from typing import Any, Callable

from .. import BusNotFound, Queue, Topic
from .. import unlink as unlink_bus
from .._format import parse_size
from ._params import MEASUREMENT_TIMEOUT_S, Params

__all__ = [
    "Endpoint",
    "Options",
    "Channel",
    "ShmbusChannel",
    "MpQueueChannel",
    "MpPipeChannel",
    "FasterFifoChannel",
    "ZmqChannel",
    "TopicChannel",
    "ScratchBusChannel",
    "CHANNELS",
    "bus_name",
    "unlink_quietly",
]


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


def bus_name() -> str:
    # pid and counter: two benchmarks at once, or one bus per measurement, never collide.
    return f"shmbus-bench-{os.getpid()}-{next(_bus_numbers)}"


def unlink_quietly(path: str) -> None:
    with contextlib.suppress(BusNotFound):
        unlink_bus(path)


class ShmbusChannel(Channel):
    """One shmbus Queue per direction; children open them by name, as real users do.

    Options: ``capacity`` (default: the run's), ``spin_us`` (default: the library's),
    ``pure`` (True: without the C fast path, to show what it brings in the same run),
    ``bytes_as_objects`` (True: raw bytes go by ``put``/``get``, as msgpack bin messages).
    """

    def __init__(self, ctx: ForkContext, two_way: bool, params: Params, options: Options) -> None:
        super().__init__(ctx, two_way, params, options)
        self.paths: list[str] = []
        self.spin_us: float | None = options.get("spin_us")
        self.pure: bool = options.get("pure", False)
        self.bytes_as_objects: bool = options.get("bytes_as_objects", False)
        try:
            for _ in range(2 if two_way else 1):
                path = bus_name()
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
                # The "pure Python" rows: one handle without C, which no user needs a public door for.
                q._drop_fast_path()  # noqa: SLF001
        if tx is not None:
            ep.send, ep.send_batch, ep.send_raw = tx.put, tx.put_many, tx.put_bytes
            if self.bytes_as_objects:
                ep.send_raw = tx.put
            ep.reserve = tx.reserve
        if rx is not None:
            ep.recv, ep.recv_raw, ep.get_view = rx.get, rx.get_bytes, rx.get_view
            if self.bytes_as_objects:
                ep.recv_raw = rx.get
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
            unlink_quietly(path)


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
    """A shmbus Topic per direction: a side publishes on one, and subscribes to the other (two-way)."""

    def __init__(self, ctx: ForkContext, two_way: bool, params: Params, options: Options) -> None:
        super().__init__(ctx, two_way, params, options)
        self.paths: list[str] = []
        try:
            for _ in range(2 if two_way else 1):
                path = bus_name()
                Topic.create(path, capacity=params.topic_capacity).close()
                self.paths.append(path)
        except BaseException:
            self.close()
            raise

    def endpoint(self, side: str) -> Endpoint:
        back = self.paths[1] if self.two_way else None
        tx_path, rx_path = _directions(side, self.paths[0], back)
        tx = Topic.open(tx_path) if tx_path else None
        rx = Topic.open(rx_path) if rx_path else None
        ep = Endpoint()
        if tx is not None:
            ep.send, ep.send_batch = tx.publish, tx.publish_many
        if rx is not None:
            sub = rx.subscribe()  # before the barrier: it sees every message published
            ep.recv = sub.get
            ep.recv_batch = functools.partial(sub.get_many, self.batch_size)
            ep.stats = lambda: {"lost": sub.lost, "received": sub.received}

        def close() -> None:
            for t in (tx, rx):
                if t is not None:
                    t.close()  # closes the subscription too

        ep.close = close
        return ep

    def close(self) -> None:
        paths, self.paths = self.paths, []
        for path in paths:
            unlink_quietly(path)


class ScratchBusChannel(Channel):
    """No channel, only a bus name a child creates; the parent removes it whatever happens."""

    def __init__(self, ctx: ForkContext, two_way: bool, params: Params, options: Options) -> None:
        super().__init__(ctx, two_way, params, options)
        self.path: str = options["path"]

    def close(self) -> None:
        unlink_quietly(self.path)


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
