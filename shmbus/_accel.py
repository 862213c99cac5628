"""The optional C fast path: load it, check it matches the file format, hand it to a Queue.

One job: decide whether the Queue's single put and get run in C
(``shmbus/_cfast.c``) and build its per-handle object. The C code does only
the common case and hands everything else back, so it changes speed, never
behaviour: the whole suite runs both ways (``SHMBUS_PURE_PYTHON=1`` forces
pure Python, as does a machine where the extension could not be compiled).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from . import _ring
from ._format import (
    ALIGN,
    I_HEAD_REPAIR,
    I_SPACE_WAITING,
    I_TAIL_REPAIR,
    M_HEAD,
    M_TAIL,
    Q_BYTES_IN,
    Q_BYTES_OUT,
    Q_HEAD,
    Q_NEXT_SEQ,
    Q_TAIL,
    Q_TAIL_SEQ,
    Q_TIME_SAMPLES,
    RECORD,
    SAMPLE_EVERY,
    TIME_SAMPLES,
)
from ._mutex import MUTEX_SIZE

if TYPE_CHECKING:
    from ._queue import Queue

__all__ = [
    "ENABLED", "PUT_NOT_TAKEN", "PUT_DONE", "PUT_HELD",
    "NO_TOKEN", "HAS_TOKEN", "SPIN_MAX",
    "queue_fast_path", "drop_fast_path",
]  # fmt: skip

# FastQueue.put / put_many return ``written << 2 | code`` with these codes (see _cfast.c).
PUT_NOT_TAKEN, PUT_DONE, PUT_HELD = 0, 1, 2


def _load() -> Any:
    if os.environ.get("SHMBUS_PURE_PYTHON", "") not in ("", "0"):
        return None
    try:
        from . import _cfast  # type: ignore[attr-defined]
    except ImportError:
        return None
    # The C code hard-codes the record header; refuse it if the format moved on.
    if (
        RECORD.format != "<IHHQ"
        or RECORD.size != _cfast.RECORD_SIZE
        or _cfast.ALIGN != ALIGN
        or _cfast.MUTEX_SIZE > MUTEX_SIZE
        or TIME_SAMPLES != 8
    ):
        return None
    return _cfast


_cfast = _load()
# FastQueue.get_obj returns a message, a record, or one of these (never a message).
NO_TOKEN: Any = _cfast.NO_TOKEN if _cfast is not None else object()
HAS_TOKEN: Any = _cfast.HAS_TOKEN if _cfast is not None else object()
SPIN_MAX: float = _cfast.SPIN_MAX if _cfast is not None else 0.0  # the longest C spins, holding the GIL
ENABLED: bool = _cfast is not None  # shown by ``shmbus bench`` and ``shmbus info``


def queue_fast_path(q: Queue) -> Any:
    """A ``FastQueue`` for this handle, or None (pure Python, or a queue with ``maxsize``)."""
    if _cfast is None or q._slots is not None:
        return None
    s = q._sems
    try:
        fast = _cfast.FastQueue(
            q._mm, q._layout.ring_offset, q._layout.capacity,
            SAMPLE_EVERY, _ring.HOT_WINDOW, _ring.NEAR_EMPTY,
            (s["items"].name, s["space"].name),
            (Q_HEAD, Q_TAIL, Q_NEXT_SEQ, Q_TAIL_SEQ, Q_BYTES_IN, Q_BYTES_OUT, Q_TIME_SAMPLES),
            (I_HEAD_REPAIR, I_TAIL_REPAIR, I_SPACE_WAITING),
            (M_HEAD, M_TAIL),
        )  # fmt: skip
    except OSError:
        return None  # a semaphore we cannot open by name: the Python path opens its own
    pack, unpack, unpack_kwargs = q._codec._c_parts()
    fast.set_codec(pack, unpack, unpack_kwargs, q._max_payload)
    return fast


def drop_fast_path(q: Queue) -> None:
    """Make this handle use pure Python from now on (the benchmark's "pure" rows)."""
    fast, q._fast = q._fast, None
    if fast is not None:
        fast.close()
