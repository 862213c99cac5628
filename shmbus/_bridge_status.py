"""Where running bridges tell ``shmbus info`` and ``stats`` which routes touch a bus, and their lag.

Rule: each running ``Bridge`` keeps one small JSON file in a shared runtime
directory (``/dev/shm/.shmbus-bridges``, or ``$SHMBUS_BRIDGE_STATUS_DIR``),
replaced whole by an atomic rename, so a reader sees the last complete
version or none; the bridge removes it on a clean stop. A reader trusts a
file only while the process that wrote it is alive (its pid and that
process's start time both match): a killed bridge's file is ignored, and
removed by ``shmbus gc``. The bus file is never written: a bridge's status
is not part of the format. No secret is ever in a status file.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import stat
import tempfile
import time
from typing import Any, Callable

from ._file import resolve_path
from ._format import STATIC_SIZE, peek_ids

__all__ = ["status_dir", "bus_key", "StatusFile", "routes_on", "stale_files", "remove_stale", "render"]

DEFAULT_DIR = "/dev/shm/.shmbus-bridges"
_MAX_FILE = 1 << 20  # a status file is a few hundred bytes a route
_counter = itertools.count()


def status_dir() -> str:
    """The directory of the status files: ``$SHMBUS_BRIDGE_STATUS_DIR`` or ``/dev/shm/.shmbus-bridges``."""
    return os.environ.get("SHMBUS_BRIDGE_STATUS_DIR") or DEFAULT_DIR


def bus_key(bus: str) -> tuple[str, str | None]:
    """A bus's real path and its bus id (None if it cannot be read): how status files name a bus."""
    real = os.path.realpath(resolve_path(bus))
    try:
        with open(real, "rb") as f:
            ids = peek_ids(f.read(STATIC_SIZE))
    except OSError:
        ids = None
    return real, ids[0] if ids else None


def _started(pid: int) -> str | None:
    """The start time of process ``pid`` (clock ticks since boot), None if it is gone.

    With the pid it names one process: a reused pid has another start time.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: count from the last ')'.
    return stat[stat.rindex(b")") + 2 :].split()[19].decode()


class StatusFile:
    """One bridge's status file: ``write(rows)`` replaces it, ``remove()`` deletes it."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.path = os.path.join(status_dir(), f"{self.pid}-{next(_counter)}.json")
        self._started = _started(self.pid)

    def write(self, rows: list[dict[str, Any]]) -> None:
        """Replace the file with ``rows`` (one dict per route); an unwritable directory is not fatal."""
        doc = {"pid": self.pid, "started": self._started, "updated": time.time(), "routes": rows}
        d = os.path.dirname(self.path)
        try:
            _make_dir(d)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=d)
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(doc, f)
                os.chmod(tmp, 0o644)  # readable by every user's `shmbus info`
                os.replace(tmp, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        except OSError:
            pass  # the status file is a convenience: a bridge runs on without it

    def remove(self) -> None:
        """Delete the file (a clean stop); nothing if it is gone."""
        with contextlib.suppress(OSError):
            os.unlink(self.path)


def _make_dir(d: str) -> None:
    if not os.path.isdir(d):
        with contextlib.suppress(FileExistsError):
            os.makedirs(d)
            # Every user's bridges write here; the sticky bit keeps each file its owner's (as /tmp).
            os.chmod(d, 0o1777)


def _read_all() -> list[tuple[str, dict[str, Any] | None]]:
    """Every status file, with its content (None: unreadable, or its writer is dead)."""
    d = status_dir()
    try:
        names = sorted(n for n in os.listdir(d) if n.endswith(".json"))
    except OSError:
        return []
    out: list[tuple[str, dict[str, Any] | None]] = []
    for n in names:
        path = os.path.join(d, n)
        try:
            doc = json.loads(_read_small(path))
            alive = _started(int(doc["pid"])) == doc["started"] and doc["started"] is not None
        except (OSError, ValueError, KeyError, TypeError):
            doc, alive = None, False
        out.append((path, doc if alive else None))
    return out


def _read_small(path: str) -> bytes:
    """A regular file's bytes (at most 1 MiB): a FIFO or a link planted in the shared directory is
    refused, never waited on or followed."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError(f"{path} is not a regular file")
        return os.read(fd, _MAX_FILE)
    finally:
        os.close(fd)


def routes_on(bus: str) -> list[dict[str, Any]]:
    """The routes of live bridges that read or write ``bus``, each with its bridge's ``pid``."""
    real, bus_id = bus_key(bus)
    rows = []
    for _path, doc in _read_all():
        for row in (doc or {}).get("routes", []):
            if row.get("bus_path") == real and (bus_id is None or row.get("bus_id") in (None, bus_id)):
                rows.append({**row, "pid": doc["pid"]})  # type: ignore[index]
    return rows


def stale_files() -> list[str]:
    """Status files whose bridge is dead (killed before it could remove its file), or unreadable."""
    return [path for path, doc in _read_all() if doc is None]


def remove_stale(dry_run: bool = False, unlink: Callable[[str], None] = os.unlink) -> list[str]:
    """Remove the status files of dead bridges (``shmbus gc``); returns them."""
    removed = []
    for path in stale_files():
        if not dry_run:
            try:
                unlink(path)
            except OSError:
                continue  # another user's, or gone meanwhile
        removed.append(path)
    return removed


def render(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """``(label, text)`` lines for ``shmbus info``/``stats``: one per route, then nothing if none."""
    out = []
    for r in rows:
        side = f"-> {r.get('subject')}" if str(r.get("direction", "")).endswith("-to-stream") else (
            f"<- {r.get('subject')}")  # fmt: skip
        text = (f"{r.get('direction')} {side} (stream {r.get('stream')})  pid {r.get('pid')}  "
                f"{r.get('state')}  moved {r.get('moved')}  lag {r.get('lag')}")  # fmt: skip
        if r.get("missed"):
            text += f"  missed {r['missed']}"
        out.append(("  bridge", text))
    return out
