"""Liveness and dead-holder recovery: who is alive, who holds which lock, who frees it.

Rule: this module owns the participant table, the OFD locks and the protocol
that frees a lock whose holder died. POSIX semaphores are not released when
their holder dies, so every lock of a bus is a semaphore *plus* a header field
naming its holder's participant slot:

* A process claims a participant slot before it takes its first lock, and
  holds an OFD lock (``F_OFD_SETLK``) on the slot's first byte for as long as
  it lives. The kernel drops that lock when the process dies, whatever the
  pid becomes afterwards: a slot marked live whose byte is unlocked belongs to
  a dead process.
* After taking a lock, a holder stores its slot + 1 in the lock's holder
  field; it clears the field before releasing.
* A waiter sleeps in slices (``RECOVERY_INTERVAL``); after each slice it
  calls ``recover``. Recovery is serialized by an OFD lock on the recovery
  byte (768), which the kernel also drops on death. Under it the recoverer
  lists the dead participants; for each lock whose holder is dead it repairs
  what the holder left half-done (a hook of the bus kind) and posts the
  semaphore once, then frees the dead slots. A second recoverer, serialized
  behind the first, finds no dead participant left and does nothing: a lock
  is never posted twice.
* A holder killed between taking the semaphore and storing its slot (or
  between clearing it and posting) leaves a held lock with no holder. Live
  holders pass through that state constantly, so one look proves nothing:
  when recovery finds a dead participant and such a lock, it watches the lock
  for ``UNRECORDED_GRACE``; only if it stays held, nameless and unreleased
  (its release counter unchanged) the whole time is it freed. (A live process
  stopped for that long inside that window would be misjudged; see
  docs/guarantees.md.)
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import struct
import time
import weakref
from collections.abc import Iterator
from typing import Callable, Final

from . import _sync
from ._format import P_ATTACHED, P_PID_STATE, P_TOKENS, PARTICIPANT_SIZE, RECOVERY_BYTE, Layout

__all__ = [
    "RECOVERY_INTERVAL",
    "UNRECORDED_GRACE",
    "Participant",
    "Lock",
    "live_participants",
]

log = logging.getLogger("shmbus")

RECOVERY_INTERVAL: Final = _sync.SLICE
UNRECORDED_GRACE: Final = 0.5
_FLOCK = struct.Struct("hhqqi4x")  # struct flock on Linux x86-64 and arm64
_LIVE = 1 << 32  # state 1 in the high half of the pid/state word
# Holder field of a process that found the participant table full: never taken
# for "no holder", so recovery leaves its lock alone (it cannot tell if it died).
_UNKNOWN = 0xFFFFFFFF


def _ofd(fd: int, cmd: int, ltype: int, offset: int) -> int:
    res = fcntl.fcntl(fd, cmd, _FLOCK.pack(ltype, os.SEEK_SET, offset, 1, 0))
    return int(_FLOCK.unpack(res)[0])


def _try_lock(fd: int, offset: int) -> bool:
    try:
        _ofd(fd, fcntl.F_OFD_SETLK, fcntl.F_WRLCK, offset)
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def _locked_elsewhere(fd: int, offset: int) -> bool:
    """True if another open file description holds a lock on the byte at ``offset``."""
    return _ofd(fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, offset) != fcntl.F_UNLCK


def _marked_live(fd: int, h64: memoryview, layout: Layout, skip: int = -1) -> Iterator[tuple[int, bool]]:
    """``(slot, alive)`` for each participant slot marked live but ``skip``: alive if its byte is locked.

    ``fd`` must be an open file description other than the participants' own
    (a lock is never seen by the description that holds it).
    """
    for slot in range(layout.max_participants):
        base = layout.participants_offset + slot * PARTICIPANT_SIZE
        if slot != skip and h64[base // 8 + P_PID_STATE] >> 32:
            yield slot, _locked_elsewhere(fd, base)


def live_participants(fd: int, h64: memoryview, layout: Layout) -> list[int]:
    """The pids of the live participants of a bus (read-only: for ``shmbus ls`` and ``stats``).

    ``fd`` is a descriptor of the bus file this process opened for itself
    (read-only is enough); ``h64`` its header and participant table as u64,
    a live mapping or a copy read with ``pread``.
    """
    pid = (layout.participants_offset // 8) + P_PID_STATE
    return [
        int(h64[pid + slot * PARTICIPANT_SIZE // 8] & 0xFFFFFFFF)
        for slot, alive in _marked_live(fd, h64, layout)
        if alive
    ]


_instances: weakref.WeakSet[Participant] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for p in list(_instances):
        p.forget()


os.register_at_fork(after_in_child=_after_fork_in_child)


class Participant:
    """This process's slot in one bus's participant table, claimed on first use."""

    def __init__(self, path: str, bus_fd: int, h64: memoryview, layout: Layout) -> None:
        self.path = path
        self._bus_fd = bus_fd
        self._h64 = h64
        self._layout = layout
        self.slot = -1
        self.me = 0  # slot + 1, the value stored in holder fields; 0 = not claimed
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
    def recovery_lock(self) -> Iterator[None]:
        """Hold the recovery byte: one recoverer (or claimer) at a time, released on death."""
        fd = self.fd()
        while True:
            try:
                _ofd(fd, fcntl.F_OFD_SETLKW, fcntl.F_WRLCK, RECOVERY_BYTE)
                break
            except InterruptedError:
                continue
        try:
            yield
        finally:
            _ofd(fd, fcntl.F_OFD_SETLK, fcntl.F_UNLCK, RECOVERY_BYTE)

    def claim(self, reap: Callable[[], object]) -> int:
        """Claim a free slot (reaping dead ones first through ``reap``); return slot + 1.

        Returns 0 when the table is full: the process still works, but a lock
        it dies holding can then only be freed by ``shmbus recover``.
        """
        if self.me:
            return self.me
        reap()
        fd = self.fd()
        h = self._h64
        with self.recovery_lock():
            for slot in range(self._layout.max_participants):
                i = self._index(slot)
                if h[i + P_PID_STATE] >> 32 == 0 and _try_lock(fd, self._byte(slot)):
                    h[i + P_ATTACHED] = time.time_ns()
                    h[i + P_TOKENS] = 0
                    h[i + P_PID_STATE] = _LIVE | os.getpid()
                    self.slot, self.me, self.tokens_index = slot, slot + 1, i + P_TOKENS
                    return self.me
        log.warning("%s: participant table full; this process's locks cannot be recovered", self.path)
        return 0

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
            if h[i + P_PID_STATE] >> 32 and slot not in dead:
                total += h[i + P_TOKENS]
        return total

    def tokens_of(self, slot: int) -> int:
        return int(self._h64[self._index(slot) + P_TOKENS])

    def pid_of(self, slot: int) -> int:
        return int(self._h64[self._index(slot) + P_PID_STATE] & 0xFFFFFFFF)

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
    """A bus lock: a binary semaphore, the header field naming its holder, and a release counter."""

    __slots__ = ("_h32", "_holder", "_part", "_recover", "_releases", "role", "sem")

    def __init__(
        self, role: str, sem: _sync.Sem, h32: memoryview, holder_index: int, releases_index: int,
        part: Participant, recover: Callable[[], object],
    ) -> None:  # fmt: skip
        self.role = role
        self.sem = sem
        self._h32 = h32
        self._holder = holder_index
        self._releases = releases_index
        self._part = part
        self._recover = recover

    def acquire(self, deadline: float | None) -> bool:
        """Take the lock before ``deadline`` (None: for ever), recovering a dead holder's lock.

        A wait that times out runs recovery once and tries again, so even a
        short wait (a non-blocking put) frees a dead holder's lock.
        """
        me = self._part.me or self._part.claim(self._recover) or _UNKNOWN
        if not self.sem.acquire(deadline, self._recover):
            self._recover()
            if not self.sem.try_acquire():
                return False
        self._h32[self._holder] = me
        return True

    def try_acquire(self) -> bool:
        """Take the lock if it is free now."""
        me = self._part.me or self._part.claim(self._recover) or _UNKNOWN
        if not self.sem.try_acquire():
            return False
        self._h32[self._holder] = me
        return True

    def release(self) -> None:
        """Clear the holder field, count the release, then post the semaphore."""
        h32 = self._h32
        h32[self._holder] = 0
        h32[self._releases] = (h32[self._releases] + 1) & 0xFFFFFFFF
        self.sem.release()

    def holder(self) -> int:
        """The holder field: participant slot + 1, or 0."""
        return int(self._h32[self._holder])

    def looks_orphaned(self, grace: float) -> bool:
        """True if the lock stays held with no holder and no release for all of ``grace`` seconds.

        "Held, no holder" is normal for an instant: between taking the
        semaphore and naming itself, or between clearing its name and posting,
        a holder is anonymous. A live one leaves that state within microseconds
        (the holder field or the release counter changes); only a process that
        died there, or one stopped there for the whole grace, stays in it.
        """
        h32, sem = self._h32, self.sem
        releases = h32[self._releases]
        end = time.monotonic() + grace
        while True:
            if h32[self._holder] or sem.value or h32[self._releases] != releases:
                return False
            if time.monotonic() >= end:
                return True
            time.sleep(0.002)

    def force_release(self) -> None:
        """Free a lock whose holder is dead (only ``recover`` calls this, under the recovery lock)."""
        self.release()
