"""Cross-process tests of ``shmbus.Topic``: real processes, real files, real semaphores.

Every child runs through ``_run``, which sends its result (or its traceback)
back on a pipe, so a failed check in a child fails the test with the child's
own message. Subscribers subscribe and signal readiness before any publisher
starts. Synchronisation goes through ``mp.Event``, pipes and the topic itself,
never through sleeps. When a test needs a subscriber to be *asleep* (to prove
that a publish wakes it), it polls until the subscriber's wait flag is set in
the topic and ``/proc/<pid>`` shows the process asleep in a futex wait
(``_wait_until_asleep``): an observable state, with a deadline.

Every time bound is generous: the machine has 2 cores shared by every process a
test starts, and a test that fails one run in twenty is a bug.
"""

from __future__ import annotations

import os
import random
import signal
import statistics
import time
import zlib
from multiprocessing.connection import Connection
from typing import Any, Callable

import msgpack
import pytest
from conftest import proc_state as _proc_state
from conftest import recv as _recv
from conftest import result as _result
from conftest import run as _run

import shmbus
from shmbus import Topic, _subscription, _topic
from shmbus._format import WAIT_FLAGS

# Far above anything a healthy run needs; only a hang or a lost wake-up reaches them.
CHILD_TIMEOUT = 60.0
WAKE_BOUND = 2.0  # a woken subscriber must return this soon after the publish that wakes it
LOST_WAKE_UP = 20.0  # a get's timeout where only a publish can wake it: reaching it means a lost wake-up


# -- helpers ------------------------------------------------------------------------


def _start(procs: Any, body: Callable[..., Any], *args: Any) -> tuple[Any, Connection]:
    rx, tx = procs.ctx.Pipe(duplex=False)
    return procs.start(_run, tx, body, *args), rx


def _wait_until_asleep(t: Topic, slot: int, pid: int, timeout: float = 20.0, poll: float = 0.001) -> None:
    """Return once subscriber ``slot`` (in process ``pid``) sleeps on its semaphore.

    Its wait flag in the topic says it is in its wait (set just before the
    last check and the sleep); the kernel saying the process sleeps in a
    futex wait then says it is asleep there.
    """
    assert t._mm is not None
    deadline = time.monotonic() + timeout
    while True:
        flag = t._mm[WAIT_FLAGS + slot]
        state, wchan = _proc_state(pid)
        if flag and state == "S" and "futex" in wchan:
            return
        if time.monotonic() > deadline:
            raise AssertionError(
                f"subscriber {pid} never slept (flag {flag}, state {state}, wchan {wchan!r})"
            )
        time.sleep(poll)  # a poll of an observable state, not a synchronisation guess


def _span(obj: Any) -> int:
    """Ring bytes one message takes: 16-byte record header, payload, padding to 16."""
    return (16 + len(msgpack.packb(obj)) + 15) & ~15


def _kill(procs: Any, proc: Any) -> None:
    """SIGKILL ``proc`` and reap it (no zombie left); ``procs.join_all`` no longer expects it."""
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(CHILD_TIMEOUT)
    assert proc.exitcode == -signal.SIGKILL
    procs.procs.remove(proc)


def _own_row(t: Topic, slot: int) -> dict[str, int]:
    (row,) = [d for d in t.subscribers() if d["slot"] == slot]
    return row


# -- child bodies --------------------------------------------------------------------


def _publish_numbered(path: str, n: int) -> float:
    t = Topic.open(path)
    t0 = time.monotonic()
    publish = t.publish
    for i in range(n):
        publish([i, f"m{i}"])
    took = time.monotonic() - t0
    t.close()
    return took


