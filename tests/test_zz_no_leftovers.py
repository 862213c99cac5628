"""Runs last (by name): after the whole suite, nothing of ours is left in /dev/shm."""

from __future__ import annotations

from conftest import leftovers


def test_suite_left_nothing_in_dev_shm() -> None:
    assert leftovers() == [], f"the suite left these in /dev/shm: {leftovers()}"
