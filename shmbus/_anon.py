"""Anonymous buses: their private names, and the proof that their creator is gone.

Rule: this module owns the one question an anonymous bus raises, "is the
process that created it still there?". ``Queue()`` makes a bus under a
private name in ``/dev/shm`` (``shmbus-anon-<pid>-<16 hex digits>``) and
writes in its header the creating process's pid and start time (field 22
of ``/proc/<pid>/stat``, clock ticks after boot: a reused pid has another).
The creating process removes the name when its handle is garbage-collected
or when it exits (``weakref.finalize``, which also runs at exit); a process
that received the queue by pickling, or inherited it through ``fork``,
never does. A creator killed before it could remove the name leaves a bus
that ``shmbus gc`` removes once ``creator_gone`` proves the creator dead and
no live participant (a consumer that has waited on it) is attached: a
process that still uses it keeps its mapping either way, as when the
creator exits normally.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from typing import Callable, Final

from ._format import Layout

__all__ = ["PREFIX", "new_name", "identity", "start_ticks", "creator_gone", "remove_with_creator"]

PREFIX: Final = "shmbus-anon-"


def new_name() -> str:
    """A fresh private bus name in ``/dev/shm`` for this process."""
    return f"{PREFIX}{os.getpid()}-{secrets.token_hex(8)}"


def start_ticks(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks after boot), or None if it does not exist."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    fields = stat[stat.rindex(b")") + 2 :].split()
    return int(fields[19])  # field 22 overall; fields[0] is field 3


def identity() -> tuple[int, int]:
    """This process's (pid, start time), as an anonymous bus records its creator."""
    pid = os.getpid()
    start = start_ticks(pid)
    assert start is not None  # our own /proc entry
    return pid, start


def creator_gone(layout: Layout) -> bool:
    """True if ``layout`` is an anonymous bus whose creating process provably exited.

    False for a named bus, a live creator, and when /proc cannot tell (another
    PID namespace shows no pid 1 of ours: we then prove nothing).
    """
    if not layout.anonymous or not layout.creator_pid:
        return False
    if not os.path.exists("/proc/self/stat"):
        return False  # no /proc: nothing can be proven
    start = start_ticks(layout.creator_pid)
    return start is None or start != layout.creator_start


def remove_with_creator(path: str, pid: int, unlink: Callable[[str], object]) -> None:
    """The finalizer of an anonymous handle: remove the bus, in its creating process only.

    A child that inherited the handle through ``fork`` runs this too (when
    the copy is collected): it must leave the bus to its creator.
    """
    if os.getpid() != pid:
        return
    with contextlib.suppress(OSError, ValueError):  # gone already (BusNotFound), or replaced
        unlink(path)
