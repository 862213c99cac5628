"""The file format: the only module that knows byte offsets.

A bus file is a header followed by the ring. All integers are little-endian
(shmbus reads the counters in native order, so it runs on little-endian
machines only: x86-64 and arm64, which is every Linux target in practice).
``docs/format.md`` mirrors this docstring; change both together and bump
``VERSION`` when the layout changes. The field tables below (``HEADER_FIELDS``
and the others) are the machine-readable form: the offsets derive from them,
tests/test_spec.py checks docs/format.md against them, and
tools/gen_cheader.py writes the C fast path's constants from them.

::

    offset  size  field              written by        meaning
    ------  ----  -----------------  ----------------  --------------------------------------
    -- static block (written once at create, covered by header_crc) --
         0     8  magic              create            b"\\x93SHMBUS\\n"
         8     4  version  u32       create            format version (2)
        12     4  kind     u32       create            1 = Queue, 2 = Topic
        16     8  capacity u64       create            ring size in bytes (multiple of 4096, at least 4096)
        24     8  ring_offset u64    create            where the ring starts (multiple of 4096)
        32     8  maxsize  u64       create            Queue message bound, 0 = bytes only
        40     4  flags    u32       create            bit 0 (FLAG_ANONYMOUS): an anonymous bus, see
                                                   creator_pid; other bits reserved, 0
        44     4  max_subscribers    create            Topic subscriber slots (0 for a Queue)
        48     4  max_participants   create            participant table slots
        52     4  align    u32       create            record alignment (16)
        56     8  created_ns u64     create            creation time, ns since the epoch
        64    16  bus_id   ascii     create            16 lowercase hex digits; semaphore names
        80     4  creator_uid u32    create            uid of the creating process
        84     4  participants_offset u32              byte offset of the participant table
        88     4  subscribers_offset u32               byte offset of the subscriber table
        92     4  creator_pid u32    create            anonymous bus: pid of the creating process (else 0)
        96     8  creator_start u64  create            anonymous bus: its start time, clock ticks after
                                                   boot (/proc/PID/stat field 22; else 0)
       104    20  reserved           -                 zero
       124     4  header_crc u32     create            zlib.crc32 of bytes 0..123
    -- producer line (guarded by the head semaphore) --
       128     8  head     u64       producers         position one past the last committed record
       136     8  next_seq u64       producers         sequence number of the next record
       144     8  bytes_in u64       producers         payload bytes committed, ever
       152     4  reserved           -                 zero
       156     4  head_repair u32    producers         1 while what a dead head holder left needs mending
       160    32  reserved           -                 zero
    -- consumer line (Queue: tail semaphore; Topic: head semaphore) --
       192     8  tail     u64       consumers         position of the oldest record still held
       200     8  tail_seq u64       consumers         sequence number of the record at tail
       208     8  bytes_out u64      consumers         payload bytes consumed, ever
       216     4  reserved           -                 zero
       220     4  tail_repair u32    consumers         1 while what a dead tail holder left needs mending
       224     4  space_waiting u32  both            1 while a producer sleeps for space
       228     4  reserved           -                 zero
       232     8  tasks_done u64     consumers         task_done calls, ever (JoinableQueue); the
                                                   unfinished tasks are next_seq - tasks_done
       240    16  reserved           -                 zero
    -- recovery line (256..319) --
       256     4  reserved           -                 zero
       260     4  subs_repair u32    subscribers       1 while what a dead subs holder left needs mending
       264     8  recoveries u64     lock holders      lock repairs done, ever (dead or cut-short holders)
       272     8  last_recovery_ns   recoverers        when, ns since the epoch
       280    16  reserved           -                 zero
       296     8  sems_dev u64       create, reopener  st_dev of the file that made the semaphores
       304     8  sems_ino u64       create, reopener  st_ino of that file: a copy (another inode)
                                                   or look-alike never owns its id's semaphores
       312     1  sems_byte          -                 no data: an OFD write lock on it serializes
                                                   recreating missing semaphores
       313     7  reserved           -                 zero
       320     8  scratch u64        Queue consumers   where a consumer with no participant slot
                                                   counts its items tokens (read by nobody)
       328     8  reserved           -                 zero
       336    16  boot_id            openers           the boot (Linux boot_id) the locks were last
                                                   used in; set under the boot byte
       352    32  reserved           -                 zero
    -- time samples (384..511), for ``shmbus stats``: 8 entries of 16 bytes --
       384   128  samples            producers         entry i at 384 + 16 i: seq u64, time_ns u64:
                                                   message seq was published at time_ns (ns since
                                                   the epoch); seq 2**64-1 while being written,
                                                   time_ns 0 = empty entry. Unordered: see below.
    -- 512..767: Topic wait flags, one byte per subscriber slot: 1 while that
       subscriber sleeps (or is about to) on its semaphore sub<i> --
    -- 768: the recovery mutex (64 bytes, like the locks below): it serializes
       participant claims and the recovery of what dead participants held.
       An OFD write lock on byte 768 (the boot byte) serializes the boot reset --
    -- 832, 896, 960: the head, tail and subs locks, 64 bytes each: a glibc
       pthread_mutex_t, robust, process-shared, error-checking (see below) --
    -- participant table at participants_offset: max_participants x 32 bytes --
    -- subscriber table at subscribers_offset: max_subscribers x 64 bytes --
    -- ring at ring_offset: capacity bytes --

A participant slot (one per process that has taken a lock) is::

    0  u32 pid          the process (informational: liveness is the OFD lock)
    4  u32 state        0 = free, 1 = live (claimed under the recovery mutex)
    8  u64 attached_ns  when it was claimed
   16  u64 tokens       Queue ``items`` tokens taken and not yet consumed
   24  8    reserved

While a participant lives it holds an OFD write lock (``F_OFD_SETLK``) on
the first byte of its slot; the kernel releases it when the process dies, so
a slot whose state is 1 and whose byte is unlocked belongs to a dead process.

The time samples let a reader bound the age of the oldest message without a
timestamp in every record. Under the head lock, when a message's seq is a
multiple of 256 (``SAMPLE_EVERY``), its producer writes (seq, now) into entry
``(seq >> 8) & 3`` (the last four such messages), and into entry ``3 + k`` for
each k in 1..4 with seq a multiple of ``256 * 8**k`` (sparser samples that
survive a deep backlog). It stores seq = 2**64-1 first, then time_ns, then
seq, so a reader that reads seq, time_ns, seq and gets two equal seqs has a
whole entry. Readers treat the entries as an unordered set: the oldest
message (``tail_seq``) is at most as old as the newest sample with seq <=
tail_seq, and older than any sample with tail_seq < seq < next_seq.

A subscriber slot (Topic) is::

    0  u32 state        0 = free, 1 = active (written under the subs semaphore)
    4  u32 pid          the subscribing process
    8  u64 cursor       position of the next record it will read
   16  u64 next_seq     sequence number it expects next
   24  u64 lost         messages overwritten before it read them
   32  u64 received     messages it returned
   40  u64 attached_ns  when it subscribed, ns since the epoch
   48  u64 owner        participant slot + 1 of the subscribing process
   56  8    reserved

Positions (head, tail) count bytes written since creation; a position's place
in the ring is ``position % capacity``. A record is::

    0  u32 length   payload bytes
    4  u16 kind     1 = msgpack, 2 = raw bytes, 3 = wrap marker, 4 = numpy array
    6  u16 state    1 = committed (stored last, after the payload)
    8  u64 seq      sequence number of the message
   16  payload, then padding (any content) up to a multiple of 16

A record never straddles the end of the ring: when it does not fit, a wrap
marker (kind 3, length 0) fills the rest and the record starts at offset 0.

The locks are robust mutexes (``_mutex``): the futex word at the lock's first
byte holds the owner's thread id (bits 0..29) and the kernel's OWNER_DIED bit
(bit 30), so taking a lock and naming its holder is one atomic step, and a
holder's death, however it happens, is seen by the next taker (EOWNERDEAD).
That taker sets the lock's ``*_repair`` word, marks the mutex consistent, and
mends what the dead holder left half-done; it clears the word when done, so
a repairer that dies too leaves the job to the next holder. A reader of the
format in another language uses glibc's ``pthread_mutex_*`` on these bytes.
A lock word from an earlier boot (a disk bus after a crash) is stale: the
first opener in a new boot re-initializes the three mutexes under the
boot byte and stores the new ``boot_id``.
"""

