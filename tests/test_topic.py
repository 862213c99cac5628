"""``shmbus.Topic`` and ``shmbus.Subscription`` in one process: the API, its errors and its accounting.

Messages published here carry their own sequence number (one publisher, so
the message index is the record's ``seq``): a test can then say exactly which
messages a subscriber must receive and how many it must count as lost. A
hypothesis test drives random publishes, reads and subscriptions on a tiny
ring against that model. Cross-process behaviour is in ``test_topic_mp.py``.
"""

from __future__ import annotations

import itertools
import os
import pickle
import queue
import time
import uuid
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
from conftest import SHM, TEST_PREFIX
from hypothesis import given, settings
from hypothesis import strategies as st

import shmbus
from shmbus import Subscription, Topic, _sync

CAP = 4096
LIMIT = CAP - 16  # the largest encoded message a ring of CAP bytes promises to hold


def span(obj: Any) -> int:
    """Ring bytes one message takes: 16-byte record header, payload, padding to 16."""
    return (16 + len(msgpack.packb(obj)) + 15) & ~15


def msg(i: int, size: int = 0) -> list[Any]:
    """Message number ``i``, with ``size`` bytes of padding that depend on ``i``."""
    return [i, bytes([i & 0xFF]) * size]


def drain(sub: Subscription) -> list[Any]:
    """Everything the subscriber can read now, without waiting."""
    out: list[Any] = []
    while True:
        got = sub.get_many(1000, block=False)
        if not got:
            return out
        out.extend(got)


def indices(msgs: list[Any]) -> list[int]:
    return [m[0] for m in msgs]


@pytest.fixture
def topic(bus_name: str) -> Iterator[Topic]:
    t = Topic.create(bus_name, capacity="64KiB")
    yield t
    t.close()


@pytest.fixture
def small(bus_name: str) -> Iterator[Topic]:
    """A topic whose ring (4 KiB) laps after a few dozen messages."""
    t = Topic.create(bus_name, capacity=CAP)
    yield t
    t.close()


# -- publish and receive -------------------------------------------------------------


VALUES: list[Any] = [
    {"a": 1, "b": [1, 2, {"c": None}]},
    [1, "two", 3.5, True, None],
    "texte accentué",
    0,
    -(2**63),
    2**64 - 1,
    None,
    b"",
    b"\x00\xff" * 300,
    {1: "int keys", 2: b"x"},
    [],
]


def test_every_subscriber_receives_every_message_in_order(topic: Topic) -> None:
    subs = [topic.subscribe() for _ in range(3)]
    assert len({s.slot for s in subs}) == 3
    for v in VALUES:
        topic.publish(v)
    topic.publish_bytes(b"raw \x00 bytes")
    for s in subs:
        assert [s.get(timeout=1) for _ in VALUES] == VALUES
        assert s.get(timeout=1) == b"raw \x00 bytes"
        assert (s.received, s.lost) == (len(VALUES) + 1, 0)
        with pytest.raises(shmbus.Empty):
            s.get_nowait()


def test_a_subscriber_on_another_handle_receives_too(topic: Topic) -> None:
    with Topic.open(topic.path) as other:
        sub = other.subscribe()
        topic.publish({"from": "first handle"})
        assert sub.get(timeout=1) == {"from": "first handle"}
        other.publish("back")
        mine = topic.subscribe()
        other.publish("after")
        assert mine.get(timeout=1) == "after"  # 'back' came before this subscription
        assert sub.get_many(5, timeout=1) == ["back", "after"]
        mine.close()


def test_get_on_nothing_new_raises_empty_after_the_timeout(topic: Topic) -> None:
    sub = topic.subscribe()
    t0 = time.monotonic()
    with pytest.raises(shmbus.Empty) as info:
        sub.get(timeout=0.2)
    took = time.monotonic() - t0
    assert isinstance(info.value, queue.Empty)
    assert 0.2 <= took < 0.6, took
    t0 = time.monotonic()
    with pytest.raises(shmbus.Empty):
        sub.get_many(3, timeout=0.2)
    assert 0.2 <= time.monotonic() - t0 < 0.6
    for fn in (sub.get_nowait, lambda: sub.get(block=False)):
        t0 = time.monotonic()
        with pytest.raises(shmbus.Empty):
            fn()
        assert time.monotonic() - t0 < 0.1
    assert sub.get_many(5, block=False) == []
    # Failed waits change nothing: the next message still arrives.
    topic.publish("later")
    assert sub.get(timeout=1) == "later"
    assert (sub.received, sub.lost) == (1, 0)


