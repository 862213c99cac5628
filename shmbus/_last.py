"""``Topic.last()``: a Topic's newest message, read without a lock and without subscribing.

Rule: the newest record is the one that ends exactly at ``head``, found by
walking record boundaries forward, and a copy of it is trusted only if
``tail`` has not passed it once the copy is done (the seqlock of
``_subscription``). The format stores no back-link, so the walk has to start
at a position known to be a record boundary at or past ``tail``:

* ``tail`` itself;
* a boundary this handle found on an earlier call;
* an active subscriber's cursor (a subscriber stores only boundaries there).

Positions only grow, so a position that was once a boundary is still the
same record's start as long as it is not below ``tail``. A walk from a
subscriber's cursor that meets a damaged header is redone from ``tail``
before it is called corruption: the cursor is a hint, ``tail`` the truth.
Each header read is re-checked against ``tail`` before its length is used:
a header overwritten meanwhile may be a newer record's, intact-looking, and
its length would lead the walk off the boundaries.
Every step moves forward by at least ``ALIGN`` bytes and ``_ring.read``
refuses a record past ``head``, so a walk takes at most
``capacity / ALIGN`` steps and never addresses memory outside the ring.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterable

from . import _ring
from ._codec import Payload, extract
from ._errors import CorruptBus, Empty, Overwritten
from ._format import Q_HEAD, Q_NEXT_SEQ, Q_TAIL, RECORD_SIZE

__all__ = ["ATTEMPTS", "Found", "find_last", "read_last"]

ATTEMPTS = 8  # walks redone when a publisher laps the reader before Overwritten

# The newest record: (position, start past any wrap marker, kind, payload length, seq).
Found = tuple[int, int, int, int, int]


class _Lapped(Exception):
    """The walk or the copy was overtaken by ``tail``: start again."""


def find_last(h64: memoryview, ring: memoryview, capacity: int, hints: Iterable[int]) -> Found:
    """Locate the record that ends at ``head`` (read once, first).

    Raises ``Empty`` when the ring holds no record, ``CorruptBus`` for a
    damaged header or positions, ``_Lapped`` when ``tail`` passed the walk.
    """
    head = h64[Q_HEAD]
    tail = h64[Q_TAIL]  # after head: tail only grows, so head - tail is never overstated
    if (head | tail) & 15 or (tail <= head and head - tail > capacity):  # _subscription.bad_positions
        raise CorruptBus(f"ring positions out of range (head {head}, tail {tail})")
    if tail >= head:  # nothing yet, or a publisher is replacing the only records right now
        raise Empty("the topic holds no message")
    starts = sorted({p for p in hints if tail < p < head and not p & 15}, reverse=True)
    for start in [*starts, tail]:
        try:
            return _walk(h64, ring, capacity, start, head)
        except CorruptBus:
            if start == tail:
                raise
    raise AssertionError("unreachable: the walk from tail returns or raises")


def _walk(h64: memoryview, ring: memoryview, capacity: int, pos: int, head: int) -> Found:
    """From the boundary ``pos`` to the record ending at ``head`` (at most capacity / ALIGN steps)."""
    while True:
        try:
            start, kind, seq, n, end = _ring.read(ring, capacity, pos, head)
        except CorruptBus:
            if h64[Q_TAIL] > pos:  # _subscription.lapped: overwritten while we looked
                raise _Lapped from None
            raise
        if h64[Q_TAIL] > pos:  # the header may be a newer record's: its length says nothing here
            raise _Lapped
        if end == head:
            return pos, start, kind, n, seq
        pos = end  # (read refuses end > head, and end >= pos + ALIGN: the walk ends)


def read_last(
    h64: memoryview, mm: mmap.mmap, ring: memoryview, capacity: int, ring_offset: int, hints: Iterable[int]
) -> tuple[int, int, Payload]:
    """Copy out the newest record: ``(position, kind, payload)``, validated like a subscriber's read.

    Raises ``Empty``, ``CorruptBus``, or ``Overwritten`` when publishers lap
    the reader ``ATTEMPTS`` times in a row.
    """
    hints = list(hints)
    for _ in range(ATTEMPTS):
        try:
            pos, start, kind, n, seq = find_last(h64, ring, capacity, hints)
        except _Lapped:
            continue
        payload = extract(mm, ring_offset + start % capacity + RECORD_SIZE, n, kind)
        if h64[Q_TAIL] > pos:  # _subscription.lapped, after the copy: it may be torn
            continue
        if seq >= h64[Q_NEXT_SEQ]:  # records are numbered below next_seq, stored before head
            raise CorruptBus(f"record with sequence number {seq}, past next_seq")
        return pos, kind, payload
    raise Overwritten(f"publishers overwrote the newest message {ATTEMPTS} times while it was read")