def _subscribe_all_numbered(path: str, how: str, n: int, ready: Any) -> dict[str, Any]:
    """Receive ``n`` numbered messages in order, by iteration, get or get_many."""
    t = Topic.open(path)
    sub = t.subscribe()
    ready.set()
    expected = 0

    def check(m: Any) -> None:
        nonlocal expected
        if m != [expected, f"m{expected}"]:
            raise AssertionError(f"{how}: expected message {expected}, got {m!r}")
        expected += 1

    if how == "iter":
        for m in sub:
            check(m)
            if expected == n:
                break
    elif how == "get":
        for _ in range(n):
            check(sub.get(timeout=CHILD_TIMEOUT))
    else:
        while expected < n:
            for m in sub.get_many(500, timeout=CHILD_TIMEOUT):
                check(m)
    out = {
        "count": expected,
        "received": sub.received,
        "lost": sub.lost,
        "extra": sub.get_many(10, block=False),
        "row": _own_row(t, sub.slot),
    }
    sub.close()
    t.close()
    return out


def _publish_checksummed(path: str, n: int, seed: int, acks: list[Any]) -> dict[str, int]:
    """Publish ``n`` data messages, then "end" messages until every subscriber saw one."""
    t = Topic.open(path)
    rng = random.Random(seed)
    total_bytes = 0
    for i in range(n):
        payload = rng.randbytes(rng.randint(0, 400))
        m = [i, zlib.crc32(payload), payload]
        t.publish(m)
        total_bytes += _span(m)
    ends = 0
    deadline = time.monotonic() + CHILD_TIMEOUT
    while True:
        pending = [a for a in acks if not a.is_set()]
        if not pending:
            break
        assert time.monotonic() < deadline, f"{len(pending)} subscribers never acknowledged the end"
        t.publish(["end", ends])
        ends += 1
        # Re-publish "end" until acknowledged: a lapped subscriber may lose one.
        pending[0].wait(0.002)
    st = t.stats()
    t.close()
    return {"ends": ends, "put_count": st.put_count, "total_bytes": total_bytes}


def _subscribe_checked(path: str, ready: Any, ack: Any, work: int, batch: int) -> dict[str, int]:
    """Check order and checksum of every data message until the first "end"; ``work`` slows it."""
    t = Topic.open(path)
    sub = t.subscribe()
    ready.set()
    last, data = -1, 0
    ends: list[int] = []  # the "end" messages returned (a batch may hold more than one)
    while not ends:
        msgs = sub.get_many(batch, timeout=CHILD_TIMEOUT) if batch > 1 else [sub.get(timeout=CHILD_TIMEOUT)]
        for m in msgs:
            if m[0] == "end":
                ends.append(m[1])
                ack.set()
                continue
            if ends:
                raise AssertionError(f"data message {m[0]} after end {ends[0]}")
            i, crc, payload = m
            if i <= last:
                raise AssertionError(f"message {i} arrived after message {last}")
            if zlib.crc32(payload) != crc:
                raise AssertionError(f"message {i} is damaged: {len(payload)} bytes, crc mismatch")
            for _ in range(work):  # a slow consumer: real work per message, no sleeping
                zlib.crc32(payload)
            last = i
            data += 1
    if ends != list(range(ends[0], ends[-1] + 1)):
        raise AssertionError(f"end messages out of order: {ends}")
    out = {"data": data, "last": last, "ends": len(ends), "last_end": ends[-1]}
    out.update(received=sub.received, lost=sub.lost)
    sub.close()
    t.close()
    return out


def _subscribe_then_block(path: str, conn: Connection) -> None:
    """Subscribe, report the slot, then wait for a message that the test never publishes."""
    t = Topic.open(path)
    sub = t.subscribe(spin=0)
    conn.send(sub.slot)
    sub.get(timeout=CHILD_TIMEOUT)
    raise AssertionError("the blocked subscriber received a message")


def _subscribe_busy(path: str, ready: Any, progress: Any) -> None:
    """Read with some work per message (so it stays behind the publisher) until killed."""
    t = Topic.open(path)
    sub = t.subscribe()
    ready.set()
    n = 0
    while True:
        for m in sub.get_many(50, timeout=CHILD_TIMEOUT):
            for _ in range(100):  # ~10 us a message: it stays far behind the publisher
                zlib.crc32(m[1])
            n += 1
            if n == 1000:
                progress.set()


