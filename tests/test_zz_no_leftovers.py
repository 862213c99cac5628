"""Runs last (by name): after the whole suite, nothing of ours is left in /dev/shm."""

from __future__ import annotations

import os


def test_suite_left_nothing_in_dev_shm() -> None:
    left = [
        n for n in os.listdir("/dev/shm")
        if n.startswith(("sem.shmbus.", "shmbus-test-", ".shmbus-test-"))
    ]
    assert left == [], f"the suite left these in /dev/shm: {left}"
