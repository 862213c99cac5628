"""The bridge under faults: kill -9 storms, a broker restarted, a cluster node killed, a Topic overwritten.

Everything is real: bridges are ``python -m shmbus bridge`` processes, the
producer is a process of its own, the servers come from ``natsserver.py``.
Waits are on observable states (a queue's consumed count, messages
arriving, the stream's last message), each with a deadline. The kill
instants are random: a point of the run (a consumed or received count)
drawn from a seeded RNG, then a random delay of at most one round; the seed
is printed (a failing test shows it) and ``SHMBUS_FAULT_SEED=<n>`` replays it.

What is counted: the stream's payloads by producer and sequence number (and
its message count), the receiving queue's messages by number. The slowest
tests are marked ``slow`` (``-m "not slow"`` leaves them out locally; the
suite, and so ``.ci/run``, runs them).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import random
import select
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
from natsserver import retried
from test_bridge import _bridge, _stop

import shmbus
from shmbus import _bridge_wire as wire

pytestmark = pytest.mark.timeout(120)

nats = pytest.importorskip("nats")  # the test extra installs it: CI never skips
KILLS = 20
RUN_WAIT = 90.0  # seconds for a whole run, kills included: far above a healthy one on a loaded machine
DUPLICATE_WINDOW = 120.0  # seconds: the streams' duplicate window (a restart must republish within it)
ACK_WAIT = "2"  # in-routes: a killed bridge's fetch comes back after this (the default 30 s is too long)
SEED = int(os.environ.get("SHMBUS_FAULT_SEED") or random.randrange(2**32))


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> random.Random:
    """A seeded RNG for kill instants; the seed is printed, so a failing test shows it."""
    print(f"kill instants: SHMBUS_FAULT_SEED={SEED} ({request.node.name})")
    return random.Random(f"{SEED}:{request.node.name}")


def _seed() -> str:
    return f"SHMBUS_FAULT_SEED={SEED}"


# -- the stream, read back ----------------------------------------------------------------------


def _connect(urls: list[str]) -> Any:
    return nats.connect(urls, connect_timeout=2, max_reconnect_attempts=-1, reconnect_time_wait=0.2)


def _js(urls: list[str], fn: Any) -> Any:
    """``fn(js)`` on a fresh connection to any of ``urls``, again while a leader is being elected."""

    async def go() -> Any:
        nc = await _connect(urls)
        try:
            js = nc.jetstream(timeout=10)
            return await retried(lambda: fn(js))
        finally:
            await nc.close()

    return asyncio.run(asyncio.wait_for(go(), RUN_WAIT))


def _add_stream(urls: list[str], name: str, subject: str, replicas: int = 1) -> None:
    async def add(js: Any) -> None:
        await js.add_stream(name=name, subjects=[subject], duplicate_window=DUPLICATE_WINDOW,
                            num_replicas=replicas)  # fmt: skip

    _js(urls, add)


def _stream_messages(urls: list[str], stream: str) -> int:
    async def count(js: Any) -> int:
        return int((await js.stream_info(stream)).state.messages)

    return int(_js(urls, count))


def _stream_records(urls: list[str], stream: str, subject: str) -> list[tuple[int, Any]]:
    """Every record the stream holds, in stream order: (the bus's sequence number, the decoded message)."""
    from nats.js import api

    async def read(js: Any) -> list[tuple[int, Any]]:
        total = (await js.stream_info(stream)).state.messages
        config = api.ConsumerConfig(ack_policy=api.AckPolicy.NONE, deliver_policy=api.DeliverPolicy.ALL,
                                    inactive_threshold=30.0)  # fmt: skip
        psub = await js.pull_subscribe(subject, stream=stream, config=config)
        out: list[tuple[int, Any]] = []
        seen = 0
        while seen < total:
            for m in await psub.fetch(min(total - seen, 5000), timeout=10):
                first = int(m.headers[wire.SEQ])
                recs = wire.records_of(m.data, m.headers)
                out.extend((first + k, msgpack.unpackb(x.data)) for k, x in enumerate(recs))
                seen += 1
        await psub.unsubscribe()
        return out

    return list(_js(urls, read))


def _last_seq(urls: list[str], stream: str, subject: str) -> int | None:
    """The bus sequence number of the last record the stream holds (None: none yet)."""

    async def last(js: Any) -> int | None:
        try:
            m = await js.get_last_msg(stream, subject)
        except nats.js.errors.NotFoundError:
            return None
        return int(m.headers[wire.SEQ]) + wire.frame_count(m.headers) - 1

    return _js(urls, last)  # type: ignore[no-any-return]


def _consumer_settled(urls: list[str], stream: str, durable: str) -> bool:
    """True when the durable consumer has nothing left to deliver and nothing unacknowledged."""

    async def info(js: Any) -> bool:
        ci = await js.consumer_info(stream, durable)
        return bool(ci.num_pending == 0 and ci.num_ack_pending == 0)

    return bool(_js(urls, info))


def _check_exactly_once(records: list[tuple[int, Any]], n: int, producers: int = 1) -> tuple[int, int]:
    """(lost, duplicated) counted by each message's producer and number."""
    counts = collections.Counter((m["p"], m["i"]) for _seq, m in records)
    want = {(p, i) for p in range(producers) for i in range(n // producers)}
    lost = len(want - counts.keys())
    dups = sum(c - 1 for c in counts.values())
    return lost, dups


# -- buses and processes --------------------------------------------------------------------------


class Buses:
    """Buses made in a test's tmp dir: closed and unlinked after."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.made: list[Any] = []

    def queue(self, name: str, capacity: str) -> shmbus.Queue:
        q = shmbus.Queue.create(str(self.root / name), capacity=capacity)
        self.made.append(q)
        return q

    def topic(self, name: str, capacity: str) -> shmbus.Topic:
        t = shmbus.Topic.create(str(self.root / name), capacity=capacity)
        self.made.append(t)
        return t

    def close(self) -> None:
        for bus in self.made:
            bus.unlink()
            bus.close()


@pytest.fixture
def buses(tmp_path: Path) -> Iterator[Buses]:
    b = Buses(tmp_path)
    yield b
    b.close()


class Bridges:
    """Bridge processes of one test: every one still running at the end is killed and reaped."""

    def __init__(self) -> None:
        self.procs: list[Any] = []

    def start(self, *args: str) -> Any:
        proc = _bridge(*args)
        self.procs.append(proc)
        return proc

    def kill(self, proc: Any) -> None:
        proc.kill()
        proc.communicate()

    def reap(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()


@pytest.fixture
def bridges() -> Iterator[Bridges]:
    b = Bridges()
    yield b
    b.reap()


def _producer(path: str, p: int, n: int) -> None:
    """A producer process: ``{"p": p, "i": i}``, i from 0 to n-1 (it waits when the queue is full)."""
    q = shmbus.Queue.open(path)
    for start in range(0, n, 200):
        q.put_many([{"p": p, "i": i} for i in range(start, min(start + 200, n))])
    q.close()


def _kill_points(rng: random.Random, n: int) -> list[int]:
    """Where in a run of ``n`` messages the kills come: ``KILLS`` random counts, in order."""
    return sorted(rng.sample(range(1, n - n // 5), KILLS))


def _random_instant(rng: random.Random, round_time: float) -> None:
    """Wait a random part of a round: the kill lands anywhere in it (the instant drawn, not a sync)."""
    time.sleep(rng.uniform(0.0, round_time))


def _kill_storm(
    bridges: Bridges, args: list[str], rng: random.Random, n: int, progress: Any, round_time: float,
    deadline: float,
) -> tuple[Any, list[float], list[float]]:
    """Kill -9 a bridge ``KILLS`` times at random points of the run (``progress()`` reaching a count drawn
    from ``rng``, then a random part of a round), starting it again each time; the last one runs on.

    Returns it, the kill cycles' durations (from one kill to the next) and the restarts' (from a kill
    to the next bridge's first progress: how long records of a killed round wait to be sent again).
    Fails if fewer than half the kills came with work left (the run was too short to test anything).
    """
    cycles, restarts = [], []
    proc = bridges.start(*args)
    killed_at = None
    mid_run = 0
    for point in _kill_points(rng, n):
        started = time.monotonic()
        if killed_at is not None:
            was = progress()
            _wait(lambda was=was: progress() > was or was >= n, "the restarted bridge's first round",
                  deadline, proc)  # fmt: skip
            if was < n:
                restarts.append(time.monotonic() - killed_at)
        _wait(lambda at=point: progress() >= at, f"{point} messages through", deadline, proc)
        _random_instant(rng, round_time)
        mid_run += progress() < n
        bridges.kill(proc)
        killed_at = time.monotonic()
        cycles.append(killed_at - started)
        proc = bridges.start(*args)
    assert mid_run >= KILLS // 2, f"only {mid_run} kills came with work left: make the run longer ({_seed()})"
    return proc, cycles, restarts


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _wait(cond: Any, what: str, deadline: float, alive: Any = None) -> None:
    """Poll ``cond()`` (an observable state) until true; fail at ``deadline`` or if ``alive`` exited."""
    while not cond():
        if time.monotonic() > deadline:
            said = ""
            if alive is not None:  # what the bridge said (a status line first)
                alive.send_signal(signal.SIGUSR1)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    alive.communicate(timeout=1.0)
                alive.kill()
                out, err = alive.communicate()
                said = f"; the bridge said: {out[-1000:]} {err[-2000:]}"
            raise AssertionError(f"timed out waiting for {what} ({_seed()}){said}")
        if alive is not None and alive.poll() is not None:
            raise AssertionError(f"the bridge exited ({alive.returncode}) waiting for {what}: "
                                 f"{alive.communicate()[1][-2000:]}")  # fmt: skip
        time.sleep(0.002)  # a poll of an observable state


# -- kill -9 the out-bridge ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("batch", [False, True], ids=["one-per-message", "batch-framing"])
def test_out_bridge_killed_20_times_stores_every_record_exactly_once(
    nats_server: Any, buses: Buses, bridges: Bridges, procs: Any, rng: random.Random, batch: bool
) -> None:
    n = 200_000 if batch else 40_000  # (the 200 000 one per message: 50 s here, too long)
    urls = [nats_server.url]
    q = buses.queue("jobs", "1MiB")  # the producer meets backpressure: it feeds the queue all along
    _add_stream(urls, "STORM", "storm.out")
    args = ["queue-to-stream", str(buses.root / "jobs"), "--subject", "storm.out", "--stream", "STORM",
            "--server", nats_server.url, "--max-batch", "500", *(["--batch"] if batch else [])]  # fmt: skip
    procs.start(_producer, str(buses.root / "jobs"), 0, n)
    t0 = time.monotonic()
    deadline = t0 + RUN_WAIT
    round_time = 0.01 if batch else 0.05  # (a batch-framing round moves 500 records in a few ms)
    proc, cycles, restarts = _kill_storm(bridges, args, rng, n, lambda: q.stats().get_count, round_time,
                                         deadline)  # fmt: skip
    _wait(lambda: q.stats().get_count >= n, "every record consumed", deadline, proc)
    took = time.monotonic() - t0
    rc, _status, err = _stop(proc)
    procs.join_all()
    assert rc == 0, err
    records = _stream_records(urls, "STORM", "storm.out")
    lost, dups = _check_exactly_once(records, n)
    in_flight = q.stats().recoveries  # kills that found the bridge holding a round (the consumer lock)
    print(f"out-bridge, {KILLS} kills ({in_flight} with a round in flight), {n} messages "
          f"({'batch' if batch else 'one per message'}): lost {lost}, duplicates {dups}, {took:.1f} s, "
          f"{_mean(cycles):.2f} s per kill cycle, restarts {_mean(restarts):.2f} s "
          f"(longest {max(restarts):.2f} s)")  # fmt: skip
    assert (lost, dups) == (0, 0), f"{lost} lost, {dups} duplicated ({_seed()})"
    assert in_flight >= KILLS // 2, f"only {in_flight} kills landed with a round in flight ({_seed()})"
    assert max(restarts) < DUPLICATE_WINDOW / 10, "restarts far inside the duplicate window"
    assert sorted(seq for seq, _m in records) == list(range(n)), _seed()
    if not batch:  # one message per record: the count says the same
        assert _stream_messages(urls, "STORM") == n
    assert q.qsize() == 0


# -- kill -9 the in-bridge ----------------------------------------------------------------------------


def _publish(urls: list[str], subject: str, n: int) -> None:
    """Publish ``{"p": 0, "i": i}`` for i in 0..n-1 to the stream, acks pipelined."""

    async def go(js: Any) -> None:
        for start in range(0, n, 2000):
            futs = [await js.publish_async(subject, msgpack.packb({"p": 0, "i": i}))
                    for i in range(start, min(start + 2000, n))]  # fmt: skip
            await asyncio.gather(*futs)

    _js(urls, go)


@pytest.mark.slow
def test_in_bridge_killed_20_times_loses_nothing_and_duplicates_at_most_a_fetch_per_kill(
    nats_server: Any, buses: Buses, bridges: Bridges, rng: random.Random
) -> None:
    n, max_batch = 20_000, 200
    urls = [nats_server.url]
    qb = buses.queue("jobs", "16MiB")
    _add_stream(urls, "IN", "in.storm")
    _publish(urls, "in.storm", n)
    args = ["stream-to-queue", str(buses.root / "jobs"), "--subject", "in.storm", "--stream", "IN",
            "--durable", "hostb", "--max-batch", str(max_batch), "--ack-wait", ACK_WAIT,
            "--server", nats_server.url]  # fmt: skip
    got: list[int] = []

    def drain() -> int:
        got.extend(m["i"] for m in qb.get_many(100_000, block=False))
        return len(got)

    t0 = time.monotonic()
    deadline = t0 + RUN_WAIT
    proc, cycles, restarts = _kill_storm(bridges, args, rng, n, drain, 0.02, deadline)
    # Every message acknowledged: what the killed bridges held came back after the ack wait.
    _wait(lambda: _consumer_settled(urls, "IN", "hostb") and drain() >= n, "the consumer settled",
          deadline, proc)  # fmt: skip
    took = time.monotonic() - t0
    rc, _status, err = _stop(proc)
    drain()
    assert rc == 0, err
    counts = collections.Counter(got)
    lost = n - len(counts)
    dups = len(got) - len(counts)
    print(f"in-bridge, {KILLS} kills, {n} messages: lost {lost}, duplicates {dups} "
          f"(bound {KILLS} x {max_batch}), {took:.1f} s, {_mean(cycles):.2f} s per kill cycle, "
          f"restarts {_mean(restarts):.2f} s (longest {max(restarts):.2f} s)")  # fmt: skip
    assert lost == 0 and set(counts) == set(range(n)), f"{lost} lost ({_seed()})"
    assert dups <= KILLS * max_batch, f"{dups} duplicates, above one fetch per kill ({_seed()})"


# -- broker faults ------------------------------------------------------------------------------------


class Pipeline:
    """Producer -> Queue "a" -> out-bridge -> stream -> in-bridge -> Queue "b", drained by the test."""

    def __init__(self, buses: Buses, bridges: Bridges, procs: Any, urls: list[str], n: int) -> None:
        self.n, self.urls = n, urls
        self.qa = buses.queue("a", "1MiB")
        self.qb = buses.queue("b", "16MiB")
        servers = [x for url in urls for x in ("--server", url)]
        self.out = bridges.start("queue-to-stream", str(buses.root / "a"), "--subject", "pipe.out",
                                 "--stream", "PIPE", "--max-batch", "500", *servers)  # fmt: skip
        self.inb = bridges.start("stream-to-queue", str(buses.root / "b"), "--subject", "pipe.out",
                                 "--stream", "PIPE", "--durable", "b", "--max-batch", "500",
                                 "--ack-wait", ACK_WAIT, *servers)  # fmt: skip
        procs.start(_producer, str(buses.root / "a"), 0, n)
        self.got: list[int] = []

    def drain(self) -> int:
        self.got.extend(m["i"] for m in self.qb.get_many(100_000, block=False))
        return len(self.got)

    def alive(self) -> None:
        for proc in (self.out, self.inb):
            assert proc.poll() is None, proc.communicate()[1][-2000:]

    def finish(self, deadline: float) -> tuple[int, int]:
        """Wait for every message, stop both bridges; (lost, duplicated) at host B."""
        _wait(lambda: len(set(self.got)) >= self.n or self.drain() < 0, "every message at host B",
              deadline, self.inb)  # fmt: skip
        for proc in (self.out, self.inb):
            rc, _status, err = _stop(proc)
            assert rc == 0, err
        self.drain()
        lost = self.n - len(set(self.got))
        return lost, len(self.got) - len(set(self.got))


@pytest.mark.slow
@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_a_broker_stopped_and_restarted_mid_run_loses_nothing(
    nats_server: Any, buses: Buses, bridges: Bridges, procs: Any, how: str
) -> None:
    n = 12_000
    urls = [nats_server.url]
    _add_stream(urls, "PIPE", "pipe.out")
    pipe = Pipeline(buses, bridges, procs, urls, n)
    deadline = time.monotonic() + RUN_WAIT
    _wait(lambda: pipe.drain() >= n // 3, "a third of the run at host B", deadline, pipe.inb)
    # SIGTERM: the file store is flushed; SIGKILL: what the server wrote is in the OS's page cache
    # (a process crash, not a host's). Either way the bridges lose their connection.
    nats_server.stop() if how == "sigterm" else nats_server.kill()
    # Meanwhile the producer goes on: host A's queue backs up (the bridge holds what it took).
    _wait(lambda: pipe.qa.qsize() >= 2000 or pipe.qa.stats().put_count >= n, "host A backing up",
          deadline, pipe.out)  # fmt: skip
    nats_server.start()
    lost, dups = pipe.finish(deadline)
    procs.join_all()
    records = _stream_records(urls, "PIPE", "pipe.out")
    in_stream = _check_exactly_once(records, n)
    print(f"broker {how}, restarted: lost {lost}, duplicates at host B {dups}; in the stream: lost, "
          f"duplicated {in_stream}")  # fmt: skip
    assert lost == 0
    assert in_stream == (0, 0)
    if how == "sigterm":  # (a crashed server may also forget acks it had: JetStream saves them lazily)
        assert dups <= 2 * 500, "at most the fetches in flight when the server went away come twice"


@pytest.mark.slow
def test_a_cluster_node_killed_mid_run_loses_nothing(
    nats_cluster: Any, buses: Buses, bridges: Bridges, procs: Any
) -> None:
    n = 12_000
    urls = nats_cluster.urls
    _add_stream(urls, "PIPE", "pipe.out", replicas=3)
    pipe = Pipeline(buses, bridges, procs, urls, n)
    deadline = time.monotonic() + RUN_WAIT
    _wait(lambda: pipe.drain() >= n // 3, "a third of the run at host B", deadline, pipe.inb)

    async def leader(js: Any) -> str:
        return str((await js.stream_info("PIPE")).cluster.leader)

    name = _js(urls, leader)
    node = next(i for i, s in enumerate(nats_cluster.servers) if s.name == name)
    nats_cluster.kill(node)  # SIGKILL the stream's leader: a new one is elected from the two replicas
    lost, dups = pipe.finish(deadline)
    procs.join_all()
    up = [s.url for s in nats_cluster.servers if s.running]
    records = _stream_records(up, "PIPE", "pipe.out")
    in_stream = _check_exactly_once(records, n)
    print(f"stream leader {name} killed: lost {lost}, duplicates at host B {dups}; in the stream: lost, "
          f"duplicated {in_stream}")  # fmt: skip
    assert lost == 0
    assert in_stream == (0, 0)


# -- Topic -> stream across restarts ------------------------------------------------------------------


def _status(proc: Any) -> dict[str, Any]:
    """The route's status line, asked with SIGUSR1 (the bridge runs with --json)."""
    proc.send_signal(signal.SIGUSR1)
    ready, _w, _x = select.select([proc.stdout], [], [], 30)
    assert ready, "no status line in 30 s"
    line = proc.stdout.readline()
    assert line, f"the bridge exited ({proc.wait()}): {proc.stderr.read()[-2000:]}"
    return dict(json.loads(line))


def _running_status(t: shmbus.Topic, proc: Any, deadline: float) -> dict[str, Any]:
    """The status of a topic bridge once it runs (subscribed: its SIGUSR1 handler is in place by then)."""
    _wait(lambda: any(row["pid"] == proc.pid for row in t.subscribers()), "the bridge subscribed",
          deadline, proc)  # fmt: skip
    while True:
        row = _status(proc)
        if row["state"] == "running":
            return row
        assert time.monotonic() < deadline, f"the bridge is {row['state']} ({_seed()})"


@pytest.mark.slow
def test_topic_to_stream_across_restarts_counts_exactly_what_the_ring_overwrote_meanwhile(
    nats_server: Any, buses: Buses, bridges: Bridges, rng: random.Random
) -> None:
    urls = [nats_server.url]
    t = buses.topic("metrics", "64KiB")
    _add_stream(urls, "METRICS", "metrics.all")
    args = ["topic-to-stream", str(buses.root / "metrics"), "--subject", "metrics.all", "--stream",
            "METRICS", "--server", nats_server.url, "--json"]  # fmt: skip
    ring = 0  # records the ring holds when full, learnt below
    deadline = time.monotonic() + RUN_WAIT
    gaps: list[range] = []  # per restart: what the ring overwrote while no bridge ran, by the bridge's count

    def publish(k: int) -> None:
        start = t.stats().put_count
        for i in range(start, start + k):
            t.publish({"i": i})

    publish(500)
    for cycle in range(8):
        st = t.stats()
        oldest = st.put_count - st.messages  # the oldest record the ring still holds
        proc = bridges.start(*args)
        _wait(lambda: _last_seq(urls, "METRICS", "metrics.all") == t.stats().put_count - 1,
              "the stream holding the ring's newest record", deadline, proc)  # fmt: skip
        missed = _running_status(t, proc, deadline)["missed"]
        gaps.append(range(oldest - missed, oldest))
        publish(rng.randrange(1, 1000))  # the bridge runs: it keeps up (less than the ring holds)
        if cycle % 2:
            _random_instant(rng, 0.02)
            bridges.kill(proc)  # kill -9, maybe with a round in flight
        else:
            _wait(lambda: _last_seq(urls, "METRICS", "metrics.all") == t.stats().put_count - 1,
                  "the stream holding the ring's newest record", deadline, proc)  # fmt: skip
            rc, _out, err = _stop(proc)
            assert rc == 0, err
        ring = ring or t.stats().messages
        # No bridge: the publisher goes on, sometimes past what the ring holds.
        publish(rng.choice([0, rng.randrange(1, 3000), rng.randrange(3000, 8000)]))
    proc = bridges.start(*args)
    st = t.stats()
    _wait(lambda: _last_seq(urls, "METRICS", "metrics.all") == st.put_count - 1,
          "the stream holding the ring's newest record", deadline, proc)  # fmt: skip
    missed = _running_status(t, proc, deadline)["missed"]
    gaps.append(range(st.put_count - st.messages - missed, st.put_count - st.messages))
    rc, _out, err = _stop(proc)
    assert rc == 0, err
    held = [seq for seq, m in _stream_records(urls, "METRICS", "metrics.all")]
    missing = set(range(st.put_count)) - set(held)
    counted = {seq for gap in gaps for seq in gap}
    print(f"topic -> stream, 9 bridge runs: {len(held)} stored, {len(missing)} overwritten while no bridge "
          f"ran, counted in missed: {[len(g) for g in gaps]}")  # fmt: skip
    assert len(held) == len(set(held)), "no record twice in the stream"
    assert missing == counted, f"missed must count exactly the records the ring lost ({_seed()})"
    assert sum(len(g) for g in gaps) == len(counted), "each overwritten record counted once"
    assert any(gaps), f"no restart found the ring overwritten ({_seed()}); it holds {ring} records"


# -- the ack wait: how soon a killed in-bridge's messages come back ------------------------------------


def test_the_ack_wait_comes_from_the_route_and_updates_an_existing_durable(
    nats_server: Any, buses: Buses, bridges: Bridges, tmp_path: Path
) -> None:
    from nats.js import api

    from shmbus.bridge import BridgeConfigError, load_config

    cfg = tmp_path / "bridge.toml"
    cfg.write_text('[[route]]\ndirection = "stream-to-queue"\nbus = "q"\nsubject = "a.b"\nack_wait = 1.5\n')
    assert load_config(str(cfg))[0][0].ack_wait == 1.5
    cfg.write_text('[[route]]\ndirection = "stream-to-queue"\nbus = "q"\nsubject = "a.b"\nack_wait = 0\n')
    with pytest.raises(BridgeConfigError, match="ack_wait must be above 0"):
        load_config(str(cfg))
    urls = [nats_server.url]
    buses.queue("q", "64KiB")
    _add_stream(urls, "AW", "aw.in")

    async def durable(js: Any) -> None:  # made earlier with JetStream's default ack wait (30 s)
        await js.add_consumer("AW", api.ConsumerConfig(durable_name="w", ack_policy=api.AckPolicy.EXPLICIT,
                                                       filter_subject="aw.in"))  # fmt: skip

    async def ack_wait(js: Any) -> float:
        return float((await js.consumer_info("AW", "w")).config.ack_wait)

    _js(urls, durable)
    assert _js(urls, ack_wait) == 30.0
    proc = bridges.start("stream-to-queue", str(buses.root / "q"), "--subject", "aw.in", "--durable", "w",
                         "--ack-wait", "1.5", "--server", nats_server.url)  # fmt: skip
    _wait(lambda: _js(urls, ack_wait) == 1.5, "the durable's ack wait updated", time.monotonic() + RUN_WAIT,
          proc)  # fmt: skip
    rc, _out, err = _stop(proc)
    assert rc == 0, err
    assert "ack wait set to 1.5 s (was 30 s)" in err