def test_get_many_blocking_returns_1_to_n_and_non_blocking_0_to_n(topic: Topic) -> None:
    sub = topic.subscribe()
    topic.publish_many(range(5))
    assert sub.get_many(3) == [0, 1, 2]
    t0 = time.monotonic()
    assert sub.get_many(10, timeout=5) == [3, 4]  # fewer than asked: returns without waiting
    assert time.monotonic() - t0 < 1.0
    assert sub.get_many(10, block=False) == []
    topic.publish("one")
    assert sub.get_many(10, block=False) == ["one"]
    topic.publish_many(range(10, 30))
    assert sub.get_many(7, block=False) == list(range(10, 17))
    assert sub.get_many(100, block=False) == list(range(17, 30))
    for bad in (0, -1):
        with pytest.raises(ValueError):
            sub.get_many(bad)
    for call in (lambda: sub.get(timeout=-1), lambda: sub.get_many(3, timeout=-0.5)):
        with pytest.raises(ValueError, match="timeout"):
            call()
    assert sub.received == 5 + 1 + 20


def test_iterating_a_subscription_yields_its_messages(topic: Topic) -> None:
    sub = topic.subscribe()
    topic.publish_many({"n": n} for n in range(10))
    assert list(itertools.islice(sub, 10)) == [{"n": n} for n in range(10)]
    topic.publish("more")
    assert next(iter(sub)) == "more"
    assert sub.received == 11


def test_publish_many_keeps_order_and_an_empty_batch_publishes_nothing(topic: Topic) -> None:
    sub = topic.subscribe()
    topic.publish_many(msg(i, i) for i in range(50))
    topic.publish_many([])
    topic.publish_many(iter(()))
    assert topic.stats().put_count == 50
    got = drain(sub)
    assert got == [msg(i, i) for i in range(50)]


def test_a_batch_larger_than_the_ring_keeps_its_newest_messages(small: Topic) -> None:
    sub = small.subscribe()
    batch = [msg(i, 200) for i in range(100)]  # 100 x 224 bytes into a 4 KiB ring
    small.publish_many(batch)
    got = drain(sub)
    st = small.stats()
    assert st.put_count == 100
    assert got == batch[st.get_count :]
    assert got[-1] == batch[-1]
    assert sub.lost == st.get_count > 0
    assert sub.received + sub.lost == 100


def test_subscription_is_a_context_manager(topic: Topic) -> None:
    with topic.subscribe() as sub:
        topic.publish(1)
        assert sub.get(timeout=1) == 1
        assert [d["slot"] for d in topic.subscribers()] == [sub.slot]
    assert sub.closed
    assert topic.subscribers() == []


# -- where a new subscriber starts ---------------------------------------------------


def test_latest_sees_only_messages_published_after_it(small: Topic) -> None:
    small.publish_many(msg(i, 100) for i in range(200))  # laps the ring several times
    sub = small.subscribe("latest")
    assert sub.get_many(10, block=False) == []
    small.publish_many(msg(i, 100) for i in range(200, 205))
    assert drain(sub) == [msg(i, 100) for i in range(200, 205)]
    assert (sub.received, sub.lost) == (5, 0)


def test_latest_is_the_default(small: Topic) -> None:
    small.publish("before")
    sub = small.subscribe()
    small.publish("after")
    assert drain(sub) == ["after"]


def test_earliest_sees_every_message_still_in_the_ring_then_the_new_ones(small: Topic) -> None:
    small.publish_many(msg(i, 100) for i in range(200))
    oldest = small.stats().get_count
    assert 0 < oldest < 200  # the ring lapped but holds more than one message
    sub = small.subscribe("earliest")
    got = drain(sub)
    # The oldest message still intact, then every later one, in order.
    assert indices(got) == list(range(oldest, 200))
    assert got == [msg(i, 100) for i in range(oldest, 200)]
    small.publish(msg(200, 100))
    assert sub.get(timeout=1) == msg(200, 100)
    assert sub.lost == 0


def test_earliest_on_a_fresh_topic_sees_the_first_message(small: Topic) -> None:
    sub = small.subscribe("earliest")
    small.publish_many(msg(i) for i in range(3))
    assert drain(sub) == [msg(i) for i in range(3)]
    assert (sub.received, sub.lost) == (3, 0)