def _publish_until_killed(path: str, n: int, killed: Any) -> dict[str, Any]:
    """Publish messages 0, 1, ...: at least ``n``, and on until ``killed`` is set; then "end"."""
    t = Topic.open(path)
    i = 0
    slowest = 0.0
    deadline = time.monotonic() + CHILD_TIMEOUT
    while i < n or not killed.is_set():
        t0 = time.monotonic()
        t.publish([i, b"x" * (i % 64)])
        slowest = max(slowest, time.monotonic() - t0)
        i += 1
        assert time.monotonic() < deadline, "the test never killed the busy subscriber"
    t.publish(["end", i])
    t.close()
    return {"published": i, "slowest": slowest}


def _subscribe_until_end(path: str, ready: Any, spin: float | None) -> dict[str, Any]:
    t = Topic.open(path)
    sub = t.subscribe(spin=spin)
    ready.set()
    expected = 0
    while True:
        m = sub.get(timeout=CHILD_TIMEOUT)
        if m[0] == "end":
            break
        if m != [expected, b"x" * (expected % 64)]:
            raise AssertionError(f"expected message {expected}, got {m!r}")
        expected += 1
    out = {"count": expected, "end": m[1], "received": sub.received, "lost": sub.lost}
    sub.close()
    t.close()
    return out


def _publish_two_phases(path: str, m: int, k: int, phase1: Any, go: Any) -> int:
    t = Topic.open(path)
    for i in range(m):
        t.publish([i, bytes(100)])
    phase1.set()
    assert go.wait(CHILD_TIMEOUT)
    for i in range(m, m + k):
        t.publish([i, bytes(100)])
    put = t.stats().put_count
    t.close()
    return put


def _late_subscriber(path: str, start: str, k: int, ready: Any, done: Any) -> dict[str, Any]:
    """Subscribe after the first phase; take what is there now, then the next ``k``."""
    t = Topic.open(path)
    sub = t.subscribe(start)  # type: ignore[arg-type]
    at_once = []
    while got := sub.get_many(1000, block=False):
        at_once.extend(m[0] for m in got)
    ready.set()
    later = [sub.get(timeout=CHILD_TIMEOUT)[0] for _ in range(k)]
    assert done.wait(CHILD_TIMEOUT)
    out = {
        "at_once": at_once,
        "later": later,
        "after": sub.get_many(10, block=False),
        "received": sub.received,
        "lost": sub.lost,
    }
    sub.close()
    t.close()
    return out


def _resuming_subscriber(path: str, start: int, k: int, ready: Any, done: Any) -> dict[str, Any]:
    """Subscribe at sequence number ``start``; read one at a time, checking ``last_seq`` on each message."""
    t = Topic.open(path)
    sub = t.subscribe(start)
    lost_at_once = sub.lost
    got: list[int] = []

    def take(m: Any) -> None:
        if sub.last_seq != m[0]:
            raise AssertionError(f"message {m[0]} read with last_seq {sub.last_seq}")
        got.append(m[0])

    while True:
        try:
            take(sub.get_nowait())
        except shmbus.Empty:
            break
    at_once = len(got)
    ready.set()
    for _ in range(k):
        take(sub.get(timeout=CHILD_TIMEOUT))
    assert done.wait(CHILD_TIMEOUT)
    out = {"got": got, "at_once": at_once, "lost_at_once": lost_at_once}
    out.update(lost=sub.lost, received=sub.received)
    sub.close()
    t.close()
    return out


