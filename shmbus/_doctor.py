"""``shmbus doctor``: what this machine and this install give shmbus, in one report.

Rule: this module only looks (versions, the C fast path, /dev/shm, the
limits that bound how many buses and semaphores a machine holds); it creates
nothing and changes nothing, so it is safe to run anywhere, any time.
"""

from __future__ import annotations

import os
import platform
import resource
import sys
from importlib import metadata
from typing import Any

from . import _accel
from ._version import __version__

__all__ = ["report", "render"]

SHM_DIR = "/dev/shm"


def _dist_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def _sysconf(name: str) -> int | None:
    try:
        value = os.sysconf(name)
    except (ValueError, OSError):
        return None
    return value if value >= 0 else None  # -1: no fixed limit


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _shm() -> dict[str, Any]:
    """Size, free bytes and free inodes of /dev/shm: every bus there and every semaphore is a file in it."""
    try:
        st = os.statvfs(SHM_DIR)
    except OSError as e:
        return {"path": SHM_DIR, "error": str(e)}
    return {
        "path": SHM_DIR,
        "size": st.f_blocks * st.f_frsize,
        "free": st.f_bavail * st.f_frsize,
        "files_free": st.f_favail,
    }


def report() -> dict[str, Any]:
    """Everything ``shmbus doctor`` shows, as plain data (``--json`` prints it as is)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return {
        "shmbus": __version__,
        "python": f"{platform.python_implementation()} {platform.python_version()} ({sys.executable})",
        "platform": platform.platform(),
        "libc": " ".join(platform.libc_ver()).strip() or "unknown",
        "c_fast_path": {"on": _accel.ENABLED, "why_not": _accel.REASON},
        "msgpack": _dist_version("msgpack"),
        "posix_ipc": _dist_version("posix_ipc"),
        "shm": _shm(),
        "limits": {
            # A named semaphore is a file in /dev/shm and one mapping while open; a bus
            # opens 2 to 4 (a Topic one more per subscriber slot in use).
            "sem_value_max": _sysconf("SC_SEM_VALUE_MAX"),
            "sem_nsems_max": _sysconf("SC_SEM_NSEMS_MAX"),
            "open_files": {"soft": soft, "hard": hard},
            "max_map_count": _read_int("/proc/sys/vm/max_map_count"),
        },
    }


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024  # type: ignore[assignment]
    raise AssertionError("unreachable")


def _limit(v: int | None) -> str:
    return "no fixed limit" if v is None else f"{v:,}"


def render(r: dict[str, Any]) -> str:
    """The report as the lines ``shmbus doctor`` prints."""
    c = r["c_fast_path"]
    shm = r["shm"]
    lim = r["limits"]
    lines = [
        f"shmbus          {r['shmbus']}",
        f"python          {r['python']}",
        f"platform        {r['platform']}, {r['libc']}",
        "C fast path     " + ("on" if c["on"] else f"OFF: {c['why_not']}"),
        f"msgpack         {r['msgpack']}",
        f"posix_ipc       {r['posix_ipc']}",
    ]
    if "error" in shm:
        lines.append(f"/dev/shm        cannot be read: {shm['error']}")
    else:
        lines.append(
            f"/dev/shm        {_bytes(shm['size'])}, {_bytes(shm['free'])} free, "
            f"{shm['files_free']:,} more files (each bus and each semaphore is one)"
        )
    nofile = lim["open_files"]
    lines += [
        f"semaphores      value up to {_limit(lim['sem_value_max'])}; "
        f"per process: {_limit(lim['sem_nsems_max'])}",
        f"open files      {nofile['soft']:,} (hard {nofile['hard']:,}); "
        f"memory maps: {_limit(lim['max_map_count'])} per process",
    ]
    if not c["on"]:
        lines.append("note: without the C fast path shmbus behaves the same, only slower per message")
    return "\n".join(lines)
