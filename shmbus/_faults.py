"""Fault injection for the crash tests: kill (or stop) this process at a named step.

Rule: production code only calls ``hit(name)`` behind ``if _faults.armed``,
which costs one attribute load when nothing is armed; the C fast path calls it
at the same steps through a hook it holds only while a step is armed (``watch``
tells ``_accel`` when that changes). A test arms a step in a
child process (``arm("put:after-write")``); when the child reaches that step it
SIGKILLs itself, exactly as a supervisor's kill would land there. Armed with
another signal (``arm("put:after-lock", sig=signal.SIGSTOP)``) it sends itself
that signal once and disarms: a SIGSTOPped child sits at the step, its locks
held, until the test sends SIGCONT, then carries on (a paused process is not a
dead one). The steps are listed in ``STEPS`` (and in docs/guarantees.md).
"""

from __future__ import annotations

import os
import signal
from typing import Callable, Final

__all__ = ["STEPS", "arm", "armed", "disarm", "hit", "watch"]

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
_sig: int = signal.SIGKILL
_watchers: list[Callable[[bool], None]] = []


def watch(callback: Callable[[bool], None]) -> None:
    """Call ``callback(armed)`` now and whenever a step is armed or disarmed."""
    _watchers.append(callback)
    callback(armed)


def _tell() -> None:
    for callback in _watchers:
        callback(armed)


def arm(step: str, sig: int = signal.SIGKILL) -> None:
    """Make this process send itself ``sig`` (SIGKILL by default) when it reaches ``step``.

    Any signal but SIGKILL fires once: the step is disarmed as it is hit, so a
    process stopped there with SIGSTOP goes on normally after SIGCONT.
    """
    global armed, _step, _sig
    if step not in STEPS:
        raise ValueError(f"unknown crash step {step!r}; known: {', '.join(STEPS)}")
    armed, _step, _sig = True, step, sig
    _tell()


def disarm() -> None:
    """Forget any armed step."""
    global armed, _step, _sig
    armed, _step, _sig = False, "", signal.SIGKILL
    _tell()


def hit(step: str) -> None:
    """Called at ``step``: die (or stop, or whatever the armed signal does) here if it is armed."""
    if step == _step:
        sig = _sig
        if sig != signal.SIGKILL:
            disarm()
        os.kill(os.getpid(), sig)
