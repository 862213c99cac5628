"""``Queue``: the multi-producer, multi-consumer work queue.

Rule: every message put is taken by exactly one ``get``, in the order the
puts committed. The locking protocol (also in ``docs/format.md``):

* ``head`` (robust mutex in the header, see ``_mutex``) serializes producers; under it a producer
  places, writes and commits records and advances ``head``/``next_seq``.
* ``tail`` (robust mutex in the header, see ``_mutex``) serializes consumers; under it a consumer copies
  records out and advances ``tail``/``tail_seq``.
* ``items`` counts committed records no consumer has claimed yet. A producer
  posts it once per record *after* publishing ``head`` (still under the head
  lock); a consumer takes one token per record *before* taking ``tail``, so a
  token always stands for a record that is already complete.
* ``space`` wakes a producer sleeping for free bytes. The producer sets
  ``space_waiting`` under ``tail`` after finding the ring still full; the
  consumer that frees bytes clears it and posts under the same lock, so the
  wake-up cannot be lost.
* ``slots`` (only with ``maxsize``) counts free message slots, as
  ``multiprocessing.Queue(maxsize)`` does.

Messages are encoded before any lock and decoded after every lock is
released: the critical sections hold only copies and counter updates.

The put side lives in ``_producer``, the get side in ``_consumer``; this module
assembles ``Queue`` from them and keeps its lifecycle, asyncio entry points,
crash recovery hooks and inspection.
"""

from __future__ import annotations

import logging
import os
import time
import weakref
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from . import _accel, _anon, _ring
from ._aio import QueueAio, QueueOps
from ._bus import Bus
from ._codec import Codec
from ._consumer import _Consuming
from ._file import unlink
from ._format import (
    KIND_QUEUE,
    Q_HEAD,
    Q_NEXT_SEQ,
    Q_TAIL,
    Q_TAIL_SEQ,
    RECORD_SIZE,
    Layout,
    max_payload,
    ring_capacity,
)
from ._producer import _Producing
from ._sync import SPIN_DEFAULT

if TYPE_CHECKING:
    from ._cfast import FastQueue

__all__ = ["Queue", "ANON_CAPACITY"]

log = logging.getLogger("shmbus")
_monotonic = time.monotonic
_REPAIR_WAIT = 2.0  # seconds healing waits for a live tail holder before giving up this round
# The ring of an anonymous queue, ``Queue()``: sparse (memory is used as messages pass), large
# enough for any everyday message, and four fit in the 64 MiB /dev/shm of a default container.
ANON_CAPACITY = "16MiB"