def _ping_pong_subscriber(path: str, n: int, conn: Connection) -> None:
    """Report the slot, then for each message the ns from its timestamp to the wake-up."""
    t = Topic.open(path)
    sub = t.subscribe(spin=0)  # no polling: every wait sleeps on the semaphore
    conn.send(sub.slot)
    for _ in range(n):
        sent = sub.get(timeout=CHILD_TIMEOUT)
        conn.send(time.monotonic_ns() - sent)
    sub.close()
    t.close()


def _sleepy_subscriber(path: str, n: int, ready: Any) -> tuple[int, float]:
    """Receive ``n`` messages sleeping at once each time (spin 0): (count, the longest get in seconds)."""
    _subscription._SAFETY_SLICE = 3600.0  # a lost wake-up now sleeps until the get's timeout
    t = Topic.open(path)
    sub = t.subscribe(spin=0)
    ready.set()
    got, longest = 0, 0.0
    while got < n:
        t0 = time.monotonic()
        got += len(sub.get_many(64, timeout=LOST_WAKE_UP))
        longest = max(longest, time.monotonic() - t0)
    sub.close()
    t.close()
    return got, longest


def _publish_with_gaps(path: str, n: int) -> int:
    """Publish ``n`` messages, pausing at random so the subscribers fall asleep, wake, and race us."""
    t = Topic.open(path)
    rng = random.Random(7)
    for i in range(n):
        t.publish(i)
        k = rng.random()
        if k < 0.3:
            time.sleep(0.00005)  # not a synchronisation: a varied pace, whatever it turns out to be
        elif k < 0.7:
            end = time.perf_counter() + rng.random() * 30e-6
            while time.perf_counter() < end:
                pass
    t.close()
    return n


def _wake_subscriber(path: str, spin: float, rounds: int, many: bool, conn: Connection) -> None:
    """Sleep in get() or get_many() for each of ``rounds`` publishes; report what woke it and when."""
    # Only a publish may wake this process: no periodic re-check to fall back on.
    _subscription._SAFETY_SLICE = 3600.0
    t = Topic.open(path)
    sub = t.subscribe(spin=spin)
    conn.send(sub.slot)
    for _ in range(rounds):
        got = sub.get_many(10, timeout=30) if many else [sub.get(timeout=30)]
        conn.send((got, time.monotonic()))
    sub.close()
    t.close()


def _publish_tagged(path: str, p: int, n: int, batch: int, go: Any) -> None:
    t = Topic.open(path)
    assert go.wait(CHILD_TIMEOUT)
    if batch > 1:
        for lo in range(0, n, batch):
            t.publish_many([p, i] for i in range(lo, min(lo + batch, n)))
    else:
        for i in range(n):
            t.publish([p, i])
    t.close()


def _subscribe_tagged(path: str, n_pub: int, per: int, ready: Any) -> dict[str, Any]:
    """Every message of every publisher exactly once, each publisher's in order."""
    t = Topic.open(path)
    sub = t.subscribe()
    ready.set()
    nxt = [0] * n_pub
    order = 0  # a digest of the whole sequence: every subscriber must see the same one
    switches, prev = 0, -1
    while sum(nxt) < n_pub * per:
        for p, i in sub.get_many(1000, timeout=CHILD_TIMEOUT):
            if i != nxt[p]:
                raise AssertionError(f"publisher {p}: message {i} where {nxt[p]} was due")
            nxt[p] += 1
            order = zlib.crc32(bytes((p,)) + i.to_bytes(4, "little"), order)
            switches += p != prev
            prev = p
    out = {"next": nxt, "order": order, "switches": switches, "received": sub.received, "lost": sub.lost}
    out["after"] = sub.get_many(10, block=False)
    sub.close()
    t.close()
    return out


def _publish_and_close_inherited(t: Topic, n: int) -> None:
    t.publish_many(range(n))
    t.close()


# -- 1. broadcast without loss ------------------------------------------------------------


