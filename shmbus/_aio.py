"""asyncio support: every thread shmbus starts, and every hand-off from one to an event loop.

Rule: the event loop's thread never sleeps on a semaphore that stands for a
message or for free space; only helper threads do. The loop thread takes the
short locks alone (``tail`` for a take, ``head`` for a publish or a put that
fits), exactly as a synchronous call does, and those are held only for copies.
A Queue is reached only through ``QueueOps``, the operations it names for us.

A POSIX semaphore has no file descriptor, so a loop cannot poll it. Each handle
that waits gets, on first need, one daemon thread per kind of wait; ``close()``
stops and joins them. Every sleep in those threads lasts at most ``_SLICE``
seconds before it re-checks for ``close()``.

* ``Queue.aget``: first an ``items`` token without waiting (``try_acquire``);
  with none, the coroutine queues a future for the handle's *waiter* thread.
  While futures are queued, that thread sleeps on ``items``; each token it
  takes goes to the loop with ``call_soon_threadsafe``, where it is given to
  the first future not yet done, or posted back if every future is gone
  (cancelled, timed out). The coroutine holding the token takes its record at
  once with the ordinary take path: no ``await`` between the token and the
  record, hence no cancellation point. A coroutine cancelled after its future
  got a token, but before it ran again, posts the token back. A token stands
  for one committed record, so a cancelled ``aget`` consumes nothing.
* ``Queue.aput``: first the producer lock without waiting, and the put of
  whatever fits now; the rest goes to the handle's *putter* thread, which runs
  blocking puts one at a time in the order they came (a new ``aput`` waits
  behind them rather than overtake). The putter puts in slices of ``_SLICE``
  seconds, carrying ``Full.sent`` over, so it notices ``close()``. A job
  cancelled before the putter starts it sends nothing; once started it runs
  to its end (or its timeout), even though the cancelled ``aput`` cannot say.
* ``Subscription.aget``: reads are lock-free and run on the loop; the
  subscription's waiter thread sleeps in ``Subscription._wait`` (wait flag and
  ``sub<i>`` semaphore) and wakes every waiting coroutine, which re-read.

A call that finds its message (or space) ready returns without suspending,
except that at least every ``_BUDGET`` seconds such calls yield to the loop
once, so a consumer that never runs dry cannot starve the loop's other tasks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections import deque
from typing import Any, Callable, Final, NamedTuple

from . import _sync
from ._codec import Encoded
from ._errors import BusClosed, Empty, Full
from ._queue_base import NO_RECORD

__all__ = ["QueueOps", "QueueAio", "SubscriptionAio", "checkpoint"]

log = logging.getLogger("shmbus")
_monotonic = time.monotonic
_SLICE: Final = 0.1  # seconds a helper thread sleeps at most before it looks for close()
_BUDGET: Final = 0.001  # seconds of back-to-back ready results before a call yields anyway
_local = threading.local()

_PENDING, _STARTED, _CANCELLED = 0, 1, 2


async def checkpoint() -> None:
    """Yield to the event loop once if this thread's loop last yielded through us over ``_BUDGET`` ago."""
    if _monotonic() - getattr(_local, "t", 0.0) >= _BUDGET:
        await asyncio.sleep(0)
        _local.t = _monotonic()


def _suspended() -> None:
    _local.t = _monotonic()




def _expire(fut: asyncio.Future[bool]) -> None:
    if not fut.done():
        fut.set_result(False)


def _resolve(fut: asyncio.Future[None], err: BaseException | None) -> None:
    if fut.done():
        return  # cancelled meanwhile: nobody is told (see the module docstring)
    if err is None:
        fut.set_result(None)
    else:
        fut.set_exception(err)


def _call_in(loop: asyncio.AbstractEventLoop, fn: Callable[..., object], *args: Any) -> None:
    """Run ``fn(*args)`` in ``loop``: now if this is its thread, else at its next turn (never if closed)."""
    try:
        here = asyncio.get_running_loop() is loop
    except RuntimeError:
        here = False
    if here:
        fn(*args)
    else:
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(fn, *args)


