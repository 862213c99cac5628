"""Finding the buses on this machine, and what crashed processes left behind.

Rule: this module owns one question, "which shmbus resources exist here, and
which belong to nobody?", and the one cleanup that follows from it.
It reads bus files with ``pread`` (it never opens them as buses, which could
recreate a missing semaphore), follows no symbolic link, opens nothing but
regular files, and removes nothing but ``sem.shmbus.*`` names and orphaned
anonymous buses.

An anonymous bus (``Queue()``) is orphaned when its header's creator
(pid and start time) provably exited (``_anon.creator_gone``) and no live
process is attached: its creator would have removed it at exit, had it not
been killed. ``gc`` removes it as ``shmbus.unlink`` would.

A semaphore is an orphan when it is provably unused: no process has it open
(``_sync.unlink_unused`` proves that with a write lease, and holds the lease
across the removal) and no bus file that ``gc`` can see carries its id. ``gc``
sees the files in ``/dev/shm`` and the paths it is given; a disk bus kept
elsewhere is protected by the first rule while any process uses it, and
when none does its semaphores may go: the next ``open`` recreates them, with
nobody holding old ones. Two more guards keep ``gc`` from removing what is not
an orphan:

* ``create`` makes the semaphores before the file appears, so a semaphore
  younger than ``min_age`` seconds (default ``GRACE``) is never an orphan;
* a semaphore whose owner also owns a file in ``/dev/shm`` that we may not
  read is not one either: it may be that file's.

A semaphore whose use cannot be judged (another user's, without root) is
never an orphan.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import stat
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from . import _anon, _recovery, _sync
from ._errors import CorruptBus, IncompatibleBus, ShmbusError
from ._file import SHM_DIR, open_fd, read_layout, resolve_path, unlink
from ._format import HEADER_MIN, peek_ids
from ._stats import header_stats

__all__ = ["BusInfo", "list_buses", "unreadable_files", "orphan_semaphores", "gc", "GRACE"]

log = logging.getLogger("shmbus")

GRACE: Final = 10.0  # seconds; far longer than create takes between its semaphores and its file


@dataclass(frozen=True)
class BusInfo:
    """One bus file as ``list_buses`` found it.

    ``kind`` is ``"Queue"`` or ``"Topic"``, or ``"corrupt"`` / ``"incompatible"``
    for a file with the shmbus magic whose header cannot be used (``problem``
    then says why, and ``capacity``, ``fill`` and ``messages`` are 0).
    ``mode`` holds the permission bits, ``owner`` the uid, ``size`` the file's
    size in bytes, ``semaphores`` how many of its semaphores exist now.
    ``participants`` counts the live processes attached (those that have
    taken one of its locks and not closed it); None for a corrupt bus.
    ``orphaned`` is True for an anonymous bus whose creating process exited
    and that no live process uses: ``gc`` removes it.
    """

    path: str
    kind: str
    bus_id: str
    mode: int
    owner: int
    size: int
    capacity: int
    fill: float
    messages: int
    semaphores: int
    problem: str | None = None
    participants: int | None = None
    orphaned: bool = False


def list_buses(paths: Iterable[str] | None = None) -> list[BusInfo]:
    """Every bus file in ``/dev/shm``, plus the buses at ``paths``, sorted by path.

    Other files in ``/dev/shm`` are skipped silently, and so are those we may
    not read. A path given explicitly must be a bus: raises ``BusNotFound``,
    ``NotABus`` or ``PermissionError`` otherwise.
    """
    return _scan(paths, _sync.list_sems())[0]


def unreadable_files() -> list[str]:
    """The files in ``/dev/shm`` (semaphores aside) this process may not read: perhaps others' buses.

    ``list_buses`` skips them; ``shmbus ls`` says how many there are, so that
    an empty list is not taken for a machine without buses.
    """
    out = []
    with os.scandir(SHM_DIR) as it:
        for entry in it:
            if entry.name.startswith(("sem.", ".")) or not entry.is_file(follow_symlinks=False):
                continue  # a semaphore, or a bus being created under its hidden temporary name
            if not os.access(entry.path, os.R_OK):
                out.append(entry.path)
    return sorted(out)


def orphan_semaphores(paths: Iterable[str] | None = None, *, min_age: float = GRACE) -> list[str]:
    """The files in ``/dev/shm`` of the shmbus semaphores that no process uses and no bus file names.

    Only the buses in ``/dev/shm`` and at ``paths`` are known (see the module
    docstring). Semaphores younger than ``min_age`` seconds are left out:
    their bus may be being created.
    """
    return [f for _, _, f in _orphans(paths, min_age)]


def gc(paths: Iterable[str] | None = None, dry_run: bool = False, *, min_age: float = GRACE) -> list[str]:
    """Remove orphaned anonymous buses, then orphan semaphores (see ``orphan_semaphores``).

    Returns the files removed: the orphaned anonymous buses' files (see
    ``BusInfo.orphaned``), then the semaphores. With ``dry_run`` nothing is
    removed and the list says what would be. A semaphore that a process
    opens meanwhile, or that we may not remove (another user's), is kept,
    with a warning.

    Example::

        shmbus._admin.gc(["/var/lib/app/jobs.bus"])   # also keep that disk bus's semaphores
    """
    removed = []
    for bus in list_buses():
        if not bus.orphaned:
            continue
        if not dry_run:
            try:
                unlink(bus.path)  # its semaphores too, unless a process still has them open
            except (ShmbusError, OSError) as e:
                log.warning("kept orphaned anonymous bus %s: %s", bus.path, e)
                continue
            log.debug("removed orphaned anonymous bus %s", bus.path)
        removed.append(bus.path)
    for bus_id, role, f in _orphans(paths, min_age):
        if not dry_run:
            if not _sync.unlink_unused(bus_id, [role])[0]:
                log.warning("kept semaphore %s: in use, or not ours to remove (run as its owner)", f)
                continue
            log.debug("removed orphan semaphore %s", f)
        removed.append(f)
    return removed


def _orphans(paths: Iterable[str] | None, min_age: float) -> list[tuple[str, str, str]]:
    # List the semaphores before the files: a bus created in between then has
    # its file seen, or its semaphores are too young to judge.
    sems = _sync.list_sems()
    buses, hidden_owners = _scan(paths, sems)
    owned = {b.bus_id for b in buses}
    now = time.time()
    out = []
    for bus_id, role, f in sems:
        if bus_id in owned:
            continue
        try:
            st = os.lstat(f)
        except FileNotFoundError:
            continue  # removed meanwhile
        if st.st_uid in hidden_owners or now - max(st.st_mtime, st.st_ctime) < min_age:
            continue
        if _sync.in_use(f) is not False:
            continue  # a process has it open (a disk bus we were not told of), or we cannot tell
        out.append((bus_id, role, f))
    return sorted(out, key=lambda o: o[2])


def _scan(paths: Iterable[str] | None, sems: list[tuple[str, str, str]]) -> tuple[list[BusInfo], set[int]]:
    """The buses in /dev/shm and at ``paths``; and the owners of the /dev/shm files we may not read."""
    counts = collections.Counter(bus_id for bus_id, _, _ in sems)
    sem_files = {f for _, _, f in sems}
    found: dict[tuple[int, int], BusInfo] = {}
    hidden: set[int] = set()
    with os.scandir(SHM_DIR) as it:
        for entry in it:
            # d_type only: no stat, no link followed, and FIFOs or devices never opened.
            if entry.path in sem_files or not entry.is_file(follow_symlinks=False):
                continue
            if entry.name.startswith(".") and entry.name.endswith(".tmp"):
                continue  # a bus being created, under its temporary name: it is listed once linked
            try:
                key, info = _read_bus(entry.path, counts)
            except PermissionError:
                with contextlib.suppress(FileNotFoundError):
                    hidden.add(entry.stat(follow_symlinks=False).st_uid)
                continue
            except (ShmbusError, OSError):
                continue  # not a bus, gone, or swapped for something that is not a regular file
            found[key] = info
    for p in paths or ():
        key, info = _read_bus(resolve_path(p), counts)
        found.setdefault(key, info)
    return sorted(found.values(), key=lambda b: b.path), hidden


def _read_bus(path: str, sem_counts: collections.Counter[str]) -> tuple[tuple[int, int], BusInfo]:
    """Read the header of the file at ``path``; raises ``NotABus`` when it has no shmbus magic."""
    fd = open_fd(path, os.O_RDONLY)  # O_NOFOLLOW | O_NONBLOCK: a swapped-in link or FIFO fails fast
    try:
        st = os.fstat(fd)
        key, mode = (st.st_dev, st.st_ino), stat.S_IMODE(st.st_mode)
        try:
            layout = read_layout(fd, path)
        except (CorruptBus, IncompatibleBus) as e:
            ids = peek_ids(os.pread(fd, HEADER_MIN, 0))
            bus_id = ids[0] if ids else ""
            kind = "incompatible" if isinstance(e, IncompatibleBus) else "corrupt"
            return key, BusInfo(
                path, kind, bus_id, mode, st.st_uid, st.st_size, capacity=0, fill=0.0, messages=0,
                semaphores=sem_counts[bus_id], problem=str(e),
            )  # fmt: skip
        # The header and the participant table, padded if truncated meanwhile.
        head = os.pread(fd, layout.subscribers_offset, 0).ljust(layout.subscribers_offset, b"\0")
        h = memoryview(head).cast("Q")
        pids = _recovery.live_participants(fd, h, layout)
    finally:
        os.close(fd)
    s = header_stats(path, layout, h)
    return key, BusInfo(
        path, s.kind, s.bus_id, mode, st.st_uid, st.st_size, capacity=s.capacity, fill=s.fill,
        messages=s.messages, semaphores=sem_counts[s.bus_id], participants=len(pids),
        orphaned=not pids and _anon.creator_gone(layout),
    )  # fmt: skip