def test_three_subscribers_receive_all_100k_messages_in_order(bus_name: str, procs: Any) -> None:
    n = 100_000
    t = Topic.create(bus_name, capacity="8MiB")
    assert sum(_span([i, f"m{i}"]) for i in range(n)) < t.capacity  # no message can be lost
    readies = [procs.ctx.Event() for _ in range(3)]
    hows = ("iter", "get", "get_many")
    subs = [_start(procs, _subscribe_all_numbered, t.path, how, n, r) for how, r in zip(hows, readies)]
    for r in readies:
        assert r.wait(CHILD_TIMEOUT)
    assert len(t.subscribers()) == 3
    pub, pub_rx = _start(procs, _publish_numbered, t.path, n)
    results = [_result(rx, p) for p, rx in subs]
    took = _result(pub_rx, pub)
    procs.join_all()
    for r in results:
        assert r["count"] == r["received"] == n
        assert r["lost"] == 0
        assert r["extra"] == []
        assert (r["row"]["lag"], r["row"]["lost"], r["row"]["received"]) == (0, 0, n)
    st = t.stats()
    assert (st.put_count, st.get_count, st.messages) == (n, 0, n)
    assert took < CHILD_TIMEOUT
    assert t.subscribers() == []  # every child closed its subscription
    t.close()


# -- 2. a ring far too small, one slow subscriber -------------------------------------------


def test_small_ring_loses_messages_but_never_order_integrity_or_count(bus_name: str, procs: Any) -> None:
    n = 50_000
    t = Topic.create(bus_name, capacity="16KiB")
    # (work per message, get_many batch): one slow subscriber, two fast ones.
    kinds = [(400, 1), (0, 1), (0, 64)]
    readies = [procs.ctx.Event() for _ in kinds]
    acks = [procs.ctx.Event() for _ in kinds]
    subs = [
        _start(procs, _subscribe_checked, t.path, r, a, work, batch)
        for r, a, (work, batch) in zip(readies, acks, kinds)
    ]
    for r in readies:
        assert r.wait(CHILD_TIMEOUT)
    pub, pub_rx = _start(procs, _publish_checksummed, t.path, n, 1234, acks)
    results = [_result(rx, p) for p, rx in subs]
    published = _result(pub_rx, pub)
    procs.join_all()

    assert published["total_bytes"] > 100 * t.capacity  # many times around the ring
    assert published["put_count"] == n + published["ends"]
    for (work, _), r in zip(kinds, results):
        # Its last message was "end" number last_end: every message up to it was received or lost.
        assert r["received"] + r["lost"] == n + r["last_end"] + 1, r
        assert r["received"] == r["data"] + r["ends"], r
        # Of the last_end + 1 "end" messages up to there, those not received were lost.
        data_lost = r["lost"] - (r["last_end"] + 1 - r["ends"])
        assert 0 <= data_lost <= n, r
        assert r["data"] + data_lost == n, r
        assert r["last"] <= n - 1
        if work:
            assert data_lost > 0, f"the slow subscriber lost nothing: {r}"
    st = t.stats()
    assert st.put_count == published["put_count"]
    assert 0 < st.get_count < st.put_count  # the ring lapped; the newest messages are still there
    t.close()


# -- 3. killed subscribers ---------------------------------------------------------------


