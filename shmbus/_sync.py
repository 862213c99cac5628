"""Locking and signalling: the only module that touches ``posix_ipc``.

A bus owns a few named POSIX semaphores, named from the random ``bus_id`` in
its header (``/shmbus.<bus_id>.<role>``, which Linux shows as
``/dev/shm/sem.shmbus.<bus_id>.<role>``). They are created exclusively with the
bus, so a name squatted by someone else makes ``create`` fail instead of
adopting a foreign semaphore. Waits take an absolute deadline
(``time.monotonic()`` based, ``None`` for ever); every public call turns its
``timeout`` argument into one through ``deadline`` (or checks it with
``check_timeout``), the one place that says which timeouts are refused.

Sleeping waits and signals. ``posix_ipc`` creates, opens, unlinks, posts and
try-takes; it does not sleep for us, because on EINTR it runs the Python
signal handler and then *discards* whatever exception the handler raised
(anything but KeyboardInterrupt), raising its own ``SignalError``: a SIGTERM
handler's ``SystemExit`` was lost and ``get()`` went on blocking. Its
timeouts are also absolute CLOCK_REALTIME deadlines, stretched by a
wall-clock step back. So each ``Sem`` also opens the same named semaphore
through libc (``sem_open(name, 0)``: glibc maps the same /dev/shm file) and
sleeps there with ctypes, which releases the GIL:

* ``sem_clockwait(sem, CLOCK_MONOTONIC, abstime)`` (glibc 2.30+): the
  deadline is on ``time.monotonic()``'s clock, so a clock step changes nothing;
* elsewhere ``sem_timedwait`` (CLOCK_REALTIME) in naps of ``SIGNAL_SLICE``:
  a clock step can stretch one nap, not the wait;
* where libc cannot be reached (no ``sem_open`` through ctypes), the old
  ``posix_ipc`` wait, whose handler exceptions are lost (docs/guarantees.md).

On EINTR control comes back to Python, which runs the handler: an exception
it raises propagates out of the wait; if it returns, the wait goes on for
what is left (PEP 475). The call's result is stored in a list before Python
can run a handler (``list.extend(map(...))``: no signal check in between),
so a handler that raises just after the semaphore was taken finds it taken
and the wait posts it back: a wait either returns True holding the token or
raises holding nothing. A signal that lands in the microseconds between
Python's last signal check and the start of the sleep cannot interrupt it;
each sleep therefore lasts at most ``SIGNAL_SLICE`` (40 ms), the bound on
that rare delay.


Closing under a waiter. ``sem_close`` unmaps the semaphore: a thread of the
process still sleeping on it would then sleep on unmapped memory. A ``Sem``
counts the threads sleeping on it (``list.append``/``pop``, atomic under the
GIL); ``interrupt()`` (a handle's ``close()``) makes every sleeper raise
``BusClosed`` at the end of its current nap (at most ``SIGNAL_SLICE``) and
refuses new sleeps, and ``close()`` is carried out by the last sleeper out.


A semaphore is removed only when no process has it open (``unlink_unused``):
glibc maps a named semaphore's file for as long as a process has it open, and
the kernel refuses a write lease (``F_SETLEASE``, fcntl(2)) on a file that
anyone holds open for writing, mappings included. The lease is held across
the ``unlink``, so an ``open`` racing with it waits for the lease to go and
then finds the name gone. A user who can merely read a bus file cannot fake
this: only a process that could open the semaphore itself shows up.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import re
import signal
import stat as _stat
import struct
import time
from typing import Any, Callable, Final

import posix_ipc

from ._errors import BusClosed

__all__ = [
    "Sem",
    "sem_name",
    "create_sems",
    "create_missing",
    "open_sems",
    "unlink_sems",
    "unlink_unused",
    "in_use",
    "list_sems",
    "sem_owner",
    "chmod_sem",
    "SEM_PREFIX",
    "SLICE",
    "SPIN_DEFAULT",
    "SIGNAL_SLICE",
    "WAIT_KIND",
    "SemPermissionError",
    "SemExistsError",
    "check_timeout",
    "deadline",
]

log = logging.getLogger("shmbus")

SEM_PREFIX: Final = "shmbus."
_yield = os.sched_yield
# How long a waiter polls before it sleeps, by default (per handle: ``spin_us``).
SPIN_DEFAULT: Final = float(os.environ.get("SHMBUS_SPIN_US", "50")) / 1e6
# Seconds a recoverable wait sleeps before looking for a dead holder.
SLICE: Final = float(os.environ.get("SHMBUS_RECOVERY_INTERVAL", "0.25"))
_BusyError = posix_ipc.BusyError
SemPermissionError = posix_ipc.PermissionsError
SemExistsError = posix_ipc.ExistentialError
_SignalError = posix_ipc.SignalError
# The longest one sleep lasts: the bound on how late a handler runs when its
# signal lands just before the sleep starts (see the module docstring).
SIGNAL_SLICE: Final = float(os.environ.get("SHMBUS_SIGNAL_SLICE", "0.04"))
_monotonic = time.monotonic
_map = map


def check_timeout(timeout: float | None) -> None:
    """Refuse a negative or NaN ``timeout`` (``ValueError``); None and ``inf`` wait for ever."""
    # ``not >= 0`` and not ``< 0``: NaN compares false both ways, and a NaN deadline never passes.
    if timeout is not None and not timeout >= 0:
        raise ValueError("'timeout' must be a non-negative number")


def deadline(timeout: float | None) -> float | None:
    """The deadline a wait of ``timeout`` seconds takes (``time.monotonic()`` based; None: for ever).

    Raises ``ValueError`` for a negative ``timeout`` (``check_timeout``).
    """
    if timeout is None:
        return None
    check_timeout(timeout)
    return _monotonic() + timeout


# A struct timespec, packed into bytes: ctypes passes a bytes object's buffer as
# a pointer, without building a Structure per sleep (a third of its cost).
_timespec = struct.Struct("@ll").pack


def _bind_libc() -> tuple[str, Any, Any, Any, Any]:
    """How waits sleep here: ``(kind, sem_open, sem_close, sem_clockwait, sem_timedwait)``.

    ``kind`` is "clockwait", "timedwait" or "posix_ipc" (no usable libc);
    ``SHMBUS_SEM_WAIT`` may ask for a weaker one (tests use it).
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        sem_open, sem_close, timedwait = libc.sem_open, libc.sem_close, libc.sem_timedwait
    except (OSError, AttributeError):
        return "posix_ipc", None, None, None, None
    sem_open.argtypes, sem_open.restype = [ctypes.c_char_p, ctypes.c_int], ctypes.c_void_p
    sem_close.argtypes, sem_close.restype = [ctypes.c_void_p], ctypes.c_int
    # The waits get no argtypes: they are called with a c_void_p, an int and bytes,
    # which ctypes passes as they are, faster than through argtypes (~0.2 us).
    timedwait.restype = ctypes.c_int
    clockwait = getattr(libc, "sem_clockwait", None)  # glibc >= 2.30
    if clockwait is not None:
        clockwait.restype = ctypes.c_int
    kind = "clockwait" if clockwait is not None else "timedwait"
    asked = os.environ.get("SHMBUS_SEM_WAIT", "")
    if asked == "posix_ipc" or (asked == "timedwait" and kind == "clockwait"):
        kind = asked
    return kind, sem_open, sem_close, clockwait, timedwait


