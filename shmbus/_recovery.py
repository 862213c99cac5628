"""Liveness and dead-holder recovery: who is alive, which lock needs mending, who mends it.

Rule: this module owns the mechanisms of liveness and recovery: the
participant table, the OFD locks, the bus locks (``Lock``) and how a dead
holder is noticed and its repair called. What a repair mends (counters read
back from the records) and the sweep that ``Bus.recover`` runs are
``_resync``'s; what a repair means for a bus kind is its ``_repair`` hook.

* A lock is a robust mutex in the header (``_mutex``): taking it records its
  holder in the same atomic step, and the kernel marks it when the holder
  dies, so a lock is never held by nobody and a paused holder is never taken
  for a dead one. The next taker gets EOWNERDEAD: it sets the lock's repair
  word, marks the mutex consistent, and calls the bus kind's repair hook
  (counters half-stored, tokens not posted); the word is cleared once the
  repair is done, so a repairer that dies too leaves the job to the next.
* A process claims a participant slot before it takes items tokens, and
  holds an OFD write lock (``F_OFD_SETLK``) on the slot's first byte for as
  long as it lives; the kernel drops it when the process dies. A slot marked
  live whose byte carries no *write* lock belongs to a dead process: a user
  who can only read the file can place read locks, never write locks, so
  cannot make a dead participant look alive.
* Recovery of what a dead participant held besides locks (its items tokens,
  its Topic subscriber slots), and participant claims, are serialized by the
  recovery mutex (768), a robust mutex like the locks: nobody who can only
  read the file can hold it, and a dead recoverer's is taken over at once.
  The boot reset is serialized by an OFD write lock on the same byte, with a
  bounded wait: a stranger's read lock there delays that reset, never hangs
  an open.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import fcntl
import logging
import os
import struct
import time
import weakref
from collections.abc import Iterator
from typing import Any, Callable, Final, Literal, TypeVar

from . import _mutex, _sync
from ._errors import CorruptBus, ShmbusError
from ._format import (
    BOOT_BYTE,
    P_ATTACHED,
    P_PID_STATE,
    P_TOKENS,
    PARTICIPANT_SIZE,
    Layout,
    participant_pid,
    participant_state,
    participant_word,
)

__all__ = [
    "RECOVERY_INTERVAL",
    "RECOVERY_LOCK_WAIT",
    "Participant",
    "Lock",
    "NOT_TAKEN",
    "live_participants",
    "pid_alive",
    "ofd_lock_polled",
    "ofd_unlock",
]

log = logging.getLogger("shmbus")

RECOVERY_INTERVAL: Final = _sync.SLICE
# The longest a process waits for the recovery mutex (or the boot byte) before it gives up this round.
RECOVERY_LOCK_WAIT: Final = 2.0
_FLOCK = struct.Struct("hhqqi4x")  # struct flock on Linux x86-64 and arm64
_FOREVER: Final = float("inf")
_T = TypeVar("_T")


class _NotTaken(enum.Enum):
    """``Lock.run``'s result when the lock did not come in time."""

    NOT_TAKEN = 0


NOT_TAKEN: Final = _NotTaken.NOT_TAKEN


def _ofd(fd: int, cmd: int, ltype: int, offset: int) -> int:
    res = fcntl.fcntl(fd, cmd, _FLOCK.pack(ltype, os.SEEK_SET, offset, 1, 0))
    return int(_FLOCK.unpack(res)[0])


def _try_lock(fd: int, offset: int, ltype: int = fcntl.F_WRLCK) -> bool:
    try:
        _ofd(fd, fcntl.F_OFD_SETLK, ltype, offset)
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def ofd_lock_polled(fd: int, offset: int, wait: float, ltype: int = fcntl.F_WRLCK) -> bool:
    """Take an OFD lock on the byte at ``offset``, polling for at most ``wait`` seconds; False if not.

    Never a blocking wait (``F_OFD_SETLKW``): anyone who can read the file can
    hold a read lock on any byte, which must delay us, never hang us. The
    holders we wait for keep these bytes for microseconds: the pause grows
    from 0.5 ms to 20 ms.
    """
    end = time.monotonic() + wait
    pause = 0.0005
    while not _try_lock(fd, offset, ltype):
        if time.monotonic() >= end:
            return False
        time.sleep(pause)  # a back-off between tries, not a synchronisation
        pause = min(pause * 2, 0.02)
    return True


