"""The benchmark's targets table: named by what each target measures, and limited to the rows run."""

from __future__ import annotations

import re

from shmbus._bench._params import ROW_LETTERS
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