class _Helper:
    """What both helpers share: the condition, the bound loop, the threads and their stop."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.pid = os.getpid()  # a forked child's copy owns no thread
        self._cond = threading.Condition()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop = False
        self._threads: list[threading.Thread] = []

    def _busy(self) -> bool:
        raise NotImplementedError

    def _bind(self) -> asyncio.AbstractEventLoop:
        """The running loop, now the one this helper serves (call under the condition)."""
        if self._stop:
            raise BusClosed(f"this handle on {self.path} is closed", path=self.path)
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            if not self._loop_gone() and self._busy():
                raise RuntimeError(
                    f"{self.path} is being waited on from another event loop: use one loop per handle"
                )
            self._loop = loop
        return loop

    def _start(self, body: Callable[[], None], what: str) -> threading.Thread:
        t = threading.Thread(target=self._guard, args=(body,), name=f"shmbus {what} {self.path}", daemon=True)
        t.start()
        self._threads.append(t)
        return t

    def _guard(self, body: Callable[[], None]) -> None:
        """A thread's main: a thread that dies must not leave its waiters hanging."""
        try:
            body()
        except BaseException as e:
            log.error("%s: asyncio helper thread failed: %r", self.path, e)
            me = threading.current_thread()
            with self._cond:
                if me in self._threads:  # (not when close() is joining us)
                    self._threads.remove(me)
                futs = self._forget(me)
            self._fail(futs, e)

    def _forget(self, thread: threading.Thread | None) -> list[asyncio.Future[Any]]:
        """Drop the calls that ``thread`` serves (None: all) and the reference to it; return their futures.

        Called under the condition; the next call that needs the thread starts a new one.
        """
        raise NotImplementedError

    def _loop_gone(self) -> bool:
        """True if the bound loop is closed; then whatever it was owed is dropped (under the condition).

        A loop closed with our hand-off still in its queue never runs it, and
        the coroutines it was meant for never resume.
        """
        loop = self._loop
        if loop is None or not loop.is_closed():
            return False
        self._orphan()
        return True

    def _orphan(self) -> None:
        raise NotImplementedError

    def _stop_threads(self) -> bool:
        """Stop and join the threads; False in a forked child, whose copy has none."""
        if self.pid != os.getpid():
            return False
        with self._cond:
            self._stop = True
            self._cond.notify_all()
            threads, self._threads = self._threads, []
        me = threading.current_thread()
        for t in threads:
            if t is not me:
                t.join()  # within _SLICE: every sleep in them is that short
        return True

    def _fail(self, futs: list[asyncio.Future[Any]], err: BaseException | None = None) -> None:
        """Fail ``futs`` in their loop with ``err``, or each with its own ``BusClosed``."""
        loop = self._loop
        if loop is None or not futs:
            return

        def fail() -> None:
            for f in futs:
                if not f.done():
                    f.set_exception(err or self._closed_error())

        _call_in(loop, fail)

    def _closed_error(self) -> BusClosed:
        return BusClosed(f"{self.path} was closed while this call waited", path=self.path)


class QueueOps(NamedTuple):
    """What ``QueueAio`` may do to its Queue handle: these operations, and nothing else.

    ``Queue._aio_ops`` fills it with the handle's own methods. None of them
    sleeps on a semaphore (the rule above), except ``put``, which only the
    putter thread calls; each counts as a use of the handle, so ``close()``
    waits for it to end. A token is one of ``items``: it stands for one
    committed record that no consumer has claimed.
    """

    items: _sync.Sem  # the tokens: try_acquire() on the loop; acquire(deadline), release() anywhere
    claim: Callable[[], None]  # claim the handle's consumer slot, once, before the first take
    take_one: Callable[[], Any]  # with 1 token in hand: the oldest message, or NO_RECORD (a stray token)
    take: Callable[[int], list[Any]]  # with k tokens in hand: up to k oldest messages ([]: strays)
    heal: Callable[[], None]  # after an empty wait: free dead holders, post tokens records lack
    check: Callable[[list[Encoded]], None]  # BusClosed, or MessageTooLarge for a batch that can never fit
    put_ready: Callable[[list[Encoded]], int]  # put what fits now, not even waiting for the lock: how many
    put: Callable[[list[Encoded], float | None], None]  # put all by the deadline, or Full(sent=...)


class _PutJob:
    __slots__ = ("batch", "deadline", "fut", "sent", "state")

    def __init__(self, batch: list[Encoded], deadline: float | None, fut: asyncio.Future[None], sent: int):
        self.batch = batch
        self.deadline = deadline
        self.fut = fut
        self.sent = sent  # messages of the call already in (put from the loop, or earlier slices)
        self.state = _PENDING