class Queue(_Producing, _Consuming, Bus):
    """A multi-producer, multi-consumer FIFO queue in a memory-mapped file.

    ``Queue(maxsize=0)`` makes an anonymous queue, as ``multiprocessing.Queue``
    does: pass it to child processes (as an argument, or to a ``Pool``
    initializer) with any start method. Its file lives in ``/dev/shm`` under
    a private name, removed when this handle is garbage-collected in the
    creating process or when that process exits; ``shmbus gc`` removes what
    a creator killed outright left behind. Keep the handle while children
    may still be starting: one that opens the queue after the name is gone
    gets ``BusNotFound``.

    A named queue is created once with ``Queue.create`` and opened anywhere
    with ``Queue.open``; both accept a file path, or a bare name that lives
    in ``/dev/shm``. Method names, ``block``/``timeout`` semantics and
    exceptions follow ``multiprocessing.Queue`` (see docs/migrating.md).

    Parameters:
        maxsize: the most messages the queue holds at once (0: bounded only
            by ``capacity``), as in ``multiprocessing.Queue(maxsize)``.
        capacity: ring size in bytes (keyword-only; default ``"16MiB"``, at
            least 4096, rounded up to a multiple of 4096): a message may be
            at most ``capacity - 16`` bytes once encoded.
        codec: msgpack options for this handle (see ``Codec``).

    Raises ``ValueError`` for a bad maxsize or capacity, ``NoSpace`` or
    ``OSError`` when ``/dev/shm`` cannot hold the file.

    Example::

        q = shmbus.Queue()
        q.put({"task": 1})
        assert q.get() == {"task": 1}

        with shmbus.Queue.create("jobs", capacity="16MiB") as named:
            named.unlink()
    """

    _KIND = KIND_QUEUE
    _ROLES = ("items", "space")
    _aio: QueueAio | None = None  # asyncio threads, started by the first async call that waits
    _fast: FastQueue | None = None  # the C fast path (_accel), when built and usable for this handle

    _finalizer: weakref.finalize[Any, Any] | None = None  # an anonymous queue's remover

    def __init__(self, maxsize: int = 0, *, capacity: int | str = ANON_CAPACITY,
                 codec: Codec | None = None) -> None:  # fmt: skip
        cap = ring_capacity(capacity)
        _check_maxsize(maxsize)
        name = _anon.new_name()
        self._create(
            name, capacity=cap, maxsize=maxsize, max_subscribers=0, exist_ok=False, mode=0o600,
            codec=codec, creator=_anon.identity(), into=self,
        )  # fmt: skip
        self._finalizer = weakref.finalize(self, _anon.remove_with_creator, self.path, os.getpid(), unlink)

    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        *,
        capacity: int | str = "64MiB",
        maxsize: int = 0,
        exist_ok: bool = False,
        mode: int = 0o600,
        codec: Codec | None = None,
        preallocate: bool = False,
    ) -> Queue:
        """Create a new named queue and open it.

        Every option is keyword-only: ``Queue.create("jobs", 6)`` is a
        ``TypeError`` (a message count is ``maxsize=6``, a size ``capacity=``).

        Parameters:
            path: a file path, or a bare name (kept in ``/dev/shm``).
            capacity: ring size in bytes, an int or a string such as ``"64MiB"``;
                at least 4096 (one page), rounded up to a multiple of 4096. A
                message may be at most ``capacity - 16`` bytes once encoded.
            maxsize: the most messages the queue holds at once (0: bounded only
                by ``capacity``), as in ``multiprocessing.Queue(maxsize)``.
            exist_ok: open the bus already at ``path`` instead of failing.
            mode: permission bits of the file and semaphores (0o660 to share
                with your group).
            codec: msgpack options for this handle (see ``Codec``).
            preallocate: reserve the file's space now (``posix_fallocate``):
                a full file system then fails here with ``NoSpace`` instead of
                killing a later put with SIGBUS. Without it, a file system with
                less room than the bus logs a warning.

        Raises ``BusExists`` (unless ``exist_ok``), ``NoSpace``, ``PermissionError``, and
        ``ValueError`` for a bad capacity or maxsize.
        """
        cap = ring_capacity(capacity)
        _check_maxsize(maxsize)
        return cls._create(
            path, capacity=cap, maxsize=maxsize, max_subscribers=0,
            exist_ok=exist_ok, mode=mode, codec=codec, preallocate=preallocate,
        )  # fmt: skip

    def join_thread(self) -> None:
        """Do nothing: there is no feeder thread to wait for.

        ``multiprocessing.Queue`` buffers puts in a background thread, and
        ``join_thread()`` waits for it to flush. A shmbus ``put`` has written
        the message into shared memory before it returns, so the usual
        ``q.close(); q.join_thread()`` shutdown works unchanged and waits for
        nothing.
        """

    def cancel_join_thread(self) -> None:
        """Do nothing: there is no feeder thread, so nothing buffered can be lost at exit.

        With ``multiprocessing.Queue`` this lets a process exit without
        flushing its buffered puts (which are then lost). A shmbus ``put``
        is in shared memory when it returns: a process may exit at once.
        """

    # -- Bus hooks -------------------------------------------------------------

    @classmethod
    def _ROLES_FOR(cls, layout: Layout) -> list[str]:
        return [*cls._ROLES, "slots"] if layout.maxsize else list(cls._ROLES)

    @classmethod
    def _initial_sems(cls, layout: Layout, queued: int) -> dict[str, int]:
        init = {"items": queued, "space": 0}
        if layout.maxsize:
            init["slots"] = max(layout.maxsize - queued, 0)
        return init

    def _queued(self) -> int:
        h = self._h64
        # At most what the ring can hold: counters from a corrupt header must not
        # become a huge semaphore count (ValueError) or a loop posting tokens.
        return min(max(h[Q_NEXT_SEQ] - h[Q_TAIL_SEQ], 0), self._layout.capacity // RECORD_SIZE)

    def _setup(self) -> None:
        self.spin = SPIN_DEFAULT
        self._kept = []
        self._in_hand = []
        s = self._sems
        self._locks = self._make_locks()
        self._head_lock, self._tail_lock = self._locks
        self._items = s["items"]
        self._space = s["space"]
        self._slots = s.get("slots")
        self._cap = self._layout.capacity
        self._max_payload = max_payload(self._cap)
        self._encode = self._codec.encode
        self._finish = self._codec.finish
        self._ro = self._layout.ring_offset
        _accel.warn_once_if_pure()
        sem_names = (self._items.name, self._space.name)
        # Codec is public; what the C path needs of it (its msgpack callables) is not API.
        codec_parts = self._codec._c_parts()  # noqa: SLF001
        self._fast = None if self._slots is not None else _accel.queue_fast_path(  # C: no maxsize
            self._mm, self._layout, sem_names, codec_parts, self._max_payload
        )

    def _describe(self) -> str:
        return f"qsize={self.qsize()}"

    # -- asyncio (the mechanism is in _aio) -------------------------------------

    async def aget(self, timeout: float | None = None) -> Any:
        """``get`` for asyncio: wait for the oldest message without blocking the event loop.

        Parameters:
            timeout: seconds to wait at most (None: for ever).

        Raises ``Empty`` when nothing arrived in time, ``BusClosed`` if the
        handle is closed meanwhile, ``CorruptBus`` as ``get`` does. Returns the
        message. A cancelled ``aget`` consumes nothing: the message stays for
        the next ``get``.
        """
        return await self._async().get(timeout)

    async def aget_many(self, max_messages: int, timeout: float | None = None) -> list[Any]:
        """``get_many`` for asyncio: wait for the first message, return 1 to ``max_messages``.

        Parameters:
            max_messages: the most messages to return (at least 1).
            timeout: seconds to wait for the first one at most (None: for ever).

        Raises ``Empty`` when nothing arrived in time, ``BusClosed``, and
        ``DecodeError`` as ``get_many`` does. Cancelled, it consumes nothing.
        """
        return await self._async().get_many(max_messages, timeout)

    async def aput(self, obj: Any, timeout: float | None = None) -> None:
        """``put`` for asyncio: wait for space without blocking the event loop.

        Parameters:
            obj: the message.
            timeout: seconds to wait for space at most (None: for ever).

        Raises ``Full`` when no space came in time, ``EncodeError``,
        ``MessageTooLarge``, ``BusClosed``. Puts waiting for space go in one
        at a time, in the order they were called. If cancelled while waiting
        its turn, nothing is sent; once its turn came the put completes anyway.
        """
        await self._async().put([self._encode(obj)], timeout)

    async def aput_many(self, objs: Iterable[Any], timeout: float | None = None) -> None:
        """``put_many`` for asyncio: put every object, in order, waiting for space without blocking.

        Parameters:
            objs: the messages.
            timeout: seconds to wait for space at most (None: for ever).

        Raises ``Full`` (its ``sent`` says how many went in), ``EncodeError``
        or ``MessageTooLarge`` (nothing sent), ``BusClosed``. If cancelled,
        the messages that fitted at once stay in; the rest are sent only if
        their turn to wait for space had already come (see docs/asyncio.md).
        """
        encoded = [self._encode(o) for o in objs]
        if encoded:
            await self._async().put(encoded, timeout)

    def _async(self) -> QueueAio:
        aio = self._aio
        if aio is None or aio.pid != os.getpid():
            self._check_open()
            aio = self._aio = QueueAio(self.path, self._aio_ops())
        return aio

    def _aio_ops(self) -> QueueOps:
        """The operations the asyncio layer may perform on this handle (see ``QueueOps``)."""
        return QueueOps(
            items=self._items,
            claim=self._claim_slot,
            take_one=self._take_held_one,
            take=self._take_held,
            heal=self._heal_outside,
            check=self._check_batch,
            put_ready=self._put_ready,
            put=self._put,
        )

    def close(self) -> None:
        """Release this handle, after stopping its asyncio threads; the queue stays.

        Pending ``aget``/``aput`` calls raise ``BusClosed``. Idempotent.
        """
        aio, self._aio = self._aio, None
        if aio is not None:
            aio.close()
        self._drop_fast_path()  # it holds the mapping: before the mapping closes
        super().close()

    def _drop_fast_path(self) -> None:
        """Use pure Python from now on (also the benchmark's "pure" rows)."""
        fast, self._fast = self._fast, None
        if fast is not None:
            fast.close()

    # -- crash recovery hooks ------------------------------------------------

    def _repair(self, role: str) -> bool:
        if role == "tail":
            self._resync(fix_next=False)
            return True
        # A producer died under the head lock (or was cut short): counters may be
        # half-stored and records published without their items tokens. Only
        # producer fields are mended, so no tail lock is needed: a consumer
        # paused while holding it must not hold up every producer.
        self._resync(fix_next=True, own_tail=False)
        self._reconcile_tokens()
        return True

    def _reconcile_tokens(self) -> None:
        """Post the items tokens that records lack (under the head lock, in a repair).

        Live consumers between taking tokens and recording them, or taking
        records meanwhile, make this over-count, which is harmless: a token
        without a record is dropped. It never under-counts: a consumer takes
        a token before it records it, and records one before it commits.
        """
        assert self._part is not None
        records = self._queued()
        have = self._items.value + self._part.live_tokens()
        for _ in range(records - have):
            self._items.release()
        self._reconcile_slots()

    def _reconcile_slots(self) -> None:
        """With ``maxsize``: post the free-slot tokens a dead process took with it.

        A producer killed after taking a slot, or a consumer killed before
        giving its slots back, would otherwise shrink the queue for ever.
        A live consumer between its commit and its slot post makes this
        over-count by its batch: the bound is then exceeded by that much once.
        """
        slots = self._slots
        if slots is not None:
            for _ in range(self._layout.maxsize - self._queued() - slots.value):
                slots.release()

    def _heal(self) -> None:
        """After each empty slice of a consumer's wait: recover dead holders, then lost tokens.

        A process interrupted or killed between taking or posting an items
        token and recording it can leave records without tokens: the queue
        holds messages while ``items`` is 0. Posting what is missing heals it;
        posting one too many is harmless (a token without a record is dropped).
        """
        self.recover()
        if self._items.value or not self._queued():
            return
        part = self._part
        assert part is not None
        # Recovery mutex first, then the tail lock: the order claim() and recover() use.
        part.under_recovery_lock(self._tail_lock.run, _monotonic() + _REPAIR_WAIT, self._heal_tokens)

    def _heal_outside(self) -> None:
        """``_heal``, for a thread waiting outside any call (the asyncio waiter): ``close()`` waits for it."""
        self._enter()
        try:
            self._heal()
        finally:
            self._leave()

    def _heal_tokens(self) -> None:
        """Under the recovery mutex and the tail lock: post the items tokens records lack."""
        part = self._part
        assert part is not None
        missing = self._queued() - part.live_tokens() - self._items.value
        if missing > 0:
            log.warning("%s: %d messages had no items token; healing", self.path, missing)
            for _ in range(missing):
                self._items.release()

    def _reap(self, slot: int) -> None:
        assert self._part is not None
        self._reconcile_slots()
        # Tokens a dead consumer took and never used go back (at worst one too many);
        # no more than the ring's records, whatever a damaged table says.
        for _ in range(min(self._part.tokens_of(slot), self._layout.capacity // RECORD_SIZE)):
            self._items.release()

    # -- inspection ----------------------------------------------------------

    def qsize(self) -> int:
        """Messages in the queue now (a snapshot: other processes change it at once)."""
        self._enter()
        try:
            return self._queued()
        finally:
            self._leave()

    def empty(self) -> bool:
        """True if the queue holds no message now (a snapshot)."""
        return self.qsize() == 0

    def full(self) -> bool:
        """True if a small message would not fit now: ``maxsize`` reached or no free bytes."""
        self._enter()
        try:
            maxsize = self._layout.maxsize
            if maxsize and self._queued() >= maxsize:
                return True
            h = self._h64
            return _ring.place(h[Q_HEAD], h[Q_TAIL], self._cap, 1) < 0
        finally:
            self._leave()

    @property
    def spin_us(self) -> float:
        """Microseconds a waiting ``get`` polls before it sleeps (default 50; 0: sleep at once).

        Polling saves the kernel's wake-up (tens of microseconds) when the
        producer is on another core; each poll yields the CPU, so an idle wait
        costs little. Set it per handle: ``q.spin_us = 0``.
        """
        return self.spin * 1e6

    @spin_us.setter
    def spin_us(self, value: float) -> None:
        if value < 0:
            raise ValueError("spin_us must be 0 or more")
        self.spin = value / 1e6

    @property
    def maxsize(self) -> int:
        """The message bound set at create (0: bounded only by capacity)."""
        return self._layout.maxsize


def _check_maxsize(maxsize: object) -> None:
    if isinstance(maxsize, bool) or not isinstance(maxsize, int) or not 0 <= maxsize < 1 << 31:
        raise ValueError(f"maxsize must be an int from 0 to 2**31-1, got {maxsize!r}")