from __future__ import annotations

import re
import struct
import time
import zlib
from dataclasses import dataclass
from typing import Final, NamedTuple

from ._errors import CorruptBus, IncompatibleBus, NotABus
from ._mutex import INIT_BYTES

__all__ = [
    "MAGIC",
    "VERSION",
    "KIND_QUEUE",
    "KIND_TOPIC",
    "KIND_NAMES",
    "STATIC",
    "STATIC_SIZE",
    "HEADER_MIN",
    "PAGE",
    "ALIGN",
    "RECORD",
    "RECORD_SIZE",
    "REC_MSGPACK",
    "REC_RAW",
    "REC_WRAP",
    "REC_NDARRAY",
    "STATE_COMMITTED",
    "Q_HEAD",
    "Q_NEXT_SEQ",
    "Q_BYTES_IN",
    "Q_TAIL",
    "Q_TAIL_SEQ",
    "Q_BYTES_OUT",
    "M_HEAD",
    "M_TAIL",
    "M_SUBS",
    "I_HEAD_REPAIR",
    "I_TAIL_REPAIR",
    "I_SUBS_REPAIR",
    "BOOT_ID",
    "LOCKS",
    "current_boot_id",
    "Q_RECOVERIES",
    "Q_LAST_RECOVERY",
    "S_OWNER",
    "P_PID_STATE",
    "P_ATTACHED",
    "P_TOKENS",
    "M_RECOVERY",
    "BOOT_BYTE",
    "IDENTITY",
    "IDENTITY_OFFSET",
    "SEMS_BYTE",
    "I_SPACE_WAITING",
    "Q_SCRATCH",
    "Q_TIME_SAMPLES",
    "Q_TASKS_DONE",
    "FLAG_ANONYMOUS",
    "MIN_CAPACITY",
    "TIME_SAMPLES",
    "SAMPLE_EVERY",
    "SAMPLE_WRITING",
    "sample_due",
    "PARTICIPANT_SIZE",
    "WAIT_FLAGS",
    "MAX_SUBSCRIBERS",
    "S_STATE_PID",
    "S_CURSOR",
    "S_NEXT_SEQ",
    "S_LOST",
    "S_RECEIVED",
    "S_ATTACHED",
    "SUBSCRIBER_SIZE",
    "Field",
    "HEADER_FIELDS",
    "SAMPLE_FIELDS",
    "PARTICIPANT_FIELDS",
    "SUBSCRIBER_FIELDS",
    "RECORD_FIELDS",
    "participant_word",
    "participant_pid",
    "participant_state",
    "subscriber_word",
    "subscriber_state",
    "subscriber_pid",
    "Layout",
    "build_header",
    "parse_header",
    "peek_ids",
    "parse_size",
    "ring_capacity",
    "align_up",
    "max_payload",
    "U64_MAX",
]

