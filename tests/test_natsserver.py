"""The nats-server fixtures (``natsserver.py``) with plain nats-py: they start real servers that work.

JetStream publish and pull on one server; a stop and start that keeps a
file-stored stream; a 3-node cluster that keeps a stream of 3 replicas
available with a node killed; a server that refuses a wrong password and a
forbidden subject. Each test bounds its client calls (``run``).
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.errors import NoServersError
from nats.js.api import StorageType
from natsserver import AuthUsers, NatsCluster, NatsServer, free_port, retried, run

pytestmark = pytest.mark.timeout(90)


async def _add_stream(nc: Any, name: str, subject: str, replicas: int = 1) -> None:
    js = nc.jetstream()
    await js.add_stream(name=name, subjects=[subject], storage=StorageType.FILE, num_replicas=replicas)


async def _publish(nc: Any, subject: str, n: int, start: int = 0) -> list[int]:
    """Publish ``n`` numbered messages, acknowledgements pipelined; their stream sequence numbers."""
    js = nc.jetstream()
    acks = await asyncio.gather(*(js.publish(subject, b"m%d" % i) for i in range(start, start + n)))
    return [a.seq for a in acks]


async def _fetch_all(nc: Any, subject: str, durable: str, n: int) -> list[bytes]:
    """``n`` messages through a durable pull consumer, each acknowledged."""
    sub = await retried(lambda: nc.jetstream().pull_subscribe(subject, durable=durable))
    got: list[bytes] = []
    while len(got) < n:
        try:
            batch = await sub.fetch(n - len(got), timeout=2)
        except nats.errors.TimeoutError:
            continue  # a consumer just made, or electing a leader, answers a later pull (run() bounds it)
        for m in batch:
            got.append(m.data)
            await m.ack()
    return got


def test_one_server_takes_jetstream_publishes_and_serves_a_pull_consumer(nats_server: NatsServer) -> None:
    async def main() -> tuple[list[int], list[bytes]]:
        nc = await nats.connect(nats_server.url)
        try:
            await _add_stream(nc, "JOBS", "jobs.>")
            seqs = await _publish(nc, "jobs.a", 100)
            return seqs, await _fetch_all(nc, "jobs.a", "workers", 100)
        finally:
            await nc.close()

    seqs, got = run(main())
    assert seqs == list(range(1, 101))
    assert got == [b"m%d" % i for i in range(100)]
    assert nats_server.store_dir.is_dir() and any(nats_server.store_dir.iterdir())


def test_a_stopped_and_restarted_server_keeps_its_file_stored_stream(nats_server: NatsServer) -> None:
    async def before() -> None:
        nc = await nats.connect(nats_server.url)
        try:
            await _add_stream(nc, "KEEP", "keep.>")
            await _publish(nc, "keep.x", 50)
        finally:
            await nc.close()

    async def after() -> tuple[int, list[bytes]]:
        nc = await nats.connect(nats_server.url)
        try:
            info = await nc.jetstream().stream_info("KEEP")
            await _publish(nc, "keep.x", 10, start=50)
            return info.state.messages, await _fetch_all(nc, "keep.x", "reader", 60)
        finally:
            await nc.close()

    run(before())
    port, pid = nats_server.port, nats_server.pid
    nats_server.stop()
    assert not nats_server.running and nats_server.pid is None
    nats_server.start()
    assert (nats_server.port, nats_server.running) == (port, True) and nats_server.pid != pid
    kept, got = run(after())
    assert kept == 50
    assert got == [b"m%d" % i for i in range(60)]


def test_a_killed_server_restarts_with_what_it_acknowledged(nats_server: NatsServer) -> None:
    async def publish() -> list[int]:
        nc = await nats.connect(nats_server.url)
        try:
            await _add_stream(nc, "CRASH", "crash.>")
            return await _publish(nc, "crash.x", 20)
        finally:
            await nc.close()

    async def count() -> int:
        nc = await nats.connect(nats_server.url)
        try:
            return (await nc.jetstream().stream_info("CRASH")).state.messages  # type: ignore[no-any-return]
        finally:
            await nc.close()

    assert run(publish()) == list(range(1, 21))
    nats_server.kill()
    nats_server.start()
    # The file store writes each message before the ack, so a SIGKILL keeps them (no fsync: a host
    # crash could lose the last ones; nats-server's sync_interval says how many).
    assert run(count()) == 20


def test_a_cluster_keeps_a_three_replica_stream_with_a_node_killed(nats_cluster: NatsCluster) -> None:
    assert len(nats_cluster.urls) == 3

    async def write(n: int, start: int) -> list[int]:
        nc = await nats.connect(nats_cluster.urls, max_reconnect_attempts=-1, reconnect_time_wait=0.1)
        try:
            if start == 0:
                await _add_stream(nc, "R3", "r3.>", replicas=3)
            # A publish may time out while the stream elects a new leader: retry it (dedup by id).
            js = nc.jetstream()
            seqs = []
            for i in range(start, start + n):
                ack = await retried(
                    lambda i=i: js.publish("r3.x", b"m%d" % i, timeout=1, headers={"Nats-Msg-Id": str(i)})
                )
                seqs.append(ack.seq)
            return seqs
        finally:
            await nc.close()

    async def read_all(n: int) -> list[bytes]:
        nc = await nats.connect(nats_cluster.urls, max_reconnect_attempts=-1, reconnect_time_wait=0.1)
        try:
            return await _fetch_all(nc, "r3.x", "all", n)
        finally:
            await nc.close()

    async def stream_leader() -> str:
        nc = await nats.connect(nats_cluster.urls)
        try:
            info = await nc.jetstream().stream_info("R3")
            assert info.cluster is not None and info.cluster.leader is not None
            return info.cluster.leader
        finally:
            await nc.close()

    assert run(write(20, 0)) == list(range(1, 21))
    leader = run(stream_leader())
    (victim,) = [i for i, s in enumerate(nats_cluster.servers) if s.name == leader]
    # The hardest node to lose: the one that orders the stream. Its followers elect a new
    # leader after nats-server's Raft election timeout (4 to 9 s): most of this test's time.
    nats_cluster.kill(victim)
    assert run(write(20, 20)) == list(range(21, 41))
    assert run(read_all(40)) == [b"m%d" % i for i in range(40)]
    nats_cluster.start(victim)  # back: the cluster is whole again (ready: a new R3 stream can be made)
    assert all(s.running for s in nats_cluster.servers)


def test_the_auth_server_refuses_a_wrong_password(nats_auth_server: NatsServer) -> None:
    users = nats_auth_server.users
    assert users is not None

    async def connect(password: str) -> None:
        nc = NATS()
        try:
            await nc.connect(
                nats_auth_server.url, user=users.user, password=password,
                allow_reconnect=False, max_reconnect_attempts=1, connect_timeout=2,
            )  # fmt: skip
        finally:
            await nc.close()  # (after a refused connect too: nats-py leaves its socket open otherwise)

    run(connect(users.password))
    with pytest.raises((nats.errors.Error, NoServersError), match=r"(?i)authorization"):
        run(connect("wrong"))


def test_the_auth_server_refuses_the_limited_user_a_forbidden_subject(nats_auth_server: NatsServer) -> None:
    users = nats_auth_server.users
    assert users is not None

    async def main() -> tuple[int, list[str]]:
        errors: list[str] = []

        async def on_error(e: Exception) -> None:
            errors.append(str(e))

        nc = await nats.connect(
            nats_auth_server.url, user=users.limited_user, password=users.limited_password, error_cb=on_error,
        )  # fmt: skip
        try:
            await _add_stream(nc, "OK", "allowed.>")
            seq = (await nc.jetstream().publish("allowed.x", b"fine")).seq
            await nc.publish("forbidden.x", b"no")
            await nc.flush()
            while not errors:  # the server's -ERR arrives after the flush's PONG at the latest
                await asyncio.sleep(0.01)
            return seq, errors
        finally:
            await nc.close()

    seq, errors = run(main())
    assert seq == 1
    assert any("permissions violation" in e.lower() and "forbidden.x" in e for e in errors), errors


def test_the_factory_makes_independent_servers_and_a_free_port_refuses(
    nats_server_factory: Callable[..., NatsServer],
) -> None:
    a, b = nats_server_factory(), nats_server_factory(users=AuthUsers)
    assert len({a.port, b.port, a.http_port, b.http_port}) == 4 and a.store_dir != b.store_dir
    assert (a.users, b.users) == (None, AuthUsers)

    async def reach(url: str) -> None:
        nc = NATS()
        try:
            # (nats-py: max_reconnect_attempts=0 retries a refused first connect for ever; 1 gives up)
            await nc.connect(
                url, allow_reconnect=False, max_reconnect_attempts=1, reconnect_time_wait=0.05,
                connect_timeout=2,
            )  # fmt: skip
        finally:
            await nc.close()

    run(reach(a.url))
    with pytest.raises(NoServersError):
        run(reach(f"nats://127.0.0.1:{free_port()}"))  # nobody listens there: what "unreachable" means
