"""The exception tree: every error shmbus raises on purpose is defined here.

Each class inherits both ``ShmbusError`` and the nearest builtin, so callers can
catch either (``except shmbus.Empty`` or ``except queue.Empty``). Errors carry
their data as attributes and pickle with it, because they cross process
boundaries in ``multiprocessing`` pools.
"""

from __future__ import annotations

import queue
from typing import Any

__all__ = [
    "ShmbusError",
    "BusExists",
    "BusNotFound",
    "NotABus",
    "ForeignBus",
    "CorruptBus",
    "IncompatibleBus",
    "MessageTooLarge",
    "EncodeError",
    "DecodeError",
    "BusClosed",
    "TooManySubscribers",
    "SequenceAhead",
    "Overwritten",
    "Empty",
    "Full",
    "NoSpace",
]


class ShmbusError(Exception):
    """Base class of every error shmbus raises on purpose.

    ``fact`` is what went wrong and ``hint`` what to do next in Python terms
    (None when the fact says it all); the message is ``"fact: hint"``. They
    are kept apart so that the command line can give its own advice.
    """

    def __init__(self, message: str, *, path: str | None = None, hint: str | None = None) -> None:
        super().__init__(f"{message}: {hint}" if hint else message)
        self.path = path
        self.fact = message
        self.hint = hint

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only ``path`` would be lost by the default reduce, which only
        # replays ``self.args``; keep it so errors survive a trip through a Pool.
        return (_rebuild, (type(self), self.args, self.__dict__))


def _rebuild(cls: type[BaseException], args: tuple[Any, ...], state: dict[str, Any]) -> Any:
    err = cls.__new__(cls)
    err.args = args
    err.__dict__.update(state)
    return err


class BusExists(ShmbusError, FileExistsError):
    """``create`` found a file already at the path (pass ``exist_ok=True`` to open it)."""


class BusNotFound(ShmbusError, FileNotFoundError):
    """``open`` found no file at the path (create the bus first)."""


class NotABus(ShmbusError, ValueError):
    """The file exists but has no shmbus header: it is not a bus."""


class ForeignBus(ShmbusError, PermissionError):
    """The bus belongs to another user, or others may write it: refused unless opted in.

    A peer with write access can corrupt the bus or stall it, so shmbus only
    trusts buses you own and only you (and your group) can write. Pass
    ``allow_shared=True`` to ``open`` to accept one on purpose.
    """


class CorruptBus(ShmbusError, ValueError):
    """The bus header or a record breaks an invariant (a counter or length out of range).

    ``offset`` is the byte offset in the file where the problem was found, when known.
    """

    def __init__(self, message: str, *, path: str | None = None, offset: int | None = None) -> None:
        super().__init__(message, path=path)
        self.offset = offset


class IncompatibleBus(ShmbusError, ValueError):
    """The file is a bus of another format version, or of another kind (Topic vs Queue).

    ``kind`` names the kind the file holds (``"Queue"`` or ``"Topic"``) when
    the kind is what differs, and is None for another format version.
    """

    def __init__(
        self, message: str, *, path: str | None = None, hint: str | None = None, kind: str | None = None
    ) -> None:
        super().__init__(message, path=path, hint=hint)
        self.kind = kind


class MessageTooLarge(ShmbusError, ValueError):
    """The encoded message is larger than the ring can ever hold.

    ``size`` is the encoded size in bytes, ``limit`` the largest the bus accepts.
    """

    def __init__(
        self, message: str, *, path: str | None = None, hint: str | None = None, size: int = 0, limit: int = 0
    ) -> None:
        super().__init__(message, path=path, hint=hint)
        self.size = size
        self.limit = limit


class EncodeError(ShmbusError, TypeError):
    """msgpack cannot encode the object (nothing was written to the bus)."""


class DecodeError(CorruptBus):
    """A message cannot be decoded: bad msgpack, an ext type the ``ext_hook`` refuses, an unreadable array.

    An array message is unreadable where numpy cannot be imported, or when
    its header is malformed.

    From ``get_many``, ``decoded`` holds the batch's other messages, in order,
    so that one bad message does not lose the rest.
    """

    decoded: list[object]

    def __init__(self, message: str, *, path: str | None = None, offset: int | None = None) -> None:
        super().__init__(message, path=path, offset=offset)
        self.decoded = []


class BusClosed(ShmbusError, ValueError):
    """The handle was closed with ``close()``; the bus itself may still exist.

    Also raised by a call that was waiting on the handle when another thread
    (or a signal handler) closed it. ``sent`` says how many messages of a
    ``put_many`` batch went in before that (always 0 for ``put``).
    """

    def __init__(self, message: str, *, path: str | None = None, sent: int = 0) -> None:
        super().__init__(message, path=path)
        self.sent = sent


class TooManySubscribers(ShmbusError, RuntimeError):
    """Every subscriber slot of the Topic is taken (create it with more ``max_subscribers``)."""


class SequenceAhead(ShmbusError, ValueError):
    """``Topic.subscribe(start=n)`` named a sequence number the topic has not reached.

    ``start`` is the number asked for, ``next_seq`` the one the next publish
    will carry: ``start`` may be at most ``next_seq``. A larger one usually
    means the reader's position belongs to another topic (one recreated since,
    so its numbering restarted); waiting for it would hide that.
    """

    def __init__(self, message: str, *, path: str | None = None, start: int = 0, next_seq: int = 0) -> None:
        super().__init__(message, path=path)
        self.start = start
        self.next_seq = next_seq


class Overwritten(ShmbusError, RuntimeError):
    """A Topic publisher overwrote a message while a zero-copy view was reading it.

    Raised when a ``Subscription.get_view()`` block ends; the bytes seen may
    be torn, and the message counts in ``lost``. Also raised by
    ``Topic.last()`` when publishers overwrite the newest message several
    times in a row while it reads it (call it again).
    """


class Empty(ShmbusError, queue.Empty):
    """Nothing arrived in time (raised by ``get`` with a timeout and by ``get_nowait``)."""

    def __init__(self, message: str = "the bus is empty", *, path: str | None = None) -> None:
        super().__init__(message, path=path)


class Full(ShmbusError, queue.Full):
    """No space (bytes or ``maxsize``) freed up in time (raised by ``put``).

    ``sent`` says how many messages of a ``put_many`` batch went in before
    the space ran out (always 0 for ``put``).
    """

    def __init__(self, message: str = "the bus is full", *, path: str | None = None, sent: int = 0) -> None:
        super().__init__(message, path=path)
        self.sent = sent


class NoSpace(ShmbusError, OSError):
    """``create(..., preallocate=True)`` found too little room on the file system for the bus.

    ``size`` is the bytes the bus needs, ``free`` what the file system had.
    Without ``preallocate`` a bus file is sparse, and the first put that
    reaches a page the file system cannot back kills its process with
    ``SIGBUS``: preallocating turns that into this error, at create.
    """

    def __init__(self, message: str, *, path: str | None = None, size: int = 0, free: int = 0) -> None:
        super().__init__(message, path=path)
        self.size = size
        self.free = free