MAGIC: Final = b"\x93SHMBUS\n"
VERSION: Final = 2
KIND_QUEUE: Final = 1
KIND_TOPIC: Final = 2
KIND_NAMES: Final = {KIND_QUEUE: "Queue", KIND_TOPIC: "Topic"}

PAGE: Final = 4096
ALIGN: Final = 16
MIN_CAPACITY: Final = PAGE  # the smallest ring: one page
# Positions, sequence numbers and counters are u64 fields: the first two never pass this (see
# _ring), a statistic counter wraps at it (a damaged header may hold any value).
U64_MAX: Final = (1 << 64) - 1
FLAG_ANONYMOUS: Final = 1  # flags bit 0: removed with its creator (creator_pid, creator_start)

# The static block, field by field (see the table above).
STATIC: Final = struct.Struct("<8sIIQQQIIIIQ16sIIIIQ20s")
STATIC_SIZE: Final = 124  # header_crc follows at 124
_CRC: Final = struct.Struct("<I")
assert STATIC.size == STATIC_SIZE

HEADER_MIN: Final = 1024  # tables start here


class Field(NamedTuple):
    """One field of a table below: its name (as docs/format.md spells it), byte offset and size."""

    name: str
    offset: int
    size: int


# The header, byte by byte (the docstring's table; tests/test_spec.py checks
# docs/format.md against these tables, and the header constants below derive
# from them). "reserved" fields are zero.
HEADER_FIELDS: Final = (
    # static block (covered by header_crc)
    Field("magic", 0, 8), Field("version", 8, 4), Field("kind", 12, 4), Field("capacity", 16, 8),
    Field("ring_offset", 24, 8), Field("maxsize", 32, 8), Field("flags", 40, 4),
    Field("max_subscribers", 44, 4), Field("max_participants", 48, 4), Field("align", 52, 4),
    Field("created_ns", 56, 8), Field("bus_id", 64, 16), Field("creator_uid", 80, 4),
    Field("participants_offset", 84, 4), Field("subscribers_offset", 88, 4),
    Field("creator_pid", 92, 4), Field("creator_start", 96, 8), Field("reserved", 104, 20),
    Field("header_crc", 124, 4),
    # producer line
    Field("head", 128, 8), Field("next_seq", 136, 8), Field("bytes_in", 144, 8),
    Field("reserved", 152, 4), Field("head_repair", 156, 4), Field("reserved", 160, 32),
    # consumer line
    Field("tail", 192, 8), Field("tail_seq", 200, 8), Field("bytes_out", 208, 8),
    Field("reserved", 216, 4), Field("tail_repair", 220, 4), Field("space_waiting", 224, 4),
    Field("reserved", 228, 4), Field("tasks_done", 232, 8), Field("reserved", 240, 16),
    # recovery line
    Field("reserved", 256, 4), Field("subs_repair", 260, 4), Field("recoveries", 264, 8),
    Field("last_recovery_ns", 272, 8), Field("reserved", 280, 16), Field("sems_dev", 296, 8),
    Field("sems_ino", 304, 8), Field("sems_byte", 312, 1), Field("reserved", 313, 7),
    # 320..1023
    Field("scratch", 320, 8), Field("reserved", 328, 8), Field("boot_id", 336, 16),
    Field("reserved", 352, 32), Field("time_samples", 384, 128), Field("wait_flags", 512, 256),
    Field("recovery_mutex", 768, 64), Field("head_lock", 832, 64), Field("tail_lock", 896, 64),
    Field("subs_lock", 960, 64),
)  # fmt: skip
# One time sample entry (TIME_SAMPLES of them from time_samples).
SAMPLE_FIELDS: Final = (Field("seq", 0, 8), Field("time_ns", 8, 8))
# A participant slot, and a subscriber slot: pid and state share the first u64 in
# both, in opposite halves (pack them with the helpers below).
PARTICIPANT_FIELDS: Final = (
    Field("pid", 0, 4), Field("state", 4, 4), Field("attached_ns", 8, 8), Field("tokens", 16, 8),
    Field("reserved", 24, 8),
)  # fmt: skip
SUBSCRIBER_FIELDS: Final = (
    Field("state", 0, 4), Field("pid", 4, 4), Field("cursor", 8, 8), Field("next_seq", 16, 8),
    Field("lost", 24, 8), Field("received", 32, 8), Field("attached_ns", 40, 8), Field("owner", 48, 8),
    Field("reserved", 56, 8),
)  # fmt: skip
# A record's header; its payload follows at RECORD_SIZE.
RECORD_FIELDS: Final = (Field("length", 0, 4), Field("kind", 4, 2), Field("state", 6, 2), Field("seq", 8, 8))