def ofd_unlock(fd: int, offset: int) -> None:
    """Drop this open file description's lock on the byte at ``offset``."""
    _ofd(fd, fcntl.F_OFD_SETLK, fcntl.F_UNLCK, offset)


def _locked_elsewhere(fd: int, offset: int) -> bool:
    """True if another open file description holds a *write* lock on the byte at ``offset``.

    A read lock proves nothing: anyone who can read the file can place one (and
    it cannot coexist with a participant's write lock, so it even proves death).
    """
    return _ofd(fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, offset) == fcntl.F_WRLCK


def _marked_live(fd: int, h64: memoryview, layout: Layout, skip: int = -1) -> Iterator[tuple[int, bool]]:
    """``(slot, alive)`` for each participant slot marked live but ``skip``: alive if its byte is locked.

    ``fd`` must be an open file description other than the participants' own
    (a lock is never seen by the description that holds it).
    """
    for slot in range(layout.max_participants):
        base = layout.participants_offset + slot * PARTICIPANT_SIZE
        if slot != skip and participant_state(h64[base // 8 + P_PID_STATE]):
            yield slot, _locked_elsewhere(fd, base)


def live_participants(fd: int, h64: memoryview, layout: Layout) -> list[int]:
    """The pids of the live participants of a bus (read-only: for ``shmbus ls`` and ``stats``).

    ``fd`` is a descriptor of the bus file this process opened for itself
    (read-only is enough); ``h64`` its header and participant table as u64,
    a live mapping or a copy read with ``pread``.
    """
    pid = (layout.participants_offset // 8) + P_PID_STATE
    return [
        participant_pid(h64[pid + slot * PARTICIPANT_SIZE // 8])
        for slot, alive in _marked_live(fd, h64, layout)
        if alive
    ]


_instances: weakref.WeakSet[Participant] = weakref.WeakSet()


def pid_alive(pid: int) -> bool:
    """True if a process ``pid`` exists (ours or another user's), for a record that names only a pid."""
    if pid >= 1 << 31:
        return False  # no pid_t holds it (os.kill would raise OverflowError): a damaged slot
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _after_fork_in_child() -> None:
    for p in list(_instances):
        p.forget()


os.register_at_fork(after_in_child=_after_fork_in_child)


class Participant:
    """This process's slot in one bus's participant table, claimed on first use."""

    def __init__(self, path: str, bus_fd: int, h64: memoryview, layout: Layout, mutex: _mutex.Mutex) -> None:
        self.path = path
        self._mutex = mutex  # the recovery mutex
        self._bus_fd = bus_fd
        self._h64 = h64
        self._layout = layout
        self.slot = -1
        self.me = 0  # slot + 1, the value a subscriber slot's owner field stores; 0 = not claimed
        self.tokens_index = 0  # u64 index of our slot's tokens field
        self._fd = -1
        self._pid = 0
        _instances.add(self)

    def _index(self, slot: int) -> int:
        return (self._layout.participants_offset + slot * PARTICIPANT_SIZE) // 8

    def _byte(self, slot: int) -> int:
        return self._layout.participants_offset + slot * PARTICIPANT_SIZE

    def fd(self) -> int:
        """Our own open file description of the bus (OFD locks belong to it)."""
        if self._fd < 0 or self._pid != os.getpid():
            # A new open file description of the same inode (even if unlinked):
            # the bus's own descriptor is shared with forked children.
            self._fd = os.open(f"/proc/self/fd/{self._bus_fd}", os.O_RDWR | os.O_CLOEXEC)
            self._pid = os.getpid()
        return self._fd

    @contextlib.contextmanager
    def boot_lock(self, wait: float = RECOVERY_LOCK_WAIT) -> Iterator[bool]:
        """Hold an OFD write lock on the boot byte (768): one boot reset at a time.

        Yields False (holding nothing) if it stayed locked for ``wait``
        seconds: a user who can read the file can place a read lock there,
        which must delay a reset, never hang an open.
        """
        fd = self.fd()
        if not ofd_lock_polled(fd, BOOT_BYTE, wait):
            log.warning("%s: the boot byte stayed locked for %.1f s; not resetting", self.path, wait)
            yield False
            return
        try:
            yield True
        finally:
            ofd_unlock(fd, BOOT_BYTE)

    def under_recovery_lock(self, fn: Callable[..., _T], *args: Any) -> _T | Literal[_NotTaken.NOT_TAKEN]:
        """Run ``fn(*args)`` holding the recovery mutex: one recoverer (or claimer) at a time.

        A robust mutex in the header, so nobody who cannot write the file can
        hold it, and a dead holder's is taken over at once. Returns
        ``NOT_TAKEN`` if a live holder kept it for ``RECOVERY_LOCK_WAIT``
        seconds. A plain ``try``/``finally``, not a context manager: a
        generator's ``__enter__`` could be interrupted by a signal handler's
        exception after taking the mutex, leaving it to the garbage collector.
        A recoverer that died in the middle leaves at worst a token posted
        twice (harmless: a token without a record is dropped).
        """
        mutex = self._mutex
        end = time.monotonic() + RECOVERY_LOCK_WAIT
        try:
            while True:
                rc = mutex.lock_until(end)
                if rc == 0 or rc == _mutex.EOWNERDEAD:
                    return fn(*args)
                if rc == errno.ETIMEDOUT and time.monotonic() < end:
                    continue
                if rc == _mutex.ENOTRECOVERABLE:
                    mutex.reset()  # it guards no counters of its own: start afresh
                    continue
                log.warning("%s: the recovery lock stayed busy; skipping this round", self.path)
                return NOT_TAKEN
        finally:
            if mutex.owned():
                if mutex.inconsistent():  # taken with EOWNERDEAD: it guards nothing to mend
                    mutex.consistent()
                mutex.unlock()

    def claim(self, reap: Callable[[], object]) -> int:
        """Claim a free slot (reaping dead ones first through ``reap``); return slot + 1.

        Returns 0 when the table is full (or the recovery mutex stays busy):
        the process still works; items tokens it dies holding are healed by
        the consumers (``Queue._heal``) instead of given back at once.
        """
        if self.me:
            return self.me
        reap()
        if self.under_recovery_lock(self._claim_free_slot):
            return self.me
        log.warning(
            "%s: no free participant slot; items tokens this process dies holding are healed by consumers",
            self.path,
        )
        return 0

    def _claim_free_slot(self) -> bool:
        """Under the recovery mutex: take the first free slot we can write-lock; False if none."""
        fd = self.fd()
        h = self._h64
        for slot in range(self._layout.max_participants):
            i = self._index(slot)
            if participant_state(h[i + P_PID_STATE]) == 0 and _try_lock(fd, self._byte(slot)):
                h[i + P_ATTACHED] = time.time_ns()
                h[i + P_TOKENS] = 0
                h[i + P_PID_STATE] = participant_word(os.getpid(), 1)  # 1: live
                self.slot, self.me, self.tokens_index = slot, slot + 1, i + P_TOKENS
                return True
        return False

    def dead_slots(self) -> list[int]:
        """Slots marked live whose OFD lock is gone (call under the recovery lock)."""
        marked = _marked_live(self.fd(), self._h64, self._layout, skip=self.slot)
        return [slot for slot, alive in marked if not alive]

    def live_tokens(self) -> int:
        """Sum of the items tokens that live participants hold (call under the recovery lock)."""
        h = self._h64
        dead = set(self.dead_slots())
        total = 0
        for slot in range(self._layout.max_participants):
            i = self._index(slot)
            if participant_state(h[i + P_PID_STATE]) and slot not in dead:
                total += h[i + P_TOKENS]
        return total

    def tokens_of(self, slot: int) -> int:
        return int(self._h64[self._index(slot) + P_TOKENS])

    def pid_of(self, slot: int) -> int:
        return participant_pid(self._h64[self._index(slot) + P_PID_STATE])

    def free(self, slot: int) -> None:
        """Mark a dead participant's slot free (under the recovery lock)."""
        i = self._index(slot)
        self._h64[i + P_TOKENS] = 0
        self._h64[i + P_PID_STATE] = 0

    def release(self) -> None:
        """Give our slot back (on close)."""
        if self.me and self._pid == os.getpid():
            with contextlib.suppress(ValueError, OSError):
                self._h64[self._index(self.slot) + P_PID_STATE] = 0
        self.forget()

    def forget(self) -> None:
        """Drop our claim without touching the table (a forked child's copy is not the owner)."""
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)  # a child's close leaves the parent's OFD locks alone
        self._fd = -1
        self.slot, self.me, self.tokens_index = -1, 0, 0


class Lock:
    """A bus lock: a robust mutex in the header (``_mutex``) and its repair word.

    The discipline every caller follows, so that no signal can strand it::

        lock = self._head_lock
        try:
            if not lock.acquire(deadline):
                raise Full(...)
            ...                      # the critical section
        finally:
            lock.release()           # releases only if this thread holds it

    ``acquire`` is inside the ``try``: a signal handler's exception raised the
    instant after the mutex was taken still reaches the ``finally``, and
    ``release`` asks the lock word (not a Python variable) whether this thread
    holds it. A section that an exception cut short calls ``abandon`` instead,
    which leaves the repair word set for the next holder.
    """

    __slots__ = ("_h32", "_mutex", "_on_repaired", "_repair", "_repair_index", "path", "role")

    def __init__(
        self, role: str, path: str, mutex: _mutex.Mutex, h32: memoryview, repair_index: int,
        repair: Callable[[str], bool], on_repaired: Callable[[], None],
    ) -> None:  # fmt: skip
        self.role = role
        self.path = path
        self._mutex = mutex
        self._h32 = h32
        self._repair_index = repair_index
        self._repair = repair
        self._on_repaired = on_repaired

    @property
    def mutex(self) -> _mutex.Mutex:
        """The mutex itself (for ``shmbus check`` and the C fast path)."""
        return self._mutex

    def acquire(self, deadline: float | None) -> bool:
        """Take the lock before ``deadline`` (``time.monotonic()``; None: for ever); False on timeout.

        Waits in slices of ``_mutex.WAIT_SLICE``, so a signal handler's
        exception comes out within one. A holder that died is noticed at once
        (EOWNERDEAD); what it left half-done is mended here before returning.
        Call it inside the ``try`` whose ``finally`` calls ``release``.
        """
        mutex = self._mutex
        end = _FOREVER if deadline is None else deadline
        rc = mutex.trylock()  # (first without sleeping: a lock no death will free is refused at once)
        while True:
            if rc == 0 or rc == _mutex.EOWNERDEAD:
                if self._taken(rc):
                    return True
                mutex.unlock()  # the repair must wait for a lock another holds: not ours yet
            elif rc == errno.ETIMEDOUT or rc == errno.EBUSY:
                if mutex.ghost():
                    # Held by a thread that does not exist (a damaged file, or a
                    # holder in another PID namespace): no death will ever free it.
                    raise CorruptBus(
                        f"{self.path}: the {self.role} lock is held by a thread that does not exist: "
                        "run `shmbus check`, then `shmbus recover --force` once no process uses the bus",
                        path=self.path,
                    )
                if deadline is not None and time.monotonic() >= deadline:
                    return False
            elif rc == errno.EDEADLK and mutex.owned():
                # This thread kept it: a section an exception cut short at an
                # instant no ``finally`` covered. Hand it on for repair, take it again.
                log.warning("%s: this thread still held the %s lock; repairing", self.path, self.role)
                self.abandon()
            else:
                self._refuse(rc)
            rc = mutex.lock_until(end)

    def run(
        self, deadline: float | None, fn: Callable[..., _T], *args: Any
    ) -> _T | Literal[_NotTaken.NOT_TAKEN]:
        """Take the lock (before ``deadline``), run ``fn(*args)`` holding it, release it.

        Returns what ``fn`` returned, or ``NOT_TAKEN`` if the lock did not come
        in time. shmbus's own errors are raised before any store, so they just
        release; any other exception (a signal handler's, from any
        instruction) abandons, and the next holder checks the counters.
        """
        try:
            if not self.acquire(deadline):
                return NOT_TAKEN
            result = fn(*args)
        except BaseException as e:
            self.release_after(e)
            raise
        self.release()
        return result

    def release_after(self, exc: BaseException) -> None:
        """Release after a critical section that ``exc`` ended: plainly if it is shmbus's own.

        shmbus raises its own errors before any store, so nothing needs mending;
        any other exception (a signal handler's, from any instruction) may have
        cut the section between two stores: ``abandon``, and the next holder checks.
        """
        if isinstance(exc, ShmbusError):
            self.release()
        else:
            self.abandon()

    def try_acquire(self) -> bool:
        """Take the lock if it is free now (mending a dead holder's leftovers first)."""
        mutex = self._mutex
        rc = mutex.trylock()
        if rc == 0 or rc == _mutex.EOWNERDEAD:
            if self._taken(rc):
                return True
            mutex.unlock()
            return False
        if rc == errno.EBUSY:
            return False
        if rc == errno.EDEADLK and mutex.owned():
            log.warning("%s: this thread still held the %s lock; repairing", self.path, self.role)
            self.abandon()
            return self.try_acquire()
        self._refuse(rc)
        return False  # not reached

    def _taken(self, rc: int) -> bool:
        """Just taken (``rc`` 0 or EOWNERDEAD): repair what needs it; False if it could not be yet."""
        h32, i = self._h32, self._repair_index
        if rc == _mutex.EOWNERDEAD:
            # The word first: a repairer that dies too leaves the job to the next holder.
            h32[i] = 1
            self._mutex.consistent()
            log.warning("%s: the %s lock's holder died holding it; repairing", self.path, self.role)
        elif h32[i]:
            # Left by a holder cut short (abandon), a repairer that could not finish,
            # or the C fast path, which hands a dead holder's lock over this way.
            log.warning(
                "%s: the %s lock was left needing repair (its holder died or was cut short); repairing",
                self.path, self.role,
            )  # fmt: skip
        if h32[i]:
            if not self._repair(self.role):
                return False
            h32[i] = 0
            self._on_repaired()
        return True

    def _refuse(self, rc: int) -> None:
        if rc == _mutex.ENOTRECOVERABLE:
            raise CorruptBus(
                f"{self.path}: the {self.role} lock is marked unrecoverable (a holder released it "
                "without repairing): run `shmbus recover --force` once no process uses the bus",
                path=self.path,
            )
        if rc == errno.EDEADLK and self._mutex.owned():
            raise RuntimeError(f"this thread already holds the {self.role} lock of {self.path}")
        if rc == errno.EDEADLK:
            raise CorruptBus(
                f"{self.path}: the {self.role} lock's word names this thread, which does not hold it: "
                "run `shmbus check`, then `shmbus recover --force` once no process uses the bus",
                path=self.path,
            )
        raise OSError(rc, f"{self.role} lock of {self.path}: {os.strerror(rc)}")

    def owned(self) -> bool:
        """True if the calling thread holds the lock."""
        return self._mutex.owned()

    def release(self) -> None:
        """Release the lock if this thread holds it; otherwise do nothing.

        A signal handler's exception raised in here is held back until the
        lock is released, then re-raised: the release always happens.
        """
        pending: BaseException | None = None
        while True:
            try:
                self._release_once(mark=False)
                break
            except BaseException as e:  # a signal handler's, between two steps: try again
                pending = e
        if pending is not None:
            raise pending

    def _release_once(self, mark: bool = False) -> None:
        # Each step may be repeated (release retries after an exception), so
        # each one first looks at what the lock says, never at a Python flag.
        mutex = self._mutex
        if mutex.owned():
            if mutex.inconsistent():
                # A take with EOWNERDEAD interrupted before its repair: the next
                # holder mends what the dead one left (the word first, as in _taken).
                self._h32[self._repair_index] = 1
                mutex.consistent()
            elif mark:  # a section cut short: the next holder mends what was left
                self._h32[self._repair_index] = 1
            mutex.unlock()

    def abandon(self) -> None:
        """Release after a critical section that an exception cut short: the next holder repairs."""
        pending: BaseException | None = None
        while True:
            try:
                self._release_once(mark=True)
                break
            except BaseException as e:
                pending = e
        if pending is not None:
            raise pending

    def state(self) -> tuple[int, bool, bool]:
        """``(owner thread id or 0, owner died, repair pending)`` now: for ``shmbus check``."""
        tid, died = _mutex.owner_of(self._mutex.word())
        return tid, died, bool(self._h32[self._repair_index])

    def force_reset(self) -> bool:
        """Re-initialize the mutex if nothing can free it otherwise; True if it did.

        That is: held by a thread id that does not exist here, or marked
        unrecoverable. The repair word is set, so the next holder mends the
        counters. Only ``recover(force=True)`` calls this.
        """
        if not self._mutex.ghost() and not self._mutex.unrecoverable():
            return False
        self._h32[self._repair_index] = 1
        self._mutex.reset()
        return True

    def close(self) -> None:
        """Drop this handle's pin on the mapping (after the last use)."""
        self._mutex.close()
