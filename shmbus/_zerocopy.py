"""Zero-copy access: a writable slice of the ring to fill in place, a read-only one to read in place.

Rule: this module owns the objects handed to users for in-place access and
their exit rules; the bus kinds (``Queue``, ``Topic``, ``Subscription``)
supply what happens at commit and at abandon. A ``Reservation`` holds the
producer lock from ``reserve()`` until its block ends (``reserve_record`` is
that discipline, for Queue and Topic alike); a Queue ``View`` holds
the consumer lock for as long as its block runs. Both are meant for ``with``:
a reservation dropped without exiting is abandoned when it is collected.

What a user learns, and when:

* ``Reservation``: leaving the block normally commits the record (visible to
  consumers at once); an exception abandons it (nothing visible).
* ``View`` of a Queue: leaving the block normally consumes the message; an
  exception leaves it in the queue for the next ``get`` (at-least-once).
* ``View`` of a Topic subscription: no lock is held, so a publisher may lap
  the reader meanwhile. ``valid()`` says whether the bytes seen so far are
  intact; leaving the block raises ``Overwritten`` if they were not (and the
  message counts as lost).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Callable, NamedTuple

from . import _ring
from ._errors import Full, Overwritten, ShmbusError
from ._format import REC_NDARRAY, REC_RAW

if TYPE_CHECKING:
    from ._recovery import Lock

__all__ = ["Reservation", "View", "view_kind", "BlockOwner", "reserve_record"]


class BlockOwner(NamedTuple):
    """What ``reserve_record`` may do to the handle a block belongs to (``Bus._reservation`` builds it)."""

    path: str
    is_closed: Callable[[], bool]  # the handle was closed (the block's wake-up is then skipped)
    enter: Callable[[], None]  # a call on the handle begins: close() waits for it to end
    leave: Callable[[], None]  # that call ends (when the block ends)
    track: Callable[[Reservation], Reservation]  # close() ends the block if the user did not


def view_kind(record_kind: int, is_bytes: bool) -> str:
    """What a ``View`` holds: "ndarray" (see ``array_view``), "bytes", or "msgpack" (an encoding)."""
    if record_kind == REC_NDARRAY:
        return "ndarray"
    return "bytes" if is_bytes else "msgpack"


class Reservation:
    """A writable ``memoryview`` of one record's payload, from ``reserve(nbytes)``.

    Example::

        with q.reserve(8) as buf:
            struct.pack_into("<d", buf, 0, 3.14)
        # committed: consumers can get the 8 bytes now
    """

    __slots__ = ("__weakref__", "_abandon", "_commit", "_done", "view")

    def __init__(self, view: memoryview, commit: Callable[[], None], abandon: Callable[[], None]) -> None:
        self.view = view
        self._commit = commit
        self._abandon = abandon
        self._done = False

    def __enter__(self) -> memoryview:
        return self.view

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self._end(commit=exc_type is None)

    def _end(self, *, commit: bool) -> None:
        if self._done:
            return
        self._done = True
        with contextlib.suppress(BufferError):  # the caller kept a slice: it stays valid memory
            self.view.release()
        (self._commit if commit else self._abandon)()

    def end_unused(self) -> None:
        """End the block as an exception would (``close()`` does, for a block left open)."""
        self._end(commit=False)

    def __del__(self) -> None:
        self._end(commit=False)


class View:
    """A read-only ``memoryview`` of one message's payload, from ``get_view()``.

    ``kind`` tells how the payload was put: ``"bytes"`` for ``put_bytes``,
    ``reserve`` or a ``bytes`` object, ``"ndarray"`` for a numpy array (read
    it with ``shmbus.array_view``), ``"msgpack"`` for anything else (then
    the view holds its msgpack encoding).
    """

    __slots__ = ("__weakref__", "_check", "_done", "_finish", "kind", "view")

    def __init__(
        self,
        view: memoryview,
        kind: str,
        finish: Callable[[bool], None],
        check: Callable[[], bool] | None = None,
    ) -> None:
        self.view = view
        self.kind = kind
        self._finish = finish
        self._check = check
        self._done = False

    def valid(self) -> bool:
        """True if the bytes are intact (always, for a Queue; a Topic publisher may overwrite them)."""
        return self._check is None or self._check()

    def __enter__(self) -> memoryview:
        return self.view

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if self._done:
            return
        self._done = True
        intact = self.valid()
        with contextlib.suppress(BufferError):
            self.view.release()
        self._finish(exc_type is None)
        if not intact and exc_type is None:
            raise Overwritten("a publisher overwrote this message while it was being read: it counts as lost")

    def end_unused(self) -> None:
        """End the block as an exception would: the message stays (``close()`` does this)."""
        if not self._done:
            self._done = True
            with contextlib.suppress(BufferError):
                self.view.release()
            self._finish(False)

    def __del__(self) -> None:
        if not self._done:
            self._done = True
            self._finish(False)


def reserve_record(
    bus: BlockOwner,
    lock: Lock,
    ring: memoryview,
    cap: int,
    nbytes: int,
    lock_deadline: float | None,
    room: Callable[[], tuple[int, int, int]],
    publish: Callable[[int, int], None],
    abandon: Callable[[], None],
    after: Callable[[], None] | None = None,
) -> Reservation:
    """A zero-copy write, for Queue and Topic alike: take the head ``lock`` and reserve.

    ``room()`` makes space and returns ``(start, head, seq)``; on commit the
    record header is stored and ``publish(seq, new_head)`` makes it
    visible; ``abandon()`` undoes ``room()``'s claims. The head lock is
    released at the end either way, then ``after()`` runs (a Topic wakes
    its subscribers there, outside the lock). Raises ``Full`` if the lock
    was not free by ``lock_deadline``.
    """
    bus.enter()  # left when the block ends: close() waits for it
    try:
        if not lock.acquire(lock_deadline):
            raise Full(f"{bus.path}: timed out waiting for the producer lock", path=bus.path)
        start, head, seq = room()
        off = _ring.begin(ring, cap, head, start, seq)

        def commit() -> None:
            try:
                try:
                    publish(seq, _ring.commit(ring, cap, start, REC_RAW, seq, nbytes))
                except BaseException as e:
                    lock.release_after(e)
                    raise
                lock.release()
                if after is not None and not bus.is_closed():
                    after()
            finally:
                bus.leave()

        def drop() -> None:
            try:
                try:
                    abandon()
                except BaseException:
                    lock.abandon()
                    raise
                lock.release()
            finally:
                bus.leave()

        return bus.track(Reservation(ring[off : off + nbytes], commit, drop))
    except ShmbusError:  # ours: raised before any store
        try:
            lock.release()
        finally:
            bus.leave()
        raise
    except BaseException:  # from anywhere (a signal handler): the next holder checks the counters
        try:
            lock.abandon()
        finally:
            bus.leave()
        raise
