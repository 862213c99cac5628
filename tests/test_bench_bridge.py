"""Row (n) of the bench: ``shmbus bridge`` end to end beside plain nats-py, and without a nats-server."""

from __future__ import annotations

import dataclasses
import multiprocessing as mp

import pytest

from shmbus._bench import _bridgerow
from shmbus._bench._measure import Progress
from shmbus._bench._params import params_for
from shmbus._bench._report import format_table
from shmbus._bench._run import machine_info
from shmbus._bench._targets import evaluate_targets

pytest.importorskip("nats")  # the test extra installs it: CI never skips


def _results(row: dict[str, object]) -> dict[str, object]:
    params = dataclasses.asdict(params_for(quick=True))
    params["optional_missing"] = {}
    return {"machine": machine_info(), "params": params, "benchmarks": {"bridge": row}, "duration_s": 1.0,
            "targets": evaluate_targets({"bridge": row})}  # fmt: skip


@pytest.mark.timeout(180)
def test_the_row_moves_every_message_through_two_bridges_and_reports_rates_and_cpu() -> None:
    params = dataclasses.replace(params_for(quick=True), bridge_messages=3000, bridge_batch_messages=20000)
    shown: list[str] = []
    row = _bridgerow.run_bridge(params, mp.get_context("fork"), Progress(3, shown.append))
    assert len(shown) == 3 and all(s.startswith("[") and "(n) bridge" in s for s in shown)
    v = row["variants"]
    assert list(v) == ["nats-py", "single", "batch"] and all(x["available"] for x in v.values())
    for key in ("single", "batch"):  # (the consumer checked every seq: a loss or a repeat fails the run)
        assert v[key]["value"] > 0 and v[key]["cpu_us_per_msg"] > 0 and v[key]["server_cpu_us_per_msg"] >= 0
        ends = v[key]["out_cpu_us_per_msg"] + v[key]["in_cpu_us_per_msg"]
        assert v[key]["cpu_us_per_msg"] == pytest.approx(ends)
        assert v[key]["pct_of_nats_py"] == pytest.approx(100 * v[key]["value"] / v["nats-py"]["value"])
    assert v["batch"]["msgs"] == 20000 and v["single"]["msgs"] == 3000
    targets = evaluate_targets({"bridge": row})
    assert len(targets) == 2 and all(t["value"] is not None for t in targets)
    table = format_table(_results(row))
    assert "(n) bridge" in table and "% of nats-py" in table and "bridge, batch framing" in table


def test_without_nats_server_the_row_says_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    params = params_for(quick=True)
    assert _bridgerow.bridge_steps(params) == 0
    row = _bridgerow.run_bridge(params, mp.get_context("fork"), Progress(0, None))
    variants = row["variants"].values()
    assert all(not x["available"] and "not installed: nats-server" in x["note"] for x in variants)
    assert all(t["value"] is None and t["met"] is None for t in evaluate_targets({"bridge": row}))
    assert "not installed: nats-server" in format_table(_results(row))