def test_killed_subscribers_change_nothing_for_the_publisher_and_the_others(
    bus_name: str, procs: Any
) -> None:
    t = Topic.create(bus_name, capacity="16MiB", max_subscribers=4)
    readies = [procs.ctx.Event() for _ in range(3)]
    survivors = [
        _start(procs, _subscribe_until_end, t.path, readies[k], spin) for k, spin in ((0, None), (1, 0.0))
    ]
    progress = procs.ctx.Event()
    busy = procs.start(_subscribe_busy, t.path, readies[2], progress)
    slot_rx, slot_tx = procs.ctx.Pipe(duplex=False)
    blocked = procs.start(_subscribe_then_block, t.path, slot_tx)
    blocked_slot = _recv(slot_rx, blocked)
    for r in readies:
        assert r.wait(CHILD_TIMEOUT)
    assert len(t.subscribers()) == 4
    busy_slot = next(d["slot"] for d in t.subscribers() if d["pid"] == busy.pid)

    # One killed asleep in get(): its wait flag stays set for good.
    _wait_until_asleep(t, blocked_slot, blocked.pid)
    _kill(procs, blocked)
    assert t._mm is not None and t._mm[WAIT_FLAGS + blocked_slot] == 1

    # One killed while busy reading, with the publisher publishing all along.
    killed = procs.ctx.Event()
    n = 50_000
    pub, pub_rx = _start(procs, _publish_until_killed, t.path, n, killed)
    assert progress.wait(CHILD_TIMEOUT)
    row = _own_row(t, busy_slot)
    _kill(procs, busy)
    killed.set()
    # It died reading, mid-stream: behind the publisher, and not in a wait.
    assert row["received"] >= 1000 and row["lag"] > 0, row
    assert t._mm[WAIT_FLAGS + busy_slot] == 0

    published = _result(pub_rx, pub)
    results = [_result(rx, p) for p, rx in survivors]
    procs.join_all()
    m = published["published"]
    assert m >= n
    assert published["slowest"] < WAKE_BOUND  # no publish ever waited on anyone
    for r in results:
        assert (r["count"], r["end"], r["received"], r["lost"]) == (m, m, m + 1, 0)
    # Only the dead may still hold slots: recovery (run whenever a process claims a
    # participant slot) frees them early; a full table reclaims them in any case.
    assert {d["pid"] for d in t.subscribers()} <= {busy.pid, blocked.pid}
    fresh = [t.subscribe() for _ in range(4)]
    assert sorted(s.slot for s in fresh) == [0, 1, 2, 3]
    with pytest.raises(shmbus.TooManySubscribers):
        t.subscribe()
    t.publish("to the new ones")
    assert all(s.get(timeout=WAKE_BOUND) == "to the new ones" for s in fresh)
    t.close()


def test_the_slot_of_a_killed_subscriber_is_reclaimed_when_the_table_is_full(
    bus_name: str, procs: Any
) -> None:
    t = Topic.create(bus_name, capacity="64KiB", max_subscribers=2)
    slot_rx, slot_tx = procs.ctx.Pipe(duplex=False)
    victim = procs.start(_subscribe_then_block, t.path, slot_tx)
    victim_slot = _recv(slot_rx, victim)
    mine = t.subscribe()
    assert mine.slot != victim_slot
    with pytest.raises(shmbus.TooManySubscribers):
        t.subscribe()  # the victim is alive: its slot is not up for grabs
    mine.close()

    _kill(procs, victim)
    first = t.subscribe()  # the free slot
    second = t.subscribe()  # the dead process's slot, reclaimed
    assert first.slot != victim_slot
    assert second.slot == victim_slot
    with pytest.raises(shmbus.TooManySubscribers):
        t.subscribe()
    rows = t.subscribers()
    assert sorted(d["slot"] for d in rows) == [0, 1]
    assert {d["pid"] for d in rows} == {os.getpid()}
    t.publish("after the reclaim")
    for s in (first, second):
        assert s.get(timeout=WAKE_BOUND) == "after the reclaim"
        assert (s.received, s.lost) == (1, 0)
    t.close()


# -- 4. late subscribers -----------------------------------------------------------------


