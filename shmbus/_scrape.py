"""Reading every bus for the metrics exporter: which files, what each says, what was skipped.

Rule: this module owns what one collection of metrics sees, and it reads
without ever changing a bus. Each bus is read as ``shmbus stats`` reads it
(``_live.snapshot``: one ``pread`` of a file opened read-only, no semaphore,
no participant slot), so exporting cannot count as a process using the bus.
A file that cannot be read as a bus is skipped with a reason and never fails
the collection; each bad file is logged once, not at every collection.

Two promises to Prometheus are kept here. A bus is identified by its bus id
(random at create), so a bus removed and created again at the same path
comes back as new series, never as a counter reset. And the bus counters
handed out never decrease for one bus id: the repair after a crash reads
``next_seq`` back from the records, which can take back the one message
whose put was cut short, so the highest value seen is held until the bus
passes it.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Final

from . import _live
from ._advice import cli_os_message
from ._errors import BusNotFound, CorruptBus, IncompatibleBus, NotABus, ShmbusError
from ._file import SHM_DIR, resolve_path

__all__ = ["REASONS", "Reading", "Census", "Scraper", "bus_label"]

log = logging.getLogger("shmbus")

# Why a file was skipped, as the ``reason`` label says it.
REASONS: Final = ("missing", "not_a_bus", "corrupt", "incompatible", "permission", "error")
# Rounds a bus id may go unseen before its counters' high marks are forgotten
# (a bus skipped once, as damaged or unreadable, must not look reset when it comes back).
_KEEP_ROUNDS: Final = 100


@dataclass(frozen=True)
class Reading:
    """One bus as a collection read it: its label, and what ``shmbus stats`` would show of it."""

    bus: str  # the label: a name in /dev/shm, else the path
    snapshot: _live.Snapshot


@dataclass(frozen=True)
class Census:
    """What one collection found: the buses read, and the files skipped."""

    buses: list[Reading]
    skipped: dict[str, int]  # reason -> files skipped in this collection
    skipped_total: dict[str, int]  # reason -> files skipped since the scraper was made
    unreadable: int  # files in a scanned directory we may not read (maybe another user's buses)


def bus_label(path: str) -> str:
    """The ``bus`` label of the bus at ``path``: its name if it lives in /dev/shm, else its path."""
    head, name = os.path.split(path)
    return name if head == SHM_DIR else path


class Scraper:
    """Reads the buses named (files, or directories to scan), or every bus in /dev/shm.

    ``read()`` may be called from several threads (an HTTP server's); the
    calls take turns. Example::

        census = Scraper().read()
        for r in census.buses:
            print(r.bus, r.snapshot.stats.messages)
    """

    def __init__(self, paths: Iterable[str] | None = None) -> None:
        self._paths: Sequence[str] = [resolve_path(p) for p in paths or ()]
        self._lock = threading.Lock()
        self._logged: dict[str, str] = {}  # path -> the reason last logged for it
        self._high: dict[str, tuple[int, tuple[int, ...]]] = {}  # bus id -> (round, counters)
        self._total: Counter[str] = Counter()
        self._round = 0

    def read(self) -> Census:
        """Read every bus once; never raises for a bad file (see the module docstring)."""
        with self._lock:
            return self._read()

    def _read(self) -> Census:
        self._round += 1
        skipped: Counter[str] = Counter()
        buses: list[Reading] = []
        tried: set[str] = set()
        unreadable = 0
        for path, named in self._candidates():
            if path in tried:
                continue
            tried.add(path)
            try:
                snap = _live.snapshot(path)
            except Exception as e:  # a bad file must never break the endpoint
                reason = _reason(e)
                if not named and reason in ("not_a_bus", "missing", "permission"):
                    # Found by a scan: not ours, gone meanwhile, or perhaps another user's bus.
                    unreadable += reason == "permission"
                    continue
                skipped[reason] += 1
                self._log_once(path, reason, e)
                continue
            self._logged.pop(path, None)
            buses.append(Reading(bus_label(path), self._monotonic(snap)))
        self._forget(tried)
        self._total.update(skipped)
        return Census(buses, dict(skipped), dict(self._total), unreadable)

    def _candidates(self) -> list[tuple[str, bool]]:
        """(path, named) for every file to read: the named buses, and the files of scanned directories."""
        out: list[tuple[str, bool]] = []
        for p in self._paths or [SHM_DIR]:
            if os.path.isdir(p) and not os.path.islink(p):
                out += [(f, False) for f in _files_in(p)]
            else:
                out.append((p, True))
        return out

    def _monotonic(self, snap: _live.Snapshot) -> _live.Snapshot:
        st = snap.stats
        now = (st.put_count, st.get_count, st.bytes_in, st.bytes_out, st.recoveries)
        _, old = self._high.get(st.bus_id, (0, now))
        high = tuple(max(a, b) for a, b in zip(now, old))
        self._high[st.bus_id] = (self._round, high)
        if high == now:
            return snap
        put, got, b_in, b_out, rec = high
        st = replace(st, put_count=put, get_count=got, bytes_in=b_in, bytes_out=b_out, recoveries=rec)
        return replace(snap, stats=st)

    def _forget(self, tried: set[str]) -> None:
        for p in set(self._logged) - tried:
            del self._logged[p]  # a bad file gone: should it come back, it is logged again
        stale = [i for i, (seen, _) in self._high.items() if self._round - seen > _KEEP_ROUNDS]
        for i in stale:
            del self._high[i]

    def _log_once(self, path: str, reason: str, e: BaseException) -> None:
        if self._logged.get(path) == reason:
            return
        self._logged[path] = reason
        unexpected = not isinstance(e, (ShmbusError, OSError))
        why = reason.replace("_", " ")
        log.warning("shmbus export: skipping %s (%s): %s", path, why, _said(e), exc_info=unexpected)


def _said(e: BaseException) -> str:
    """Why a file was skipped, in words: no advice to create a watched bus, no ``[Errno N]``."""
    if isinstance(e, BusNotFound):
        return e.fact
    if isinstance(e, OSError) and not isinstance(e, ShmbusError):
        return cli_os_message(e)
    return str(e)


def _files_in(directory: str) -> list[str]:
    """The regular files of ``directory`` that may be buses, as ``shmbus ls`` finds them.

    Only the directory entry's type is looked at (no stat, no link followed,
    FIFOs and devices never opened). Semaphores (``sem.*``) and hidden files
    are left out: a bus being created is a hidden temporary file for an
    instant, and would otherwise flash by as a bus of its own.
    """
    try:
        with os.scandir(directory) as it:
            names = [
                e.path for e in it
                if e.is_file(follow_symlinks=False) and not e.name.startswith((".", "sem."))
            ]  # fmt: skip
    except OSError as e:
        log.debug("shmbus export: cannot list %s: %s", directory, e)
        return []
    return sorted(names)


def _reason(e: BaseException) -> str:
    if isinstance(e, (BusNotFound, FileNotFoundError)):
        return "missing"
    if isinstance(e, NotABus):
        return "not_a_bus"
    if isinstance(e, IncompatibleBus):
        return "incompatible"
    if isinstance(e, CorruptBus):
        return "corrupt"
    if isinstance(e, PermissionError):
        return "permission"
    return "error"
