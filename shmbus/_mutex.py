"""Robust process-shared mutexes in the bus file: the only module that calls ``pthread_mutex_*``.

Rule: a bus lock is a glibc ``pthread_mutex_t`` stored in the header,
initialized ``PTHREAD_PROCESS_SHARED``, ``PTHREAD_MUTEX_ROBUST`` and
``PTHREAD_MUTEX_ERRORCHECK``. Why a mutex and not a semaphore: taking a
semaphore and writing down who took it are two steps, and a signal, a
``SIGSTOP`` or a ``SIGKILL`` can land between them, leaving a lock held by
nobody (or a paused holder that looks dead). A robust mutex records its owner
in the same atomic instruction that takes it (the owner's thread id in the
futex word), and the kernel marks it ``OWNER_DIED`` when the owner dies,
however it dies, so the next taker gets ``EOWNERDEAD`` and repairs (the
design of LMDB's lock file). A stopped or slow owner keeps its lock: it is
never mistaken for a dead one.

Because the owner is in the lock word, "do I hold it?" can always be answered
(``owned``), so a Python caller interrupted by a signal handler's exception at
any instruction can still release exactly what it holds.

The calls go through ``ctypes`` (they release the GIL while they wait); the C
fast path (``_cfast.c``) calls the same glibc functions on the same memory.
Linux with glibc only: musl and macOS lack what this needs.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os
import threading
import time
from typing import Final

from ._errors import BusClosed

__all__ = [
    "MUTEX_SIZE",
    "INIT_BYTES",
    "KIND_WORD",
    "TID_MASK",
    "OWNER_DIED",
    "EOWNERDEAD",
    "ENOTRECOVERABLE",
    "Mutex",
    "owner_of",
    "ghost_word",
    "kind_ok_at",
    "NOT_RECOVERABLE",
]

MUTEX_SIZE: Final = 64  # room for a pthread_mutex_t (40 bytes on x86-64, 48 on arm64)
TID_MASK: Final = 0x3FFFFFFF  # the futex word: owner's thread id in the low bits (futex(2))
OWNER_DIED: Final = 0x40000000  # set by the kernel when the owner died holding it
EOWNERDEAD: Final = errno.EOWNERDEAD
_INCONSISTENT: Final = 0x7FFFFFFF  # glibc's __owner (u32 index 2) after EOWNERDEAD, until consistent()
NOT_RECOVERABLE: Final = 0x7FFFFFFE  # glibc's __owner once unlocked without consistent()
ENOTRECOVERABLE: Final = errno.ENOTRECOVERABLE

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=False)
_P = [ctypes.c_void_p]
_trylock = _libc.pthread_mutex_trylock
_unlock = _libc.pthread_mutex_unlock
_consistent = _libc.pthread_mutex_consistent
for _f in (_trylock, _unlock, _consistent):
    _f.argtypes, _f.restype = _P, ctypes.c_int


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_clocklock = getattr(_libc, "pthread_mutex_clocklock", None)  # glibc 2.30+
if _clocklock is not None:
    _clocklock.argtypes, _clocklock.restype = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p], ctypes.c_int
_CLOCK_MONOTONIC: Final = 1
# A wait sleeps at most this long between two looks at Python's signal flags:
# a signal handler's exception must come out of a wait within 50 ms.
WAIT_SLICE: Final = 0.02


def _init_bytes() -> bytes:
    """The bytes of a freshly initialized robust, process-shared, error-checking mutex."""
    attr = ctypes.create_string_buffer(64)  # pthread_mutexattr_t is 4 bytes on glibc
    buf = ctypes.create_string_buffer(MUTEX_SIZE)
    lib = _libc
    if (
        lib.pthread_mutexattr_init(attr)
        or lib.pthread_mutexattr_setpshared(attr, 1)  # PTHREAD_PROCESS_SHARED
        or lib.pthread_mutexattr_setrobust(attr, 1)  # PTHREAD_MUTEX_ROBUST
        or lib.pthread_mutexattr_settype(attr, 2)  # PTHREAD_MUTEX_ERRORCHECK
        or lib.pthread_mutex_init(buf, attr)
    ):
        raise OSError("this C library cannot make robust process-shared mutexes (shmbus needs glibc)")
    lib.pthread_mutexattr_destroy(attr)
    return bytes(buf.raw)


INIT_BYTES: Final = _init_bytes()
# The mutex's kind word (offset 16 in glibc's layout): checked before a mutex
# read from a file is used, so a damaged one is refused rather than run.
KIND_WORD: Final = int.from_bytes(INIT_BYTES[16:20], "little")


_local = threading.local()


def _tid() -> int:
    """This thread's id as the kernel (and so a lock word) names it; cached: it is asked per lock call."""
    try:
        return _local.tid  # type: ignore[no-any-return]
    except AttributeError:
        tid = _local.tid = threading.get_native_id()
        return tid