class QueueAio(_Helper):
    """A Queue handle's asyncio side: the waiter thread for ``aget``, the putter thread for ``aput``."""

    def __init__(self, path: str, ops: QueueOps) -> None:
        super().__init__(path)
        self._ops = ops
        self._items = ops.items
        self._waiters: deque[asyncio.Future[bool]] = deque()
        self._in_flight = False  # the waiter took a token that the loop has not given out yet
        self._holding = 0  # tokens given to futures whose coroutine has not used them yet
        self._getter: threading.Thread | None = None
        self._jobs: deque[_PutJob] = deque()
        self._putting = False
        self._putter: threading.Thread | None = None

    def _busy(self) -> bool:
        return bool(self._waiters or self._in_flight or self._holding or self._jobs or self._putting)

    # -- consuming (loop side) -------------------------------------------------

    async def get(self, timeout: float | None) -> Any:
        """One message, as ``Queue.aget``."""
        ops = self._ops
        deadline = _sync.deadline(timeout)
        await checkpoint()
        while True:
            ops.claim()
            if not self._items.try_acquire() and not await self._token(deadline):
                raise Empty(f"{self.path} is empty", path=self.path)
            # One token held: take the record now, with no await (no cancellation point) before it.
            # (A close() that lands between the token and the take strands the token
            # until a consumer's wait heals it: this handle can no longer post it.)
            msg = ops.take_one()
            if msg is not NO_RECORD:
                return msg

    async def get_many(self, max_messages: int, timeout: float | None) -> list[Any]:
        """1 to ``max_messages`` messages, as ``Queue.aget_many``."""
        ops = self._ops
        if max_messages < 1:
            raise ValueError("max_messages must be at least 1")
        deadline = _sync.deadline(timeout)
        await checkpoint()
        try_acquire = self._items.try_acquire
        while True:
            ops.claim()
            if not try_acquire() and not await self._token(deadline):
                raise Empty(f"{self.path} is empty", path=self.path)
            k = 1
            while k < max_messages and try_acquire():
                k += 1
            msgs = ops.take(k)  # (as in get)
            if msgs:
                return msgs

    async def _token(self, deadline: float | None) -> bool:
        """Wait for the waiter thread to hand us one items token; False at the deadline."""
        delay = None if deadline is None else deadline - _monotonic()
        if delay is not None and delay <= 0:
            return False
        with self._cond:
            loop = self._bind()
            fut: asyncio.Future[bool] = loop.create_future()
            self._waiters.append(fut)
            if self._getter is None:
                self._getter = self._start(self._wait_items, "aget")
            self._cond.notify_all()
        timer = None if delay is None else loop.call_later(delay, _expire, fut)
        try:
            got = await fut
        except BaseException:
            self._drop(fut)
            raise
        finally:
            if timer is not None:
                timer.cancel()
            _suspended()
        with self._cond:
            if not got:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(fut)
                return False
            if self._stop:  # close() posted our token back already
                raise self._closed_error()
            self._holding -= 1
        return True

    def _drop(self, fut: asyncio.Future[bool]) -> None:
        """A waiting coroutine leaves (cancelled, closed): post back the token it was given, if any."""
        with self._cond:
            with contextlib.suppress(ValueError):
                self._waiters.remove(fut)
            given = fut.done() and not fut.cancelled() and fut.exception() is None and fut.result()
            if given and not self._stop:
                self._holding -= 1
                self._items.release()

    def _deliver(self) -> None:
        """(Loop thread.) Give the token the waiter took to the first live future, or post it back."""
        with self._cond:
            if not self._in_flight:
                return  # close() posted it back
            self._in_flight = False
            while self._waiters:
                fut = self._waiters.popleft()
                if not fut.done():
                    fut.set_result(True)
                    self._holding += 1
                    break
            else:
                self._items.release()
            self._cond.notify_all()

    # -- consuming (waiter thread) ---------------------------------------------

    def _wait_items(self) -> None:
        cond, items = self._cond, self._items
        healed = _monotonic()
        while True:
            with cond:
                while not self._stop and (self._in_flight or not self._waiters):
                    # Timed only while a hand-off is pending, to notice a loop closed without running it.
                    cond.wait(_SLICE if self._in_flight else None)
                    if self._in_flight:
                        self._loop_gone()
                if self._stop:
                    return
            if not items.acquire(_monotonic() + _SLICE):
                if _monotonic() - healed >= _sync.SLICE:
                    self._heal()
                    healed = _monotonic()
                continue
            with cond:
                loop = self._loop
                if self._stop or loop is None:
                    items.release()
                    return
                if all(f.done() for f in self._waiters):
                    # Everyone left while we slept: give it back now, not after a trip through the loop.
                    items.release()
                    continue
                self._in_flight = True
                try:
                    loop.call_soon_threadsafe(self._deliver)
                except RuntimeError:  # the loop is closed
                    self._orphan()

    def _heal(self) -> None:
        """As a blocking get does after each empty slice: free dead holders, post lost tokens."""
        try:
            self._ops.heal()
        except Exception as e:
            # (CorruptBus, say): the waiting calls raise it, as a blocking get would.
            with self._cond:
                futs: list[asyncio.Future[Any]] = [*self._waiters]
                self._waiters.clear()
            self._fail(futs, e)

    # -- producing ---------------------------------------------------------------

    async def put(self, batch: list[Encoded], timeout: float | None) -> None:
        """Put an encoded batch, in order, as ``Queue.aput``/``aput_many``."""
        ops = self._ops
        deadline = _sync.deadline(timeout)
        await checkpoint()
        ops.check(batch)
        sent = 0
        with self._cond:
            busy = self._putting or bool(self._jobs)
        if not busy:  # never overtake a put still waiting in the putter
            sent = ops.put_ready(batch)
            if sent == len(batch):
                return
            if deadline is not None and _monotonic() >= deadline:  # timeout=0: no thread for that
                raise Full(f"{self.path} is full: no space freed in time", path=self.path, sent=sent)
        with self._cond:
            loop = self._bind()
            job = _PutJob(batch[sent:], deadline, loop.create_future(), sent)
            self._jobs.append(job)
            if self._putter is None:
                self._putter = self._start(self._run_puts, "aput")
            self._cond.notify_all()
        # The putter keeps the deadline once it runs the job; this timer, while it waits its turn.
        timer = None if deadline is None else loop.call_later(deadline - _monotonic(), self._expire_job, job)
        try:
            await job.fut
        except BaseException:
            with self._cond:
                if job.state == _PENDING:
                    job.state = _CANCELLED  # the putter skips it: nothing of it is sent
            raise
        finally:
            if timer is not None:
                timer.cancel()
            _suspended()

    def _expire_job(self, job: _PutJob) -> None:
        """(Loop thread.) A put whose deadline passed before its turn came: ``Full``, nothing of it sent."""
        with self._cond:
            if job.state != _PENDING:
                return
            job.state = _CANCELLED
        if not job.fut.done():
            job.fut.set_exception(
                Full(f"{self.path} is full: no space freed in time", path=self.path, sent=job.sent)
            )

    def _run_puts(self) -> None:
        cond = self._cond
        while True:
            with cond:
                while not self._stop and not self._jobs:
                    cond.wait()
                if self._stop:
                    return  # close() fails the jobs left
                job = self._jobs.popleft()
                if job.state == _CANCELLED:
                    continue
                job.state = _STARTED
                self._putting = True
            err: BaseException | None = None
            try:
                self._put_sliced(job)
            except Exception as e:
                err = e
            with cond:
                self._putting = False
                loop = self._loop
                assert loop is not None
                with contextlib.suppress(RuntimeError):  # a closed loop: nobody awaits
                    loop.call_soon_threadsafe(_resolve, job.fut, err)

    def _put_sliced(self, job: _PutJob) -> None:
        """A blocking put of the job, cut into ``_SLICE`` second waits so close() is noticed."""
        put, batch, deadline = self._ops.put, job.batch, job.deadline
        while True:
            if self._stop:
                raise self._closed_error()
            now = _monotonic()
            try:
                put(batch, now + _SLICE if deadline is None else min(deadline, now + _SLICE))
                return
            except Full as e:
                job.sent += e.sent
                batch = batch[e.sent :]
                if deadline is not None and _monotonic() >= deadline:
                    raise Full(
                        f"{self.path} is full: no space freed in time", path=self.path, sent=job.sent
                    ) from None

    # -- lifecycle -----------------------------------------------------------------

    def _orphan(self) -> None:
        # Tokens on their way to the closed loop, or given to coroutines that will never run, go back.
        for _ in range(self._holding + self._in_flight):
            self._items.release()
        self._holding, self._in_flight = 0, False
        self._waiters.clear()
        for job in self._jobs:
            if job.state == _PENDING:
                job.state = _CANCELLED

    def _forget(self, thread: threading.Thread | None) -> list[asyncio.Future[Any]]:
        futs: list[asyncio.Future[Any]] = []
        if thread is None or thread is self._getter:
            futs += self._waiters
            self._waiters.clear()
            self._getter = None
        if thread is None or thread is self._putter:
            futs += [j.fut for j in self._jobs if j.state == _PENDING]
            self._jobs.clear()
            self._putting = False
            self._putter = None
        return futs

    def close(self) -> None:
        """Stop the threads; post back every token not yet used; pending calls raise ``BusClosed``."""
        if not self._stop_threads():
            return
        with self._cond:
            for _ in range(self._holding + self._in_flight):
                self._items.release()
            self._holding, self._in_flight = 0, False
            futs = self._forget(None)
        self._fail(futs)