WAIT_KIND, _sem_open, _sem_close, _clockwait, _timedwait = _bind_libc()
_MONOTONIC: Final = (time.CLOCK_MONOTONIC,)
_get_errno = ctypes.get_errno
_EINTR, _ETIMEDOUT = errno.EINTR, errno.ETIMEDOUT


def _libc_handle(name: str) -> ctypes.c_void_p | None:
    """A libc ``sem_t*`` on the existing semaphore ``name``, or None (then posix_ipc sleeps)."""
    if WAIT_KIND == "posix_ipc":
        return None
    h = _sem_open(os.fsencode(name), 0)
    if not h or h == ctypes.c_void_p(-1).value:  # SEM_FAILED: 0 in glibc and musl, -1 elsewhere
        return None
    return ctypes.c_void_p(h)


def sem_name(bus_id: str, role: str) -> str:
    """The POSIX name of the semaphore playing ``role`` for bus ``bus_id``."""
    return f"/{SEM_PREFIX}{bus_id}.{role}"


class Sem:
    """One named semaphore, with deadline-based waits.

    ``acquire`` returns False on timeout instead of raising, because every
    caller turns a timeout into its own error (``Empty``, ``Full``). An
    exception a signal handler raises during a wait propagates, with the
    semaphore not taken.
    """

    __slots__ = ("_acq", "_closing", "_h", "_idle", "_open", "_rel", "_sleepers", "name", "sem")

    def __init__(self, sem: posix_ipc.Semaphore) -> None:
        self.sem = sem
        self.name: str = sem.name
        self._acq = sem.acquire
        self._rel = sem.release
        self._h = _libc_handle(sem.name)
        self._closing = False  # interrupt() or close() was called: sleeps raise BusClosed
        self._sleepers: list[None] = []  # one entry per thread sleeping on it now
        self._open = [None]  # popped by whoever carries out the close (once)
        self._idle = 0.0  # seconds recoverable waits spent empty-handed since on_slice last ran

    def acquire(self, deadline: float | None, on_slice: Callable[[], object] | None = None) -> bool:
        """Take the semaphore before ``deadline``; False if the deadline passed first.

        With ``on_slice``, ``on_slice()`` runs after every ``SLICE`` seconds
        spent empty-handed (crash recovery looks for a dead holder there).
        Raises whatever a signal handler raises meanwhile, holding nothing;
        a handler that returns does not end the wait.
        """
        if on_slice is None:
            return self._sleep(deadline)
        while True:
            start = _monotonic()
            # The slice counts the empty-handed time of earlier waits that timed out
            # first: a loop of waits shorter than a slice runs on_slice too.
            end = start + SLICE - self._idle
            if deadline is not None and deadline <= end:
                if self._sleep(deadline):
                    self._idle = 0.0
                    return True
                self._idle += _monotonic() - start
                if self._idle < SLICE:
                    return False
                self._idle = 0.0
                on_slice()
                return self.try_acquire()  # (what on_slice gave back is this wait's to take)
            if self._sleep(end):
                self._idle = 0.0
                return True
            self._idle = 0.0
            on_slice()

    def _sleep(self, end: float | None) -> bool:
        """Sleep until the semaphore is ours (True) or ``end`` passes (False), in naps.

        Raises ``BusClosed`` (holding nothing) once ``interrupt()`` was called.
        """
        sleepers = self._sleepers
        sleepers.append(None)  # before the look at _closing: close() then sees us, or we see it
        try:
            if self._closing:
                raise self._closed_error()
            h = self._h
            if h is None:
                return self._sleep_posix_ipc(end)
            return self._sleep_libc((h,), end)
        finally:
            sleepers.pop()
            if self._closing and not sleepers:
                self._close_now()

    def _closed_error(self) -> BusClosed:
        return BusClosed(f"the handle was closed while this call waited on semaphore {self.name}")

    def _sleep_libc(self, handle: tuple[ctypes.c_void_p], end: float | None) -> bool:
        clockwait = _clockwait is not None and WAIT_KIND == "clockwait"
        while True:
            if self._closing:
                raise self._closed_error()
            now = _monotonic()
            stop = now + SIGNAL_SLICE
            if end is not None and end < stop:
                stop = end
            got: list[int] = []
            if clockwait:
                sec = int(stop)
                call = _map(_clockwait, handle, _MONOTONIC, (_timespec(sec, int((stop - sec) * 1e9)),))
            else:  # CLOCK_REALTIME, for one nap only: a clock step stretches no more
                at = time.time() + max(stop - now, 0.0)
                sec = int(at)
                call = _map(_timedwait, handle, (_timespec(sec, int((at - sec) * 1e9)),))
            try:
                # extend stores the result before Python looks for a signal.
                got.extend(call)
            except BaseException:
                if got and got[0] == 0:  # taken, then a handler raised: give it back
                    self._rel()
                raise
            if got[0] == 0:
                return True
            err = _get_errno()
            if err == _ETIMEDOUT:
                if end is not None and stop >= end:
                    return False
            elif err != _EINTR:  # EINTR: the handler ran and returned; sleep on
                raise OSError(err, f"waiting on semaphore {self.name}: {os.strerror(err)}")

    def _sleep_posix_ipc(self, end: float | None) -> bool:
        """``_sleep`` without libc: posix_ipc's wait, whose handler exceptions are lost."""
        acq = self._acq
        while True:
            if self._closing:
                raise self._closed_error()
            # In naps, so that interrupt() is noticed (posix_ipc's own handle is closed last).
            stop = _monotonic() + SIGNAL_SLICE
            timeout = max((stop if end is None else min(end, stop)) - _monotonic(), 0.0)
            try:
                acq(timeout)
                return True
            except _BusyError:
                if end is not None and _monotonic() >= end:
                    return False
            except _SignalError:
                continue  # posix_ipc ran the handler and dropped its exception

    def try_acquire(self) -> bool:
        """Take the semaphore if it is free now, without waiting."""
        try:
            self._acq(0)
        except _BusyError:
            return False
        return True

    def spin_acquire(
        self, deadline: float | None, spin: float, on_slice: Callable[[], object] | None = None
    ) -> bool:
        """``acquire``, but first poll for up to ``spin`` seconds before sleeping.

        When the other side is running on another core, the wait is often
        shorter than the cost of sleeping and being woken by the kernel (a
        futex wake and a context switch, tens of microseconds). Each poll
        yields the CPU: when the process we wait for has no core of its own,
        spinning would only delay it (measured: p50 round trip 9.6 us alone,
        121 us beside one busy process without the yield, 17 us with it).
        """
        if spin > 0:
            sem = self.sem
            end = time.monotonic() + spin
            while True:
                if sem.value > 0:
                    try:
                        self._acq(0)
                        return True
                    except _BusyError:
                        pass
                if time.monotonic() >= end:
                    break
                _yield()
        return self.acquire(deadline, on_slice)

    def release(self) -> None:
        """Post the semaphore once."""
        self._rel()

    @property
    def value(self) -> int:
        """The current count (Linux: exact; a snapshot that may change at once)."""
        return int(self.sem.value)

    def unlink(self) -> None:
        """Remove the semaphore's name; open handles keep working."""
        with contextlib.suppress(posix_ipc.ExistentialError):
            self.sem.unlink()

    def interrupt(self) -> None:
        """Make every sleep on this handle raise ``BusClosed`` within a nap, now and from now on.

        Posts, try-takes and ``value`` still work until ``close()``.
        """
        self._closing = True

    def close(self) -> None:
        """Drop this process's handles; the semaphore itself stays. Idempotent.

        A thread sleeping on it meanwhile raises ``BusClosed`` within a nap,
        and the last one out closes the handles: never under a sleeper.
        """
        self._closing = True
        if not self._sleepers:
            self._close_now()

    def _close_now(self) -> None:
        try:
            self._open.pop()  # whoever pops it closes; a racing second caller finds it empty
        except IndexError:
            return
        h, self._h = self._h, None
        if h is not None:
            _sem_close(h)
        with contextlib.suppress(posix_ipc.ExistentialError):
            self.sem.close()


