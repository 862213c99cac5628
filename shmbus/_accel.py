"""The optional C fast path: load it, check it matches the file format, hand it to a Queue or Topic.

One job: decide whether the Queue's single put and get, and the Topic's
publish and a subscription's read, run in C (``shmbus/_cfast.c``) and build
their per-handle objects. The C code does only
the common case and hands everything else back, so it changes speed, never
behaviour: the whole suite runs both ways (``SHMBUS_PURE_PYTHON=1`` forces
pure Python, as does a machine where the extension could not be compiled).
An extension compiled with another value of any format constant than this
Python's (``_cconst``) is refused with a warning, never run.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import warnings
from types import ModuleType
from typing import TYPE_CHECKING, Any

from . import _cconst, _faults
from ._cconst import PUB_SHIFT, PUB_WAKE, PUT_DONE, PUT_HELD, PUT_NOT_TAKEN, PUT_PYTHON
from ._format import Layout

if TYPE_CHECKING:
    from ._cfast import FastQueue, FastTopic

__all__ = [
    "ENABLED", "REASON", "warn_once_if_pure",
    "PUT_NOT_TAKEN", "PUT_DONE", "PUT_HELD", "PUT_PYTHON", "PUB_WAKE", "PUB_SHIFT",
    "NO_TOKEN", "HAS_TOKEN", "SPIN_MAX",
    "check_constants", "queue_fast_path", "topic_fast_path",
]  # fmt: skip

# (pack, unpack or None, unpack's keywords, fast encode or None, fast decode or None)
CodecParts = tuple[Any, ...]


def check_constants(module: ModuleType) -> bool:
    """True if ``module`` (the extension) was compiled with this Python's constants.

    Otherwise warns (``RuntimeWarning``), naming each constant that differs, so
    that a stale build is never run silently.
    """
    bad = _cconst.mismatches(getattr(module, "CONSTANTS", {}))
    if bad:
        warnings.warn(
            f"shmbus: the C fast path was compiled with other values of {', '.join(bad)} than "
            "shmbus/_format.py and its peers; running in pure Python. Rebuild it: "
            "`python tools/gen_cheader.py && python -m pip install -e .`",
            RuntimeWarning,
            stacklevel=2,
        )
    return not bad


def _load() -> tuple[ModuleType | None, str]:
    """The extension, or None and why not (shown by ``shmbus doctor`` and ``info``)."""
    if os.environ.get("SHMBUS_PURE_PYTHON", "") not in ("", "0"):
        return None, "turned off by SHMBUS_PURE_PYTHON"
    try:
        from . import _cfast
    except ImportError as e:
        # pip hides a failed optional build unless -v: say here what happened and what to do.
        # (Python's own words for a module that is not there, during the package's import,
        # speak of "a circular import": they would send the reader the wrong way.)
        what = "is not built" if _absent() else f"does not load ({e})"
        return None, (
            f"the extension shmbus._cfast {what}: reinstall with a C compiler and the "
            "Python headers present (e.g. `apt install gcc python3-dev`, then `pip install --force-reinstall "
            "--no-binary shmbus shmbus`, or `pip install -e .` in a clone)"
        )
    if not check_constants(_cfast):
        return None, "the extension was built from other format constants (a stale build): rebuild it"
    return _cfast, ""


def _absent() -> bool:
    """True when no compiled ``shmbus._cfast`` sits beside the sources: the build did not happen."""
    try:
        return importlib.util.find_spec("shmbus._cfast") is None
    except ImportError:
        return True


def _c_step(step: str) -> None:
    """What C calls at a named crash step while one is armed (``_faults``)."""
    _faults.hit(step)


def _arm_c(armed: bool) -> None:
    assert _cfast is not None
    _cfast.set_fault_hook(_c_step if armed else None)


_cfast, REASON = _load()  # REASON: why the C fast path is off ("" when it is on)
if _cfast is not None:
    _faults.watch(_arm_c)
# FastQueue.get_obj returns a message, a record, or one of these (never a message).
NO_TOKEN: Any = _cfast.NO_TOKEN if _cfast is not None else object()
HAS_TOKEN: Any = _cfast.HAS_TOKEN if _cfast is not None else object()
SPIN_MAX: float = _cfast.SPIN_MAX if _cfast is not None else 0.0  # the longest C spins, holding the GIL
ENABLED: bool = _cfast is not None  # shown by ``shmbus bench`` and ``shmbus info``


def queue_fast_path(
    mapping: Any, layout: Layout, sem_names: tuple[str, str], codec: CodecParts, max_payload: int
) -> FastQueue | None:
    """A ``FastQueue`` on ``mapping``, or None (pure Python, or semaphores C cannot open).

    ``sem_names``: the (items, space) semaphores; ``codec``: what
    ``Codec._c_parts`` gives; ``max_payload``: larger messages go to Python.
    """
    if _cfast is None:
        return None
    try:
        fast: FastQueue = _cfast.FastQueue(mapping, layout.ring_offset, layout.capacity, sem_names)
    except OSError:
        return None  # a semaphore we cannot open by name: the Python path opens its own
    pack, unpack, unpack_kwargs, fast_pack, fast_unpack, plain = codec
    fast.set_codec(pack, unpack, unpack_kwargs, max_payload, fast_pack, fast_unpack, plain)
    return fast


_warned = False


def warn_once_if_pure() -> None:
    """Log, once per process, that shmbus runs without its C fast path when nobody asked for that.

    A build that failed at install time is silent (pip shows it only with
    ``-v``); the first bus opened says it instead, at warning level on the
    ``shmbus`` logger (silence it there). Nothing when ``SHMBUS_PURE_PYTHON``
    turned C off on purpose.
    """
    global _warned
    if _warned or ENABLED or os.environ.get("SHMBUS_PURE_PYTHON", "") not in ("", "0"):
        return
    _warned = True
    logging.getLogger("shmbus").warning(
        "shmbus runs in pure Python, several times slower per small message: %s "
        "(`shmbus doctor` tells more)",
        REASON,
    )


def topic_fast_path(mapping: Any, layout: Layout, codec: CodecParts, max_payload: int) -> FastTopic | None:
    """A ``FastTopic`` on ``mapping`` (publish, and its subscriptions' reads), or None (pure Python).

    ``codec``: what ``Codec._c_parts`` gives; ``max_payload``: larger messages go to Python.
    """
    if _cfast is None:
        return None
    fast: FastTopic = _cfast.FastTopic(mapping, layout.ring_offset, layout.capacity, layout.max_subscribers)
    pack, unpack, unpack_kwargs, fast_pack, fast_unpack, plain = codec
    fast.set_codec(pack, unpack, unpack_kwargs, max_payload, fast_pack, fast_unpack, plain)
    return fast
