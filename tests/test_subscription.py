"""``_subscription``: the reader through its door, and its named protocol steps against their inline copies.

A ``Subscription`` sees its topic only through a ``TopicDoor``. Here the door
is made by hand over an anonymous mapping, with records written by a few lines
that play the publisher: no ``Topic``, no file, no semaphore. The per-record
loops keep inline copies of ``bad_positions`` and ``lapped`` for speed;
hypothesis checks that each copy decides as its named function does.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from typing import Any, Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

import shmbus
from shmbus import _ring
from shmbus._codec import DEFAULT_CODEC
from shmbus._errors import CorruptBus
from shmbus._format import Q_HEAD, Q_NEXT_SEQ, Q_TAIL, Q_TAIL_SEQ, REC_RAW, S_CURSOR, S_NEXT_SEQ, S_RECEIVED
from shmbus._subscription import Subscription, TopicDoor, bad_positions, lapped

HEADER = 2048  # bytes before the ring: the queue words, the wait flags at 512, the slot at 1024
CAP = 4096
BASE = 1024 // 8  # the slot's first word
FLAG = 512


class Door:
    """A door made by hand, and what the subscription did through it."""

    def __init__(self, mm: Any = None) -> None:
        self.raw = mmap.mmap(-1, HEADER + CAP)
        whole = memoryview(self.raw)
        self.h64 = whole[:HEADER].cast("Q")
        self.ring = whole[HEADER:]
        self.views = (self.h64, self.ring, whole)
        self.calls: list[str] = []
        self.door = TopicDoor(
            path="hand-made", h64=self.h64, mm=mm or self.raw, ring=self.ring,
            capacity=CAP, ring_offset=HEADER, slot=0, base=BASE, flag=FLAG,
            sem=None,  # type: ignore[arg-type]  # (nothing here waits)
            enter=lambda: self.calls.append("enter"), leave=lambda: self.calls.append("leave"),
            check_open=lambda: None, codec=DEFAULT_CODEC,
            release_slot=lambda: self.calls.append("release_slot"),
            forget=lambda sub: self.calls.append("forget"),
        )  # fmt: skip

    def publish(self, body: bytes) -> int:
        """Append one raw record as a publisher does (no eviction: the tests stay far below CAP)."""
        h = self.h64
        head, seq = h[Q_HEAD], h[Q_NEXT_SEQ]
        start, _, _ = _ring.evict(self.ring, CAP, h[Q_TAIL], head, len(body))
        new_head = _ring.write(self.ring, CAP, head, start, REC_RAW, seq, b"", body)
        h[Q_NEXT_SEQ] = seq + 1  # next_seq before head, as Topic._commit_record
        h[Q_HEAD] = new_head
        return head

    def close(self) -> None:
        for v in self.views:
            v.release()
        self.raw.close()


@pytest.fixture
def door() -> Iterator[Door]:
    d = Door()
    yield d
    d.close()


def test_a_subscription_reads_from_its_door_alone(door: Door) -> None:
    door.publish(b"before")
    sub = Subscription(door.door, "latest", 0.0)
    assert sub.get_many(10, block=False) == []
    for body in (b"one", b"two", b"three"):
        door.publish(body)
    assert sub.get_many(10, block=False) == [b"one", b"two", b"three"]
    h = door.h64
    assert (h[BASE + S_CURSOR], h[BASE + S_NEXT_SEQ], h[BASE + S_RECEIVED]) == (h[Q_HEAD], 4, 3)
    assert door.calls == ["enter", "leave"] * 2  # each call on the handle is counted
    door.publish(b"four")
    with sub.get_view() as buf:
        assert bytes(buf) == b"four"
    assert sub.received == 4 and sub.lost == 0
    sub.close()
    sub.close()
    assert door.calls[-2:] == ["release_slot", "forget"]


def test_an_earliest_subscription_starts_at_the_tail(door: Door) -> None:
    door.publish(b"old")
    door.h64[Q_TAIL_SEQ] = 0
    sub = Subscription(door.door, "earliest", 0.0)
    assert sub.get_nowait() == b"old"
    with pytest.raises(shmbus.Empty):
        sub.get_nowait()


def test_a_subscription_holds_no_topic_but_through_its_door(bus_name: str) -> None:
    with shmbus.Topic.create(bus_name, capacity=CAP) as t:
        sub = t.subscribe()
        assert not any(isinstance(v, shmbus.Topic) for v in vars(sub).values())
        t.publish("through the door")
        assert sub.get(timeout=5) == "through the door"
        sub.close()
        t.unlink()


def test_a_closed_subscription_is_reported_before_a_bad_argument(bus_name: str) -> None:
    """``get_many`` checks the subscription, then enters the topic (its open check), then its arguments."""
    t = shmbus.Topic.create(bus_name, capacity=CAP)
    try:
        mine, theirs = t.subscribe(), t.subscribe()
        mine.close()
        with pytest.raises(shmbus.BusClosed, match="subscription"):
            mine.get_many(0)
        with pytest.raises(ValueError, match="max_messages"):
            theirs.get_many(0)
        t.close()  # (closes theirs too)
        with pytest.raises(shmbus.BusClosed):
            theirs.get_many(0, timeout=-1)
    finally:
        t.close()
        t.unlink()


# -- the inline copies agree with the named steps ------------------------------------------

positions = st.integers(0, 3 * CAP).map(lambda p: p * 8)  # every other one unaligned


@given(head=positions, tail=positions, cursor=positions)
def test_the_inline_position_check_is_bad_positions(head: int, tail: int, cursor: int) -> None:
    d = Door()  # (a fresh one per example: hypothesis runs the body many times)
    try:
        sub = Subscription(d.door, "latest", 0.0)
        d.h64[Q_HEAD], d.h64[Q_TAIL] = head, tail
        sub._cursor = cursor
        try:
            sub._next_record()  # an empty ring: any record it reads is corrupt, which is not our question
            refused = False
        except CorruptBus as e:
            refused = "ring positions out of range" in str(e)
        assert refused == bad_positions(head, tail, cursor, CAP)
    finally:
        d.close()


class _LappingMap:
    """A mapping whose first payload copy is raced by a publisher moving ``tail`` to ``new_tail``."""

    def __init__(self, door: Callable[[], Door], new_tail: int) -> None:
        self.door, self.new_tail = door, new_tail
        self.lapped_at_copy: bool | None = None
        self.copies = 0

    def __getitem__(self, key: Any) -> Any:
        self.copies += 1
        assert self.copies < 100, "the reader keeps throwing intact copies away"
        d = self.door()
        if self.lapped_at_copy is None:
            d.h64[Q_TAIL] = self.new_tail
            self.lapped_at_copy = lapped(d.h64, self.sub._cursor)
        return d.raw[key]

    sub: Subscription


@given(before=st.integers(0, 4), n=st.integers(1, 8), new_tail_at=st.integers(0, 11))
def test_the_inline_recheck_after_a_copy_is_lapped(before: int, n: int, new_tail_at: int) -> None:
    """A publisher moves ``tail`` to any record while the first copy is made: kept iff not ``lapped``."""
    holder: list[Door] = []
    race = _LappingMap(lambda: holder[0], 0)
    d = Door(mm=race)
    holder.append(d)
    try:
        old = [d.publish(b"old") for _ in range(before)]
        race.sub = Subscription(d.door, "latest", 0.0)
        starts = old + [d.publish(b"m%d" % i) for i in range(n)]
        # A record boundary, as eviction leaves it, on the last record at most: the
        # next one delivered then counts the loss.
        race.new_tail = starts[min(new_tail_at, len(starts) - 1)]
        got = race.sub.get_many(100, block=False)
        dropped = max(min(new_tail_at, len(starts) - 1) - before, 0)
        assert race.lapped_at_copy is not None
        assert (got[:1] == [b"m0"]) == (not race.lapped_at_copy)
        assert got == [b"m%d" % i for i in range(dropped, n)]
        assert (race.sub.received, race.sub.lost) == (n - dropped, dropped)
    finally:
        d.close()