def test_late_subscribers_start_at_latest_or_at_the_oldest_message_still_there(
    bus_name: str, procs: Any
) -> None:
    m, k = 1000, 20
    t = Topic.create(bus_name, capacity="16KiB")
    phase1, go, done = procs.ctx.Event(), procs.ctx.Event(), procs.ctx.Event()
    pub, pub_rx = _start(procs, _publish_two_phases, t.path, m, k, phase1, go)
    assert phase1.wait(CHILD_TIMEOUT)
    oldest = t.stats().get_count
    assert 0 < oldest < m - k  # the ring lapped; much is still there
    readies = {start: procs.ctx.Event() for start in ("latest", "earliest")}
    subs = {start: _start(procs, _late_subscriber, t.path, start, k, r, done) for start, r in readies.items()}
    for r in readies.values():
        assert r.wait(CHILD_TIMEOUT)
    go.set()
    assert _result(pub_rx, pub) == m + k
    done.set()
    late = _result(subs["latest"][1], subs["latest"][0])
    early = _result(subs["earliest"][1], subs["earliest"][0])
    procs.join_all()
    assert late["at_once"] == []
    assert late["later"] == list(range(m, m + k))
    assert early["at_once"] == list(range(oldest, m))
    assert early["later"] == list(range(m, m + k))
    for r, total in ((late, k), (early, m + k - oldest)):
        assert (r["after"], r["received"], r["lost"]) == ([], total, 0)
    t.close()


def test_subscribers_in_other_processes_resume_at_their_sequence_numbers(bus_name: str, procs: Any) -> None:
    """Starts still in the ring, overwritten, and next: each reader's first message and counts."""
    m, k = 1000, 20
    t = Topic.create(bus_name, capacity="16KiB")
    phase1, go, done = procs.ctx.Event(), procs.ctx.Event(), procs.ctx.Event()
    pub, pub_rx = _start(procs, _publish_two_phases, t.path, m, k, phase1, go)
    assert phase1.wait(CHILD_TIMEOUT)
    oldest = t.stats().get_count
    assert 10 < oldest < m - 10
    starts = [oldest + 10, 3, m]
    readies = [procs.ctx.Event() for _ in starts]
    subs = [_start(procs, _resuming_subscriber, t.path, s, k, r, done) for s, r in zip(starts, readies)]
    for r in readies:
        assert r.wait(CHILD_TIMEOUT)
    go.set()
    assert _result(pub_rx, pub) == m + k
    done.set()
    results = [_result(rx, p) for p, rx in subs]
    procs.join_all()
    for start, r in zip(starts, results):
        first = max(start, oldest)
        assert r["got"] == list(range(first, m + k)), start
        assert r["at_once"] == m - first
        assert r["lost"] == r["lost_at_once"] == first - start
        assert r["received"] + r["lost"] == m + k - start
    t.close()


# -- 5. wake-ups ---------------------------------------------------------------------------


def test_a_sleeping_subscriber_wakes_within_10_ms_p99(bus_name: str, procs: Any) -> None:
    n = 1000
    t = Topic.create(bus_name, capacity="64KiB")
    rx, tx = procs.ctx.Pipe(duplex=False)
    child = procs.start(_ping_pong_subscriber, t.path, n, tx)
    slot = _recv(rx, child)
    delays = []
    for _ in range(n):
        _wait_until_asleep(t, slot, child.pid, poll=0.0002)
        t.publish(time.monotonic_ns())
        delays.append(_recv(rx, child))
    procs.join_all()
    delays_ms = sorted(d / 1e6 for d in delays)
    p50 = statistics.median(delays_ms)
    p99 = delays_ms[int(0.99 * n) - 1]
    summary = f"wake-up latency over {n}: p50 {p50:.3f} ms, p99 {p99:.3f} ms, max {delays_ms[-1]:.3f} ms"
    print(summary)
    assert delays_ms[0] > 0
    assert p99 < 10.0, summary
    t.close()


