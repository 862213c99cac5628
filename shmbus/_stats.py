"""What a bus reports about itself: header statistics, time samples, subscriber rows.

Rule: this module owns every reading of the header made for people (``stats()``,
``shmbus stat``/``top``/``ls``) and the time samples producers leave for it.
It reads a header viewed as u64, a live mapping or a copy read with ``pread``,
without a lock: what it returns is consistent only to within the messages in
flight at that instant, and nothing here ever feeds back into the ring's
logic. The one store is ``record_time``, a producer's note under the head lock.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from ._format import (
    KIND_NAMES,
    Q_BYTES_IN,
    Q_BYTES_OUT,
    Q_HEAD,
    Q_NEXT_SEQ,
    Q_RECOVERIES,
    Q_TAIL,
    Q_TAIL_SEQ,
    Q_TIME_SAMPLES,
    S_LOST,
    S_NEXT_SEQ,
    S_RECEIVED,
    SAMPLE_EVERY,
    SAMPLE_WRITING,
    SUBSCRIBER_SIZE,
    TIME_SAMPLES,
    VERSION,
    Layout,
    subscriber_pid,
    subscriber_state,
)

__all__ = ["Stats", "header_stats", "record_time", "oldest_age", "subscriber_rows"]


@dataclass(frozen=True)
class Stats:
    """A snapshot of a bus's header, as returned by ``stats()``.

    Counters are read without a lock, so they are consistent only to within
    the messages in flight at that instant.
    """

    path: str
    kind: str
    format_version: int
    bus_id: str
    capacity: int
    maxsize: int
    max_subscribers: int
    used_bytes: int
    messages: int
    put_count: int
    get_count: int
    bytes_in: int
    bytes_out: int
    created_ns: int
    recoveries: int = 0  # lock repairs done since create (a holder died, or was cut short)

    @property
    def fill(self) -> float:
        """Fraction of the ring's bytes in use, 0.0 to 1.0."""
        return self.used_bytes / self.capacity


def header_stats(path: str, lay: Layout, h: memoryview) -> Stats:
    """The ``Stats`` of a bus from its header viewed as u64 (a live mapping or a copy read with pread)."""
    head, tail, put, got = h[Q_HEAD], h[Q_TAIL], h[Q_NEXT_SEQ], h[Q_TAIL_SEQ]
    return Stats(
        path=path,
        kind=KIND_NAMES[lay.kind],
        format_version=VERSION,
        bus_id=lay.bus_id,
        capacity=lay.capacity,
        maxsize=lay.maxsize,
        max_subscribers=lay.max_subscribers,
        used_bytes=min(max(head - tail, 0), lay.capacity),
        messages=max(put - got, 0),
        put_count=put,
        get_count=got,
        bytes_in=h[Q_BYTES_IN],
        bytes_out=h[Q_BYTES_OUT],
        created_ns=lay.created_ns,
        recoveries=h[Q_RECOVERIES],
    )


def record_time(h: memoryview, seq: int) -> None:
    """Note in the time samples that message ``seq`` (a multiple of 256) is published now.

    Producers call it under the head lock, for one message in 256: the
    policy (which entries) is in the ``_format`` docstring.
    """
    now = time.time_ns()
    _store_sample(h, Q_TIME_SAMPLES + ((seq // SAMPLE_EVERY) & 3) * 2, seq, now)
    for k in range(1, TIME_SAMPLES - 3):
        if seq % (SAMPLE_EVERY << 3 * k):
            break
        _store_sample(h, Q_TIME_SAMPLES + (3 + k) * 2, seq, now)


def _store_sample(h: memoryview, i: int, seq: int, now: int) -> None:
    # seq last: a reader that sees the same seq before and after reading the time has a whole entry.
    h[i] = SAMPLE_WRITING
    h[i + 1] = now
    h[i] = seq


def oldest_age(h: memoryview, now_ns: int) -> tuple[float | None, float | None] | None:
    """Bounds on the age of the oldest message, in seconds: ``(at_least, at_most)``; None if empty.

    Read from the time samples of the header ``h`` (viewed as u64, a live
    mapping or a copy). Either bound is None when no sample gives it; they
    are equal when the oldest message carries a sample itself.
    """
    tail_seq, next_seq = h[Q_TAIL_SEQ], h[Q_NEXT_SEQ]
    if next_seq <= tail_seq:
        return None
    before: tuple[int, int] | None = None  # newest sample at or before the oldest message
    after: tuple[int, int] | None = None  # oldest sample after it, among the messages held
    for i in range(Q_TIME_SAMPLES, Q_TIME_SAMPLES + 2 * TIME_SAMPLES, 2):
        seq, t = h[i], h[i + 1]
        if seq != h[i] or seq == SAMPLE_WRITING or not t:
            continue  # being written (or never)
        if seq <= tail_seq:
            if before is None or seq > before[0]:
                before = (seq, t)
        elif seq < next_seq and (after is None or seq < after[0]):
            after = (seq, t)
    at_most = max(now_ns - before[1], 0) / 1e9 if before else None
    at_least = max(now_ns - after[1], 0) / 1e9 if after else None
    if before is not None and before[0] == tail_seq:
        at_least = at_most
    return at_least, at_most


def subscriber_rows(h: memoryview, layout: Layout) -> list[dict[str, int]]:
    """``Topic.subscribers`` from a header viewed as u64 (a live mapping or a copy read with pread)."""
    out = []
    published = h[Q_NEXT_SEQ]
    for i in range(layout.max_subscribers):
        base = (layout.subscribers_offset + i * SUBSCRIBER_SIZE) // 8
        word = h[base]
        if subscriber_state(word):
            nxt = h[base + S_NEXT_SEQ]
            out.append({
                "slot": i,
                "pid": subscriber_pid(word),
                "lag": max(published - nxt, 0),
                "lost": h[base + S_LOST],
                "received": h[base + S_RECEIVED],
            })  # fmt: skip
    return out
