"""What the children run: each producer and consumer body, and the checks that keep the figures honest.

A consumer checks every message it gets (its seq, or its length and tag) and
raises ``Mismatch`` at the first one out of place, so a lost, duplicated or
reordered message fails the run instead of inflating it.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from typing import Any, Callable

from .. import Queue
from ._channels import Endpoint
from ._params import MIB, PAYLOAD_POOL, Params

__all__ = [
    "now_ns",
    "RoleFn",
    "Mismatch",
    "produce_single",
    "consume_single",
    "produce_batch",
    "consume_batch",
    "produce_bytes",
    "consume_bytes",
    "warmup_lap",
    "produce_reserved",
    "consume_viewed",
    "memcpy_new",
    "memcpy_into",
    "ping",
    "echo",
    "produce_share",
    "consume_until_none",
    "publish",
    "publish_batches",
    "subscribe",
    "create_open",
]


def now_ns() -> int:
    # CLOCK_MONOTONIC is one clock for the whole machine, so the producer's
    # start and the consumer's end stamps can be subtracted.
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


# once its set-up is done: ``go`` waits at the barrier and starts the clocks.
# It returns what it wants the parent to check (count, last seq) or report.
# Workloads that need more than Params get it bound with functools.partial.
RoleFn = Callable[[Endpoint, Params, Callable[[], None]], dict[str, Any]]


class Mismatch(Exception):
    """The consumer did not receive what the producer sent."""


def _message(i: int) -> dict[str, Any]:
    return {"seq": i, "ts": time.time(), "name": "sensor-17", "value": 3.14}


def produce_single(ep: Endpoint, p: Params, go: Callable[[], None]) -> dict[str, Any]:
    send, now = ep.send, time.time
    go()
    for i in range(p.small_messages):
        # The dict is built inline, as a real producer would: the same cost for every channel.
        send({"seq": i, "ts": now(), "name": "sensor-17", "value": 3.14})
    return {}


def consume_single(ep: Endpoint, p: Params, go: Callable[[], None]) -> dict[str, Any]:
    recv = ep.recv
    count, last = 0, -1
    go()
    for _ in range(p.small_messages):
        last = recv()["seq"]
        if last != count:
            raise Mismatch(f"message {count} has seq {last}")
        count += 1
    return {"count": count, "last_seq": last}


def produce_batch(ep: Endpoint, p: Params, go: Callable[[], None]) -> dict[str, Any]:
    send, now, n, size = ep.send_batch, time.time, p.small_messages, p.batch_size
    go()
    for start in range(0, n, size):
        stop = min(start + size, n)
        send([{"seq": i, "ts": now(), "name": "sensor-17", "value": 3.14} for i in range(start, stop)])
    return {}


def consume_batch(ep: Endpoint, p: Params, go: Callable[[], None]) -> dict[str, Any]:
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


def warmup_lap(p: Params, size: int) -> tuple[int, int]:
    """The untimed warm-up before bytes messages of ``size``: ``(message size, count)``.

    As much as ``bytes_warmup`` 1 MiB messages (one lap of the ring), in
    messages of the measured size when larger: records are placed by size
    (large ones do not wrap early), so only a lap at that size touches the
    pages the timed messages will, and a fresh page costs about 10x the copy.
    """
    warm = max(size, MIB)
    return warm, -(-p.bytes_warmup * MIB // warm)


def produce_bytes(
    ep: Endpoint, p: Params, go: Callable[[], None], *, size: int, count: int
) -> dict[str, Any]:
    send = ep.send_raw
    pool, last = _payloads(size, count)
    k = len(pool)
    warm_size, laps = warmup_lap(p, size)
    warm = _tagged(0, warm_size)
    for _ in range(laps):
        send(warm)
    go()
    for i in range(count - 1):
        send(pool[i % k])
    send(last)
    return {}


def consume_bytes(
    ep: Endpoint, p: Params, go: Callable[[], None], *, size: int, count: int
) -> dict[str, Any]:
    recv, k = ep.recv_raw, _pool_size(size)
    n, last = 0, -1
    from_bytes = int.from_bytes
    for _ in range(warmup_lap(p, size)[1]):
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


def produce_reserved(
    ep: Endpoint, p: Params, go: Callable[[], None], *, size: int, count: int
) -> dict[str, Any]:
    """Zero copy in: each payload is copied once, straight into the ring."""
    reserve = ep.reserve
    pool, last = _payloads(size, count)
    k = len(pool)
    warm_size, laps = warmup_lap(p, size)
    warm = _tagged(0, warm_size)
    for _ in range(laps):
        with reserve(warm_size) as buf:
            buf[:] = warm  # every byte: the lap must touch every page of the ring
    go()
    for i in range(count - 1):
        with reserve(size) as buf:
            buf[:] = pool[i % k]
    with reserve(size) as buf:
        buf[:] = last
    return {}


def consume_viewed(
    ep: Endpoint, p: Params, go: Callable[[], None], *, size: int, count: int
) -> dict[str, Any]:
    """Zero copy out: the length and tag are read in the ring, nothing is copied."""
    get_view, k = ep.get_view, _pool_size(size)
    n, last = 0, -1
    from_bytes = int.from_bytes
    for _ in range(warmup_lap(p, size)[1]):
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


def memcpy_new(ep: Endpoint, p: Params, go: Callable[[], None], *, size: int, count: int) -> dict[str, Any]:
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


def memcpy_into(
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


def ping(ep: Endpoint, p: Params, go: Callable[[], None]) -> dict[str, Any]:
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


def echo(ep: Endpoint, p: Params, go: Callable[[], None]) -> dict[str, Any]:
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


def produce_share(
    ep: Endpoint, p: Params, go: Callable[[], None], *, index: int, share: int
) -> dict[str, Any]:
    """(f) One of several producers: its own range of seqs, one message at a time."""
    send, now = ep.send, time.time
    go()
    for i in range(index * share, (index + 1) * share):
        send({"seq": i, "ts": now(), "name": "sensor-17", "value": 3.14})
    return {"count": share}


def consume_until_none(ep: Endpoint, p: Params, go: Callable[[], None]) -> dict[str, Any]:
    """(f) One of several consumers: count and sum seqs until the parent's ``None``."""
    recv, clock = ep.recv, now_ns
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


def publish(ep: Endpoint, p: Params, go: Callable[[], None]) -> dict[str, Any]:
    """(t) The publisher: small dicts, one ``publish`` at a time, never waiting."""
    send, now = ep.send, time.time
    go()
    for i in range(p.topic_messages):
        send({"seq": i, "ts": now(), "name": "sensor-17", "value": 3.14})
    return {"count": p.topic_messages}


def publish_batches(ep: Endpoint, p: Params, go: Callable[[], None]) -> dict[str, Any]:
    """(t) The publisher of batches: ``publish_many`` of ``batch_size`` small dicts at a time."""
    send, now, n, size = ep.send_batch, time.time, p.topic_messages, p.batch_size
    go()
    for start in range(0, n, size):
        stop = min(start + size, n)
        send([{"seq": i, "ts": now(), "name": "sensor-17", "value": 3.14} for i in range(start, stop)])
    return {"count": n}


def subscribe(ep: Endpoint, p: Params, go: Callable[[], None]) -> dict[str, Any]:
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
    t_last = now_ns()
    return {"received": received, "t_last_ns": t_last, **ep.stats()}


def create_open(
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