def test_subscribe_rejects_an_unknown_start(topic: Topic) -> None:
    with pytest.raises(ValueError, match="start"):
        topic.subscribe("oldest")  # type: ignore[arg-type]
    assert topic.subscribers() == []  # no slot was taken


# -- starting at a sequence number -----------------------------------------------------
# One publisher: message i carries sequence number i (see the module docstring).


def test_a_subscription_can_start_at_a_sequence_number_still_in_the_ring(small: Topic) -> None:
    small.publish_many(msg(i, 100) for i in range(200))
    oldest = small.stats().get_count
    start = oldest + 7
    sub = small.subscribe(start)
    assert (sub.next_seq, sub.last_seq, sub.lost) == (start, None, 0)
    got = drain(sub)
    assert indices(got) == list(range(start, 200))
    assert (sub.last_seq, sub.next_seq, sub.received, sub.lost) == (199, 200, 200 - start, 0)
    small.publish(msg(200, 100))
    assert sub.get(timeout=1) == msg(200, 100)
    assert sub.last_seq == 200


def test_a_start_older_than_the_ring_begins_at_the_oldest_and_counts_the_gap_at_once(small: Topic) -> None:
    small.publish_many(msg(i, 100) for i in range(200))
    oldest = small.stats().get_count
    assert oldest > 10
    sub = small.subscribe(3)
    assert (sub.lost, sub.next_seq) == (oldest - 3, oldest)  # before any read
    assert small.subscribers()[0]["lost"] == oldest - 3  # and in its slot, for stats
    assert indices(drain(sub)) == list(range(oldest, 200))
    assert sub.received + sub.lost == 200 - 3


def test_a_start_overwritten_before_the_first_read_still_counts_from_the_start(small: Topic) -> None:
    small.publish_many(msg(i, 100) for i in range(50))
    sub = small.subscribe(20)
    small.publish_many(msg(i, 100) for i in range(50, 400))  # laps it before it reads
    got = drain(sub)
    first = small.stats().get_count
    assert indices(got) == list(range(first, 400))
    assert (sub.lost, sub.received + sub.lost) == (first - 20, 400 - 20)


def test_a_start_at_the_next_sequence_number_waits_for_the_next_message(small: Topic) -> None:
    sub0 = small.subscribe(0)  # on a fresh topic: the first message ever
    small.publish_many(msg(i) for i in range(5))
    sub5 = small.subscribe(5)
    assert sub5.get_many(10, block=False) == []
    small.publish(msg(5))
    assert sub5.get(timeout=1) == msg(5)
    assert indices(drain(sub0)) == [0, 1, 2, 3, 4, 5]
    assert (sub5.last_seq, sub0.last_seq, sub0.lost, sub5.lost) == (5, 5, 0, 0)


def test_a_start_past_the_next_sequence_number_raises_sequence_ahead_and_takes_no_slot(small: Topic) -> None:
    small.publish_many(msg(i) for i in range(5))
    with pytest.raises(shmbus.SequenceAhead, match="number 5") as info:
        small.subscribe(6)
    assert isinstance(info.value, ValueError)
    assert (info.value.start, info.value.next_seq, info.value.path) == (6, 5, small.path)
    assert small.subscribers() == []


@pytest.mark.parametrize("bad", [-1, True, 1.5, "3"])
def test_subscribe_rejects_a_start_that_is_no_sequence_number(topic: Topic, bad: Any) -> None:
    with pytest.raises(ValueError, match="sequence number"):
        topic.subscribe(bad)
    assert topic.subscribers() == []


def test_start_none_is_latest(small: Topic) -> None:
    small.publish(msg(0))
    sub = small.subscribe(None)
    small.publish(msg(1))
    assert drain(sub) == [msg(1)]


def test_last_seq_follows_each_read_whatever_the_read(small: Topic) -> None:
    sub = small.subscribe()
    small.publish_many(msg(i) for i in range(6))
    assert sub.get_many(3, block=False) == [msg(i) for i in range(3)]
    assert sub.last_seq == 2  # a batch without a gap: numbered last_seq - 2 .. last_seq
    assert sub.get_bytes(timeout=1) == msgpack.packb(msg(3))
    assert sub.last_seq == 3
    with sub.get_view(timeout=1) as view:
        assert msgpack.unpackb(view) == msg(4)
    assert sub.last_seq == 4
    assert sub.get(timeout=1) == msg(5)
    assert sub.last_seq == 5


