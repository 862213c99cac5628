"""``Topic``: one-to-many broadcast where a slow subscriber never holds up a publisher.

Rule: publishers never wait for subscribers, and subscribers take no lock a
publisher waits on. The protocol (also in ``docs/format.md``; the reader's
side, the ``Subscription``, is in ``_subscription``):

* Publishers serialize on the ``head`` semaphore. When the ring is full a
  publisher drops the oldest records: it stores the new ``tail`` (and
  ``tail_seq``) *before* it writes a byte over them, then writes the record,
  its header last, then ``next_seq`` and ``head``.
* A subscriber reads without a lock and trusts a copy only if ``tail`` has
  not passed it once the copy is done (the seqlock of ``_subscription``):
  hence ``tail`` moves before any byte of what it drops is overwritten.
* Wake-up: each subscriber slot ``i`` has a semaphore ``sub<i>`` and a wait
  flag byte. A subscriber about to sleep sets its flag, fences and re-checks
  ``head`` (``Subscription._wait``); after every publish the publisher reads
  all flags in one slice, and for each flagged slot clears the flag, then
  posts its semaphore, so every waiting subscriber wakes, not just one, and
  later publishes pay nothing for a subscriber already woken. The flag and
  ``head`` are ordered by full fences on both sides.
* Subscriber slots are claimed and freed under the ``subs`` semaphore, which
  only subscribers take (``subscribe``/``close``). A slot whose process is
  gone is reclaimed when the table is full.
* A ``Subscription`` sees this handle only through the ``TopicDoor`` that
  ``subscribe`` gives it (``_door``): the views, its slot, and named operations.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Callable, Literal

from . import _accel, _faults, _last, _ring
from ._aio import checkpoint
from ._bus import Bus
from ._codec import Codec, Encoded, as_bytes_view
from ._errors import Empty, SequenceAhead, TooManySubscribers
from ._format import (
    KIND_TOPIC,
    MAX_SUBSCRIBERS,
    Q_BYTES_IN,
    Q_HEAD,
    Q_NEXT_SEQ,
    Q_TAIL,
    Q_TAIL_SEQ,
    REC_RAW,
    S_ATTACHED,
    S_CURSOR,
    S_OWNER,
    S_STATE_PID,
    SUBSCRIBER_SIZE,
    U64_MAX,
    WAIT_FLAGS,
    Layout,
    max_payload,
    ring_capacity,
    subscriber_pid,
    subscriber_state,
    subscriber_word,
)
from ._recovery import pid_alive
from ._stats import record_time, subscriber_rows
from ._subscription import Subscription, TopicDoor
from ._sync import SPIN_DEFAULT
from ._zerocopy import Reservation, stored_batch

if TYPE_CHECKING:
    from ._cfast import FastTopic

__all__ = ["Topic"]

log = logging.getLogger("shmbus")

# FastTopic's results for "published, nothing left to do" and "published, and a subscriber waits".
_PUB_DONE = 1 << _accel.PUB_SHIFT | _accel.PUT_DONE
_PUB_WAKE = _PUB_DONE | _accel.PUB_WAKE


class Topic(Bus):
    """A broadcast topic: every subscriber sees every message; the ring drops the oldest.

    Example::

        with shmbus.Topic.create("metrics", capacity="1MiB") as t:
            sub = t.subscribe()
            t.publish({"cpu": 0.5})
            assert sub.get() == {"cpu": 0.5}
            sub.close()
            t.unlink()
    """

    _KIND = KIND_TOPIC
    _ROLES = ()  # the wake-up semaphores sub<i> are added per layout
    _fast: FastTopic | None = None  # the C fast path (_accel), when built

    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        *,
        capacity: int | str = "16MiB",
        exist_ok: bool = False,
        mode: int = 0o600,
        max_subscribers: int = 32,
        codec: Codec | None = None,
        preallocate: bool = False,
    ) -> Topic:
        """Create a new topic and open it.

        Every option is keyword-only, as in ``Queue.create``.

        Parameters:
            path: a file path, or a bare name (kept in ``/dev/shm``).
            capacity: ring size in bytes, an int or a string such as ``"16MiB"``;
                at least 4096 (one page), rounded up to a multiple of 4096. It
                bounds how far behind a subscriber may fall before it loses messages.
            exist_ok: open the topic already at ``path`` instead of failing.
            mode: permission bits of the file and semaphores.
            max_subscribers: subscriber slots (1 to 256), fixed at create.
            codec: msgpack options for this handle (see ``Codec``).
            preallocate: reserve the file's space now (``posix_fallocate``):
                a full file system then fails here with ``NoSpace`` instead of
                killing a later put with SIGBUS. Without it, a file system with
                less room than the bus logs a warning.

        Raises ``BusExists`` (unless ``exist_ok``), ``NoSpace``, ``PermissionError``, and
        ``ValueError`` for a bad capacity or slot count.
        """
        cap = ring_capacity(capacity)
        if not isinstance(max_subscribers, int) or not 1 <= max_subscribers <= MAX_SUBSCRIBERS:
            raise ValueError(f"max_subscribers must be from 1 to {MAX_SUBSCRIBERS}, got {max_subscribers!r}")
        return cls._create(
            path, capacity=cap, maxsize=0, max_subscribers=max_subscribers,
            exist_ok=exist_ok, mode=mode, codec=codec, preallocate=preallocate,
        )  # fmt: skip

    # -- Bus hooks -------------------------------------------------------------

    @classmethod
    def _ROLES_FOR(cls, layout: Layout) -> list[str]:
        # Every subscriber slot's wake-up semaphore is made with the topic,
        # exclusively: a name squatted in /dev/shm then fails create, instead
        # of letting a stranger hold or flood a subscriber's wake-ups.
        return [*cls._ROLES, *(f"sub{i}" for i in range(layout.max_subscribers))]

    @classmethod
    def _initial_sems(cls, layout: Layout, queued: int) -> dict[str, int]:
        return {f"sub{i}": 0 for i in range(layout.max_subscribers)}

    def _queued(self) -> int:
        h = self._h64
        return max(h[Q_NEXT_SEQ] - h[Q_TAIL_SEQ], 0)

    def _setup(self) -> None:
        self._locks = self._make_locks()
        self._head_lock, self._subs_lock = self._locks
        self._cap = self._layout.capacity
        self._max_payload = max_payload(self._cap)
        self._encode = self._codec.encode
        n = self._layout.max_subscribers
        self._flags_end = WAIT_FLAGS + n
        self._no_flags = bytes(n)
        self._wakers = [self._sems[f"sub{i}"] for i in range(n)]
        self._subscriptions: list[Subscription] = []
        _accel.warn_once_if_pure()
        # Codec is public; what the C path needs of it (its msgpack callables) is not API.
        codec_parts = self._codec._c_parts()  # noqa: SLF001
        self._fast = _accel.topic_fast_path(self._mm, self._layout, codec_parts, self._max_payload)
        self._last_pos = 0  # a record boundary last() found: where its next walk may start

    def _describe(self) -> str:
        h = self._h64
        return f"published={h[Q_NEXT_SEQ]}"

    def close(self) -> None:
        """Close this handle and every subscription made through it; the topic stays."""
        for sub in list(getattr(self, "_subscriptions", ())):
            sub.close()
        self._wakers = []
        self._drop_fast_path()  # it holds the mapping: before the mapping closes
        super().close()

    def _drop_fast_path(self) -> None:
        """Use pure Python from now on (the subscriptions' doors hold it too: closed, it hands back)."""
        fast, self._fast = self._fast, None
        if fast is not None:
            fast.close()

    # -- publishing ------------------------------------------------------------

    def publish(self, obj: Any) -> None:
        """Publish ``obj`` to every subscriber; never waits for them.

        When the ring is full the oldest messages are dropped. Raises
        ``EncodeError`` or ``MessageTooLarge`` (nothing published).
        """
        fast = self._fast
        if fast is not None:
            # C: the whole publish, encoding included, when obj is of a plain type,
            # the head lock is free and the record needs no wrap; else Python's.
            r = fast.publish_obj(obj)
            if r == _PUB_DONE:
                return
            if r == _PUB_WAKE:
                self._wake_if_waiting()
                return
            if r != _accel.PUT_PYTHON:  # (C tried it: the lock is busy, or a wrap)
                self._publish([self._encode(obj)], False)
                return
        self._publish_one(self._encode(obj))

    def _publish_one(self, enc: Encoded) -> None:
        """Publish one encoded message: C when it can (with Python's encoding), else Python."""
        fast = self._fast
        if fast is not None:
            r = fast.publish(*enc)
            if r == _PUB_DONE:
                return
            if r == _PUB_WAKE:
                self._wake_if_waiting()
                return
        self._publish([enc], False)

    def publish_many(self, objs: Iterable[Any]) -> None:
        """Publish every object of ``objs``, in order, in one lock round."""
        fast = self._fast
        if fast is not None and type(objs) is list and objs and self._publish_objs(fast, objs):
            return
        batch = [self._encode(o) for o in objs]
        if batch:
            self._publish(batch)

    async def apublish(self, obj: Any) -> None:
        """``publish`` for asyncio; like ``publish`` it never waits for subscribers.

        Parameters:
            obj: the message.

        Raises ``EncodeError`` or ``MessageTooLarge`` (nothing published),
        ``BusClosed``. It takes only the short publisher lock, on the loop's
        thread, and yields to the loop now and then (see docs/asyncio.md).
        """
        await checkpoint()
        self.publish(obj)

    async def apublish_many(self, objs: Iterable[Any]) -> None:
        """``publish_many`` for asyncio: publish every object of ``objs``, in order, in one lock round.

        Parameters:
            objs: the messages.

        Raises ``EncodeError`` or ``MessageTooLarge`` (nothing published), ``BusClosed``.
        """
        await checkpoint()
        self.publish_many(objs)

    def publish_bytes(self, data: bytes) -> None:
        """Publish raw bytes with no msgpack framing (subscribers get ``bytes``)."""
        body = data if type(data) is bytes else as_bytes_view(data)
        self._publish_one((REC_RAW, b"", body, len(body)))

    def publish_records(self, records: Iterable[tuple[str, bytes | memoryview]]) -> None:
        """Publish messages in their stored form, ``(kind, data)`` pairs, in order, with no encoding.

        As ``Queue.put_records``: ``kind`` is a ``Record.kind``, a ``Record``
        qualifies (its ``seq`` is ignored). Raises ``ValueError`` for an
        unknown kind, ``MessageTooLarge`` (nothing published).
        """
        batch = stored_batch(records)
        if batch:
            self._publish(batch)

    def _publish(self, batch: list[Encoded], c: bool = True) -> None:
        """Publish ``batch`` in one lock round: first in C (unless ``c`` is false: it just tried)."""
        self._enter()
        try:
            self._check_sizes(item[3] for item in batch)
            fast = self._fast
            k = self._publish_fast(fast.publish_many, batch) if c and fast is not None else -1
            if k < len(batch):
                self._write_rest(batch[k:] if k > 0 else batch, k >= 0)  # (k >= 0: C left the lock held)
        finally:
            self._leave()

    def _publish_objs(self, fast: FastTopic, objs: list[Any]) -> bool:
        """publish_many's common case in C, encoding included; False if C left it all to Python.

        C encodes the whole list with one msgspec call and publishes what needs
        no wrap (msgspec installed, every message of plain types); Python
        encodes whatever is left past the first records C wrote, the same bytes.
        """
        self._enter()
        try:
            k = self._publish_fast(fast.publish_objs, objs)
            if k < 0:
                return False  # nothing published, the lock free: Python encodes and publishes
            if k < len(objs):
                try:  # (no EncodeError or MessageTooLarge can come: C encoded them all)
                    rest = [self._encode(o) for o in objs[k:]]
                except BaseException as e:
                    self._head_lock.release_after(e)
                    raise
                self._write_rest(rest, True)
            return True
        finally:
            self._leave()

    def _write_rest(self, batch: list[Encoded], held: bool) -> None:
        """Write ``batch`` under the head lock (``held``: C left it held), release it, wake subscribers."""
        lock = self._head_lock
        try:
            if not held:
                lock.acquire(None)  # (a BusClosed from its wait: nothing published)
            self._write(batch)
        except BaseException as e:
            lock.release_after(e)
            raise
        lock.release()  # a full fence: the new head is visible before we read the flags
        self._wake_if_waiting()

    def _publish_fast(self, call: Callable[[list[Any]], int], batch: list[Any]) -> int:
        """C's part of a batch (``call``: FastTopic's publish_many or publish_objs): all of ``batch``
        published (its length), the lock left held with the first k published (k), or nothing
        done and the lock free (-1)."""
        lock = self._head_lock
        had = lock.mutex.expect()  # C may hand it over held (PUT_HELD)
        try:
            r = call(batch)
            code = r & 3
            if code != _accel.PUT_HELD:
                lock.mutex.settle(had)  # C released it, or never took it
        except BaseException:
            # A handler's exception as C returned the lock to us: free it if we
            # hold it (abandon does nothing otherwise), and the next holder checks.
            lock.abandon()
            raise
        if code == _accel.PUT_DONE:
            if r & _accel.PUB_WAKE:
                self._wake_if_waiting()
            return len(batch)
        return r >> _accel.PUB_SHIFT if code == _accel.PUT_HELD else -1

    def _write(self, batch: list[Encoded]) -> None:
        if _faults.armed:
            _faults.hit("publish:after-lock")
        ring, cap, h = self._ring, self._cap, self._h64
        # The whole batch, before anything is stored: a head or next_seq a damaged
        # header put near 2**64 raises CorruptBus with nothing written.
        _ring.check_room(h[Q_HEAD], h[Q_NEXT_SEQ], cap, [item[3] for item in batch])
        for kind, prefix, body, n in batch:
            start, head, seq = self._make_room(n)
            new_head = _ring.write(ring, cap, head, start, kind, seq, prefix, body)
            self._commit_record(seq, n, new_head)

    def _make_room(self, n: int) -> tuple[int, int, int]:
        """Under the head lock: drop the oldest records until ``n`` bytes fit; return (start, head, seq).

        The new tail is stored *before* the caller overwrites anything:
        subscribers re-check it after copying, which is how they detect a lap.
        """
        h = self._h64
        head, tail = h[Q_HEAD], h[Q_TAIL]
        _ring.check_positions(head, tail, self._cap)
        seq = h[Q_NEXT_SEQ]
        _ring.check_room(head, seq, self._cap, [n])  # before the first store (reserve has no batch check)
        start, new_tail, _ = _ring.evict(self._ring, self._cap, tail, head, n)
        if new_tail != tail:
            # Read, not counted: a sequence number skipped after a publisher's
            # death leaves a gap that counting the dropped records would miss.
            h[Q_TAIL_SEQ] = seq if new_tail >= head else _ring.seq_at(self._ring, self._cap, new_tail)
            h[Q_TAIL] = new_tail
            if _faults.armed:
                _faults.hit("publish:after-evict")
        return start, head, seq

    def _commit_record(self, seq: int, n: int, new_head: int) -> None:
        """Publish one written record: each goes out at once, so readers never wait for a batch."""
        h = self._h64
        h[Q_NEXT_SEQ] = seq + 1
        if _faults.armed:
            _faults.hit("publish:mid-publish")
        h[Q_BYTES_IN] = (h[Q_BYTES_IN] + n) & U64_MAX  # a statistic: wraps (the Queue's bytes_out too)
        h[Q_HEAD] = new_head
        if not seq & 255:  # _format.sample_due(seq, 1), inline: a per-message path
            record_time(h, seq)

    def reserve(self, nbytes: int) -> Reservation:
        """Reserve ``nbytes`` in the ring to fill in place; use as ``with t.reserve(n) as buf:``.

        Leaving the block publishes the bytes as one raw message; an exception
        abandons it (the oldest messages it displaced stay dropped). Never waits
        for subscribers; holds the publisher lock until the block ends.
        """
        self._check_open()
        self._check_sizes((nbytes,))

        def abandon() -> None:
            h = self._h64
            if h[Q_TAIL] > h[Q_HEAD]:  # we restarted an empty ring at the next lap: finish the move
                h[Q_HEAD] = h[Q_TAIL]

        return self._reservation(
            nbytes,
            None,
            lambda: self._make_room(nbytes),
            lambda seq, new_head: self._commit_record(seq, nbytes, new_head),
            abandon,
            self._wake_if_waiting,
        )

    def _wake_if_waiting(self) -> None:
        if self._mm is not None and self._mm[WAIT_FLAGS : self._flags_end] != self._no_flags:
            self._wake_waiters()

    def _wake_waiters(self) -> None:
        mm = self._mm
        assert mm is not None
        flags = mm[WAIT_FLAGS : self._flags_end]
        for i, flag in enumerate(flags):
            if flag:
                # Clear, then post: the wake-up is pending, so the next publishes
                # skip this slot (one compare) until it sleeps again, instead of
                # coming here after every message while it wakes. The post is
                # unconditional: the clear may erase the flag of the subscriber's
                # next wait, which then sleeps unflagged, and only this post (left
                # in the semaphore) wakes it to set its flag again. (A "value <= 0"
                # test would skip it when that wait's own fence holds the count at 1.)
                mm[WAIT_FLAGS + i] = 0
                self._wakers[i].release()

    # -- the newest message --------------------------------------------------

    def last(self) -> Any:
        """The most recent message still in the ring, without subscribing; never waits.

        For a dashboard or a health check. It reads without a lock, as a
        subscriber does, and returns only a message copied out intact.
        Raises ``Empty`` when the topic holds no message, ``Overwritten``
        when publishers overwrite it faster than it can be read (several
        times in a row), ``CorruptBus`` for a damaged record.

        Example::

            t.publish({"cpu": 0.5})
            assert t.last() == {"cpu": 0.5}
        """
        self._enter()
        try:
            kind, payload = self._read_last()
        finally:
            self._leave()
        return self._codec.finish(kind, payload)

    def _read_last(self) -> tuple[int, Any]:
        assert self._mm is not None
        hints = [self._last_pos, *self._cursors()]
        try:
            pos, kind, payload = _last.read_last(
                self._h64, self._mm, self._ring, self._cap, self._layout.ring_offset, hints
            )
        except Empty:
            raise Empty(f"{self.path} holds no message", path=self.path) from None
        self._last_pos = pos
        return kind, payload

    def _cursors(self) -> list[int]:
        """The active subscribers' cursors: record boundaries, hints for last()'s walk."""
        h = self._h64
        bases = (self._slot_base(i) for i in range(self._layout.max_subscribers))
        return [h[b + S_CURSOR] for b in bases if subscriber_state(h[b + S_STATE_PID])]

    # -- subscribing -----------------------------------------------------------

    def subscribe(
        self, start: Literal["latest", "earliest"] | int | None = "latest", *, spin: float | None = None
    ) -> Subscription:
        """Join the topic: the new subscription receives every message published from now on.

        Parameters:
            start: ``"latest"`` (or None: only messages published after this
                call), ``"earliest"`` (also the oldest messages still in the
                ring), or a sequence number: the first message returned is the
                one with that number (``Subscription.last_seq`` gives a
                message's number). A number older than the oldest message
                still in the ring starts at the oldest and counts the numbers
                it skips in ``lost`` at once; a number past the next one to be
                published raises ``SequenceAhead`` (it never waits for it).
            spin: microseconds to poll before sleeping when waiting (default 50;
                0 sleeps at once). Also ``sub.spin_us`` afterwards.

        Raises ``TooManySubscribers`` when every slot is taken by a live
        process, ``SequenceAhead``, ``ValueError`` for another ``start``.
        """
        start = "latest" if start is None else start
        self._check_start(start)
        self._enter()
        try:
            self._check_reached(start)  # (before a slot is claimed: next_seq only grows)
            door = self._door(self._claim_slot())
            sub = Subscription(door, start, SPIN_DEFAULT if spin is None else spin / 1e6)
        finally:
            self._leave()
        self._subscriptions.append(sub)
        return sub

    @staticmethod
    def _check_start(start: object) -> None:
        if start in ("latest", "earliest"):
            return
        if type(start) is not int or start < 0:  # (not a bool: True is no sequence number)
            raise ValueError(f"start must be 'latest', 'earliest' or a sequence number >= 0, got {start!r}")

    def _check_reached(self, start: str | int) -> None:
        """``SequenceAhead`` for a sequence number past the next one to be published."""
        next_seq = self._h64[Q_NEXT_SEQ]
        if isinstance(start, int) and start > next_seq:
            raise SequenceAhead(
                f"{self.path}: cannot start at sequence number {start}: the next message published "
                f"will be number {next_seq} (was the topic recreated since that number was read?)",
                path=self.path, start=start, next_seq=next_seq,
            )  # fmt: skip

    def _door(self, slot: int) -> TopicDoor:
        """What the subscription in ``slot`` may use of this handle (built inside ``_enter``/``_leave``)."""
        assert self._mm is not None
        return TopicDoor(
            path=self.path, h64=self._h64, mm=self._mm, ring=self._ring,
            capacity=self._cap, ring_offset=self._layout.ring_offset,
            slot=slot, base=self._slot_base(slot), flag=WAIT_FLAGS + slot,
            sem=self._sems[f"sub{slot}"],  # opened with the topic (closed with it too)
            enter=self._enter, leave=self._leave, check_open=self._check_open,
            codec=self._codec, fast=self._fast,
            release_slot=functools.partial(self._release_slot, slot),
            forget=self._forget,
        )  # fmt: skip

    def _forget(self, sub: Subscription) -> None:
        """Stop tracking a subscription closed on its own (``close()`` closes those left)."""
        if sub in self._subscriptions:
            self._subscriptions.remove(sub)

    def _slot_base(self, slot: int) -> int:
        return (self._layout.subscribers_offset + slot * SUBSCRIBER_SIZE) // 8

    def _claim_slot(self) -> int:
        h = self._h64
        part = self._part
        assert part is not None
        part.claim(self.recover)  # before the lock: the slot records its owner
        lock = self._subs_lock
        try:
            lock.acquire(None)
            if _faults.armed:
                _faults.hit("subscribe:after-lock")
            slots = range(self._layout.max_subscribers)
            free = [i for i in slots if not subscriber_state(h[self._slot_base(i)])]
            if not free:
                free = self._reclaim_dead()
            if not free:
                raise TooManySubscribers(
                    f"all {self._layout.max_subscribers} subscriber slots of {self.path} are taken by "
                    "live processes", path=self.path,
                    hint="close a subscription, or recreate the topic with more max_subscribers",
                )
            slot = free[0]
            base = self._slot_base(slot)
            for i in range(1, SUBSCRIBER_SIZE // 8):
                h[base + i] = 0
            h[base + S_ATTACHED] = time.time_ns()
            h[base + S_OWNER] = part.me
            h[base + S_STATE_PID] = subscriber_word(1, os.getpid())
            return slot
        finally:
            lock.release()

    def _reclaim_dead(self) -> list[int]:
        """Free the slots whose owning process is gone (under the subs lock)."""
        self.recover()  # frees the slots of dead participants (see _reap)
        h = self._h64
        freed = []
        for i in range(self._layout.max_subscribers):
            base = self._slot_base(i)
            pid = subscriber_pid(h[base])
            if not subscriber_state(h[base]):
                freed.append(i)
            elif not h[base + S_OWNER] and pid and not pid_alive(pid):
                # No participant recorded (table full): fall back on the pid.
                log.warning("%s: reclaiming subscriber slot %d of dead process %d", self.path, i, pid)
                h[base + S_STATE_PID] = 0
                freed.append(i)
        return freed

    # -- crash recovery hooks ------------------------------------------------

    def _repair(self, role: str) -> bool:
        if role == "head":
            self._resync(fix_next=True, gaps=True)  # publishers only: nobody else moves tail
        return True  # the subs lock guards single-word stores: nothing to mend

    def _reap(self, slot: int) -> None:
        # A dead subscriber's slot and wait flag are freed for others.
        h = self._h64
        assert self._mm is not None
        for i in range(self._layout.max_subscribers):
            base = self._slot_base(i)
            if subscriber_state(h[base]) and h[base + S_OWNER] == slot + 1:
                log.warning("%s: freeing subscriber slot %d of a dead process", self.path, i)
                h[base + S_STATE_PID] = 0
                self._mm[WAIT_FLAGS + i] = 0

    def _release_slot(self, slot: int) -> None:
        """Free the slot of a subscription this process closes: its wait flag, then the slot itself."""
        if self._closed:
            return  # a closed handle may have unmapped the header already
        assert self._mm is not None
        self._mm[WAIT_FLAGS + slot] = 0
        lock = self._subs_lock
        try:
            lock.acquire(None)
            self._h64[self._slot_base(slot) + S_STATE_PID] = 0
        finally:
            lock.release()

    def subscribers(self) -> list[dict[str, int]]:
        """The active subscriber slots: slot, pid, lag (messages behind), lost, received."""
        self._enter()
        try:
            return subscriber_rows(self._h64, self._layout)
        finally:
            self._leave()
