"""The ring algorithm: where records go, how positions wrap, what a valid record is.

Rule: this module knows nothing of mmap, semaphores or msgpack. It works on any
writable buffer (a ``memoryview`` of the mapped ring, or a ``bytearray`` in the
tests) and on plain integers for positions. Callers hold whatever lock the
position they pass in needs.

Positions are byte counts since creation that only grow; ``pos % capacity`` is
the place in the ring. ``head - tail`` is the number of bytes in use, wrap
padding included, and never exceeds ``capacity``. Every record starts at a
multiple of ``ALIGN`` and never straddles the end of the ring: when a record
does not fit before the end, a wrap marker is written at ``head`` and the record
starts at the next multiple of ``capacity``.

Every length and position read back from the buffer is checked here before
use, and a bad one raises ``CorruptBus``: the buffer may be shared with a
crashed or hostile process. Positions and sequence numbers are stored as u64
and never wrap: a writer checks (``check_positions``, ``check_room``) that
what it will store stays below 2**64 before it stores anything.
"""

from __future__ import annotations

from typing import Final, Union

from ._errors import CorruptBus
from ._format import (
    ALIGN,
    REC_MSGPACK,
    REC_NDARRAY,
    REC_RAW,
    REC_WRAP,
    RECORD,
    RECORD_SIZE,
    STATE_COMMITTED,
    U64_MAX,
)

__all__ = [
    "Buffer",
    "record_span",
    "place",
    "evict",
    "rebases",
    "HOT_WINDOW",
    "NEAR_EMPTY",
    "seq_at",
    "write",
    "begin",
    "commit",
    "read",
    "skip",
    "check_positions",
    "check_room",
    "last_seq",
]

Buffer = Union[bytearray, memoryview]

_pack_into = RECORD.pack_into
_unpack_from = RECORD.unpack_from
_MASK = ALIGN - 1
_DAMAGED = "the header is damaged: remove the bus with `shmbus rm` and create it again"
_MESSAGE_KINDS = (REC_MSGPACK, REC_RAW, REC_NDARRAY)


def record_span(length: int) -> int:
    """Bytes a record with a ``length``-byte payload occupies, header and padding included.

    The one definition. ``place``, ``evict``, ``write``, ``read`` and
    ``check_room`` run once a record on every put or get and spell it out
    inline, each marked "record_span, inline": a call costs about 25 ns
    there (measured, against ``place``'s 150 ns). ``test_ring`` checks that
    each of them agrees with this one.
    """
    return (RECORD_SIZE + length + _MASK) & ~_MASK


def place(head: int, tail: int, capacity: int, length: int) -> int:
    """Where a record of ``length`` payload bytes would start, or -1 if it does not fit now.

    The start is ``head`` itself, or the next multiple of ``capacity`` when the
    record would straddle the end or wraps early (see ``HOT_WINDOW``; the
    caller then writes a wrap marker at ``head``). When the ring is empty
    (``tail == head``) any record up to ``capacity - RECORD_SIZE`` bytes fits:
    if it needs to wrap, the caller must move ``tail`` to the returned start
    too (see ``rebases``).
    """
    span = (RECORD_SIZE + length + _MASK) & ~_MASK  # record_span, inline (see there)
    start = head
    room = capacity - head % capacity
    if span > room:
        start = head + room
    elif (
        capacity - room >= HOT_WINDOW
        and head - tail <= max(2 * span, NEAR_EMPTY)
        and head + room + span - tail <= capacity
    ):
        return head + room  # early wrap (see HOT_WINDOW); on an empty ring, a rebase
    if start + span - tail > capacity and not (tail == head and span <= capacity):
        return -1
    return start


