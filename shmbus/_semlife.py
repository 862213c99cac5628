"""When a bus's semaphores may be made and removed, and by whom.

Rule: this module owns the semaphores' life beyond ``create``. A bus file and
its semaphores are bound by name only (the ``bus_id`` in the header), and a
name can be copied: ``cp`` of a bus file, or a look-alike that carries another
bus's id. So:

* The header records which file made the semaphores: ``(st_dev, st_ino)`` at
  ``IDENTITY_OFFSET``, written at create and by an opener that recreates
  missing ones. A file whose own identity differs (a copy, a look-alike, a
  file moved to another filesystem) is not their owner, and removing it
  (``unlink``, ``shmbus rm``) leaves them alone. So does one whose owner (uid)
  is not the semaphores' owner.
* A semaphore is removed only when no process has it open: ``_sync.unlink_unused``
  proves it with a write lease. Processes that still have it keep it; the
  last of them to close a removed bus removes it. Removers of one bus take
  turns on the OFD lock of ``SEMS_BYTE`` (``remove_sems``).
* Missing semaphores (a disk bus after a reboot) are recreated by one opener
  at a time, under an OFD write lock on ``SEMS_BYTE``, taken with a deadline:
  a lock on that byte held by someone who never lets go (a reader can place
  one) makes ``open`` fail with ``TimeoutError`` instead of hanging. Under
  the lock an opener first opens what a previous one made; nothing is ever
  removed on that path, so no opener can take up a semaphore that another
  then deletes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
from collections.abc import Iterator
from typing import Callable, Final

from . import _sync
from ._errors import BusNotFound, ForeignBus
from ._format import IDENTITY, IDENTITY_OFFSET, SEMS_BYTE
from ._recovery import ofd_lock_polled, ofd_unlock

__all__ = [
    "RECREATE_TIMEOUT",
    "REMOVE_TIMEOUT",
    "record_identity",
    "owns_sems",
    "sems_lock",
    "recreation_lock",
    "remove_sems",
    "open_sems",
    "chmod_sems",
]

log = logging.getLogger("shmbus")

RECREATE_TIMEOUT: Final = 10.0  # seconds an opener waits for another to finish recreating
REMOVE_TIMEOUT: Final = 1.0  # seconds a remover (close() included) waits for its turn, then keeps them


def record_identity(fd: int) -> None:
    """Write the identity of the file open at ``fd`` as the owner of the bus's semaphores."""
    st = os.fstat(fd)
    os.pwrite(fd, IDENTITY.pack(st.st_dev, st.st_ino), IDENTITY_OFFSET)


def owns_sems(fd: int, header: bytes) -> bool:
    """True if the file open at ``fd``, whose header is ``header``, made its id's semaphores."""
    if len(header) < IDENTITY_OFFSET + IDENTITY.size:
        return False
    dev, ino = IDENTITY.unpack_from(header, IDENTITY_OFFSET)
    st = os.fstat(fd)
    return ino != 0 and (dev, ino) == (st.st_dev, st.st_ino)


@contextlib.contextmanager
def sems_lock(fd: int, path: str, timeout: float, ltype: int = fcntl.F_WRLCK) -> Iterator[None]:
    """Hold the sems byte of the bus open at ``fd`` (an OFD lock: the kernel drops it on death).

    Polled, never a blocking wait: raises ``TimeoutError`` after ``timeout``
    seconds, naming the byte.
    """
    if not ofd_lock_polled(fd, SEMS_BYTE, timeout, ltype):
        raise TimeoutError(
            errno.ETIMEDOUT, f"another process has held a lock on byte {SEMS_BYTE} of {path} for "
            f"{timeout:.1f} s; try again, or find it in /proc/locks", path,
        )  # fmt: skip
    try:
        yield
    finally:
        ofd_unlock(fd, SEMS_BYTE)


@contextlib.contextmanager
def recreation_lock(fd: int, path: str, timeout: float | None = None) -> Iterator[None]:
    """``sems_lock`` for an opener about to recreate missing semaphores.

    Waits at most ``timeout`` seconds (default ``RECREATE_TIMEOUT``), and
    raises ``BusNotFound`` if the file was removed meanwhile: its semaphores
    must then not be made again, nobody would remove them.
    """
    with sems_lock(fd, path, RECREATE_TIMEOUT if timeout is None else timeout):
        if os.fstat(fd).st_nlink == 0:
            raise BusNotFound(f"{path} was removed while it was being opened", path=path)
        yield


