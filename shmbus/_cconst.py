"""The constants the C fast path is compiled with: one list, read from where each is defined.

Rule: ``shmbus/_cfast.c`` uses no number of the format, the codec or the C
calling convention but through ``shmbus/_format.h``, which
``tools/gen_cheader.py`` writes from ``CONSTANTS`` below (a test checks it is
up to date). The extension hands back, as ``_cfast.CONSTANTS``, the values it
was compiled with; ``mismatches`` compares them with the Python modules at
load, so a stale build is refused, never run.

The codes ``FastQueue.put``/``put_many``/``put_obj`` and ``FastTopic``'s
publish calls return are defined here (they are neither the file format nor
the codec: the C calling convention).
"""

from __future__ import annotations

import sys
from types import ModuleType
from typing import Final

from . import _codec, _format, _mutex, _ring

__all__ = [
    "PUT_NOT_TAKEN", "PUT_DONE", "PUT_HELD", "PUT_PYTHON", "PUB_WAKE", "PUB_SHIFT",
    "CONSTANTS", "expected", "mismatches",
]  # fmt: skip

# FastQueue.put / put_many / put_obj return ``written << 2 | code`` with one of these codes:
PUT_NOT_TAKEN: Final = 0  # head lock busy or needing repair, no room, or closed: nothing done
PUT_DONE: Final = 1  # all written, published, tokens posted, lock released
PUT_HELD: Final = 2  # put_many: the first ones written, published, posted; the lock is still held
# put_obj, put_objs, publish_obj, publish_objs (the whole result): nothing done, Python does it
PUT_PYTHON: Final = -1
# FastTopic.publish / publish_many / publish_obj(s) return ``written << PUB_SHIFT | PUB_WAKE? | code``
# (code: PUT_NOT_TAKEN, PUT_DONE, PUT_HELD as above; publish_obj and publish_objs may return PUT_PYTHON):
PUB_WAKE: Final = 4  # with PUT_DONE: a subscriber's wait flag was set, Python posts the wake-ups
PUB_SHIFT: Final = 3

_self = sys.modules[__name__]


# (name in C and in _cfast.CONSTANTS, the module that defines it, its name there;
# "TABLE.field" is the offset of a field in one of _format's field tables)
CONSTANTS: Final[tuple[tuple[str, ModuleType, str], ...]] = (
    # the record header
    ("RECORD_SIZE", _format, "RECORD_SIZE"),
    ("ALIGN", _format, "ALIGN"),
    ("REC_LENGTH", _format, "RECORD_FIELDS.length"),
    ("REC_KIND", _format, "RECORD_FIELDS.kind"),
    ("REC_STATE", _format, "RECORD_FIELDS.state"),
    ("REC_SEQ", _format, "RECORD_FIELDS.seq"),
    ("REC_MSGPACK", _format, "REC_MSGPACK"),
    ("REC_RAW", _format, "REC_RAW"),
    ("REC_WRAP", _format, "REC_WRAP"),
    ("REC_NDARRAY", _format, "REC_NDARRAY"),
    ("STATE_COMMITTED", _format, "STATE_COMMITTED"),
    # header words: u64 indices, u32 indices, mutex byte offsets
    ("HEADER_MIN", _format, "HEADER_MIN"),
    ("Q_HEAD", _format, "Q_HEAD"),
    ("Q_TAIL", _format, "Q_TAIL"),
    ("Q_NEXT_SEQ", _format, "Q_NEXT_SEQ"),
    ("Q_TAIL_SEQ", _format, "Q_TAIL_SEQ"),
    ("Q_BYTES_IN", _format, "Q_BYTES_IN"),
    ("Q_BYTES_OUT", _format, "Q_BYTES_OUT"),
    ("Q_TIME_SAMPLES", _format, "Q_TIME_SAMPLES"),
    ("I_HEAD_REPAIR", _format, "I_HEAD_REPAIR"),
    ("I_TAIL_REPAIR", _format, "I_TAIL_REPAIR"),
    ("I_SPACE_WAITING", _format, "I_SPACE_WAITING"),
    ("M_HEAD", _format, "M_HEAD"),
    ("M_TAIL", _format, "M_TAIL"),
    # the Topic: wait flags (bytes), subscriber slots (bytes; word indices inside a slot)
    ("WAIT_FLAGS", _format, "WAIT_FLAGS"),
    ("MAX_SUBSCRIBERS", _format, "MAX_SUBSCRIBERS"),
    ("SUBSCRIBER_SIZE", _format, "SUBSCRIBER_SIZE"),
    ("S_CURSOR", _format, "S_CURSOR"),
    ("S_NEXT_SEQ", _format, "S_NEXT_SEQ"),
    ("S_LOST", _format, "S_LOST"),
    ("S_RECEIVED", _format, "S_RECEIVED"),
    ("MUTEX_SIZE", _mutex, "MUTEX_SIZE"),
    # time samples
    ("TIME_SAMPLES", _format, "TIME_SAMPLES"),
    ("SAMPLE_EVERY", _format, "SAMPLE_EVERY"),
    ("SAMPLE_WRITING", _format, "SAMPLE_WRITING"),
    # placement: a record due to wrap early goes to Python
    ("HOT_WINDOW", _ring, "HOT_WINDOW"),
    ("NEAR_EMPTY", _ring, "NEAR_EMPTY"),
    # msgpack bin 8..32 first bytes: a bytes message, which Python returns undecoded
    ("BIN8", _codec, "_BIN8"),
    ("BIN16", _codec, "_BIN16"),
    ("BIN32", _codec, "_BIN32"),
    # the C calling convention
    ("PUT_NOT_TAKEN", _self, "PUT_NOT_TAKEN"),
    ("PUT_DONE", _self, "PUT_DONE"),
    ("PUT_HELD", _self, "PUT_HELD"),
    ("PUT_PYTHON", _self, "PUT_PYTHON"),
    ("PUB_WAKE", _self, "PUB_WAKE"),
    ("PUB_SHIFT", _self, "PUB_SHIFT"),
)


def _value(module: ModuleType, name: str) -> int:
    table, _, field = name.partition(".")
    value = getattr(module, table)
    if field:
        (value,) = [f.offset for f in value if f.name == field]
    assert isinstance(value, int), name
    return value


def expected() -> dict[str, int]:
    """Every constant of ``CONSTANTS`` by its C name, read now from the module defining it."""
    return {cname: _value(module, name) for cname, module, name in CONSTANTS}


def mismatches(compiled: dict[str, int]) -> list[str]:
    """The constants (C names) whose compiled value is missing, extra or not ``expected()``'s."""
    want = expected()
    return sorted(k for k in want.keys() | compiled.keys() if want.get(k) != compiled.get(k))