def _at(fields: tuple[Field, ...], name: str, size: int | None = None) -> int:
    """The offset of the field ``name`` (unique), checked to have ``size`` bytes if given."""
    (f,) = [f for f in fields if f.name == name]
    assert size is None or f.size == size, f
    return f.offset


def _u64(fields: tuple[Field, ...], name: str) -> int:
    """The u64 index of an 8-byte field."""
    off = _at(fields, name, 8)
    assert off % 8 == 0
    return off // 8


def _u32(name: str) -> int:
    """The u32 index of a 4-byte header field."""
    off = _at(HEADER_FIELDS, name, 4)
    assert off % 4 == 0
    return off // 4


WAIT_FLAGS: Final = _at(HEADER_FIELDS, "wait_flags")  # Topic: one byte per subscriber slot
MAX_SUBSCRIBERS: Final = 256  # the wait flags' room
PARTICIPANT_SIZE: Final = 32
SUBSCRIBER_SIZE: Final = 64

# Subscriber slot fields, as u64 indices from the slot's start (state and pid share index 0).
S_STATE_PID: Final = 0
S_CURSOR: Final = _u64(SUBSCRIBER_FIELDS, "cursor")
S_NEXT_SEQ: Final = _u64(SUBSCRIBER_FIELDS, "next_seq")
S_LOST: Final = _u64(SUBSCRIBER_FIELDS, "lost")
S_RECEIVED: Final = _u64(SUBSCRIBER_FIELDS, "received")
S_ATTACHED: Final = _u64(SUBSCRIBER_FIELDS, "attached_ns")
S_OWNER: Final = _u64(SUBSCRIBER_FIELDS, "owner")

