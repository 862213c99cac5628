"""``shmbus bridge`` against a real nats-server: two "hosts" (two bus directories), one bridge process each.

No mocks: the server is ``nats-server -js`` on a loopback port, the bridges
are ``python -m shmbus bridge`` processes, stopped with SIGTERM. The waits
are on observable states (messages arriving in a queue, a process exiting),
each with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from natsserver import AuthUsers

import shmbus
import shmbus.bridge
from shmbus import _bridge_wire as wire

pytestmark = pytest.mark.timeout(120)

nats = pytest.importorskip("nats")  # the test extra installs it: CI never skips
REPO = str(Path(__file__).resolve().parent.parent)
MOVE_WAIT = 90.0  # seconds for a whole run to cross: far above a healthy run on a loaded machine


# -- helpers ------------------------------------------------------------------------------


def _bridge(*args: str) -> subprocess.Popen[str]:
    """Start ``shmbus bridge ARGS`` in its own process (importing this clone)."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen(
        [sys.executable, "-m", "shmbus", "bridge", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip


def _stop(proc: subprocess.Popen[str], timeout: float = 30.0) -> tuple[int, str, str]:
    """SIGTERM, then the exit code and the output."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"the bridge did not stop on SIGTERM in {timeout} s: {err}") from None
    return proc.returncode, out, err


def _run(*args: str, timeout: float = 60.0) -> tuple[int, str]:
    """Run a bridge that must exit by itself (an error): its exit code and stderr."""
    proc = _bridge(*args)
    try:
        _out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, err


def _js(url: str, fn: Any) -> Any:
    """Run ``fn(js)`` (a coroutine function) on a fresh connection."""

    async def go() -> Any:
        nc = await nats.connect(url)
        try:
            return await fn(nc.jetstream())
        finally:
            await nc.close()

    return asyncio.run(go())


async def _waiting(js: Any, stream: str, durable: str) -> int:
    """The pull requests waiting on a consumer (0 while it does not exist yet)."""
    try:
        return int((await js.consumer_info(stream, durable)).num_waiting or 0)
    except nats.js.errors.NotFoundError:
        return 0


def _add_stream(url: str, name: str, subject: str) -> None:
    async def add(js: Any) -> None:
        await js.add_stream(name=name, subjects=[subject], duplicate_window=120.0)

    _js(url, add)


def _stream_ids(url: str, stream: str) -> list[tuple[str, int, int]]:
    """Every message the stream holds, as (bus id, first record, record count)."""

    async def read(js: Any) -> list[tuple[str, int, int]]:
        info = await js.stream_info(stream)
        out = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            m = await js.get_msg(stream, seq)
            out.append((m.headers[wire.BUS], int(m.headers[wire.SEQ]), wire.frame_count(m.headers)))
        return out

    return list(_js(url, read))


def _stream_messages(url: str, stream: str) -> int:
    async def count(js: Any) -> int:
        return int((await js.stream_info(stream)).state.messages)

    return int(_js(url, count))


def _drain(q: shmbus.Queue, n: int, wait: float = MOVE_WAIT) -> list[Any]:
    """Take ``n`` messages from ``q`` (failing after ``wait`` seconds), then check nothing more comes soon."""
    got: list[Any] = []
    deadline = time.monotonic() + wait
    while len(got) < n:
        left = deadline - time.monotonic()
        assert left > 0, f"only {len(got)} of {n} messages arrived in {wait} s"
        with contextlib.suppress(shmbus.Empty):
            got.extend(q.get_many(10_000, timeout=min(left, 1.0)))
    return got


class Hosts:
    """Two "hosts": two bus directories; the buses made through it are closed and unlinked after."""

    def __init__(self, root: Path) -> None:
        self.a, self.b = root / "host_a", root / "host_b"
        self.a.mkdir()
        self.b.mkdir()
        self.buses: list[Any] = []

    def queue(self, path: Path, capacity: str = "64KiB") -> shmbus.Queue:
        q = shmbus.Queue.create(str(path), capacity=capacity)
        self.buses.append(q)
        return q

    def topic(self, path: Path, capacity: str = "1MiB") -> shmbus.Topic:
        t = shmbus.Topic.create(str(path), capacity=capacity)
        self.buses.append(t)
        return t

    def close(self) -> None:
        for bus in self.buses:
            bus.unlink()
            bus.close()


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[Hosts]:
    h = Hosts(tmp_path)
    yield h
    h.close()


# -- end to end ---------------------------------------------------------------------------


def _producer(path: str, p: int, n: int) -> None:
    q = shmbus.Queue.open(path)
    for start in range(0, n, 500):
        q.put_many([{"p": p, "i": i} for i in range(start, min(start + 500, n))])
    q.close()


@pytest.mark.parametrize("batch", [False, True], ids=["one-per-message", "batch-framing"])
def test_queue_to_queue_across_hosts_exactly_once_in_order(
    nats_server: Any, hosts: Hosts, batch: bool, procs: Any
) -> None:
    n = 100_000
    a, b = hosts.a, hosts.b
    qa = hosts.queue(a / "jobs", "16MiB")
    qb = hosts.queue(b / "jobs", "16MiB")
    _add_stream(nats_server.url, "JOBS", "jobs.out")
    framing = ["--batch"] if batch else []
    out = _bridge("queue-to-stream", str(a / "jobs"), "--subject", "jobs.out", "--stream", "JOBS",
                  "--server", nats_server.url, *framing)  # fmt: skip
    inb = _bridge("stream-to-queue", str(b / "jobs"), "--subject", "jobs.out", "--stream", "JOBS",
                  "--durable", "hostb", "--server", nats_server.url)  # fmt: skip
    try:
        t0 = time.monotonic()
        for p in range(2):
            procs.start(_producer, str(a / "jobs"), p, n // 2)
        got = _drain(qb, n)
        took = time.monotonic() - t0
        procs.join_all()
        with pytest.raises(shmbus.Empty):
            qb.get(timeout=0.5)
    finally:
        rc_out, _o, err_out = _stop(out)
        rc_in, status_in, err_in = _stop(inb)
    assert rc_out == 0 and rc_in == 0, (err_out, err_in)
    # Checked once the out-bridge stopped, its last round settled: it consumes a round only
    # after JetStream's acks, which may come after host B already holds the messages.
    assert qa.qsize() == 0
    for p in range(2):
        assert [m["i"] for m in got if m["p"] == p] == list(range(n // 2))
    if batch:  # (a few hundred frames: cheap to read back)
        seqs = [s + k for _bus, s, c in _stream_ids(nats_server.url, "JOBS") for k in range(c)]
        assert sorted(seqs) == list(range(n)), "the stream holds every record once"
    else:  # n distinct message ids, each delivered once to host B: the stream holds each once
        assert _stream_messages(nats_server.url, "JOBS") == n
    assert "moved=100000" in status_in
    print(f"{n} messages host A -> host B ({'batch' if batch else 'one per message'}): "
          f"{took:.1f} s, {n / took:,.0f} msg/s")  # fmt: skip


def test_three_in_bridges_on_one_durable_share_the_work(nats_server: Any, tmp_path: Path) -> None:
    n = 6000
    _add_stream(nats_server.url, "WORK", "work.in")
    queues = []
    bridges = []
    try:
        for h in range(3):
            d = tmp_path / f"host{h}"
            d.mkdir()
            queues.append(shmbus.Queue.create(str(d / "work"), capacity="4MiB"))
            bridges.append(_bridge("stream-to-queue", str(d / "work"), "--subject", "work.in", "--durable",
                                   "workers", "--max-batch", "50", "--server", nats_server.url))  # fmt: skip

        async def publish(js: Any) -> None:
            # Once all three pull (a pull request of each waiting on the consumer): the first
            # bridge up would otherwise take all the work before the others have started.
            deadline = time.monotonic() + MOVE_WAIT
            while await _waiting(js, "WORK", "workers") < 3:
                assert time.monotonic() < deadline, "the three bridges never all pulled"
                await asyncio.sleep(0.02)  # polls the consumer's state (an observable), with a deadline
            futs = [await js.publish_async("work.in", shmbus_msgpack({"i": i})) for i in range(n)]
            await asyncio.gather(*futs)

        _js(nats_server.url, publish)
        got: list[list[int]] = [[] for _ in queues]
        deadline = time.monotonic() + MOVE_WAIT
        while sum(map(len, got)) < n:
            assert time.monotonic() < deadline, f"only {sum(map(len, got))} of {n} arrived"
            for h, q in enumerate(queues):
                got[h].extend(m["i"] for m in q.get_many(10_000, block=False))
            time.sleep(0.01)  # polling three queues for an observable state (all arrived), not a sync
        for q in queues:
            with pytest.raises(shmbus.Empty):
                q.get(timeout=0.3)
    finally:
        codes = [_stop(br)[0] for br in bridges]
        for q in queues:
            q.unlink()
            q.close()
    assert codes == [0, 0, 0]
    assert sorted(i for g in got for i in g) == list(range(n)), "every message processed once overall"
    assert all(g for g in got), f"work spread across hosts: {[len(g) for g in got]}"


def shmbus_msgpack(obj: Any) -> bytes:
    """What a non-shmbus publisher sends: plain msgpack bytes."""
    import msgpack

    return bytes(msgpack.packb(obj))


def test_topic_to_stream_and_back_to_a_topic(nats_server: Any, hosts: Hosts) -> None:
    a, b = hosts.a, hosts.b
    ta = hosts.topic(a / "metrics")
    tb = hosts.topic(b / "metrics")
    _add_stream(nats_server.url, "METRICS", "metrics.all")
    for i in range(50):  # before any bridge: the ring still holds them, so they cross too
        ta.publish({"i": i})
    sub = tb.subscribe()
    inb = _bridge("stream-to-topic", str(b / "metrics"), "--subject", "metrics.all", "--durable", "b",
                  "--server", nats_server.url)  # fmt: skip
    out = _bridge("topic-to-stream", str(a / "metrics"), "--subject", "metrics.all", "--server",
                  nats_server.url, "--json")  # fmt: skip
    try:
        for i in range(50, 100):
            ta.publish({"i": i})
        got: list[Any] = []
        deadline = time.monotonic() + MOVE_WAIT
        while len(got) < 100:
            assert time.monotonic() < deadline, f"only {len(got)} of 100 arrived"
            with contextlib.suppress(shmbus.Empty):
                got.extend(sub.get_many(1000, timeout=1.0))
    finally:
        rc_out, status_out, err_out = _stop(out)
        rc_in, _s, err_in = _stop(inb)
        sub.close()
    assert (rc_out, rc_in) == (0, 0), (err_out, err_in)
    assert got == [{"i": i} for i in range(100)]
    row = json.loads(status_out.splitlines()[-1])
    assert row["moved"] == 100 and row["missed"] == 0
    # A restarted topic bridge resumes after the last record the stream holds: nothing twice.
    for i in range(100, 110):
        ta.publish({"i": i})
    out = _bridge("topic-to-stream", str(a / "metrics"), "--subject", "metrics.all", "--server",
                  nats_server.url, "--json")  # fmt: skip
    try:
        deadline = time.monotonic() + MOVE_WAIT
        while len(_stream_ids(nats_server.url, "METRICS")) < 110:
            assert time.monotonic() < deadline
            time.sleep(0.05)  # polls the stream's state (an observable), with a deadline
    finally:
        rc_out, status_out, err_out = _stop(out)
    assert rc_out == 0, err_out
    assert [s for _b, s, _c in _stream_ids(nats_server.url, "METRICS")] == list(range(110))


# -- bad input: one line each, a defined exit code ----------------------------------------------


def test_unreachable_server_exits_3(hosts: Hosts) -> None:
    a = hosts.a
    hosts.queue(a / "q")
    rc, err = _run("queue-to-stream", str(a / "q"), "--subject", "x.y", "--server", "nats://127.0.0.1:9",
                   "--connect-timeout", "1")  # fmt: skip
    assert rc == shmbus.bridge.EXIT_UNREACHABLE, err
    assert err.count("\n") == 1 and err.startswith("shmbus bridge: no NATS server answered"), err


def test_missing_stream_exits_6_unless_asked_to_create_it(nats_server: Any, hosts: Hosts) -> None:
    a = hosts.a
    q = hosts.queue(a / "q")
    rc, err = _run("queue-to-stream", str(a / "q"), "--subject", "x.y", "--server", nats_server.url)
    assert rc == shmbus.bridge.EXIT_NO_STREAM, err
    assert err.count("\n") == 1 and "--create-stream" in err, err
    q.put({"a": 1})
    proc = _bridge("queue-to-stream", str(a / "q"), "--subject", "x.y", "--server", nats_server.url,
                   "--create-stream")  # fmt: skip
    deadline = time.monotonic() + MOVE_WAIT
    while q.qsize():
        assert time.monotonic() < deadline and proc.poll() is None, proc.stderr
        time.sleep(0.02)  # polls the queue's state (an observable), with a deadline
    rc, _out, err = _stop(proc)
    assert rc == 0, err
    assert _stream_ids(nats_server.url, "X_Y")[0][1:] == (0, 1)


def test_bad_config_and_missing_bus_exit_2_and_1(tmp_path: Path) -> None:
    cfg = tmp_path / "bridge.toml"
    cfg.write_text('[[route]]\ndirection = "sideways"\nbus = "q"\nsubject = "a.b"\n')
    rc, err = _run("--config", str(cfg))
    assert rc == shmbus.bridge.EXIT_CONFIG and "route 1: route direction must be one of" in err, err
    rc, err = _run("queue-to-stream", "q", "--subject", "a.*")
    assert rc == shmbus.bridge.EXIT_CONFIG and "without wildcards" in err, err
    rc, err = _run("queue-to-stream", "q", "--subject", "a.b", "--user", "me")
    assert rc == shmbus.bridge.EXIT_CONFIG and "needs a password" in err, err
    rc, err = _run("queue-to-stream", str(tmp_path / "nope"), "--subject", "a.b", "--server",
                   "nats://127.0.0.1:9", "--connect-timeout", "0.5")  # fmt: skip
    assert rc in (shmbus.bridge.EXIT_UNREACHABLE, shmbus.bridge.EXIT_BUS), err


def test_wrong_credentials_exit_4_and_a_forbidden_subject_5(
    tmp_path: Path, hosts: Hosts, nats_auth_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    users = AuthUsers
    a = hosts.a
    q = hosts.queue(a / "q")
    pw = tmp_path / "pw"
    pw.write_text("wrong\n")
    rc, err = _run("queue-to-stream", str(a / "q"), "--subject", "ok.x", "--server", nats_auth_server.url,
                   "--user", users.user, "--password-file", str(pw))  # fmt: skip
    assert rc == shmbus.bridge.EXIT_AUTH and err.count("\n") == 1, err
    assert "wrong" not in err
    q.put({"a": 1})
    monkeypatch.setenv("BRIDGE_PW", users.limited_password)  # (the child inherits it)
    url = nats_auth_server.url
    rc, err = _run("queue-to-stream", str(a / "q"), "--subject", "forbidden.x", "--server", url,
                   "--user", users.limited_user, "--password-env", "BRIDGE_PW", "--create-stream",
                   "--stream", "NOPE")  # fmt: skip
    assert rc == shmbus.bridge.EXIT_PERMISSION and "forbidden.x" in err, err
    assert users.limited_password not in err
    assert q.qsize() == 1


def test_a_message_that_is_not_msgpack_is_kept_raw_logged_and_counted(
    nats_server: Any, hosts: Hosts
) -> None:
    b = hosts.b
    q = hosts.queue(b / "q")
    _add_stream(nats_server.url, "RAW", "raw.in")

    async def publish(js: Any) -> None:
        await js.publish("raw.in", b"\xc1 not msgpack")
        await js.publish("raw.in", shmbus_msgpack({"ok": 1}))
        await js.publish("raw.in", b"x", headers={wire.FRAME: "1", wire.COUNT: "2"})

    _js(nats_server.url, publish)
    proc = _bridge("stream-to-queue", str(b / "q"), "--subject", "raw.in", "--server", nats_server.url)
    try:
        got = _drain(q, 3)
    finally:
        rc, status, err = _stop(proc)
    assert rc == 0, err
    assert got == [b"\xc1 not msgpack", {"ok": 1}, b"x"]
    assert "is not msgpack; put as raw bytes" in err and "kept whole as raw bytes" in err
    assert "not_msgpack=1" in status and "bad_frames=1" in status


# -- the out-bridge killed mid-run (the storm tests run many more kills) -----------------------


@pytest.mark.parametrize("batch", [False, True], ids=["one-per-message", "batch-framing"])
def test_out_bridge_killed_mid_run_stores_each_record_once(
    nats_server: Any, hosts: Hosts, batch: bool
) -> None:
    n = 20_000
    qa = hosts.queue(hosts.a / "jobs", "4MiB")
    _add_stream(nats_server.url, "KILL", "kill.out")
    qa.put_many([{"i": i} for i in range(n)])
    framing = ["--batch", "--max-batch", "300"] if batch else ["--max-batch", "300"]
    args = ["queue-to-stream", str(hosts.a / "jobs"), "--subject", "kill.out", "--stream", "KILL",
            "--server", nats_server.url, *framing]  # fmt: skip
    deadline = time.monotonic() + MOVE_WAIT
    for left in (n - 2000, n - 6000, n - 10_000):
        proc = _bridge(*args)
        while qa.qsize() > left:  # polls the queue (an observable), with a deadline
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.001)
        proc.kill()  # SIGKILL, with a round in flight most likely
        proc.communicate()
    proc = _bridge(*args)
    try:
        while qa.qsize():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.01)
    finally:
        rc, _out, err = _stop(proc)
    assert rc == 0, err
    if batch:
        seqs = [s + k for _bus, s, c in _stream_ids(nats_server.url, "KILL") for k in range(c)]
        assert sorted(seqs) == list(range(n)), "every record stored once"
    else:  # one id per record, and JetStream drops a repeated id: n messages means none lost
        assert _stream_messages(nats_server.url, "KILL") == n


def test_the_batch_framing_round_trips_and_refuses_broken_frames() -> None:
    recs = [("msgpack", b"\x81\xa1a\x01"), ("raw", b""), ("ndarray", b"\x00" * 300)]
    out = wire.frame("0123456789abcdef", 7, recs)
    assert out.headers[wire.MSG_ID] == "0123456789abcdef:7" and out.n == 3
    assert out.payload[:5] == b"\x04\x00\x00\x00\x01"  # length 4, little-endian; kind 1 (msgpack)
    back = wire.records_of(out.payload, out.headers)
    assert [(x.kind, x.data) for x in back] == recs
    with pytest.raises(wire.WireError, match="cut short"):
        wire.records_of(out.payload[:-1], out.headers)
    with pytest.raises(wire.WireError, match="holds 3 records"):
        wire.records_of(out.payload, {**out.headers, wire.COUNT: "4"})
    one = wire.single("0123456789abcdef", 9, "raw", b"xyz")
    assert wire.records_of(one.payload, one.headers) == [wire.Incoming("raw", b"xyz", False)]
    assert wire.records_of(b"\xc1", None) == [wire.Incoming("raw", b"\xc1", True)]


def test_sigusr1_prints_a_status_line_per_route(nats_server: Any, hosts: Hosts) -> None:
    import select

    hosts.queue(hosts.a / "q")
    _add_stream(nats_server.url, "ST", "st.out")
    proc = _bridge("queue-to-stream", str(hosts.a / "q"), "--subject", "st.out", "--server", nats_server.url,
                   "--json", "--status-interval", "0.2")  # fmt: skip
    try:
        assert proc.stdout is not None
        ready, _w, _x = select.select([proc.stdout], [], [], 60)
        assert ready, "no status line in 60 s"
        row = json.loads(proc.stdout.readline())
        assert row["route"].startswith("queue-to-stream") and row["stream"] == "ST" and row["lag"] == 0
        proc.send_signal(signal.SIGUSR1)
    finally:
        rc, _out, err = _stop(proc)
    assert rc == 0, err
