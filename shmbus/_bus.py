"""A bus file's lifecycle: path rules, create, open, map, close, unlink, pickle.

Rule: this module owns the file and its mapping and nothing of the ring's
logic. ``Bus`` is the base of ``Queue`` and ``Topic``; it hands them the
mapped views (``_h64``/``_h32`` over the header, ``_ring`` over the ring), the
validated ``Layout`` and the opened semaphores. Like
``multiprocessing.shared_memory``: ``close()`` is per handle and idempotent,
``unlink()`` destroys the bus for every process, a failed constructor cleans up
after itself, and a handle pickles as its path and re-opens on the other side.

A new bus is built under a temporary name and hard-linked into place, so
another process never sees a half-written header, and a file already at the
path is never overwritten.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import logging
import mmap
import multiprocessing.util
import os
import secrets
import stat
import threading
import time
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, TypeVar

from . import _mutex, _recovery, _ring, _semlife, _sync
from ._codec import DEFAULT_CODEC, Codec
from ._errors import (
    BusClosed,
    BusExists,
    BusNotFound,
    CorruptBus,
    ForeignBus,
    Full,
    IncompatibleBus,
    MessageTooLarge,
    NoSpace,
    NotABus,
    ShmbusError,
)
from ._format import (
    BOOT_ID,
    HEADER_MIN,
    KIND_NAMES,
    LOCKS,
    M_RECOVERY,
    MAGIC,
    Q_BYTES_IN,
    Q_BYTES_OUT,
    Q_HEAD,
    Q_LAST_RECOVERY,
    Q_NEXT_SEQ,
    Q_RECOVERIES,
    Q_TAIL,
    Q_TAIL_SEQ,
    Q_TIME_SAMPLES,
    REC_RAW,
    SAMPLE_EVERY,
    SAMPLE_WRITING,
    TIME_SAMPLES,
    VERSION,
    Layout,
    build_header,
    current_boot_id,
    max_payload,
    parse_header,
    peek_ids,
)
from ._zerocopy import Reservation, View

__all__ = [
    "Bus",
    "Stats",
    "resolve_path",
    "read_layout_of",
    "unlink",
    "SHM_DIR",
    "ALL_ROLES",
    "read_layout",
    "header_stats",
    "record_time",
    "oldest_age",
]

log = logging.getLogger("shmbus")
_U64 = (1 << 64) - 1  # a statistic counter wraps like a u64 (a damaged header may hold any value)

SHM_DIR = "/dev/shm"
# Every semaphore role any kind of bus may own; unlink removes them all
# (head, tail and subs: the lock semaphores of format 1 buses, which had no mutexes).
ALL_ROLES = ["items", "space", "slots", "head", "tail", "subs"]

B = TypeVar("B", bound="Bus")
# Mappings whose locks a thread of this process held when their handle closed
# or was collected (see Bus.close and Bus.__del__).
_PINNED: list[object] = []
_Block = TypeVar("_Block", Reservation, View)
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


def _open_fd(path: str, flags: int) -> int:
    """``os.open`` with the errors turned into shmbus's, naming the path and the fix."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise BusNotFound(
            f"no bus at {path}: create it first (shmbus.Queue.create or `shmbus create`)",
            path=path,
        ) from None
    except PermissionError as e:
        raise PermissionError(
            e.errno, f"permission denied opening bus {path}: ask its owner to share it "
            "(create with mode=0o660 and a common group) or run as that user", path,
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
    fd = _open_fd(real, os.O_RDONLY)
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
        fd = _open_fd(real, os.O_RDWR)  # write access: to take turns with other removers (_semlife)
    except PermissionError:
        fd = _open_fd(real, os.O_RDONLY)
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


@dataclass(frozen=True)
class Stats:
    """A snapshot of a bus's header, as returned by ``stats()``.

    Counters are read without a lock, so they are consistent only to within
    the messages in flight at that instant.
    """

    path: str
    kind: str
    format_version: int
    bus_id: str
    capacity: int
    maxsize: int
    max_subscribers: int
    used_bytes: int
    messages: int
    put_count: int
    get_count: int
    bytes_in: int
    bytes_out: int
    created_ns: int
    recoveries: int = 0  # lock repairs done since create (a holder died, or was cut short)

    @property
    def fill(self) -> float:
        """Fraction of the ring's bytes in use, 0.0 to 1.0."""
        return self.used_bytes / self.capacity


def header_stats(path: str, lay: Layout, h: memoryview) -> Stats:
    """The ``Stats`` of a bus from its header viewed as u64 (a live mapping or a copy read with pread)."""
    head, tail, put, got = h[Q_HEAD], h[Q_TAIL], h[Q_NEXT_SEQ], h[Q_TAIL_SEQ]
    return Stats(
        path=path,
        kind=KIND_NAMES[lay.kind],
        format_version=VERSION,
        bus_id=lay.bus_id,
        capacity=lay.capacity,
        maxsize=lay.maxsize,
        max_subscribers=lay.max_subscribers,
        used_bytes=min(max(head - tail, 0), lay.capacity),
        messages=max(put - got, 0),
        put_count=put,
        get_count=got,
        bytes_in=h[Q_BYTES_IN],
        bytes_out=h[Q_BYTES_OUT],
        created_ns=lay.created_ns,
        recoveries=h[Q_RECOVERIES],
    )


def record_time(h: memoryview, seq: int) -> None:
    """Note in the time samples that message ``seq`` (a multiple of 256) is published now.

    Producers call it under the head lock, for one message in 256: the
    policy (which entries) is in the ``_format`` docstring.
    """
    now = time.time_ns()
    _store_sample(h, Q_TIME_SAMPLES + ((seq // SAMPLE_EVERY) & 3) * 2, seq, now)
    for k in range(1, TIME_SAMPLES - 3):
        if seq % (SAMPLE_EVERY << 3 * k):
            break
        _store_sample(h, Q_TIME_SAMPLES + (3 + k) * 2, seq, now)


def _store_sample(h: memoryview, i: int, seq: int, now: int) -> None:
    # seq last: a reader that sees the same seq before and after reading the time has a whole entry.
    h[i] = SAMPLE_WRITING
    h[i + 1] = now
    h[i] = seq


def oldest_age(h: memoryview, now_ns: int) -> tuple[float | None, float | None] | None:
    """Bounds on the age of the oldest message, in seconds: ``(at_least, at_most)``; None if empty.

    Read from the time samples of the header ``h`` (viewed as u64, a live
    mapping or a copy). Either bound is None when no sample gives it; they
    are equal when the oldest message carries a sample itself.
    """
    tail_seq, next_seq = h[Q_TAIL_SEQ], h[Q_NEXT_SEQ]
    if next_seq <= tail_seq:
        return None
    before: tuple[int, int] | None = None  # newest sample at or before the oldest message
    after: tuple[int, int] | None = None  # oldest sample after it, among the messages held
    for i in range(Q_TIME_SAMPLES, Q_TIME_SAMPLES + 2 * TIME_SAMPLES, 2):
        seq, t = h[i], h[i + 1]
        if seq != h[i] or seq == SAMPLE_WRITING or not t:
            continue  # being written (or never)
        if seq <= tail_seq:
            if before is None or seq > before[0]:
                before = (seq, t)
        elif seq < next_seq and (after is None or seq < after[0]):
            after = (seq, t)
    at_most = max(now_ns - before[1], 0) / 1e9 if before else None
    at_least = max(now_ns - after[1], 0) / 1e9 if after else None
    if before is not None and before[0] == tail_seq:
        at_least = at_most
    return at_least, at_most


def _reopen(cls: type[Bus], path: str, codec: Codec, allow_shared: bool = False) -> Bus:
    return cls.open(path, codec=codec, allow_shared=allow_shared)


def _refuse_foreign(path: str, st: os.stat_result) -> None:
    """Raise ``ForeignBus`` for a bus another user owns or anyone may write."""
    if st.st_uid != os.geteuid():
        raise ForeignBus(
            f"{path} belongs to uid {st.st_uid}, not to you: a peer with write access can corrupt "
            "or stall a bus; if you share it on purpose, open it with allow_shared=True",
            path=path,
        )
    if st.st_mode & stat.S_IWOTH:
        raise ForeignBus(
            f"{path} is writable by every user (mode {stat.S_IMODE(st.st_mode):o}): make it private "
            "(chmod o-w, or create it with mode=0o600 / 0o660), or open it with allow_shared=True",
            path=path,
        )


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
            _chmod_sems(sems, mode)
            _write_new_file(tmp, layout, mode, real, preallocate)
            try:
                os.link(tmp, real)
                linked = True
            except FileExistsError:
                if not exist_ok:
                    raise BusExists(
                        f"a file already exists at {real}: open it with {cls.__name__}.open, "
                        "pass exist_ok=True, or remove it with `shmbus rm`",
                        path=real,
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
                _unlink_quiet(tmp)
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
        self._fd = _open_fd(real, os.O_RDWR)
        layout = read_layout(self._fd, real)
        if layout.kind != self._KIND:
            raise IncompatibleBus(
                f"{real} is a shmbus {KIND_NAMES[layout.kind]}, not a {KIND_NAMES[self._KIND]}: "
                f"open it with shmbus.{KIND_NAMES[layout.kind]}.open",
                path=real,
            )
        self._layout = layout
        st = os.fstat(self._fd)
        self._mode = stat.S_IMODE(st.st_mode)
        if not self._allow_shared:
            _refuse_foreign(real, st)
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
        self._check_locks()

    def _check_locks(self) -> None:
        """Refuse damaged lock bytes; re-initialize locks left from an earlier boot.

        A lock word is only meaningful in the boot that wrote it: a disk bus
        whose machine crashed may hold a lock word naming a thread of the last
        boot, which no kernel will ever mark dead. The first opener in a new
        boot resets the mutexes (under the boot byte, so once) and stores
        the boot id; nobody of the old boot can still be using them.
        """
        for role, m in self._mutexes.items():
            if not m.kind_ok():
                raise CorruptBus(
                    f"{self.path}: the {role} lock's bytes are damaged: run `shmbus check {self.path}`, "
                    "then remove the bus with `shmbus rm` and create it again",
                    path=self.path,
                )
        boot = current_boot_id()
        mm = self._mm
        assert mm is not None and self._part is not None
        if boot == b"\0" * 16 or mm[BOOT_ID : BOOT_ID + 16] == boot:
            return
        with self._part.boot_lock() as held:
            if held and mm[BOOT_ID : BOOT_ID + 16] != boot:
                log.warning("%s: last used in an earlier boot; resetting its locks", self.path)
                for m in self._mutexes.values():
                    m.reset()
                # A holder may have been cut off mid-section by the crash: the
                # next holder of each lock checks the counters.
                for _, _, repair in LOCKS[self._layout.kind]:
                    self._h32[repair] = 1
                mm[BOOT_ID : BOOT_ID + 16] = boot

    def _open_sems(self) -> dict[str, _sync.Sem]:
        bus_id = self._layout.bus_id
        try:
            sems, missing = _sync.open_sems(bus_id, self._ROLES_FOR(self._layout))
        except _sync.SemPermissionError as e:
            raise PermissionError(
                errno.EACCES, f"permission denied opening the semaphores of bus {self.path}: "
                "ask its owner to share it (mode=0o660 and a common group)", self.path,
            ) from e  # fmt: skip
        if missing:
            try:
                self._recreate(sems, missing)
            except BaseException:
                for s in sems.values():
                    s.close()
                raise
        if not self._allow_shared:
            # A stranger could have made these names first (after a reboot, say):
            # the same rule as for the file.
            for role, sem in sems.items():
                owner = _sync.sem_owner(sem)
                if owner is not None and owner != os.geteuid():
                    for s in sems.values():
                        s.close()
                    raise ForeignBus(
                        f"the {role} semaphore of {self.path} belongs to uid {owner}, not to you: "
                        "remove the bus's semaphores (`shmbus rm`) or open it with allow_shared=True",
                        path=self.path,
                    )
        return sems

    def _recreate(self, sems: dict[str, _sync.Sem], missing: list[str]) -> None:
        """Make the missing semaphores (a disk bus after a reboot), one opener at a time.

        Under the sems byte, an opener first takes up what an earlier one made,
        then makes the rest from the header's counters. Nothing is removed on
        this path, even on failure: another opener may already use it.
        """
        bus_id = self._layout.bus_id
        with _semlife.recreation_lock(self._fd, self.path):
            more, missing = _sync.open_sems(bus_id, missing)
            sems.update(more)
            if not missing:
                return
            log.warning("bus %s: semaphores %s were missing; recreating them", self.path, missing)
            initial = self._initial_sems(self._layout, self._queued())
            made = _sync.create_missing(bus_id, {r: initial[r] for r in missing}, 0o600)
            sems.update(made)
            _chmod_sems(made, self._mode)
            _semlife.record_identity(self._fd)

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

    def _make_locks(self) -> tuple[_recovery.Lock, ...]:
        """This kind's locks, in ``LOCKS`` order (the head lock first).

        The locks call back into the handle through a weak reference: a
        reference cycle would keep a dropped handle alive until the cyclic
        collector runs, and an anonymous queue is removed when its handle goes.
        """
        ref = weakref.ref(self)

        def repair(role: str) -> bool:
            bus = ref()
            return bus is not None and bus._repair(role)

        def count_recovery() -> None:
            bus = ref()
            if bus is not None:
                bus._count_recovery()

        return tuple(
            _recovery.Lock(role, self.path, self._mutexes[role], self._h32, idx, repair, count_recovery)
            for role, _, idx in LOCKS[self._KIND]
        )

    def _count_recovery(self) -> None:
        """A lock's repair is done: count it (a statistic: wraps)."""
        self._h64[Q_RECOVERIES] = (self._h64[Q_RECOVERIES] + 1) & _U64
        self._h64[Q_LAST_RECOVERY] = time.time_ns()

    def _reservation(
        self,
        nbytes: int,
        lock_deadline: float | None,
        room: Callable[[], tuple[int, int, int]],
        publish: Callable[[int, int], None],
        abandon: Callable[[], None],
        after: Callable[[], None] | None = None,
    ) -> Reservation:
        """A zero-copy write, for Queue and Topic alike: take the head lock and reserve.

        ``room()`` makes space and returns ``(start, head, seq)``; on commit the
        record header is stored and ``publish(seq, new_head)`` makes it
        visible; ``abandon()`` undoes ``room()``'s claims. The head lock is
        released at the end either way, then ``after()`` runs (a Topic wakes
        its subscribers there, outside the lock). Raises ``Full`` if the lock
        was not free by ``lock_deadline``.
        """
        lock = self._locks[0]
        self._enter()  # left when the block ends: close() waits for it
        try:
            if not lock.acquire(lock_deadline):
                raise Full(f"{self.path}: timed out waiting for the producer lock", path=self.path)
            start, head, seq = room()
            ring, cap = self._ring, self._layout.capacity
            off = _ring.begin(ring, cap, head, start, seq)

            def commit() -> None:
                try:
                    try:
                        publish(seq, _ring.commit(ring, cap, start, REC_RAW, seq, nbytes))
                    except BaseException as e:
                        lock.release_after(e)
                        raise
                    lock.release()
                    if after is not None and not self._closed:
                        after()
                finally:
                    self._leave()

            def drop() -> None:
                try:
                    try:
                        abandon()
                    except BaseException:
                        lock.abandon()
                        raise
                    lock.release()
                finally:
                    self._leave()

            return self._track(Reservation(ring[off : off + nbytes], commit, drop))
        except ShmbusError:  # ours: raised before any store
            try:
                lock.release()
            finally:
                self._leave()
            raise
        except BaseException:  # from anywhere (a signal handler): the next holder checks the counters
            try:
                lock.abandon()
            finally:
                self._leave()
            raise

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
                    f"{self._layout.capacity} bytes holds messages up to {limit} bytes: create the "
                    f"{type(self).__name__} with a larger capacity",
                    path=self.path, size=size, limit=limit,
                )  # fmt: skip

    def _repair(self, role: str) -> bool:
        """Mend what a holder of lock ``role`` left half-done (recovery hook, called holding it).

        Returns False if it cannot be done yet (it needs another lock that a
        live process holds); the lock's repair word then stays set.
        """
        return True

    def _reap(self, slot: int) -> None:
        """Undo what dead participant ``slot`` held besides locks (recovery hook)."""

    # -- crash recovery ------------------------------------------------------

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
        if force:
            for lk in self._locks:
                if lk.force_reset():
                    log.warning("%s: the %s lock was re-initialized by force", self.path, lk.role)
            rec = self._mutexes["recovery"]
            if rec.ghost() or rec.unrecoverable():
                rec.reset()  # it guards no counters: nothing to mend after it
                log.warning("%s: the recovery lock was re-initialized by force", self.path)
        for lk in self._locks:
            tid, died, pending = lk.state()
            if (died or (pending and not tid)) and not lk.owned():
                try:
                    lk.try_acquire()
                finally:
                    lk.release()
        part = self._part
        assert part is not None
        dead = part.under_recovery_lock(self._reap_dead)
        return 0 if dead is _recovery.NOT_TAKEN else dead

    def _reap_dead(self) -> int:
        """Under the recovery mutex: give back what dead participants held, free their slots."""
        part = self._part
        assert part is not None
        dead = part.dead_slots()
        if not dead:
            return 0
        pids = [part.pid_of(slot) for slot in dead]
        for slot in dead:
            self._reap(slot)
            part.free(slot)
        log.warning("%s: freed what dead process(es) %s held", self.path, pids)
        return len(dead)

    def _resync(self, *, fix_next: bool, gaps: bool = False, own_tail: bool = True) -> None:
        """Rebuild ``tail_seq`` (and with ``fix_next``, ``next_seq`` and an interrupted rebase).

        The writers store these counters one at a time; a writer killed between
        two stores leaves them apart. The records themselves carry their
        sequence numbers, so the counters are read back from them. The caller
        holds (or has inherited from the dead) the locks guarding what it fixes.
        Without ``own_tail`` (a Queue producer's repair, which does not hold the
        tail lock) ``tail_seq`` is left to the consumers: the records from a
        snapshot of ``tail`` to ``head`` cannot change under us, since only a
        producer overwrites records and we hold the producer lock.
        """
        h, cap = self._h64, self._layout.capacity
        head, tail = h[Q_HEAD], h[Q_TAIL]
        if fix_next and tail > head and tail - head <= cap:
            h[Q_HEAD] = head = tail  # a rebase moved tail, then died before moving head
        try:
            _ring.check_positions(head, tail, cap)
            if tail < head:
                if own_tail:
                    h[Q_TAIL_SEQ] = _ring.read(self._ring, cap, tail, head)[2]
                if fix_next:
                    last = _ring.last_seq(self._ring, cap, tail, head)
                    assert last is not None
                    if last >= _U64:  # a damaged record: next_seq cannot follow it
                        raise CorruptBus(f"a record in the ring has sequence number {last}, a u64's last")
                    # With ``gaps`` (a Topic) a sequence number handed out by a
                    # writer that died is skipped, never reused: a subscriber
                    # that saw it counts it as lost instead of missing a message.
                    h[Q_NEXT_SEQ] = max(h[Q_NEXT_SEQ], last + 1) if gaps else last + 1
            elif fix_next:
                if gaps and own_tail:
                    h[Q_TAIL_SEQ] = h[Q_NEXT_SEQ]
                else:
                    h[Q_NEXT_SEQ] = h[Q_TAIL_SEQ]
        except CorruptBus as e:
            log.warning("%s: cannot resync counters after a crash: %s", self.path, e)

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


def _write_new_file(tmp: str, layout: Layout, mode: int, real: str, preallocate: bool) -> None:
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


def _chmod_sems(sems: dict[str, _sync.Sem], mode: int) -> None:
    for sem in sems.values():
        _sync.chmod_sem(sem, mode)


def _unlink_quiet(p: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(p)
