"""The plain nats-py baseline: what a user would write by hand to move msgpack payloads through JetStream.

Rule: the baseline gets the discipline the bridge must keep, no less and no
more: the publisher pipelines its JetStream publishes (``publish_async``,
up to ``window`` acknowledgements in flight, each carrying a
``Nats-Msg-Id`` as the bridge's do) and counts a message sent only once its
acknowledgement came; the consumer pulls from a durable consumer in batches
and acknowledges every message. Publisher and consumer are separate forked
processes, as the bridge's two ends are; each measures its own CPU time
(``getrusage``) and stamps ``CLOCK_MONOTONIC`` (one clock for the machine)
after a common barrier, so no connection or stream set-up is timed.

nats-py is imported only here, inside the functions: ``shmbus[nats]`` is
optional and the rest of the bench runs without it.
"""

from __future__ import annotations

import asyncio
import functools
import multiprocessing
import time
import uuid
from typing import Any

import msgpack

from ._measure import run_children

__all__ = ["measure_nats_pair", "jetstream_stream"]

_FETCH = 256  # messages one pull asks for


def _payloads(n: int) -> list[bytes]:
    """The bench's small dict, msgpack-encoded: the bytes the bridge puts on the wire."""
    ts = time.time()
    return [msgpack.packb({"seq": i, "ts": ts, "name": "sensor-17", "value": 3.14}) for i in range(n)]


async def _publish(go: Any, url: str, subject: str, payloads: list[bytes], window: int) -> None:
    import nats

    nc = await nats.connect(url)
    try:
        js = nc.jetstream(publish_async_max_pending=window)
        go()
        futures = [
            await js.publish_async(subject, data, headers={"Nats-Msg-Id": f"pair-{i}"})
            for i, data in enumerate(payloads)
        ]
        await js.publish_async_completed()
        for f in futures:
            f.result()  # an error acknowledgement raises here
    finally:
        await nc.close()


async def _consume(go: Any, url: str, stream: str, subject: str, n: int) -> None:
    import nats
    from nats.errors import TimeoutError as NatsTimeout

    nc = await nats.connect(url)
    try:
        sub = await nc.jetstream().pull_subscribe(subject, durable="pair", stream=stream)
        go()
        got = 0
        while got < n:
            try:
                msgs = await sub.fetch(min(_FETCH, n - got), timeout=1)
            except NatsTimeout:
                continue  # the publisher is behind; the parent's deadline bounds the run
            for m in msgs:
                await m.ack()
            got += len(msgs)
        await nc.flush()  # the last acks reach the server before the clock stops
    finally:
        await nc.close()


async def _stream(url: str, name: str, subject: str, create: bool) -> None:
    """Create (or delete) the measurement's own stream: file storage, one replica."""
    import nats
    from nats.js.api import StorageType

    nc = await nats.connect(url)
    try:
        jsm = nc.jetstream()
        if create:
            await jsm.add_stream(name=name, subjects=[subject], storage=StorageType.FILE)
        else:
            await jsm.delete_stream(name)
    finally:
        await nc.close()


def jetstream_stream(url: str, name: str, subject: str, create: bool) -> None:
    """Create (``create``) or delete a measurement's own stream ``name`` holding ``subject``."""
    asyncio.run(_stream(url, name, subject, create))


def measure_nats_pair(url: str, n: int, window: int = 4096) -> dict[str, Any]:
    """Move ``n`` msgpack payloads through a fresh JetStream stream at ``url`` with plain nats-py.

    Parameters:
        url: the server (``nats://host:port``).
        n: messages.
        window: publish acknowledgements in flight at most.

    Returns ``msgs_per_s`` (the publisher's first send to the consumer's
    last acknowledgement), ``cpu_us_per_msg`` (both processes), ``seconds``
    and each end's ``cpu_s``. Raises ``BenchError`` if an end fails or
    takes longer than the bench's measurement timeout.
    """
    tag = uuid.uuid4().hex[:12]
    stream, subject = f"PAIR_{tag}", f"pair.{tag}"
    jetstream_stream(url, stream, subject, True)
    try:
        reports = _run_pair(
            {"publisher": (url, subject, _payloads(n), window), "consumer": (url, stream, subject, n)}
        )
    finally:
        jetstream_stream(url, stream, subject, False)
    ends = reports.values()
    seconds = (max(r["t_end_ns"] for r in ends) - min(r["t_start_ns"] for r in ends)) / 1e9
    cpu = {role: r["cpu_s"] for role, r in reports.items()}
    return {
        "msgs": n,
        "seconds": seconds,
        "msgs_per_s": n / seconds,
        "cpu_us_per_msg": sum(cpu.values()) / n * 1e6,
        "cpu_s": cpu,
    }


def _run_pair(args: dict[str, tuple[Any, ...]]) -> dict[str, dict[str, Any]]:
    """Fork one child per end, collect their reports; BenchError on a failure or past the timeout."""
    ends = {"publisher": _publish, "consumer": _consume}
    bodies = {role: functools.partial(_run_end, ends[role], a) for role, a in args.items()}
    return run_children(multiprocessing.get_context("fork"), bodies, "nats-py ")


def _run_end(end: Any, args: tuple[Any, ...], go: Any) -> None:
    """One end of the pair, in its child: its coroutine, run to the end."""
    asyncio.run(end(go, *args))
