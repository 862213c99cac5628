"""A bus file on disk: where it lives, how it is opened, made and removed.

Rule: this module owns the file as a file, before and after any mapping: the
path rules (a bare name lives in ``/dev/shm``), opening with shmbus's errors
(no symbolic links, a directory or a stranger's file refused with the fix
named), validating its header into a ``Layout``, writing a new file (built
under a temporary name, then hard-linked into place by ``Bus``, so no process
sees a half-written header) and ``unlink``, which removes the file and, once
no process uses them, its semaphores. The handle on a mapped file is ``_bus``.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat

from . import _semlife
from ._errors import BusNotFound, ForeignBus, NoSpace, NotABus
from ._format import HEADER_MIN, MAGIC, Layout, build_header, parse_header, peek_ids

__all__ = [
    "SHM_DIR",
    "ALL_ROLES",
    "resolve_path",
    "open_fd",
    "read_layout",
    "read_layout_of",
    "unlink",
    "refuse_foreign",
    "write_new_file",
    "unlink_quiet",
]

log = logging.getLogger("shmbus")

SHM_DIR = "/dev/shm"
# Every semaphore role any kind of bus may own; unlink removes them all
# (head, tail and subs: the lock semaphores of format 1 buses, which had no mutexes).
ALL_ROLES = ["items", "space", "slots", "head", "tail", "subs"]


def resolve_path(path: str | os.PathLike[str]) -> str:
    """A bare name (no ``/``) lives in ``/dev/shm``; anything else is a file path."""
    p = os.fspath(path)
    if not isinstance(p, str) or not p:
        raise ValueError(f"a bus path must be a non-empty str or path, got {path!r}")
    if "\0" in p:
        raise ValueError(f"a bus path cannot contain a NUL byte, got {p!r}")
    if "/" not in p:
        if p in (".", ".."):
            raise ValueError(f"{p!r} is not a bus name")
        return os.path.join(SHM_DIR, p)
    return os.path.abspath(p)


def open_fd(path: str, flags: int) -> int:
    """``os.open`` with the errors turned into shmbus's, naming the path and the fix."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise BusNotFound(
            f"no bus at {path}", path=path, hint="create it first (shmbus.Queue.create or `shmbus create`)",
        ) from None
    except PermissionError as e:
        raise PermissionError(
            e.errno, f"permission denied opening bus {path}: ask its owner to share it "
            "(mode 660 and a group you are in) or run as that user", path,
        ) from None  # fmt: skip
    except IsADirectoryError:
        raise NotABus(f"{path} is a directory, not a bus: pass the bus file's path", path=path) from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise NotABus(
                f"{path} is a symbolic link; shmbus does not follow links (a planted link could "
                "redirect the bus): pass the real path",
                path=path,
            ) from None
        raise


def read_layout(fd: int, path: str) -> Layout:
    """Check that ``fd`` is a regular file holding a bus and return its validated layout."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise NotABus(f"{path} is not a regular file, so not a bus: pass the bus file's path", path=path)
    head = os.pread(fd, HEADER_MIN, 0)
    return parse_header(head, path=path, file_size=st.st_size)


def read_layout_of(path: str | os.PathLike[str]) -> Layout:
    """The validated layout of the bus at ``path`` (any kind), without mapping it."""
    real = resolve_path(path)
    fd = open_fd(real, os.O_RDONLY)
    try:
        return read_layout(fd, real)
    finally:
        os.close(fd)


def unlink(path: str | os.PathLike[str]) -> list[str]:
    """Remove the bus at ``path``: its file, and its semaphores once no process uses them.

    Processes that have it open keep working on their mapping and semaphores
    until they close it (the last one to close removes the semaphores); nobody
    can open it again. Semaphores are removed only if this very file made them
    (not a copy, nor a file that merely carries the same bus id). Returns the
    semaphore files kept. Raises ``BusNotFound`` if there is no file and
    ``NotABus`` if the file is not a bus (it is then left alone).
    """
    real = resolve_path(path)
    try:
        fd = open_fd(real, os.O_RDWR)  # write access: to take turns with other removers (_semlife)
    except PermissionError:
        fd = open_fd(real, os.O_RDONLY)
    try:
        st = os.fstat(fd)
        head = os.pread(fd, HEADER_MIN, 0) if stat.S_ISREG(st.st_mode) else b""
        if head[: len(MAGIC)] != MAGIC:
            raise NotABus(f"{real} is not a shmbus bus; refusing to remove it", path=real)
        # The file goes first: once it is gone nobody can open the bus and
        # take up a semaphore we are about to judge unused.
        os.unlink(real)
        kept: list[str] = []
        ids = peek_ids(head)  # a corrupt header may still name its semaphores
        if ids is not None:
            bus_id, max_subs = ids
            roles = ALL_ROLES + [f"sub{i}" for i in range(max_subs)]
            kept = _semlife.remove_sems(fd, head, bus_id, roles, real)
    finally:
        os.close(fd)
    log.debug("unlinked bus %s%s", real, f"; kept {len(kept)} semaphores in use" if kept else "")
    return kept


def refuse_foreign(path: str, st: os.stat_result) -> None:
    """Raise ``ForeignBus`` for a bus another user owns or anyone may write."""
    if st.st_uid != os.geteuid():
        raise ForeignBus(
            f"{path} belongs to uid {st.st_uid}, not to you", path=path,
            hint="a peer with write access can corrupt or stall a bus; if you share it on purpose, open "
            "it with allow_shared=True",
        )
    if st.st_mode & stat.S_IWOTH:
        raise ForeignBus(
            f"{path} is writable by every user (mode {stat.S_IMODE(st.st_mode):o})", path=path,
            hint="make it private (chmod o-w, or create it with mode=0o600 / 0o660), or open it with "
            "allow_shared=True",
        )


def write_new_file(tmp: str, layout: Layout, mode: int, real: str, preallocate: bool) -> None:
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)  # the umask must not narrow a mode the caller chose on purpose
        os.ftruncate(fd, layout.file_size)  # sparse: pages cost memory only once touched
        _reserve_space(fd, layout.file_size, real, preallocate)
        os.pwrite(fd, build_header(layout), 0)
        _semlife.record_identity(fd)  # the link keeps the inode: this file owns the semaphores
    finally:
        os.close(fd)


def _reserve_space(fd: int, size: int, real: str, preallocate: bool) -> None:
    """Back every page of a new bus now (``preallocate``), or warn if the file system could not.

    A page of a sparse file that the file system cannot back (a full tmpfs)
    kills the process that first touches it with SIGBUS, long after create.
    """
    st = os.fstatvfs(fd)
    free = st.f_bavail * st.f_frsize
    if preallocate:
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EFBIG):
                raise
            raise NoSpace(
                f"cannot create {real}: it needs {size} bytes and its file system has {free} free: "
                "free some space, choose a smaller capacity, or put the bus on another file system",
                path=real, size=size, free=free,
            ) from None  # fmt: skip
    elif free < size:
        log.warning(
            "%s: its file system has %d bytes free, less than the %d this bus may use: a put that "
            "reaches a page beyond that dies of SIGBUS; create it with preallocate=True to reserve "
            "the space now, or choose a smaller capacity",
            real, free, size,
        )  # fmt: skip


def unlink_quiet(p: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(p)