def create_sems(bus_id: str, initial: dict[str, int], mode: int) -> dict[str, Sem]:
    """Create one semaphore per role, exclusively; on any failure remove those made so far."""
    made: dict[str, Sem] = {}
    try:
        for role, value in initial.items():
            raw = posix_ipc.Semaphore(sem_name(bus_id, role), posix_ipc.O_CREX, mode, value)
            made[role] = Sem(raw)
    except BaseException:
        for sem in made.values():
            sem.sem.unlink()
            sem.close()
        raise
    return made


def create_missing(bus_id: str, initial: dict[str, int], mode: int) -> dict[str, Sem]:
    """Create each role's semaphore exclusively, or open it if it exists; never remove any.

    For recreating a bus's missing semaphores: another process may already
    have opened one made here, so a failure part-way leaves what was made (the
    next opener finishes the job) instead of deleting it.
    """
    made: dict[str, Sem] = {}
    try:
        for role, value in initial.items():
            name = sem_name(bus_id, role)
            try:
                made[role] = Sem(posix_ipc.Semaphore(name, posix_ipc.O_CREX, mode, value))
            except posix_ipc.ExistentialError:
                made[role] = Sem(posix_ipc.Semaphore(name))
    except BaseException:
        for sem in made.values():
            sem.close()
        raise
    return made