def test_get_records_hands_out_each_message_as_stored_with_its_number(small: Topic) -> None:
    sub = small.subscribe()
    small.publish(msg(0))
    small.publish_bytes(b"raw bytes")
    small.publish(b"a bytes message")  # msgpack bin: stored with its msgpack header
    assert sub.get_records(10, block=False) == [
        (0, "msgpack", msgpack.packb(msg(0))),
        (1, "raw", b"raw bytes"),
        (2, "msgpack", msgpack.packb(b"a bytes message")),
    ]
    assert (sub.received, sub.lost, sub.last_seq) == (3, 0, 2)
    assert sub.get_records(10, block=False) == []
    with pytest.raises(shmbus.Empty):
        sub.get_records(1, timeout=0.01)
    with pytest.raises(ValueError, match="at least 1"):
        sub.get_records(0)


def test_get_records_numbers_each_message_across_a_gap_in_one_batch(small: Topic) -> None:
    """Where get_many's numbering is ambiguous (lost grew during the call), each record says its own."""
    sub = small.subscribe()
    small.publish_many(msg(i, 100) for i in range(3))
    assert [r[0] for r in sub.get_records(2, block=False)] == [0, 1]
    small.publish_many(msg(i, 100) for i in range(3, 200))  # laps the subscriber
    oldest = small.stats().get_count
    got: list[tuple[int, str, bytes]] = []
    while batch := sub.get_records(1000, block=False):
        got.extend(batch)
    assert [seq for seq, _, _ in got] == list(range(oldest, 200))
    assert all(msgpack.unpackb(data)[0] == seq for seq, _, data in got)
    assert sub.lost == oldest - 2


def test_get_records_from_a_start_counts_like_get_many(small: Topic) -> None:
    small.publish_many(msg(i, 100) for i in range(200))
    oldest = small.stats().get_count
    sub = small.subscribe(oldest - 5)
    got = sub.get_records(1000, block=False)
    assert [seq for seq, _, _ in got] == list(range(oldest, 200))
    assert (sub.lost, sub.received) == (5, 200 - oldest)


# -- lost messages -------------------------------------------------------------------


def test_a_lapped_subscriber_skips_to_the_oldest_and_counts_what_it_lost(small: Topic) -> None:
    sub = small.subscribe()
    small.publish_many(msg(i, 50) for i in range(10))
    assert indices(sub.get_many(4, block=False)) == [0, 1, 2, 3]
    for i in range(10, 500):
        small.publish(msg(i, 50))
    oldest = small.stats().get_count
    assert oldest > 4
    got = drain(sub)
    assert got == [msg(i, 50) for i in range(oldest, 500)]
    assert sub.lost == oldest - 4
    assert sub.received + sub.lost == 500
    # Caught up again: nothing more is lost.
    small.publish(msg(500, 50))
    assert sub.get(timeout=1) == msg(500, 50)
    assert (sub.received + sub.lost, sub.lost) == (501, oldest - 4)


def test_an_earliest_subscriber_lapped_before_its_first_read_counts_what_it_lost(small: Topic) -> None:
    """``lost``: messages overwritten before this subscriber read them, first read or not."""
    small.publish_many(msg(i, 100) for i in range(10))
    oldest = small.stats().get_count
    sub = small.subscribe("earliest")
    small.publish_many(msg(i, 100) for i in range(10, 300))  # laps it before it reads anything
    got = drain(sub)
    first = small.stats().get_count
    assert indices(got) == list(range(first, 300))
    # Messages oldest..first-1 were there for it (in the ring, or published
    # after it subscribed) and were overwritten unread.
    assert sub.lost == first - oldest, (sub.received, sub.lost, oldest, first)
    assert sub.received + sub.lost == 300 - oldest


def test_received_plus_lost_counts_every_message_since_subscribing(small: Topic) -> None:
    small.publish_many(msg(i, 10) for i in range(7))
    sub = small.subscribe()
    total = 0
    for k in range(40):
        small.publish_many(msg(7 + total + j, 30 + k * 3) for j in range(k))
        total += k
        if k % 3 == 0:
            sub.get_many(k + 1, block=False)
    drain(sub)
    assert sub.received + sub.lost == total
    assert sub.lost > 0


# -- subscriber slots ----------------------------------------------------------------


