"""The plain nats-py baseline of the bench (``shmbus._bench._natspair``) against a real nats-server."""

from __future__ import annotations

import pytest
from natsserver import NatsServer

from shmbus._bench._natspair import measure_nats_pair


@pytest.mark.timeout(90)
def test_the_nats_pair_moves_every_message_and_reports_rate_and_cpu(nats_server: NatsServer) -> None:
    r = measure_nats_pair(nats_server.url, 3000, window=512)
    assert r["msgs"] == 3000
    assert r["msgs_per_s"] > 0 and r["seconds"] > 0
    assert set(r["cpu_s"]) == {"publisher", "consumer"} and all(v > 0 for v in r["cpu_s"].values())
    assert r["cpu_us_per_msg"] == pytest.approx(sum(r["cpu_s"].values()) / 3000 * 1e6)