def open_sems(bus_id: str, roles: list[str]) -> tuple[dict[str, Sem], list[str]]:
    """Open the existing semaphores of ``roles``; also return the roles that do not exist."""
    found: dict[str, Sem] = {}
    missing: list[str] = []
    for role in roles:
        try:
            found[role] = Sem(posix_ipc.Semaphore(sem_name(bus_id, role)))
        except posix_ipc.ExistentialError:
            missing.append(role)
    return found, missing


def _sem_file(name: str) -> str:
    return f"{_SEM_DIR}/sem.{name.lstrip('/')}"


def sem_owner(sem: Sem) -> int | None:
    """The uid owning a semaphore (Linux keeps it as a file in /dev/shm), or None if unknown.

    ``lstat``: a symbolic link planted at the name is judged as itself, never
    by what it points to.
    """
    try:
        return os.lstat(_sem_file(sem.name)).st_uid
    except OSError:
        return None


def chmod_sem(sem: Sem, mode: int) -> None:
    """Give a semaphore ``mode`` despite the umask (best effort: Linux keeps it in /dev/shm)."""
    with contextlib.suppress(OSError):
        fd = os.open(_sem_file(sem.name), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            os.fchmod(fd, mode)
        finally:
            os.close(fd)


def unlink_sems(bus_id: str, roles: list[str]) -> None:
    """Remove the named semaphores of ``roles`` unconditionally; those already gone are skipped.

    Whoever uses them is not asked: only for names nobody else can know (a
    create that failed before its file appeared) and for tests. Everything
    else removes through ``unlink_unused``.
    """
    for role in roles:
        with contextlib.suppress(posix_ipc.ExistentialError):
            posix_ipc.unlink_semaphore(sem_name(bus_id, role))


def _lease(path: str) -> int | None:
    """An fd of ``path`` holding a write lease, or None if some process has the file open.

    Raises ``OSError`` when it cannot tell (not our file and no CAP_LEASE, a
    link, gone). A lease break (someone opening the file meanwhile) is
    signalled to the holder; SIGURG, ignored by default, keeps SIGIO's
    default action (exit) away from us.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.fcntl(fd, fcntl.F_SETSIG, signal.SIGURG)
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_WRLCK)
    except OSError as e:
        os.close(fd)
        if e.errno == errno.EAGAIN:
            return None
        raise
    return fd


def in_use(path: str) -> bool | None:
    """True if some process has the semaphore file ``path`` open, False if none; None if unknown."""
    try:
        fd = _lease(path)
    except OSError:
        return None
    if fd is None:
        return True
    os.close(fd)  # closing drops the lease
    return False


def unlink_unused(bus_id: str, roles: list[str], owner: int | None = None) -> tuple[list[str], list[str]]:
    """Remove the semaphores of ``roles`` that no process has open and ``owner`` (if given) owns.

    Returns ``(removed, kept)``, as semaphore file paths: kept are those in
    use, of another owner, or that we may not judge or remove. Missing ones
    are in neither list.
    """
    removed: list[str] = []
    kept: list[str] = []
    for role in roles:
        path = _sem_file(sem_name(bus_id, role))
        try:
            st = os.lstat(path)
            if (owner is not None and st.st_uid != owner) or not _stat.S_ISREG(st.st_mode):
                kept.append(path)
                continue
            fd = _lease(path)
        except FileNotFoundError:
            continue
        except OSError:
            kept.append(path)
            continue
        if fd is None:
            kept.append(path)
            continue
        try:
            held = os.fstat(fd)
            if (held.st_dev, held.st_ino) != (st.st_dev, st.st_ino):
                kept.append(path)  # replaced since the lstat: judge it another time
            elif _remove_leased(fd, path, f"{_SEM_DIR}/sem.{SEM_PREFIX}{bus_id}.gone{role}"):
                removed.append(path)
            else:
                kept.append(path)
        except FileNotFoundError:
            pass
        except OSError:
            kept.append(path)
        finally:
            os.close(fd)  # drops the lease
    return removed, kept


def _remove_leased(fd: int, path: str, aside: str) -> bool:
    """Remove ``path``, whose lease ``fd`` holds, unless someone opened it meanwhile; True if removed.

    An ``open`` that began after the lease was taken is blocked until the
    lease goes, and then gets the inode it looked up. So the name is first
    moved aside (it still leads to the inode); if the lease is being broken
    by then, the name is put back for that opener. ``aside`` matches
    ``list_sems`` (role ``gone<role>``), so a remover killed in between leaves
    an orphan that ``gc`` finds, never a stray file.
    """
    os.rename(path, aside)
    if fcntl.fcntl(fd, fcntl.F_GETLEASE) == fcntl.F_WRLCK:
        os.unlink(aside)
        return True
    try:
        os.link(aside, path)  # an opener is waiting for this inode: give it back its name
    except FileExistsError:
        # Recreated meanwhile, under the opener: that one now has another semaphore.
        log.warning("semaphore %s was opened and recreated while being removed", path)
    os.unlink(aside)
    return False


# Linux keeps the named semaphore "/x" as the file "/dev/shm/sem.x" (sem_overview(7)).
_SEM_DIR: Final = "/dev/shm"
_SEM_FILE: Final = re.compile(r"sem\." + re.escape(SEM_PREFIX) + r"([0-9a-f]{16})\.([a-z0-9]+)\Z")


def list_sems() -> list[tuple[str, str, str]]:
    """The shmbus semaphores that exist now, as ``(bus_id, role, file path)``.

    Only names of the form ``sem_name`` makes are returned; anything else in
    the directory is not ours. Where semaphores are not files (not Linux),
    returns ``[]``.
    """
    try:
        names = os.listdir(_SEM_DIR)
    except FileNotFoundError:
        return []
    out = []
    for n in names:
        m = _SEM_FILE.match(n)
        if m:
            out.append((m.group(1), m.group(2), os.path.join(_SEM_DIR, n)))
    return out