def test_too_many_subscribers_then_a_closed_slot_is_reused(bus_name: str) -> None:
    with Topic.create(bus_name, capacity=CAP, max_subscribers=3) as t:
        subs = [t.subscribe() for _ in range(3)]
        assert sorted(s.slot for s in subs) == [0, 1, 2]
        with pytest.raises(shmbus.TooManySubscribers) as info:
            t.subscribe()
        assert isinstance(info.value, RuntimeError)
        assert info.value.path == t.path
        assert "3" in str(info.value) and t.path in str(info.value)
        # Another handle in the same (live) process gets no slot either.
        with Topic.open(t.path) as other, pytest.raises(shmbus.TooManySubscribers):
            other.subscribe()
        subs[1].close()
        again = t.subscribe("earliest")
        assert again.slot == subs[1].slot
        with pytest.raises(shmbus.TooManySubscribers):
            t.subscribe()
        t.publish("hello")
        for s in (subs[0], subs[2]):
            assert s.get(timeout=1) == "hello"
        assert again.get(timeout=1) == "hello"


def test_close_frees_the_slot_and_is_idempotent(topic: Topic) -> None:
    a, b = topic.subscribe(), topic.subscribe()
    assert [d["slot"] for d in topic.subscribers()] == sorted([a.slot, b.slot])
    a.close()
    a.close()
    assert a.closed and not b.closed
    assert [d["slot"] for d in topic.subscribers()] == [b.slot]
    for call in (a.get_nowait, lambda: a.get(timeout=0.01), lambda: a.get_many(2, block=False)):
        with pytest.raises(shmbus.BusClosed):
            call()
    topic.publish("for b")
    assert b.get(timeout=1) == "for b"
    assert "slot=" in repr(b) and "received=1" in repr(b)


def test_topic_close_closes_its_subscriptions_only(topic: Topic) -> None:
    other = Topic.open(topic.path)
    mine = [topic.subscribe(), topic.subscribe()]
    theirs = other.subscribe()
    other.publish(1)
    with Topic.open(topic.path) as watcher:
        assert len(watcher.subscribers()) == 3
        topic.close()
        assert topic.closed
        assert all(s.closed for s in mine)
        assert not theirs.closed
        # Their slots are free again; the other handle's subscription is untouched.
        assert [d["slot"] for d in watcher.subscribers()] == [theirs.slot]
        for s in mine:
            with pytest.raises(shmbus.BusClosed):
                s.get_nowait()
        for call in (lambda: topic.publish(2), topic.subscribe, topic.stats, topic.subscribers):
            with pytest.raises(shmbus.BusClosed):
                call()
        topic.close()  # idempotent
        assert theirs.get(timeout=1) == 1
    other.close()
    assert theirs.closed


def test_subscribers_lists_each_slot_with_its_counters(small: Topic) -> None:
    a = small.subscribe()
    b = small.subscribe()
    small.publish_many(msg(i) for i in range(4))
    assert indices(a.get_many(4, block=False)) == [0, 1, 2, 3]
    assert indices(b.get_many(1, block=False)) == [0]
    small.publish_many(msg(i) for i in range(4, 6))
    rows = {d["slot"]: d for d in small.subscribers()}
    assert set(rows) == {a.slot, b.slot}
    assert rows[a.slot] == {"slot": a.slot, "pid": os.getpid(), "lag": 2, "lost": 0, "received": 4}
    assert rows[b.slot] == {"slot": b.slot, "pid": os.getpid(), "lag": 5, "lost": 0, "received": 1}
    # b falls a lap behind: the table shows what it lost once it reads again.
    small.publish_many(msg(i, 200) for i in range(6, 100))
    drain(b)
    drain(a)
    rows = {d["slot"]: d for d in small.subscribers()}
    assert rows[b.slot]["lost"] == b.lost > 0
    assert rows[b.slot]["received"] == b.received
    assert rows[b.slot]["received"] + rows[b.slot]["lost"] == 100
    assert rows[a.slot]["lag"] == rows[b.slot]["lag"] == 0
    b.close()
    assert [d["slot"] for d in small.subscribers()] == [a.slot]


def test_subscribers_shows_the_lag_of_a_subscriber_that_has_not_read_yet(small: Topic) -> None:
    fresh = small.subscribe()  # subscribed before anything was published: expects seq 0
    small.publish_many(msg(i) for i in range(3))
    early = small.subscribe("earliest")
    (row_fresh,) = [d for d in small.subscribers() if d["slot"] == fresh.slot]
    (row_early,) = [d for d in small.subscribers() if d["slot"] == early.slot]
    assert row_fresh["lag"] == 3, small.subscribers()
    assert row_early["lag"] == 3, small.subscribers()