# A forked child's one thread has a new id.
os.register_at_fork(after_in_child=_local.__dict__.clear)


def owner_of(word: int) -> tuple[int, bool]:
    """``(owner thread id or 0, owner died)`` from a lock's futex word."""
    return word & TID_MASK, bool(word & OWNER_DIED)


def ghost_word(word: int) -> bool:
    """True if the futex ``word`` names a holder thread that does not exist here (and did not die).

    A thread's death is marked in the word (OWNER_DIED) before its /proc
    entry goes, so a missing thread that is not marked was never ours to see:
    a damaged file, a holder in another PID namespace, or an earlier boot.
    """
    tid, died = owner_of(word)
    return bool(tid) and not died and not os.path.exists(f"/proc/{tid}")


def kind_ok_at(buf: memoryview | bytes, off: int) -> bool:
    """True if the mutex at ``buf[off:]`` has the kind word shmbus writes (a damaged file may hold any)."""
    return bytes(buf[off + 16 : off + 20]) == INIT_BYTES[16:20]


class Mutex:
    """One robust mutex at ``offset`` in a writable mapping ``mm``.

    Return codes are glibc's: 0, ``EBUSY``, ``ETIMEDOUT``, ``EOWNERDEAD``
    (taken, the last owner died: repair, then ``consistent()``),
    ``ENOTRECOVERABLE``, ``EDEADLK`` (this thread holds it already).
    """

    __slots__ = ("_anchor", "_closing", "_h32", "_takers", "_view", "addr")

    def __init__(self, mm: mmap.mmap, offset: int) -> None:
        # The ctypes object pins the mapping: it cannot be unmapped under a wait.
        self._anchor: ctypes.c_char | None = ctypes.c_char.from_buffer(mm, offset)
        self.addr = ctypes.c_void_p(ctypes.addressof(self._anchor))
        # Threads of this process that may hold the mutex: added before each
        # lock call, removed after an unlock. The lock word alone is not proof:
        # anyone who can write the file can put our thread id in it, and
        # unlocking a mutex this thread did not lock corrupts glibc's list.
        self._takers: set[int] = set()
        self._view = memoryview(mm)[offset : offset + MUTEX_SIZE]
        self._h32 = self._view.cast("I")
        self._closing = False  # interrupt(): a wait for it raises BusClosed instead of sleeping

    def word(self) -> int:
        """The futex word now (a snapshot)."""
        return int(self._h32[0])

    def owned(self) -> bool:
        """True if the calling thread holds the lock (the kernel-visible owner field says so)."""
        tid = _tid()
        return tid in self._takers and self._anchor is not None and self._h32[0] & TID_MASK == tid

    def held_here(self) -> bool:
        """True if some thread of this process may hold the mutex now (its word names one of them)."""
        if self._anchor is None:
            return False
        tid = self._h32[0] & TID_MASK
        return tid in self._takers and os.path.exists(f"/proc/self/task/{tid}")

    def expect(self) -> bool:
        """Note that the calling thread is about to take the mutex (here, or in C); True if noted already.

        Pass the result to ``settle`` if the call did not leave the mutex held.
        """
        tid = _tid()
        had = tid in self._takers
        self._takers.add(tid)
        return had

    def settle(self, had: bool) -> None:
        """Forget ``expect``'s note after a lock call that did not take the mutex (``had``: its result).

        A failed call (EBUSY, ETIMEDOUT, or EDEADLK on a forged word naming
        us) must not leave us among the takers: ``owned`` would then believe
        the forged word, and unlocking a mutex we never locked crashes glibc.
        """
        if not had:
            self._takers.discard(_tid())

    def _settled(self, rc: int, had: bool) -> int:
        if rc != 0 and rc != EOWNERDEAD:
            self.settle(had)
        return rc

    def ghost(self) -> bool:
        """True if held by a thread id that does not exist here (nothing but a reset frees it)."""
        word = self.word()
        # Read again after the /proc look: a holder that died between the first read and
        # that look has marked the word OWNER_DIED by then (its death is marked before its
        # /proc entry goes), so a word unchanged across the look is a true ghost.
        return ghost_word(word) and self.word() == word

    def _pin(self) -> ctypes.c_char:
        anchor = self._anchor
        if anchor is None:
            raise BusClosed("this handle was closed: open the bus again")
        return anchor

    def inconsistent(self) -> bool:
        """True while a taker that got EOWNERDEAD has not called ``consistent`` (glibc's owner field)."""
        return self._h32[2] == _INCONSISTENT

    def unrecoverable(self) -> bool:
        """True once a holder unlocked it after EOWNERDEAD without ``consistent`` (glibc's owner field)."""
        return self._h32[2] == NOT_RECOVERABLE

    def trylock(self) -> int:
        pin = self._pin()  # (held by this frame: the mapping stays for the call)
        had = self.expect()
        rc = self._settled(int(_trylock(self.addr)), had)
        del pin
        return rc

    def lock_until(self, end: float) -> int:
        """Wait for the lock until ``end`` (``time.monotonic()``), at most one ``WAIT_SLICE``.

        Returns ETIMEDOUT at the end of the slice; the caller looks at its
        deadline and at signals (Python runs handlers on return) and calls again.
        """
        pin = self._pin()  # (held by this frame: the mapping stays for the call)
        had = self.expect()
        rc = int(_trylock(self.addr))
        if rc != errno.EBUSY:
            return self._settled(rc, had)
        if self._closing:
            self.settle(had)
            raise BusClosed("the handle was closed while this call waited for a lock")
        left = min(end - time.monotonic(), WAIT_SLICE)
        if left <= 0:
            return self._settled(errno.ETIMEDOUT, had)
        if _clocklock is None:  # an old glibc: poll
            time.sleep(min(left, 0.001))
            return self._settled(int(_trylock(self.addr)), had)
        ts = _Timespec()
        at = time.monotonic() + left
        ts.tv_sec = int(at)
        ts.tv_nsec = int((at - ts.tv_sec) * 1e9)
        rc = self._settled(int(_clocklock(self.addr, _CLOCK_MONOTONIC, ctypes.byref(ts))), had)
        del pin
        return rc

    def unlock(self) -> int:
        pin = self._pin()
        rc = int(_unlock(self.addr))
        self._takers.discard(_tid())
        del pin
        return rc

    def consistent(self) -> int:
        """Mark a mutex taken with EOWNERDEAD usable again; EINVAL if it was not inconsistent."""
        pin = self._pin()
        rc = int(_consistent(self.addr))
        del pin
        return rc

    def reset(self) -> None:
        """Re-initialize the mutex in place (``shmbus recover --force``: nobody may be using it)."""
        pin = self._pin()
        ctypes.memmove(self.addr, INIT_BYTES, len(INIT_BYTES))
        del pin

    def kind_ok(self) -> bool:
        """True if the mutex's kind word is what shmbus writes (a damaged file may hold anything)."""
        return kind_ok_at(self._view, 0)

    def interrupt(self) -> None:
        """From now on a wait for the mutex raises ``BusClosed`` (within a slice) instead of sleeping.

        A free mutex can still be taken, and a held one released: a section
        in progress finishes, and the handle's ``close()`` waits for it.
        """
        self._closing = True

    def close(self) -> None:
        """Drop the pin on the mapping."""
        self._h32.release()
        self._view.release()
        self._anchor = None