# Participant slot fields, as u64 indices from the slot's start.
P_PID_STATE: Final = 0  # pid in the low half, state in the high half
P_ATTACHED: Final = _u64(PARTICIPANT_FIELDS, "attached_ns")
P_TOKENS: Final = _u64(PARTICIPANT_FIELDS, "tokens")
M_RECOVERY: Final = _at(HEADER_FIELDS, "recovery_mutex")  # the recovery mutex
BOOT_BYTE: Final = M_RECOVERY  # an OFD write lock on it serializes the boot reset
# Which file the semaphores belong to: (st_dev, st_ino) of the file that made
# them, written at create and when an opener recreates missing ones; 0 = unknown.
IDENTITY: Final = struct.Struct("<QQ")
IDENTITY_OFFSET: Final = _at(HEADER_FIELDS, "sems_dev", 8)
SEMS_BYTE: Final = _at(HEADER_FIELDS, "sems_byte")  # an OFD lock, no data: one recreator at a time

# Indices into the header viewed as u64 (offset // 8) and as u32 (offset // 4).
Q_HEAD: Final = _u64(HEADER_FIELDS, "head")
Q_NEXT_SEQ: Final = _u64(HEADER_FIELDS, "next_seq")
Q_BYTES_IN: Final = _u64(HEADER_FIELDS, "bytes_in")
Q_TAIL: Final = _u64(HEADER_FIELDS, "tail")
Q_TAIL_SEQ: Final = _u64(HEADER_FIELDS, "tail_seq")
Q_BYTES_OUT: Final = _u64(HEADER_FIELDS, "bytes_out")
# Each lock: its mutex's byte offset and its repair word's u32 index.
M_HEAD: Final = _at(HEADER_FIELDS, "head_lock")
M_TAIL: Final = _at(HEADER_FIELDS, "tail_lock")
M_SUBS: Final = _at(HEADER_FIELDS, "subs_lock")
I_HEAD_REPAIR: Final = _u32("head_repair")
I_TAIL_REPAIR: Final = _u32("tail_repair")
I_SUBS_REPAIR: Final = _u32("subs_repair")
BOOT_ID: Final = _at(HEADER_FIELDS, "boot_id", 16)
# The locks each kind of bus has: (role, mutex byte offset, repair word u32 index).
LOCKS: Final = {
    1: (("head", M_HEAD, I_HEAD_REPAIR), ("tail", M_TAIL, I_TAIL_REPAIR)),  # Queue
    2: (("head", M_HEAD, I_HEAD_REPAIR), ("subs", M_SUBS, I_SUBS_REPAIR)),  # Topic
}
Q_RECOVERIES: Final = _u64(HEADER_FIELDS, "recoveries")
Q_LAST_RECOVERY: Final = _u64(HEADER_FIELDS, "last_recovery_ns")
I_SPACE_WAITING: Final = _u32("space_waiting")
Q_SCRATCH: Final = _u64(HEADER_FIELDS, "scratch")
# JoinableQueue: task_done calls, ever, under the tail lock (unfinished = next_seq - tasks_done).
Q_TASKS_DONE: Final = _u64(HEADER_FIELDS, "tasks_done")
# Time samples: entries of (seq, time_ns) as u64 pairs from this index (see the docstring).
TIME_SAMPLES: Final = 8
Q_TIME_SAMPLES: Final = _at(HEADER_FIELDS, "time_samples", TIME_SAMPLES * 16) // 8
SAMPLE_EVERY: Final = 256  # producers test ``seq & 255`` inline (see sample_due): change both together
SAMPLE_WRITING: Final = (1 << 64) - 1  # the seq of an entry being written


def sample_due(last: int, count: int) -> bool:
    """True if one of ``count`` messages published together, the last with seq ``last``, gets a time sample.

    That is, if one of their seqs is a multiple of ``SAMPLE_EVERY``. The
    per-message paths inline this as ``last & 255 < count`` (a call costs
    more than the test); tests/test_format.py checks the two agree.
    """
    return last % SAMPLE_EVERY < count

