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
* ``RecordBatch`` of a Queue (``get_records``): several records in place,
  the consumer lock held as for a ``View``. Leaving the block normally
  consumes them all, an exception none; ``consume(k)`` ends it consuming
  exactly the first ``k``. Nothing is consumed before its end, so a process
  killed meanwhile leaves every record in the queue, with the same sequence
  number (what a bridge's deduplication relies on).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Callable, NamedTuple, Union

from . import _ring
from ._codec import Encoded, as_bytes_view
from ._errors import Full, Overwritten, ShmbusError
from ._format import REC_MSGPACK, REC_NDARRAY, REC_RAW

if TYPE_CHECKING:
    from ._recovery import Lock

__all__ = [
    "Reservation", "View", "Record", "RecordBatch", "view_kind", "record_kind", "record_code",
    "BlockOwner", "reserve_record",
]  # fmt: skip


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


# A record's stored form, by name (``Record.kind``) and by the code the file holds.
_RECORD_KINDS: dict[int, str] = {REC_MSGPACK: "msgpack", REC_RAW: "raw", REC_NDARRAY: "ndarray"}
_RECORD_CODES: dict[str, int] = {name: code for code, name in _RECORD_KINDS.items()}


def record_kind(code: int) -> str:
    """The name of a record kind code: "msgpack", "raw" or "ndarray"."""
    return _RECORD_KINDS[code]


def record_code(kind: str) -> int:
    """The record kind code of a name ``record_kind`` returns; ``ValueError`` for any other."""
    try:
        return _RECORD_CODES[kind]
    except KeyError:
        raise ValueError(f"record kind must be one of {sorted(_RECORD_CODES)}, got {kind!r}") from None


def stored_batch(records: Iterable[tuple[str, bytes | memoryview]]) -> list[Encoded]:
    """``put_records``/``publish_records``' input as records to write: ``(kind, data)`` pairs (a
    ``Record`` too: its last two fields) as they are, with no encoding; ``ValueError`` for a bad kind."""
    batch: list[Encoded] = []
    for rec in records:
        kind, data = rec[-2], rec[-1]
        body = data if type(data) is bytes else as_bytes_view(data)
        batch.append((record_code(kind), b"", body, len(body)))
    return batch


class Record(NamedTuple):
    """One message as the bus stores it, from ``Queue.get_records`` or ``Subscription.get_records``.

    ``seq`` is its sequence number in the bus (the same every time it is
    read: a record left in a Queue keeps it). ``kind`` is how it is stored:
    ``"msgpack"`` (``data`` is the whole msgpack encoding, a ``bytes``
    message's ``bin`` header included), ``"raw"`` (``put_bytes`` or
    ``reserve``: the data itself) or ``"ndarray"`` (shmbus's array framing).
    ``Queue.put_records`` and ``Topic.publish_records`` store it again as it is.
    """

    seq: int
    kind: str
    data: Union[memoryview, bytes]


class RecordBatch:
    """The oldest records of a Queue, in place, from ``get_records()``; use as a ``with`` block.

    Inside the block the records are read-only views into the ring and the
    consumer lock is held (keep it short, and end the batch in the thread
    that made it: the lock is that thread's). Leaving the block normally
    consumes every record; an exception consumes none; ``consume(k)``
    ends the batch at once, consuming exactly the first ``k`` (0: none).

    Example::

        with q.get_records(100) as batch:
            for rec in batch:
                send(rec.seq, bytes(rec.data))
        # consumed: all of them, or none if send raised
    """

    __slots__ = ("__weakref__", "_done", "_finish", "records")

    def __init__(self, records: list[Record], finish: Callable[[int], None]) -> None:
        self.records = records
        self._finish = finish
        self._done = False

    def __enter__(self) -> list[Record]:
        return self.records

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.consume(len(self.records) if exc_type is None else 0)

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[Record]:
        return iter(self.records)

    def consume(self, k: int | None = None) -> None:
        """End the batch now, consuming its first ``k`` records (all when None); the rest stay.

        Does nothing once the batch has ended. Raises ``ValueError`` for a
        ``k`` outside 0..len(batch) (the batch is then not ended).
        """
        n = len(self.records) if k is None else k
        if not 0 <= n <= len(self.records):
            raise ValueError(f"consume takes 0 to {len(self.records)} records, got {k}")
        if self._done:
            return
        self._done = True
        for rec in self.records:
            data = rec.data
            if type(data) is memoryview:
                # (try, not contextlib.suppress: this runs per record, and a batch may hold thousands)
                try:  # noqa: SIM105
                    data.release()
                except BufferError:  # a slice the caller kept stays valid memory
                    pass
        self._finish(n)

    def end_unused(self) -> None:
        """End the batch as an exception would: every record stays (``close()`` does this)."""
        self.consume(0)

    def __del__(self) -> None:
        if not self._done:
            self._done = True
            self._finish(0)


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
