"""The bridge's bytes on the wire: a NATS message's headers and the batch framing.

Rule: only this module knows how bus records become NATS messages and back;
docs/bridge.md ("On the wire") mirrors it byte by byte.

One record per message (the default): the payload is the record's stored
bytes unchanged (for an ordinary message, its msgpack encoding), so any NATS
client reads it with a msgpack library. Headers:

* ``Nats-Msg-Id``: ``<bus id>:<seq>``, the bus's 16 hex digits and the
  record's sequence number in that bus: JetStream drops a message whose id
  it saw within the stream's duplicate window, so a bridge that publishes a
  record again (after a crash) stores it once.
* ``Shmbus-Bus``: the bus id; ``Shmbus-Seq``: the sequence number (decimal).
* ``Shmbus-Kind``: ``raw`` or ``ndarray`` when the record is not msgpack
  (absent: msgpack).

Batch framing (opt-in): one message holds ``Shmbus-Count`` records with
consecutive sequence numbers from ``Shmbus-Seq``, its id that of its first
record, ``Shmbus-Frame: 1`` marking the framing version. The payload is, for
each record in order, a 5-byte header then its bytes::

    offset  size  field
         0     4  length   u32, little-endian: the record's byte count
         4     1  kind     1 = msgpack, 2 = raw, 4 = ndarray
         5     n  data     the record's stored bytes

A frame's ``Shmbus-Count`` is part of its identity: a publisher that sends a
frame again (with the same first record) must learn how many records the
stored one held (``frame_count``), which ``_bridge_routes`` does.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from itertools import chain
from operator import itemgetter
from typing import Any, Final, NamedTuple

from ._codec import is_msgpack
from ._format import REC_MSGPACK, REC_NDARRAY, REC_RAW

__all__ = [
    "MSG_ID", "BUS", "SEQ", "KIND", "COUNT", "FRAME", "FRAME_VERSION", "FRAME_OVERHEAD", "Outgoing",
    "Incoming", "msg_id", "single", "frame", "frame_count", "frame_records", "records_of", "WireError",
]  # fmt: skip

MSG_ID: Final = "Nats-Msg-Id"
BUS: Final = "Shmbus-Bus"
SEQ: Final = "Shmbus-Seq"
KIND: Final = "Shmbus-Kind"
COUNT: Final = "Shmbus-Count"
FRAME: Final = "Shmbus-Frame"
FRAME_VERSION: Final = "1"

_REC: Final = struct.Struct("<IB")
FRAME_OVERHEAD: Final = _REC.size  # bytes a frame adds to each record
_CODES: Final = {"msgpack": REC_MSGPACK, "raw": REC_RAW, "ndarray": REC_NDARRAY}
_NAMES: Final = {code: name for name, code in _CODES.items()}
_KIND, _LAST = itemgetter(-2), itemgetter(-1)  # a record tuple's kind and bytes


class WireError(ValueError):
    """A NATS message the bridge cannot turn into records (a broken frame)."""


class Outgoing(NamedTuple):
    """One NATS message to publish: ``n`` records from sequence number ``first``."""

    first: int
    n: int
    payload: bytes
    headers: dict[str, str]


class Incoming(NamedTuple):
    """One record read from a NATS message: its kind, bytes, and whether msgpack was expected but absent."""

    kind: str
    data: bytes | memoryview
    not_msgpack: bool


def msg_id(bus_id: str, seq: int) -> str:
    """The JetStream message id of the message whose first record is ``seq`` of bus ``bus_id``."""
    return f"{bus_id}:{seq}"


def single(bus_id: str, seq: int, kind: str, data: bytes) -> Outgoing:
    """One record as one message: the payload is its bytes unchanged."""
    headers = {MSG_ID: msg_id(bus_id, seq), BUS: bus_id, SEQ: str(seq)}
    if kind != "msgpack":
        headers[KIND] = kind
    return Outgoing(seq, 1, data, headers)


def frame(bus_id: str, first: int, records: Sequence[Sequence[Any]]) -> Outgoing:
    """Records ``first``, ``first + 1``... as one framed message (see the module's docstring).

    Each record is a tuple ending with its kind and its bytes (a bytes-like
    object: a ``Record`` read in place qualifies); the payload is made by
    one join, with no per-record copy before it.
    """
    datas = list(map(_LAST, records))  # (C-level maps: this runs per record)
    heads = map(_REC.pack, map(len, datas), map(_CODES.__getitem__, map(_KIND, records)))
    headers = {
        MSG_ID: msg_id(bus_id, first), BUS: bus_id, SEQ: str(first), FRAME: FRAME_VERSION,
        COUNT: str(len(records)),
    }  # fmt: skip
    return Outgoing(first, len(records), b"".join(chain.from_iterable(zip(heads, datas))), headers)


def frame_count(headers: dict[str, str] | None) -> int:
    """How many records a stored message holds, from its headers (1 unless framed)."""
    if headers and headers.get(FRAME):
        return int(headers.get(COUNT, "1"))
    return 1


def records_of(data: bytes, headers: dict[str, str] | None) -> list[Incoming]:
    """The records a NATS message carries, ready for ``put_records``.

    A message without our headers is one record: msgpack if its bytes are
    one msgpack object, else kept as raw bytes with ``not_msgpack`` set (the
    caller counts and logs it: never dropped, never a crash). Raises
    ``WireError`` for a frame whose lengths do not add up.
    """
    if not headers or not headers.get(FRAME):
        kind = (headers or {}).get(KIND, "msgpack")
        if kind not in _CODES:
            kind = "raw"
        if kind == "msgpack" and not is_msgpack(data):
            return [Incoming("raw", data, True)]
        return [Incoming(kind, data, False)]
    if headers[FRAME] != FRAME_VERSION:
        raise WireError(f"frame version {headers[FRAME]!r} is not one this bridge reads ({FRAME_VERSION})")
    return [Incoming(kind, rec, False) for kind, rec in frame_records(data, frame_count(headers))]


def frame_records(data: bytes, count: int) -> list[tuple[str, bytes]]:
    """A frame's records as ``(kind, bytes)`` pairs, for ``put_records``; ``WireError`` if broken.

    Slices of ``data`` (bytes): for records of a frame's size, a small copy costs less
    than a memoryview, and ``put_records`` takes bytes without a cast.
    """
    out: list[tuple[str, bytes]] = []
    append = out.append
    view = bytes(data)  # (a no-op for bytes)
    pos, end = 0, len(data)
    unpack = _REC.unpack_from
    names = _NAMES
    try:
        while pos < end:
            n, code = unpack(view, pos)
            pos += FRAME_OVERHEAD
            append((names[code], view[pos : pos + n]))
            pos += n
    except (struct.error, KeyError):
        at = pos - FRAME_OVERHEAD
        raise WireError(f"a frame's record at byte {at} is cut short or of unknown kind") from None
    if pos != end:  # the last record's length ran past the end
        raise WireError(f"a frame's last record is cut short ({pos - end} bytes missing)")
    if len(out) != count:
        raise WireError(f"a frame holds {len(out)} records, its {COUNT} header says {count}")
    return out