def test_max_subscribers_is_checked_at_create(bus_name: str) -> None:
    for bad in (0, 257, -1, 2.0):
        with pytest.raises(ValueError, match="max_subscribers"):
            Topic.create(bus_name, capacity=CAP, max_subscribers=bad)  # type: ignore[arg-type]
    assert not os.path.exists(SHM / bus_name)
    with Topic.create(bus_name, capacity=CAP, max_subscribers=256) as t:
        assert t.layout.max_subscribers == 256
        assert t.stats().max_subscribers == 256


# -- errors --------------------------------------------------------------------------


def test_a_too_large_message_raises_and_publishes_nothing(small: Topic) -> None:
    sub = small.subscribe()
    small.publish("before")
    st0 = small.stats()
    with pytest.raises(shmbus.MessageTooLarge) as info:
        small.publish(bytes(LIMIT - 2))  # a bin16 header makes it LIMIT + 1 bytes
    err = info.value
    assert isinstance(err, ValueError)
    assert (err.size, err.limit, err.path) == (LIMIT + 1, LIMIT, small.path)
    assert str(LIMIT) in str(err)
    with pytest.raises(shmbus.MessageTooLarge):
        small.publish_many(["fits", bytes(10 * CAP), "fits too"])  # all or nothing
    with pytest.raises(shmbus.MessageTooLarge):
        small.publish_bytes(bytes(LIMIT + 1))
    st1 = small.stats()
    assert (st1.put_count, st1.get_count, st1.bytes_in) == (st0.put_count, st0.get_count, st0.bytes_in)
    assert drain(sub) == ["before"]


