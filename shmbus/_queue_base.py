"""What the put side and the get side of a ``Queue`` handle share, and nothing else.

``_QueueBase`` declares the state ``Queue._setup`` gives a handle (its locks,
semaphores, sizes and codec shortcuts), so that ``_producer`` and ``_consumer``
are typed without importing ``_queue``; ``_deadline`` is the one rule that
turns a call's ``block``/``timeout`` into a wait deadline.
"""

from __future__ import annotations

from typing import Any, Callable

from . import _recovery, _sync
from ._bus import Bus
from ._codec import Encoded, Payload

__all__ = ["_QueueBase", "_deadline", "NO_RECORD"]

# The get side's answer when an items token it held stood for no record (a stray
# token): shared here because the asyncio layer, below the get side, tests for it.
NO_RECORD: Any = object()


def _deadline(block: bool, timeout: float | None) -> float | None:
    """Absolute deadline for a wait: 0 for non-blocking, None for ever; a negative timeout: ``ValueError``."""
    if timeout is None:  # the common call, answered without one more call
        return None if block else 0.0
    if block:
        return _sync.deadline(timeout)
    _sync.check_timeout(timeout)  # refused even though a non-blocking call does not use it
    return 0.0


class _QueueBase(Bus):
    """A ``Queue`` handle's state, as ``Queue._setup`` sets it (declarations only)."""

    spin: float  # seconds a waiting get polls before it sleeps (``Queue.spin_us``)
    _head_lock: _recovery.Lock
    _tail_lock: _recovery.Lock
    _items: _sync.Sem
    _space: _sync.Sem
    _slots: _sync.Sem | None
    _cap: int
    _max_payload: int
    _encode: Callable[[Any], Encoded]
    _finish: Callable[[int, Payload], Any]
    _ro: int
    _fast: Any
    _in_hand: list[tuple[int, Any]]  # records a take committed that the caller has not got yet
    _write: Callable[[list[Encoded], float | None], int]  # the producer side's (under the head lock)