_UINT: Final = {1: "B", 2: "H", 4: "I", 8: "Q"}
RECORD: Final = struct.Struct("<" + "".join(_UINT[f.size] for f in RECORD_FIELDS))  # "<IHHQ"
RECORD_SIZE: Final = RECORD.size
REC_MSGPACK: Final = 1
REC_RAW: Final = 2
REC_WRAP: Final = 3
REC_NDARRAY: Final = 4
STATE_COMMITTED: Final = 1
assert RECORD_SIZE == ALIGN
assert _at(HEADER_FIELDS, "header_crc") == STATIC_SIZE
assert sum(f.size for f in PARTICIPANT_FIELDS) == PARTICIPANT_SIZE
assert sum(f.size for f in SUBSCRIBER_FIELDS) == SUBSCRIBER_SIZE
assert sum(f.size for f in HEADER_FIELDS) == HEADER_MIN

# The packed pid/state words: a participant slot's first u64 holds the pid in its
# low half and the state in its high half; a subscriber slot's, the other way round.
_LOW: Final = 0xFFFFFFFF


def participant_word(pid: int, state: int) -> int:
    """A participant slot's first u64, from its ``pid`` and ``state``."""
    return pid | state << 32


def participant_pid(word: int) -> int:
    """The pid in a participant slot's first u64."""
    return word & _LOW


def participant_state(word: int) -> int:
    """The state (0 free, 1 live) in a participant slot's first u64."""
    return word >> 32


def subscriber_word(state: int, pid: int) -> int:
    """A subscriber slot's first u64, from its ``state`` and ``pid``."""
    return state | pid << 32


def subscriber_state(word: int) -> int:
    """The state (0 free, 1 active) in a subscriber slot's first u64."""
    return word & _LOW


def subscriber_pid(word: int) -> int:
    """The pid in a subscriber slot's first u64."""
    return word >> 32


assert _at(PARTICIPANT_FIELDS, "pid", 4) == 0 and _at(PARTICIPANT_FIELDS, "state", 4) == 4
assert _at(SUBSCRIBER_FIELDS, "state", 4) == 0 and _at(SUBSCRIBER_FIELDS, "pid", 4) == 4

_BUS_ID = re.compile(rb"[0-9a-f]{16}\Z")
_MAX_CAPACITY: Final = 1 << 40  # 1 TiB: far beyond any real bus, small enough to catch garbage
_MAX_SLOTS: Final = 1 << 16


def align_up(n: int, to: int) -> int:
    """Round ``n`` up to a multiple of ``to`` (a power of two)."""
    return (n + to - 1) & ~(to - 1)


def max_payload(capacity: int) -> int:
    """The largest payload a ring of ``capacity`` bytes can ever hold."""
    return capacity - RECORD_SIZE


_UNITS: Final = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "kib": 1024,
    "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
    "g": 1000**3, "gb": 1000**3, "gib": 1024**3,
    "t": 1000**4, "tb": 1000**4, "tib": 1024**4,
}  # fmt: skip
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*\Z")


def parse_size(value: int | str) -> int:
    """Turn ``65536``, ``"64MiB"``, ``"1.5 GB"`` or ``"512k"`` into a byte count.

    Raises ``ValueError`` for anything else, naming the accepted units.
    """
    if isinstance(value, bool):
        raise TypeError("a size is an int or a string such as '64MiB', not a bool")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"a size must be positive, got {value}")
        return value
    if not isinstance(value, str):
        raise TypeError(f"a size is an int or a string such as '64MiB', not {type(value).__name__}")
    m = _SIZE.match(value)
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise ValueError(f"cannot read size {value!r}: write e.g. 65536, '64KiB', '64MiB' or '1GiB'")
    n = int(float(m.group(1)) * _UNITS[unit])
    if n <= 0:
        raise ValueError(f"a size must be positive, got {value!r}")
    return n


def ring_capacity(value: int | str) -> int:
    """A ring size from the user (``parse_size`` rules), rounded up to a page and bounded.

    Raises ``ValueError`` below one page (``MIN_CAPACITY``, 4096 bytes: a
    smaller number is a mistake, such as a message count passed as a size,
    never silently made a page) and beyond 1 TiB, so a typo never creates a
    bus its own header check would refuse.
    """
    n = parse_size(value)
    if n < MIN_CAPACITY:
        raise ValueError(
            f"capacity {value!r} is below the minimum of {MIN_CAPACITY} bytes (one page); "
            "capacity is a size in bytes (e.g. '16MiB'): to bound the number of messages, pass maxsize"
        )
    cap = align_up(n, PAGE)
    if cap > _MAX_CAPACITY:
        raise ValueError(f"capacity {value!r} is over the 1 TiB a bus may have")
    return cap


