"""Fault injection for the crash tests: kill this process at a named step.

Rule: production code only calls ``hit(name)`` behind ``if _faults.armed``,
which costs one attribute load when nothing is armed. A test arms a step in a
child process (``arm("put:after-write")``); when the child reaches that step it
SIGKILLs itself, exactly as a supervisor's kill would land there. The steps
are listed in ``STEPS`` (and in docs/guarantees.md).
"""

from __future__ import annotations

import os
import signal
from typing import Final

__all__ = ["STEPS", "arm", "armed", "disarm", "hit"]

STEPS: Final = (
    # Queue.put / put_many (under the head lock)
    "put:after-lock",  # lock taken and holder recorded, nothing written
    "put:after-write",  # record written, head not yet published
    "put:mid-publish",  # next_seq stored, head not yet
    "put:before-post",  # head published, items tokens not yet posted
    # Queue.get / get_many
    "get:after-token",  # an items token taken, tail lock not yet
    "get:after-lock",  # tail lock taken, nothing read
    "get:after-copy",  # payload copied out, tail not advanced
    "get:mid-commit",  # tail_seq stored, tail not yet
    "get:before-unlock",  # tail advanced, tail lock still held
    # Topic.publish (under the head lock)
    "publish:after-lock",
    "publish:after-evict",  # tail moved past the dropped records, record not written
    "publish:mid-publish",  # next_seq stored, head not yet
    # Topic.subscribe (under the subs lock)
    "subscribe:after-lock",
)

armed = False
_step = ""


def arm(step: str) -> None:
    """Make this process kill itself with SIGKILL when it reaches ``step``."""
    global armed, _step
    if step not in STEPS:
        raise ValueError(f"unknown crash step {step!r}; known: {', '.join(STEPS)}")
    armed, _step = True, step


def disarm() -> None:
    """Forget any armed step."""
    global armed, _step
    armed, _step = False, ""


def hit(step: str) -> None:
    """Called at ``step``: die here if this is the armed step."""
    if step == _step:
        os.kill(os.getpid(), signal.SIGKILL)