def test_the_largest_message_fits_and_evicts_everything_else(small: Topic) -> None:
    sub = small.subscribe()
    small.publish_many(range(5))  # head is not at the start of the ring any more
    big = bytes(range(256)) * ((LIMIT - 3) // 256) + b"z" * ((LIMIT - 3) % 256)
    assert len(msgpack.packb(big)) == LIMIT
    small.publish(big)
    st = small.stats()
    assert (st.put_count, st.get_count, st.messages, st.used_bytes) == (6, 5, 1, CAP)
    assert drain(sub) == [big]
    assert (sub.received, sub.lost) == (1, 5)
    small.publish_bytes(bytes(LIMIT))
    small.publish("small again")
    assert drain(sub) == ["small again"]
    assert (sub.received, sub.lost) == (2, 6)


def test_publish_of_an_unencodable_object_raises_encode_error(topic: Topic) -> None:
    sub = topic.subscribe()
    with pytest.raises(shmbus.EncodeError):
        topic.publish({"f": object()})
    with pytest.raises(shmbus.EncodeError):
        topic.publish_many([1, object()])
    assert topic.stats().put_count == 0
    assert sub.get_many(5, block=False) == []


def test_a_topic_opened_as_a_queue_and_the_reverse_raise_incompatible_bus(bus_name: str) -> None:
    t = Topic.create(bus_name, capacity=CAP)
    sub = t.subscribe()
    for attempt in (
        lambda: shmbus.Queue.open(bus_name),
        lambda: shmbus.Queue.create(bus_name, exist_ok=True),
    ):
        with pytest.raises(shmbus.IncompatibleBus) as info:
            attempt()
        text = str(info.value)
        assert "is a shmbus Topic, not a Queue" in text
        assert "shmbus.Topic.open" in text and t.path in text
        assert info.value.path == t.path
    # The topic is unharmed.
    t.publish("still a topic")
    assert sub.get(timeout=1) == "still a topic"
    t.close()
    t.unlink()

    q = shmbus.Queue.create(bus_name, capacity=CAP)
    q.put("queued")
    as_topic = (lambda: Topic.open(bus_name), lambda: Topic.create(bus_name, exist_ok=True))
    for attempt in as_topic:
        with pytest.raises(shmbus.IncompatibleBus) as info:
            attempt()
        text = str(info.value)
        assert "is a shmbus Queue, not a Topic" in text
        assert "shmbus.Queue.open" in text and q.path in text
    assert q.get(timeout=1) == "queued"
    q.close()


# -- stats, repr, pickle -------------------------------------------------------------


def test_stats_show_the_oldest_and_newest_sequence_numbers(small: Topic) -> None:
    st = small.stats()
    assert (st.kind, st.put_count, st.get_count, st.messages, st.used_bytes) == ("Topic", 0, 0, 0, 0)
    sub = small.subscribe()
    small.publish_many(msg(i, 10) for i in range(10))
    st = small.stats()
    assert (st.put_count, st.get_count, st.messages) == (10, 0, 10)
    assert st.used_bytes == sum(span(msg(i, 10)) for i in range(10))
    assert st.bytes_in == sum(len(msgpack.packb(msg(i, 10))) for i in range(10))
    drain(sub)
    assert small.stats().get_count == 0  # reading consumes nothing
    for i in range(10, 300):
        small.publish(msg(i, 100))
        st = small.stats()
        assert st.put_count == i + 1
        assert st.messages == st.put_count - st.get_count
        assert 0 < st.used_bytes <= CAP
    assert st.get_count > 0
    # get_count is the oldest message still in the ring: exactly where "earliest" starts.
    early = small.subscribe("earliest")
    first = early.get_nowait()
    assert first[0] == st.get_count
    assert 1 + len(drain(early)) == st.messages
    assert "published=300" in repr(small)


def test_a_topic_pickles_as_its_path(topic: Topic) -> None:
    sub = topic.subscribe()
    clone = pickle.loads(pickle.dumps(topic))
    try:
        assert isinstance(clone, Topic) and clone is not topic and clone.path == topic.path
        clone.publish("via the clone")
        assert sub.get(timeout=1) == "via the clone"
        theirs = clone.subscribe()
        assert theirs.slot != sub.slot
    finally:
        clone.close()
    assert not sub.closed
    topic.publish("still here")
    assert sub.get(timeout=1) == "still here"


def test_a_subscription_made_after_unlink_leaves_nothing_in_dev_shm(bus_name: str) -> None:
    """``unlink`` removes the semaphores; handles keep working but must not recreate them."""
    t = Topic.create(bus_name, capacity=CAP, max_subscribers=4)
    bus_id = t.layout.bus_id
    try:
        t.unlink()
        sub = t.subscribe()  # an open handle keeps working after unlink ...
        t.publish("after unlink")
        assert sub.get(timeout=1) == "after unlink"
        t.close()
        # ... but leaves no semaphore behind once closed.
        assert [n for n in os.listdir(SHM) if bus_id in n] == []
    finally:
        t.close()
        _sync.unlink_sems(bus_id, [f"sub{i}" for i in range(4)])  # keep the rest of the suite clean


# -- a model of the ring, driven by hypothesis ----------------------------------------


ops = st.lists(
    st.one_of(
        st.tuples(st.just("pub"), st.integers(0, 1500)),
        st.tuples(st.just("pub_many"), st.lists(st.integers(0, 600), min_size=1, max_size=12)),
        st.tuples(st.just("read"), st.integers(0, 3), st.integers(1, 40)),
        st.tuples(st.just("sub"), st.sampled_from(["latest", "earliest"])),
        st.tuples(st.just("close"), st.integers(0, 3)),
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(ops=ops)
def test_subscribers_match_a_model_of_the_ring(ops: list[tuple[Any, ...]]) -> None:
    """Each read returns exactly the published messages from max(expected, oldest) on.

    ``expected`` is where the subscriber stands: ``put_count`` at subscribe for
    "latest", the oldest message in the ring for "earliest", then one past the
    last message read; the messages skipped are its ``lost``.
    """
    name = f"{TEST_PREFIX}{uuid.uuid4().hex[:12]}"
    t = Topic.create(name, capacity=CAP, max_subscribers=4)
    try:
        published: list[list[Any]] = []
        subs: list[tuple[Subscription, dict[str, int]]] = []
        last_oldest = 0
        for op in ops:
            if op[0] == "pub":
                m = msg(len(published), op[1])
                t.publish(m)
                published.append(m)
            elif op[0] == "pub_many":
                batch = [msg(len(published) + k, n) for k, n in enumerate(op[1])]
                t.publish_many(batch)
                published.extend(batch)
            elif op[0] == "sub" and len(subs) < 4:
                st0 = t.stats()
                s = t.subscribe(op[1])
                start = st0.put_count if op[1] == "latest" else st0.get_count
                subs.append((s, {"expect": start, "lost": 0, "read": 0}))
            elif op[0] == "read" and op[1] < len(subs):
                s, m_ = subs[op[1]]
                oldest = t.stats().get_count
                first = max(m_["expect"], oldest)
                n = min(op[2], len(published) - first)
                got = s.get_many(op[2], block=False)
                assert got == published[first : first + n]
                if n > 0:
                    m_["lost"] += first - m_["expect"]
                    m_["read"] += n
                    m_["expect"] = first + n
                    assert (s.received, s.lost) == (m_["read"], m_["lost"])
            elif op[0] == "close" and op[1] < len(subs):
                subs.pop(op[1])[0].close()
            st1 = t.stats()
            assert st1.put_count == len(published)
            assert last_oldest <= st1.get_count <= st1.put_count
            assert st1.get_count < st1.put_count or not published
            last_oldest = st1.get_count
            kept = sum(span(m) for m in published[st1.get_count :])
            assert kept <= st1.used_bytes <= CAP
            rows = {d["slot"]: d for d in t.subscribers()}
            for s, m_ in subs:
                row = rows[s.slot]
                assert (row["lag"], row["lost"], row["received"]) == (
                    len(published) - m_["expect"],
                    m_["lost"],
                    m_["read"],
                )
        assert sorted(d["slot"] for d in t.subscribers()) == sorted(s.slot for s, _ in subs)
    finally:
        t.close()
        shmbus.unlink(name)


# -- what the ring keeps -----------------------------------------------------------------


def test_a_publish_that_needs_only_the_wrap_padding_drops_no_message(small: Topic) -> None:
    """Raw payloads make every span exact: a record is 16 bytes of header plus the payload."""
    sub = small.subscribe("earliest")
    small.publish_bytes(bytes(2736))  # message 0 at ring offset 0, 2752 bytes
    small.publish_bytes(b"B" * 1344)  # 1360 bytes do not fit in the 1344 left: wraps, drops message 0
    small.publish_bytes(b"C" * 1360)  # 1376 bytes: 16 short of full (the 1344-byte padding counts)
    assert (small.stats().get_count, small.stats().used_bytes) == (1, 4080)
    small.publish_bytes(b"D" * 16)  # needs 32 bytes: freeing the padding is enough
    st = small.stats()
    # Message 1 (1360 bytes at offset 0) does not overlap message 3 (at offset 2736): it stays.
    assert (st.get_count, st.messages, st.used_bytes) == (1, 3, 2768), st
    assert drain(sub) == [b"B" * 1344, b"C" * 1360, b"D" * 16]


@settings(max_examples=200, deadline=None)
@given(sizes=st.lists(st.integers(0, 2000), min_size=1, max_size=40))
def test_the_ring_drops_only_the_messages_it_must(sizes: list[int]) -> None:
    """After every publish, the newest dropped message could not have stayed.

    Were it kept, the ring would hold it, every later message, and at most one
    wrap's padding (less than the next message's span): more than the capacity.
    """
    name = f"{TEST_PREFIX}{uuid.uuid4().hex[:12]}"
    t = Topic.create(name, capacity=CAP)
    try:
        published = []
        for n in sizes:
            m = bytes([len(published) & 0xFF]) * n
            t.publish_bytes(m)
            published.append(m)
            st1 = t.stats()
            raw = [(16 + len(p) + 15) & ~15 for p in published]
            assert sum(raw[st1.get_count :]) <= st1.used_bytes <= CAP
            if st1.get_count:
                gone, first_kept = raw[st1.get_count - 1], raw[st1.get_count]
                assert st1.used_bytes + gone + first_kept > CAP, (st1, raw)
        with t.subscribe("earliest") as sub:
            assert drain(sub) == published[t.stats().get_count :]
    finally:
        t.close()
        shmbus.unlink(name)


def test_a_publish_clears_the_flag_it_posts_so_the_next_ones_post_nothing(bus_name: str) -> None:
    from shmbus._format import WAIT_FLAGS

    with Topic.create(bus_name, capacity=4096) as t:
        sub = t.subscribe(spin=0)
        assert t._mm is not None
        t._mm[WAIT_FLAGS + sub.slot] = 1  # as a subscriber does before it sleeps
        t.publish(1)
        assert (t._mm[WAIT_FLAGS + sub.slot], sub._sem.value) == (0, 1)  # woken, once
        t.publish(2)
        t.publish(3)
        assert sub._sem.value == 1  # no flag since: no more posts
        assert sub.get_many(10, timeout=5) == [1, 2, 3]
        t.unlink()