@dataclass(frozen=True)
class Layout:
    """The static facts of a bus, as read from (or about to be written to) its header."""

    kind: int
    capacity: int
    ring_offset: int
    maxsize: int
    max_subscribers: int
    max_participants: int
    created_ns: int
    bus_id: str
    creator_uid: int
    participants_offset: int
    subscribers_offset: int
    flags: int = 0
    creator_pid: int = 0
    creator_start: int = 0

    @property
    def anonymous(self) -> bool:
        """True for an anonymous bus (``Queue()``), which goes with its creating process."""
        return bool(self.flags & FLAG_ANONYMOUS)

    @property
    def file_size(self) -> int:
        """The size the file must have: header, tables and ring."""
        return self.ring_offset + self.capacity

    @classmethod
    def new(
        cls,
        *,
        kind: int,
        capacity: int,
        maxsize: int,
        max_subscribers: int,
        max_participants: int,
        bus_id: str,
        creator_uid: int,
        creator: tuple[int, int] | None = None,
    ) -> Layout:
        """Lay out a new bus: tables after the fixed header, the ring page-aligned after them.

        ``creator`` (pid, start time in clock ticks) makes it an anonymous bus.
        """
        participants_offset = HEADER_MIN
        subscribers_offset = participants_offset + max_participants * PARTICIPANT_SIZE
        ring_offset = align_up(subscribers_offset + max_subscribers * SUBSCRIBER_SIZE, PAGE)
        return cls(
            kind=kind,
            capacity=capacity,
            ring_offset=ring_offset,
            maxsize=maxsize,
            max_subscribers=max_subscribers,
            max_participants=max_participants,
            created_ns=time.time_ns(),
            bus_id=bus_id,
            creator_uid=creator_uid,
            participants_offset=participants_offset,
            subscribers_offset=subscribers_offset,
            flags=FLAG_ANONYMOUS if creator else 0,
            creator_pid=creator[0] if creator else 0,
            creator_start=creator[1] if creator else 0,
        )


def build_header(layout: Layout) -> bytes:
    """The first ``HEADER_MIN`` bytes of a new bus: static block, crc, zeroed counters."""
    static = STATIC.pack(
        MAGIC,
        VERSION,
        layout.kind,
        layout.capacity,
        layout.ring_offset,
        layout.maxsize,
        layout.flags,
        layout.max_subscribers,
        layout.max_participants,
        ALIGN,
        layout.created_ns,
        layout.bus_id.encode("ascii"),
        layout.creator_uid,
        layout.participants_offset,
        layout.subscribers_offset,
        layout.creator_pid,
        layout.creator_start,
        b"",
    )
    head = bytearray((static + _CRC.pack(zlib.crc32(static))).ljust(HEADER_MIN, b"\0"))
    for off in (M_RECOVERY, M_HEAD, M_TAIL, M_SUBS):
        head[off : off + len(INIT_BYTES)] = INIT_BYTES
    head[BOOT_ID : BOOT_ID + 16] = current_boot_id()
    return bytes(head)


def current_boot_id() -> bytes:
    """This boot's id (16 bytes): a lock word written in another boot is stale."""
    try:
        with open("/proc/sys/kernel/random/boot_id", "rb") as f:
            return bytes.fromhex(f.read().strip().decode("ascii").replace("-", ""))[:16].ljust(16, b"\0")
    except (OSError, ValueError):
        return b"\0" * 16  # unknown: never taken for a change of boot


