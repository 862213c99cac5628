"""``_bridge_pull.Puller`` with a real nats-server: rounds in order, nothing acknowledged for its caller."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from shmbus._bridge_pull import Puller

pytestmark = pytest.mark.timeout(60)
nats = pytest.importorskip("nats")  # the test extra installs it: CI never skips


async def _pull_all(url: str, n: int) -> None:
    from nats.js import api

    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        await js.add_stream(name="PULL", subjects=["pull.x"])
        for i in range(n):
            await js.publish("pull.x", str(i).encode())
        config = api.ConsumerConfig(ack_policy=api.AckPolicy.EXPLICIT, ack_wait=30.0, max_ack_pending=10_000)
        puller = Puller(nc, js, "PULL", "pull.x", "workers", config)
        await puller.start()
        got: list[Any] = []
        while len(got) < n:
            msgs = await puller.fetch(200, 5.0)
            assert msgs, f"only {len(got)} of {n} came"
            got += msgs
        assert [int(m.data) for m in got] == list(range(n)), "in the stream's order, each once"
        info = await js.consumer_info("PULL", "workers")
        assert info.num_ack_pending == n, "the puller acknowledges nothing: its caller does, after the put"
        for m in got:
            await m.ack()
        assert await puller.fetch(200, 0.3) == [] and puller.held() == []  # nothing more: a round times out
        await puller.stop()
        await nc.flush()
        assert (await js.consumer_info("PULL", "workers")).num_ack_pending == 0
    finally:
        await nc.close()


def test_rounds_come_in_order_and_nothing_is_acknowledged_for_the_caller(nats_server: Any) -> None:
    asyncio.run(_pull_all(nats_server.url, 1000))