def evict(buf: Buffer, capacity: int, tail: int, head: int, length: int) -> tuple[int, int, int]:
    """Drop the oldest records until one of ``length`` payload bytes fits; for drop-oldest rings.

    Returns ``(start, new_tail, dropped)``: where the new record goes, the
    position of the oldest record kept (equal to ``start`` when every record
    was dropped and the new one wraps) and how many records were dropped.
    The caller must store the new tail *before* writing a byte of the record,
    so that a reader can tell when what it copied was overwritten.
    """
    span = (RECORD_SIZE + length + _MASK) & ~_MASK  # record_span, inline (see there)
    room = capacity - head % capacity
    start = head + room if span > room else head  # past the end: after a wrap
    end = start + span
    dropped = 0
    while tail < head and end - tail > capacity:
        off = tail % capacity
        _, kind, state, _ = _unpack_from(buf, off)
        if kind == REC_WRAP and state == STATE_COMMITTED:
            tail += capacity - off  # only padding: dropping it may be enough
            continue
        tail = read(buf, capacity, tail, head)[4]
        dropped += 1
    if end - tail > capacity:  # the ring is empty and the record wraps: restart at ``start``
        tail = start
    return start, tail, dropped


def seq_at(buf: Buffer, capacity: int, pos: int) -> int:
    """The sequence number stored at record position ``pos``.

    A wrap marker carries the sequence number of the record after it, so this
    is the next message's number either way. The caller knows ``pos`` holds a
    record (it lies in ``[tail, head)``).
    """
    return int(_unpack_from(buf, pos % capacity)[3])


# Early wrap (a writer's policy; readers just follow the wrap marker): a
# record due at HOT_WINDOW bytes or more into the ring, while the ring holds
# at most NEAR_EMPTY bytes (or two such records), goes back to the ring's
# start if the start is free. A consumer that keeps up then works in the same
# few MiB, still in the CPU's caches and already in memory, instead of
# sweeping the whole ring (measured: 1 MiB messages through 64 MiB, 38% ->
# 76% of memcpy; 4 KiB ones 180k -> see docs/performance.md).
HOT_WINDOW: Final = 4 * 1024 * 1024
NEAR_EMPTY: Final = 64 * 1024


def rebases(head: int, tail: int, start: int) -> bool:
    """True when a record placed at ``start`` on an empty ring needs ``tail`` moved to ``start``."""
    return start != head and tail == head


def write(
    buf: Buffer, capacity: int, head: int, start: int, kind: int, seq: int,
    prefix: bytes, body: Buffer | bytes | None,
) -> int:  # fmt: skip
    """Write one record at ``start`` (from ``place``) and return the new head.

    The payload is ``prefix`` followed by ``body`` (either may be empty), so a
    large ``bytes`` goes in with one copy. The header is stored after the
    payload, but what makes a record visible is the caller publishing the new
    head (Queue) or the seqlock re-check (Topic), not the state field. This is
    ``begin`` + copy + ``commit`` fused, as the hot path of every put.
    """
    if start != head:
        _pack_into(buf, head % capacity, 0, REC_WRAP, STATE_COMMITTED, seq)
    off = start % capacity
    p = off + RECORD_SIZE
    n = len(prefix)
    buf[p : p + n] = prefix
    if body is not None:
        m = len(body)  # callers pass byte-format buffers, so len() is the byte count
        buf[p + n : p + n + m] = body
        n += m
    _pack_into(buf, off, n, kind, STATE_COMMITTED, seq)
    return start + ((RECORD_SIZE + n + _MASK) & ~_MASK)  # record_span, inline (see there)


def begin(buf: Buffer, capacity: int, head: int, start: int, seq: int) -> int:
    """Start a record at ``start`` (from ``place``), writing the wrap marker if it wraps.

    Returns the offset in ``buf`` where the payload goes; the caller fills it
    in place, then calls ``commit``. Zero-copy writers (``reserve``) use this.
    """
    if start != head:
        _pack_into(buf, head % capacity, 0, REC_WRAP, STATE_COMMITTED, seq)
    return start % capacity + RECORD_SIZE


def commit(buf: Buffer, capacity: int, start: int, kind: int, seq: int, length: int) -> int:
    """Store the header of a record begun at ``start`` with ``length`` payload bytes; return the new head."""
    _pack_into(buf, start % capacity, length, kind, STATE_COMMITTED, seq)
    return start + record_span(length)