def parse_header(data: bytes, *, path: str, file_size: int) -> Layout:
    """Read and check the static block of ``data`` (at least the first 128 bytes of the file).

    Raises ``NotABus`` (no magic), ``IncompatibleBus`` (another version) or
    ``CorruptBus`` (any field out of range, or a crc mismatch). Every field is
    checked against the others and against the real ``file_size``: nothing read
    here is trusted later without that check.
    """
    if len(data) < len(MAGIC) or data[: len(MAGIC)] != MAGIC:
        raise NotABus(
            f"{path} is not a shmbus bus (no shmbus header): check the path, "
            "or remove the file if a bus should be created there",
            path=path,
        )
    if len(data) < STATIC_SIZE + _CRC.size or file_size < HEADER_MIN:
        raise CorruptBus(
            f"{path} is truncated ({file_size} bytes, shorter than a shmbus header): "
            "remove it with `shmbus rm` and create the bus again",
            path=path,
            offset=file_size,
        )
    fields = STATIC.unpack_from(data)
    (_, version, kind, capacity, ring_offset, maxsize, flags, max_subs, max_parts, align, created_ns,
     bus_id, uid, parts_off, subs_off, creator_pid, creator_start, _reserved) = fields  # fmt: skip
    if version != VERSION:
        raise IncompatibleBus(
            f"{path} is a shmbus bus of format version {version}, this shmbus reads version "
            f"{VERSION}: use the shmbus release that created it, or recreate the bus",
            path=path,
        )
    (crc,) = _CRC.unpack_from(data, STATIC_SIZE)
    if crc != zlib.crc32(data[:STATIC_SIZE]):
        raise _corrupt(path, 124, "the header checksum does not match its fields")
    _check_static(path, kind, capacity, ring_offset, maxsize, max_subs, max_parts, align,
                  bus_id, parts_off, subs_off, file_size)  # fmt: skip
    return Layout(
        kind=kind,
        capacity=capacity,
        ring_offset=ring_offset,
        maxsize=maxsize,
        max_subscribers=max_subs,
        max_participants=max_parts,
        created_ns=created_ns,
        bus_id=bus_id.decode("ascii"),
        creator_uid=uid,
        participants_offset=parts_off,
        subscribers_offset=subs_off,
        flags=flags,
        creator_pid=creator_pid,
        creator_start=creator_start,
    )


def peek_ids(data: bytes) -> tuple[str, int] | None:
    """The bus id and subscriber slot count of a header that may be damaged, or None.

    Used only to find a damaged bus's semaphores so that they can be removed.
    """
    if len(data) < STATIC_SIZE or data[: len(MAGIC)] != MAGIC:
        return None
    fields = STATIC.unpack_from(data)
    bus_id, max_subs = fields[11], fields[7]
    if not _BUS_ID.match(bus_id):
        return None
    return bus_id.decode("ascii"), min(max_subs, MAX_SUBSCRIBERS)


def _check_static(
    path: str,
    kind: int,
    capacity: int,
    ring_offset: int,
    maxsize: int,
    max_subs: int,
    max_parts: int,
    align: int,
    bus_id: bytes,
    parts_off: int,
    subs_off: int,
    file_size: int,
) -> None:
    # The crc catches random damage; these checks catch a hostile writer who
    # recomputed it. Each one guards an offset or a size used later.
    if kind not in KIND_NAMES:
        raise _corrupt(path, 12, f"unknown bus kind {kind}")
    if align != ALIGN:
        raise _corrupt(path, 52, f"record alignment {align}, expected {ALIGN}")
    if not (PAGE <= capacity <= _MAX_CAPACITY) or capacity % PAGE:
        raise _corrupt(path, 16, f"capacity {capacity} is not a multiple of {PAGE} in range")
    if max_subs > MAX_SUBSCRIBERS or max_parts > _MAX_SLOTS or maxsize >= 1 << 31:
        raise _corrupt(path, 32, "a table size or maxsize is out of range")
    if not _BUS_ID.match(bus_id):
        raise _corrupt(path, 64, "the bus id is not 16 hex digits")
    if parts_off != HEADER_MIN or subs_off != parts_off + max_parts * PARTICIPANT_SIZE:
        raise _corrupt(path, 84, "the table offsets do not follow the header")
    if ring_offset != align_up(subs_off + max_subs * SUBSCRIBER_SIZE, PAGE):
        raise _corrupt(path, 24, f"ring offset {ring_offset} does not follow the tables")
    if file_size < ring_offset + capacity:
        raise CorruptBus(
            f"{path} is truncated: {file_size} bytes, its header needs {ring_offset + capacity}; "
            "the messages in it are lost: remove it with `shmbus rm` and create the bus again",
            path=path,
            offset=file_size,
        )


def _corrupt(path: str, offset: int, what: str) -> CorruptBus:
    return CorruptBus(
        f"{path} is corrupt at byte {offset}: {what}; run `shmbus check {path}`, "
        "then remove it with `shmbus rm` and create the bus again",
        path=path,
        offset=offset,
    )