class SubscriptionAio(_Helper):
    """A Subscription's asyncio side: the thread that sleeps until the topic's head moves.

    It uses two operations of the subscription: ``read(k)``, up to ``k`` next
    messages without waiting (lock-free, so it runs on the loop), and
    ``wait(deadline)``, which sleeps until head may have moved (False at the
    deadline) and raises ``BusClosed`` once the topic is closed.
    """

    def __init__(self, path: str, read: Callable[[int], list[Any]], wait: Callable[[float], bool]) -> None:
        super().__init__(path)
        self._read = read
        self._wait = wait
        self._waiters: list[asyncio.Future[bool]] = []
        self._signalled = False  # a wake-up is on its way to the loop
        self._thread: threading.Thread | None = None

    def _busy(self) -> bool:
        return bool(self._waiters or self._signalled)

    async def get_many(
        self, max_messages: int, timeout: float | None, read: Callable[[int], list[Any]] | None = None
    ) -> list[Any]:
        """1 to ``max_messages`` next messages, as ``Subscription.aget_many`` (``read``: another read)."""
        if max_messages < 1:
            raise ValueError("max_messages must be at least 1")
        deadline = _sync.deadline(timeout)
        read = self._read if read is None else read
        await checkpoint()
        while True:
            got = read(max_messages)  # no await between reading and returning
            if got:
                return got
            if not await self._moved(deadline):
                raise Empty(f"no new message on {self.path}", path=self.path)

    async def _moved(self, deadline: float | None) -> bool:
        """Wait until the topic's head may have moved past our cursor; False at the deadline."""
        delay = None if deadline is None else deadline - _monotonic()
        if delay is not None and delay <= 0:
            return False
        with self._cond:
            loop = self._bind()
            fut: asyncio.Future[bool] = loop.create_future()
            self._waiters.append(fut)
            if self._thread is None:
                self._thread = self._start(self._watch, "subscription")
            self._cond.notify_all()
        timer = None if delay is None else loop.call_later(delay, _expire, fut)
        try:
            return await fut
        finally:
            if timer is not None:
                timer.cancel()
            with self._cond, contextlib.suppress(ValueError):
                self._waiters.remove(fut)
            _suspended()

    def _wake(self) -> None:
        """(Loop thread.) Every waiting coroutine re-reads; those that find nothing wait again."""
        with self._cond:
            self._signalled = False
            futs, self._waiters = self._waiters, []
            self._cond.notify_all()
        for f in futs:
            if not f.done():
                f.set_result(True)

    def _watch(self) -> None:
        cond = self._cond
        while True:
            with cond:
                while not self._stop and (self._signalled or not self._waiters):
                    cond.wait(_SLICE if self._signalled else None)
                    if self._signalled:
                        self._loop_gone()
                if self._stop:
                    return
            # (BusClosed once the topic is closed: the thread ends, its callers fail)
            if not self._wait(_monotonic() + _SLICE):
                continue
            with cond:
                loop = self._loop
                if self._stop or loop is None:
                    return
                self._signalled = True
                try:
                    loop.call_soon_threadsafe(self._wake)
                except RuntimeError:  # the loop is closed
                    self._orphan()

    def _orphan(self) -> None:
        self._signalled = False
        self._waiters.clear()

    def _forget(self, thread: threading.Thread | None) -> list[asyncio.Future[Any]]:
        futs: list[asyncio.Future[Any]] = [*self._waiters]
        self._waiters.clear()
        self._signalled = False
        self._thread = None
        return futs

    def close(self) -> None:
        """Stop the thread; pending calls raise ``BusClosed``."""
        if not self._stop_threads():
            return
        with self._cond:
            futs = self._forget(None)
        self._fail(futs)