def test_one_publish_wakes_every_sleeping_subscriber(bus_name: str, procs: Any) -> None:
    rounds = 3
    t = Topic.create(bus_name, capacity="64KiB")
    children = []
    # Two sleep at once (spin=0), two poll first (the default spin); two in get_many.
    for spin, many in ((0.0, False), (0.0, True), (_topic.SPIN_DEFAULT, False), (_topic.SPIN_DEFAULT, True)):
        rx, tx = procs.ctx.Pipe(duplex=False)
        p = procs.start(_wake_subscriber, t.path, spin, rounds, many, tx)
        children.append((p, rx, _recv(rx, p)))
    for r in range(rounds):
        for p, _, slot in children:
            _wait_until_asleep(t, slot, p.pid)
        t0 = time.monotonic()
        t.publish({"round": r})
        for p, rx, _ in children:
            got, woke = _recv(rx, p, timeout=45)
            assert got == [{"round": r}], (p.pid, got)
            assert 0 <= woke - t0 < WAKE_BOUND
    procs.join_all()
    t.close()


def test_no_wake_up_is_lost_while_publishes_race_subscribers_going_to_sleep(
    bus_name: str, procs: Any
) -> None:
    # Each publish clears the flags it posts; a subscriber sets its flag again for its next
    # sleep at any moment. Without the periodic re-check, a lost wake-up hangs a subscriber
    # (its get times out in its child, which fails the test).
    n = 20_000
    t = Topic.create(bus_name, capacity="4MiB")
    readies = [procs.ctx.Event() for _ in range(3)]
    subs = [_start(procs, _sleepy_subscriber, t.path, n, r) for r in readies]
    for r in readies:
        assert r.wait(CHILD_TIMEOUT)
    pub, pub_rx = _start(procs, _publish_with_gaps, t.path, n)
    assert _result(pub_rx, pub) == n
    results = [_result(rx, p) for p, rx in subs]
    procs.join_all()
    assert [got for got, _ in results] == [n] * 3
    # A lost wake-up sleeps until the get's timeout (then finds the message and returns it).
    assert max(longest for _, longest in results) < LOST_WAKE_UP / 2, results
    t.close()


# -- 6. several publishers ----------------------------------------------------------------


def test_two_publishers_two_subscribers_every_message_once_in_publisher_order(
    bus_name: str, procs: Any
) -> None:
    n_pub, per = 2, 50_000
    t = Topic.create(bus_name, capacity="8MiB")
    assert n_pub * per * _span([1, per]) < t.capacity
    readies = [procs.ctx.Event() for _ in range(2)]
    subs = [_start(procs, _subscribe_tagged, t.path, n_pub, per, r) for r in readies]
    for r in readies:
        assert r.wait(CHILD_TIMEOUT)
    go = procs.ctx.Event()
    for p, batch in zip(range(n_pub), (1, 100)):
        procs.start(_publish_tagged, t.path, p, per, batch, go)
    go.set()
    results = [_result(rx, p) for p, rx in subs]
    procs.join_all()
    for r in results:
        assert r["next"] == [per] * n_pub
        assert (r["received"], r["lost"], r["after"]) == (n_pub * per, 0, [])
    # A broadcast: both subscribers saw the very same interleaving.
    assert results[0]["order"] == results[1]["order"]
    assert results[0]["switches"] == results[1]["switches"]
    assert t.stats().put_count == n_pub * per
    t.close()


# -- 7. a Topic handle inherited by a child ----------------------------------------------


def test_a_child_closing_an_inherited_topic_leaves_the_parent_subscription_alone(
    bus_name: str, procs: Any
) -> None:
    t = Topic.create(bus_name, capacity="64KiB", max_subscribers=2)
    sub = t.subscribe()
    procs.start(_publish_and_close_inherited, t, 3)
    procs.join_all()
    assert not t.closed and not sub.closed
    # The subscription belongs to this process: the child's close() must not free its slot.
    assert [(d["slot"], d["pid"]) for d in t.subscribers()] == [(sub.slot, os.getpid())]
    assert sub.get_many(10, timeout=WAKE_BOUND) == [0, 1, 2]
    other = t.subscribe()
    assert other.slot != sub.slot
    t.publish("both")
    assert sub.get(timeout=WAKE_BOUND) == other.get(timeout=WAKE_BOUND) == "both"
    t.close()
