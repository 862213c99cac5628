"""A bus handle's lifecycle: create, open, attach, map, close, pickle.

Rule: this module owns the handle and its mapping, and nothing of the ring's
logic. ``Bus`` is the base of ``Queue`` and ``Topic``; it hands them the
mapped views (``_h64``/``_h32`` over the header, ``_ring`` over the ring), the
validated ``Layout``, the locks and the opened semaphores, and counts the
calls in progress so that ``close()`` never unmaps under one. Like
``multiprocessing.shared_memory``: ``close()`` is per handle and idempotent,
``unlink()`` destroys the bus for every process, a failed constructor cleans up
after itself, and a handle pickles as its path and re-opens on the other side.

What it binds to the handle lives elsewhere, one rule a module: the file on
disk (paths, opening, a new file, ``unlink``) in ``_file``, the semaphores'
opening and recreation in ``_semlife``, the locks and participants in
``_recovery``, what is mended after a crash (``recover``) in ``_resync``, a
zero-copy write's lock discipline in ``_zerocopy``, ``stats()`` in ``_stats``.

A new bus is built under a temporary name and hard-linked into place, so
another process never sees a half-written header, and a file already at the
path is never overwritten.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import mmap
import multiprocessing.util
import os
import secrets
import stat
import threading
import weakref
from collections.abc import Iterable
from typing import Any, Callable, ClassVar, TypeVar

from . import _mutex, _recovery, _resync, _semlife, _sync
from ._codec import DEFAULT_CODEC, Codec
from ._errors import (
    BusClosed,
    BusExists,
    IncompatibleBus,
    MessageTooLarge,
    NoSpace,
)
from ._file import open_fd, read_layout, refuse_foreign, resolve_path, unlink, unlink_quiet, write_new_file
from ._format import (
    HEADER_MIN,
    KIND_NAMES,
    LOCKS,
    M_RECOVERY,
    Layout,
    max_payload,
)
from ._stats import Stats, header_stats
from ._zerocopy import BlockOwner, RecordBatch, Reservation, View, reserve_record

__all__ = [
    "Bus",
]

log = logging.getLogger("shmbus")

B = TypeVar("B", bound="Bus")
# Mappings whose locks a thread of this process held when their handle closed
# or was collected (see Bus.close and Bus.__del__).
_PINNED: list[object] = []
_Block = TypeVar("_Block", Reservation, View, RecordBatch)
# Every open handle of this process, closed at its exit: a process that exits
# without closing its handles would otherwise keep a removed bus's semaphores
# (the last handle to close removes them: see _semlife).
_OPEN: weakref.WeakSet[Bus] = weakref.WeakSet()


def _close_open_handles() -> None:
    for bus in list(_OPEN):
        with contextlib.suppress(Exception):
            bus.close()


def _at_child_exit(_: object = None) -> None:
    multiprocessing.util.Finalize(None, _close_open_handles, exitpriority=0)


class _ForkHook:
    """What ``register_after_fork`` hangs the child's exit hook on (it needs a live object)."""


_FORK_HOOK = _ForkHook()
# At interpreter exit; at the end of a multiprocessing child, which leaves through
# os._exit past atexit; and in a forked child, whose start clears the finalizers.
atexit.register(_close_open_handles)
_at_child_exit()
multiprocessing.util.register_after_fork(_FORK_HOOK, _at_child_exit)


def _reopen(cls: type[Bus], path: str, codec: Codec, allow_shared: bool = False) -> Bus:
    return cls.open(path, codec=codec, allow_shared=allow_shared)


