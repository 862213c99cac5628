"""The benchmark's targets table: named by what each target measures, and limited to the rows run."""

from __future__ import annotations

import re
from dataclasses import asdict

from shmbus._bench._params import MIB, ROW_LETTERS, params_for, quick_caveat
from shmbus._bench._targets import TARGETS, evaluate_targets, row_of


def test_every_target_names_what_it_measures_and_cites_no_issue() -> None:
    for measures, what, _figure, _op, _limit in TARGETS:
        assert measures and not re.search(r"issue", measures + what, re.IGNORECASE), (measures, what)
        assert row_of(what) in ROW_LETTERS


def test_only_the_targets_of_the_rows_run_are_listed() -> None:
    listed = evaluate_targets({"topic": {"configs": {}}})
    assert listed and all(t["target"].startswith("(t)") for t in listed)
    assert all(t["met"] is None and t["value"] is None for t in listed)  # nothing measured: no verdict
    assert {row_of(t["target"]) for t in evaluate_targets({"single": {}, "scale": {}})} == {"single", "scale"}
    assert len(evaluate_targets({k: {} for k in ROW_LETTERS})) == len(TARGETS)


def test_quick_runs_the_full_runs_measurements_and_says_what_it_cannot_reproduce() -> None:
    quick, full = params_for(quick=True), params_for(quick=False)
    counts = (
        "small_messages", "bytes_messages", "bytes_warmup", "pingpong_round_trips", "pingpong_warmup",
        "sweep_volume", "sweep_min_messages", "sweep_max_messages", "mpmc_messages", "topic_messages",
    )  # fmt: skip
    assert all(getattr(quick, c) == getattr(full, c) for c in counts)  # the same measurements
    assert quick.repeats < full.repeats and set(quick.sweep_sizes) <= set(full.sweep_sizes)
    assert 4 * MIB in quick.sweep_sizes and 16 * MIB in quick.sweep_sizes  # the sizes targets name
    caveat = quick_caveat(asdict(quick))
    assert caveat is not None and caveat.startswith("quick run:") and "once" in caveat
    assert quick_caveat(asdict(full)) is None