def read(buf: Buffer, capacity: int, tail: int, head: int) -> tuple[int, int, int, int, int]:
    """Read the header of the record at ``tail`` (``tail < head``).

    Returns ``(start, kind, seq, length, next_tail)``: the record's payload is
    ``buf[start % capacity + RECORD_SIZE:][:length]``. A wrap marker at
    ``tail`` is followed to the record after it. Raises ``CorruptBus`` when the
    header does not describe a committed record lying inside ``[tail, head)``.
    """
    off = tail % capacity
    length, kind, state, seq = _unpack_from(buf, off)
    if kind == REC_WRAP and state == STATE_COMMITTED:
        tail += capacity - off
        if tail >= head:
            raise CorruptBus(f"wrap marker at ring offset {off} but no record after it", offset=off)
        off = 0
        length, kind, state, seq = _unpack_from(buf, 0)
    if state != STATE_COMMITTED or kind not in _MESSAGE_KINDS:
        raise CorruptBus(
            f"record at ring offset {off} has kind {kind} state {state}: not a committed message",
            offset=off,
        )
    end = tail + ((RECORD_SIZE + length + _MASK) & ~_MASK)  # record_span, inline (see there)
    if end > head or off + RECORD_SIZE + length > capacity:
        raise CorruptBus(
            f"record at ring offset {off} claims {length} bytes, past the written data",
            offset=off,
        )
    return tail, kind, seq, length, end


def skip(buf: Buffer, capacity: int, tail: int, head: int) -> tuple[int, int]:
    """The position after the record at ``tail``, and that record's sequence number."""
    _, _, seq, _, end = read(buf, capacity, tail, head)
    return end, seq


def last_seq(buf: Buffer, capacity: int, tail: int, head: int) -> int | None:
    """The sequence number of the last record in ``[tail, head)``, or None when empty.

    Walks every record (bounded: each is at least ``ALIGN`` bytes); for recovery,
    which must rebuild ``next_seq`` after a writer died between storing it and ``head``.
    """
    seq = None
    while tail < head:
        tail, seq = skip(buf, capacity, tail, head)
    return seq


def check_positions(head: int, tail: int, capacity: int) -> None:
    """Raise ``CorruptBus`` unless ``tail <= head <= tail + capacity``, both aligned, and head below the top.

    The top is ``2**64 - 1 - 2 * capacity``: one record moves head by less
    than twice its span (a wrap's padding is shorter than the record), so a
    writer that checked ``head`` never stores a position past 2**64 - 1. No
    bus comes near it (2**64 bytes is 58 years at 10 GB/s): above it, the
    header is damaged. The C fast path (``_cfast.c``) uses the same bound.
    """
    if tail > head or head - tail > capacity or (head | tail) & _MASK:
        raise CorruptBus(
            f"ring positions out of range (head {head}, tail {tail}, capacity {capacity})",
            offset=None,
        )
    if head > U64_MAX - 2 * capacity:
        raise CorruptBus(
            f"ring positions within {2 * capacity} bytes of 2**64 (head {head}), which no bus reaches: "
            f"{_DAMAGED}",
            offset=None,
        )


def check_room(head: int, seq: int, capacity: int, sizes: list[int]) -> None:
    """Raise ``CorruptBus`` unless records of ``sizes`` payload bytes fit below 2**64 (positions, numbers).

    That is: numbered from ``seq``, the last leaves ``next_seq`` at most
    2**64 - 1, and written from ``head``, they leave head where
    ``check_positions`` still accepts it. A writer calls it once for its
    whole batch, before it stores anything, so a damaged counter fails the
    batch without writing half of it.
    """
    count = span = 0
    for n in sizes:
        count += 1
        span += (RECORD_SIZE + n + _MASK) & ~_MASK  # record_span, inline (see there)
    if seq + count > U64_MAX:
        raise CorruptBus(
            f"next_seq {seq} leaves no sequence number below 2**64 for {count} more message(s), "
            f"which no bus reaches: {_DAMAGED}",
            offset=None,
        )
    if head + 2 * span > U64_MAX - 2 * capacity:
        raise CorruptBus(
            f"ring positions within {2 * span + 2 * capacity} bytes of 2**64 (head {head}), "
            f"which no bus reaches: {_DAMAGED}",
            offset=None,
        )