def remove_sems(fd: int, header: bytes, bus_id: str, roles: list[str], path: str) -> list[str]:
    """Remove the semaphores of the bus file open at ``fd`` that no process uses; return those kept.

    Nothing is removed unless this very file made them (``owns_sems``), and
    only those owned by the file's owner: a copy or a look-alike carrying
    another bus's id never gets that bus's semaphores removed. Removers of
    one bus take turns on the sems byte (a write lock if ``fd`` may write,
    else a read lock, which still excludes the closing handles): two last
    users closing at once would otherwise each take the other's lease for a
    use and both keep the semaphores.
    """
    existing = [f for b, role, f in _sync.list_sems() if b == bus_id and role in roles]
    if not owns_sems(fd, header):
        log.warning(
            "%s did not make the semaphores of bus id %s (a copy, a look-alike, or moved): kept them; "
            "`shmbus gc` removes them once no process uses them and no bus file carries the id",
            path, bus_id,
        )  # fmt: skip
        return existing
    writable = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE != os.O_RDONLY
    try:
        with sems_lock(fd, path, REMOVE_TIMEOUT, fcntl.F_WRLCK if writable else fcntl.F_RDLCK):
            return _sync.unlink_unused(bus_id, roles, owner=os.fstat(fd).st_uid)[1]
    except TimeoutError as e:
        log.warning("kept the semaphores of %s: %s", path, e.strerror)
        return existing


def open_sems(
    fd: int, path: str, bus_id: str, roles: list[str], mode: int, allow_shared: bool,
    initial: Callable[[], dict[str, int]],
) -> dict[str, _sync.Sem]:  # fmt: skip
    """Open the semaphores of the bus open at ``fd``, recreating missing ones from ``initial()``.

    Without ``allow_shared``, a semaphore another user owns is refused
    (``ForeignBus``) as the file would be: a stranger could have made these
    names first (after a reboot, say).
    """
    try:
        sems, missing = _sync.open_sems(bus_id, roles)
    except _sync.SemPermissionError as e:
        raise PermissionError(
            errno.EACCES, f"permission denied opening the semaphores of bus {path}: "
            "ask its owner to share it (mode 660 and a group you are in)", path,
        ) from e  # fmt: skip
    if missing:
        try:
            _recreate(fd, path, bus_id, sems, missing, mode, initial)
        except BaseException:
            for s in sems.values():
                s.close()
            raise
    if not allow_shared:
        for role, sem in sems.items():
            owner = _sync.sem_owner(sem)
            if owner is not None and owner != os.geteuid():
                for s in sems.values():
                    s.close()
                raise ForeignBus(
                    f"the {role} semaphore of {path} belongs to uid {owner}, not to you", path=path,
                    hint="remove the bus's semaphores (`shmbus rm`) or open it with allow_shared=True",
                )
    return sems


def _recreate(
    fd: int, path: str, bus_id: str, sems: dict[str, _sync.Sem], missing: list[str], mode: int,
    initial: Callable[[], dict[str, int]],
) -> None:  # fmt: skip
    """Make the missing semaphores (a disk bus after a reboot), one opener at a time.

    Under the sems byte, an opener first takes up what an earlier one made,
    then makes the rest from the header's counters (``initial()``). Nothing
    is removed on this path, even on failure: another opener may already use it.
    """
    with recreation_lock(fd, path):
        more, missing = _sync.open_sems(bus_id, missing)
        sems.update(more)
        if not missing:
            return
        log.warning("bus %s: semaphores %s were missing; recreating them", path, missing)
        values = initial()
        made = _sync.create_missing(bus_id, {r: values[r] for r in missing}, 0o600)
        sems.update(made)
        chmod_sems(made, mode)
        record_identity(fd)


def chmod_sems(sems: dict[str, _sync.Sem], mode: int) -> None:
    """Give the semaphores the bus file's mode (the umask must not narrow it)."""
    for sem in sems.values():
        _sync.chmod_sem(sem, mode)