class Bus:
    """What a Queue and a Topic share: the mapped file, its header and its semaphores."""

    _KIND: ClassVar[int] = 0
    _ROLES: ClassVar[tuple[str, ...]] = ()

    # Class-level defaults let close() run on a half-built object.
    _closed = True
    _mm: mmap.mmap | None = None
    _fd = -1
    _codec: Codec = DEFAULT_CODEC
    _allow_shared = False
    _part: _recovery.Participant | None = None
    _locks: tuple[_recovery.Lock, ...] = ()
    _mutexes: dict[str, _mutex.Mutex] = {}  # noqa: RUF012 - replaced per instance, never mutated
    _views: tuple[memoryview, ...] = ()
    _sems: dict[str, _sync.Sem] = {}  # noqa: RUF012 - replaced per instance, never mutated
    # One entry per call in progress on this handle (and per open zero-copy block):
    # close() leaves the mapping, mutexes and semaphores to the last one out.
    _users: list[None] = []  # noqa: RUF012 - replaced per instance (an empty shared one is never grown for long)
    _unreleased: list[None] = []  # noqa: RUF012 - [None] per instance until _release pops it
    path = ""

    # -- construction -------------------------------------------------------

    @classmethod
    def _create(
        cls: type[B], path: str | os.PathLike[str], *, capacity: int, maxsize: int,
        max_subscribers: int, exist_ok: bool, mode: int, codec: Codec | None, preallocate: bool = False,
        creator: tuple[int, int] | None = None, into: B | None = None,
    ) -> B:  # fmt: skip
        """Create the bus file and open it; ``creator`` makes it anonymous, ``into`` is the handle to fill."""
        real = resolve_path(path)
        bus_id = secrets.token_hex(8)
        layout = Layout.new(
            kind=cls._KIND,
            capacity=capacity,
            maxsize=maxsize,
            max_subscribers=max_subscribers,
            max_participants=64,
            bus_id=bus_id,
            creator_uid=os.getuid(),
            creator=creator,
        )
        # The temporary name fits NAME_MAX whatever the final name's length.
        stem = os.fsdecode(os.fsencode(os.path.basename(real))[:200])
        tmp = os.path.join(os.path.dirname(real), f".{stem}.{bus_id}.tmp")
        sems = _sync.create_sems(bus_id, cls._initial_sems(layout, 0), mode)
        linked = False
        try:
            _semlife.chmod_sems(sems, mode)
            write_new_file(tmp, layout, mode, real, preallocate)
            try:
                os.link(tmp, real)
                linked = True
            except FileExistsError:
                if not exist_ok:
                    raise BusExists(
                        f"a file already exists at {real}", path=real,
                        hint=f"open it with {cls.__name__}.open, pass exist_ok=True, or remove it with "
                        "`shmbus rm`",
                    ) from None
        except (BusExists, NoSpace):
            raise
        except PermissionError as e:
            raise PermissionError(
                e.errno, f"permission denied creating bus {real}: choose a directory you can "
                "write to", real,
            ) from None  # fmt: skip
        except OSError as e:
            # Name the path the user gave, not the hidden temporary file.
            raise type(e)(e.errno, f"cannot create the bus: {e.strerror}", real) from None
        finally:
            try:
                unlink_quiet(tmp)
            finally:
                if not linked:
                    # Nobody else can know these: the file that names them never appeared.
                    for s in sems.values():
                        s.unlink()
                        s.close()
        if not linked:
            return cls.open(real, codec=codec)
        bus = cls._attach(real, codec, sems=sems, allow_shared=True, into=into)  # our own file, our mode
        log.debug("created %s %s (capacity %d)", cls.__name__, real, capacity)
        return bus

    @classmethod
    def open(
        cls: type[B], path: str | os.PathLike[str], *, codec: Codec | None = None, allow_shared: bool = False
    ) -> B:
        """Open an existing bus.

        Parameters:
            path: the bus's file path, or a bare name in ``/dev/shm``.
            codec: msgpack options for this handle (see ``Codec``).
            allow_shared: accept a bus owned by another user or writable by
                others (refused by default: such a peer can corrupt or stall it).

        Raises ``BusNotFound``, ``NotABus``, ``CorruptBus``, ``IncompatibleBus``
        (another format version, or a Topic opened as a Queue and the reverse),
        ``ForeignBus``, or ``PermissionError``.
        """
        return cls._attach(resolve_path(path), codec, sems=None, allow_shared=allow_shared)

    @classmethod
    def _attach(
        cls: type[B], real: str, codec: Codec | None, sems: dict[str, _sync.Sem] | None,
        allow_shared: bool = False, into: B | None = None,
    ) -> B:  # fmt: skip
        self = cls.__new__(cls) if into is None else into
        self._users = []
        self._unreleased = [None]
        self.path = real
        self._codec = codec or DEFAULT_CODEC
        self._allow_shared = allow_shared
        try:
            self._map(real)
            self._sems = sems if sems is not None else self._open_sems()
            self._closed = False
            self._setup()
        except BaseException:
            self.close()
            raise
        _OPEN.add(self)
        return self

    def _map(self, real: str) -> None:
        self._fd = open_fd(real, os.O_RDWR)
        layout = read_layout(self._fd, real)
        if layout.kind != self._KIND:
            raise IncompatibleBus(
                f"{real} is a shmbus {KIND_NAMES[layout.kind]}, not a {KIND_NAMES[self._KIND]}",
                path=real, kind=KIND_NAMES[layout.kind],
                hint=f"open it with shmbus.{KIND_NAMES[layout.kind]}.open",
            )
        self._layout = layout
        st = os.fstat(self._fd)
        self._mode = stat.S_IMODE(st.st_mode)
        if not self._allow_shared:
            refuse_foreign(real, st)
        self._mm = mmap.mmap(self._fd, layout.file_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        mv = memoryview(self._mm)
        h = mv[: layout.ring_offset]
        self._h64 = h.cast("Q")
        self._h32 = h.cast("I")
        self._ring = mv[layout.ring_offset :]
        self._views = (self._h64, self._h32, self._ring, h, mv)
        self._mutexes = {role: _mutex.Mutex(self._mm, off) for role, off, _ in LOCKS[layout.kind]}
        self._mutexes["recovery"] = _mutex.Mutex(self._mm, M_RECOVERY)
        self._part = _recovery.Participant(real, self._fd, self._h64, layout, self._mutexes["recovery"])
        _resync.check_locks(real, self._mm, self._h32, layout.kind, self._mutexes, self._part)

    def _open_sems(self) -> dict[str, _sync.Sem]:
        lay = self._layout
        return _semlife.open_sems(
            self._fd, self.path, lay.bus_id, self._ROLES_FOR(lay), self._mode, self._allow_shared,
            lambda: self._initial_sems(lay, self._queued()),
        )  # fmt: skip

    # -- hooks for subclasses ----------------------------------------------

    @classmethod
    def _ROLES_FOR(cls, layout: Layout) -> list[str]:
        return list(cls._ROLES)

    @classmethod
    def _initial_sems(cls, layout: Layout, queued: int) -> dict[str, int]:
        raise NotImplementedError

    def _queued(self) -> int:
        raise NotImplementedError

    def _setup(self) -> None:
        """Bind the per-instance fast-path attributes (after the mapping and semaphores)."""

    def _repair(self, role: str) -> bool:
        """Mend what a holder of lock ``role`` left half-done (recovery hook, called holding it).

        Returns False if it cannot be done yet (it needs another lock that a
        live process holds); the lock's repair word then stays set.
        """
        return True

    def _reap(self, slot: int) -> None:
        """Undo what dead participant ``slot`` held besides locks (recovery hook)."""

    def _enter(self) -> None:
        """Count a call in progress on this handle; raise ``BusClosed`` if it is closed.

        Pair it with ``_leave`` in a ``finally``. Between the two, ``close()``
        from another thread (or a signal handler) only interrupts the waits:
        the views, mutexes and semaphores stay until the last call leaves.
        """
        self._users.append(None)  # before the look at _closed: close() sees us, or we see it
        if self._closed:
            self._leave()
            self._check_open()

    def _leave(self) -> None:
        """The end of a call counted by ``_enter``: the last one out of a closed handle releases it."""
        users = self._users
        users.pop()
        if not users and self._closed:
            self._release()

    def _track(self, block: _Block) -> _Block:
        """Remember an open zero-copy block and its thread, so that ``close()`` can end it first."""
        blocks = self.__dict__.setdefault("_blocks", weakref.WeakKeyDictionary())
        blocks[block] = threading.get_ident()
        return block

    def _check_sizes(self, sizes: Iterable[int]) -> None:
        """Raise ``MessageTooLarge`` for the first encoded size this ring can never hold."""
        limit = max_payload(self._layout.capacity)
        for size in sizes:
            if not 0 <= size <= limit:
                raise MessageTooLarge(
                    f"a message of {size} bytes (encoded) cannot fit in {self.path}, whose ring of "
                    f"{self._layout.capacity} bytes holds messages up to {limit} bytes",
                    hint=f"create the {type(self).__name__} with a larger capacity",
                    path=self.path, size=size, limit=limit,
                )  # fmt: skip

    # -- the protocols, bound to this handle (they live in _resync, _zerocopy) --

    def _make_locks(self) -> tuple[_recovery.Lock, ...]:
        """This kind's locks, in ``LOCKS`` order (the head lock first), mended by ``_repair``."""
        return _resync.make_locks(self.path, self._KIND, self._mutexes, self._h32, self._h64, self._repair)

    def _resync(self, *, fix_next: bool, gaps: bool = False, own_tail: bool = True) -> None:
        """Rebuild the counters a writer killed between two stores left apart (see ``_resync.resync``)."""
        h, ring, cap = self._h64, self._ring, self._layout.capacity
        _resync.resync(h, ring, cap, self.path, fix_next=fix_next, gaps=gaps, own_tail=own_tail)

    def _reservation(
        self,
        nbytes: int,
        lock_deadline: float | None,
        room: Callable[[], tuple[int, int, int]],
        publish: Callable[[int, int], None],
        abandon: Callable[[], None],
        after: Callable[[], None] | None = None,
    ) -> Reservation:
        """A zero-copy write under the head lock (see ``_zerocopy.reserve_record``)."""
        ring, cap, lock = self._ring, self._layout.capacity, self._locks[0]
        owner = BlockOwner(self.path, self._is_closed, self._enter, self._leave, self._track)
        return reserve_record(owner, lock, ring, cap, nbytes, lock_deadline, room, publish, abandon, after)

    def _is_closed(self) -> bool:
        return self._closed

    def recover(self, *, force: bool = False) -> int:
        """Mend what dead processes left and free what they held; return how many dead processes were found.

        A lock whose holder died is mended by whoever takes it next, at once
        (its holder is recorded in the lock itself); this also takes each free
        lock that still needs mending, and frees what dead participants held
        besides locks (items tokens, Topic subscriber slots). Waiters call it
        after every ``RECOVERY_INTERVAL`` of waiting; ``shmbus recover PATH``
        calls it by hand. Safe at any time from any process.

        ``force=True`` (``shmbus recover --force``) also re-initializes a lock
        that nothing proves free: one held by a thread that does not exist in
        this PID namespace, or one released unrepaired. Only for a bus that
        no process uses: a holder in another PID namespace would lose its lock.
        """
        self._enter()
        try:
            return self._recover(force)
        finally:
            self._leave()

    def _recover(self, force: bool) -> int:
        assert self._part is not None
        return _resync.sweep(self.path, self._locks, self._mutexes["recovery"], self._part, self._reap, force)

    # -- lifecycle -----------------------------------------------------------

    def close(self) -> None:
        """Release this handle (mapping, semaphores, file descriptor); the bus stays.

        Idempotent, and safe from any thread or a signal handler. A call
        waiting on this handle in another thread (for a message, for space,
        for a lock) raises ``BusClosed`` within 50 ms, having removed or
        written nothing (a ``put_many`` says how many went in, in ``sent``);
        a call that starts afterwards raises ``BusClosed`` at once. The
        mapping and semaphores are released when the last call in progress
        returns, so nothing is unmapped under a thread still using it.

        A ``reserve()`` or ``get_view()`` block this thread left open is ended
        first, as an exception would end it (the reservation abandoned, the
        message left in the queue), so no lock stays held; a block open in
        another thread is ended by that thread (its lock is its own), and the
        release waits for it. A slice of the ring the caller kept keeps the
        mapping alive until it goes.
        """
        me = threading.get_ident()
        for block, tid in list(self.__dict__.get("_blocks", {}).items()):
            if tid == me:
                with contextlib.suppress(Exception):
                    block.end_unused()
        self._closed = True  # before the look at _users (see _enter)
        for s in self._sems.values():
            s.interrupt()
        for m in self._mutexes.values():
            m.interrupt()
        if not self._users:
            self._release()

    def _release(self) -> None:
        """Release the mapping, mutexes, semaphores and descriptor: once, with no call in progress."""
        try:
            self._unreleased.pop()
        except IndexError:
            return
        if self._part is not None:
            self._part.release()
            self._part = None
        if any(m.held_here() for m in self._mutexes.values()):
            # Unmapping a robust mutex that a thread of this process holds would
            # blind the kernel, which frees it at that thread's exit through a
            # list of addresses in this mapping, and would leave the holder
            # unable to release it: keep the mapping and the mutexes for as long
            # as the process lives (one mapping per handle closed at such an instant).
            log.warning("%s: closed while this process holds one of its locks; keeping it mapped", self.path)
            _PINNED.append((self._mm, self._mutexes))
            self._mm = None
        else:
            for m in self._mutexes.values():
                m.close()
        self._mutexes = {}
        for v in self._views:
            v.release()
        self._views = ()
        if self._mm is not None:
            with contextlib.suppress(BufferError):  # a slice the caller kept: freed with it
                self._mm.close()
            self._mm = None
        for s in self._sems.values():
            s.close()
        roles = list(self._sems)
        self._sems = {}
        if self._fd >= 0:
            try:
                if roles and os.fstat(self._fd).st_nlink == 0:
                    # The bus was removed while we used it: the last user out removes its semaphores.
                    head = os.pread(self._fd, HEADER_MIN, 0)
                    _semlife.remove_sems(self._fd, head, self._layout.bus_id, roles, self.path)
            finally:
                os.close(self._fd)
                self._fd = -1

    def unlink(self) -> None:
        """Remove the bus file and its semaphores, for every process.

        Handles that are open (this one included) keep working until closed;
        nobody can open the bus again. Call it once, from the owner.
        """
        unlink(self.path)

    @property
    def closed(self) -> bool:
        """True once ``close()`` was called."""
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise BusClosed(f"this handle on {self.path} is closed: open the bus again", path=self.path)

    def flush(self) -> None:
        """Write the mapped pages back to the file (``msync``): a disk-backed bus survives a power cut."""
        self._enter()
        try:
            assert self._mm is not None
            self._mm.flush()
        finally:
            self._leave()

    @property
    def capacity(self) -> int:
        """Ring size in bytes."""
        return self._layout.capacity

    @property
    def layout(self) -> Layout:
        """The static facts of the bus, as read from its header."""
        return self._layout

    def stats(self) -> Stats:
        """A snapshot of the header: fill level and the message and byte counters."""
        self._enter()
        try:
            return header_stats(self.path, self._layout, self._h64)
        finally:
            self._leave()

    def __enter__(self: B) -> B:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __reduce__(self) -> tuple[Any, ...]:
        self._check_open()
        return (_reopen, (type(self), self.path, self._codec, self._allow_shared))

    def __del__(self) -> None:
        # An exported view keeps the mapping alive; the GC releases it later.
        # (close keeps the mapping if a thread of this process holds one of its
        # locks: see there.)
        with contextlib.suppress(Exception):
            self.close()

    def __repr__(self) -> str:
        name = type(self).__name__
        try:
            self._enter()
        except BusClosed:
            return f"<shmbus.{name} {self.path!r} closed>"
        try:
            return f"<shmbus.{name} {self.path!r} capacity={self.capacity} {self._describe()}>"
        finally:
            self._leave()

    def _describe(self) -> str:
        return ""
