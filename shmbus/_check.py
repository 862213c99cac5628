"""Checking a bus file without trusting it: the one job of ``shmbus check``.

Rule: this module only reads. It opens the file read-only, takes no lock,
opens no semaphore, and believes nothing it reads before checking it: the
static header through ``_format.parse_header``, the locks (one whose holder
died or does not exist is a problem; one held by a live, maybe paused,
process is not), then the counters, every
record from ``tail`` to ``head`` through ``_ring`` (the very checks a reader
makes), every payload through the codec, and a Topic's subscriber
table. It stops at the first problem, because nothing after a bad record or
counter can be located with confidence, and says where it is in the file.

What is checked is what no history can break, crashes included: a sound
bus, however it was used, passes. Statistics that a killed process may leave
behind (``bytes_out`` a little ahead) are not problems.

A bus in use changes under the walk (the counters are read once, without a
lock), so check a bus at rest; on a busy bus a problem may be a false alarm.
The work is bounded by the ring: at most ``capacity / 16`` records are
visited and nothing larger than one payload is copied.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass

from . import _ring
from ._codec import Codec, extract
from ._errors import CorruptBus, DecodeError
from ._file import open_fd, read_layout, resolve_path
from ._format import (
    ALIGN,
    BOOT_ID,
    KIND_NAMES,
    KIND_TOPIC,
    LOCKS,
    M_RECOVERY,
    Q_BYTES_IN,
    Q_BYTES_OUT,
    Q_HEAD,
    Q_NEXT_SEQ,
    Q_TAIL,
    Q_TAIL_SEQ,
    REC_RAW,
    RECORD_SIZE,
    S_CURSOR,
    S_NEXT_SEQ,
    S_STATE_PID,
    SUBSCRIBER_SIZE,
    Layout,
    current_boot_id,
    subscriber_state,
)
from ._mutex import NOT_RECOVERABLE, ghost_word, kind_ok_at, owner_of

__all__ = ["Problem", "Report", "check", "examine", "lock_state"]


def _any_ext(code: int, data: bytes) -> tuple[int, bytes]:
    return code, data


# The most lenient decoding: a payload is sound if it is well-formed msgpack,
# whatever ext types or map keys the reader's own Codec would make of it.
_LENIENT = Codec(unpack_options={"ext_hook": _any_ext, "use_list": False})


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a bus file: where (a byte offset in the file, when known) and what."""

    offset: int | None
    message: str

    def __str__(self) -> str:
        return self.message if self.offset is None else f"byte {self.offset}: {self.message}"


@dataclass(frozen=True)
class Report:
    """What ``examine`` found: the problems (none for a sound bus) and what it counted on the way.

    ``kind`` is ``"Queue"`` or ``"Topic"``, or None when the header itself is
    corrupt; the counts cover the records walked before the first problem.
    """

    path: str
    kind: str | None
    capacity: int
    messages: int
    used_bytes: int
    subscribers: int
    problems: tuple[Problem, ...]

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not self.problems


def check(path: str | os.PathLike[str]) -> list[Problem]:
    """Check the bus at ``path`` without trusting any of it; return its problems (empty if sound).

    The list holds at most one problem today, the first one found: its
    ``offset`` is the byte in the file where the header field or the record at
    fault starts. A corrupt header is a problem like any other.

    Raises ``BusNotFound`` (no file), ``NotABus`` (not a regular file, or no
    shmbus magic), ``IncompatibleBus`` (another format version: this shmbus
    cannot judge it) or ``PermissionError``; never anything for a corrupt bus.

    Example::

        for problem in shmbus._check.check("jobs"):
            print(problem)      # byte 4128: record at ring offset 32 has kind 9 state 1: ...
    """
    return list(examine(path).problems)


def examine(path: str | os.PathLike[str]) -> Report:
    """``check``, returning also what the walk counted (for ``shmbus check``'s summary line)."""
    real = resolve_path(path)
    fd = open_fd(real, os.O_RDONLY)
    try:
        try:
            layout = read_layout(fd, real)
        except CorruptBus as e:
            return Report(real, None, 0, 0, 0, 0, (Problem(e.offset, _what(e, real)),))
        # Mapped, not read: a ring may be large (and sparse), and nothing is copied but payloads.
        mm = mmap.mmap(fd, layout.file_size, mmap.MAP_SHARED, mmap.PROT_READ)
    finally:
        os.close(fd)
    try:
        return _Walk(real, layout, mm).run()
    finally:
        mm.close()


def _what(e: CorruptBus, path: str) -> str:
    """A header error's own words, without the path and offset that a Problem carries already."""
    # Nor its advice to run `shmbus check`: the caller is running it.
    message = str(e).split("; run `shmbus check", 1)[0]
    prefix = f"{path} is corrupt at byte {e.offset}: "
    return message[len(prefix) :] if message.startswith(prefix) else message


def lock_state(hb: memoryview, off: int, repair: int | None) -> str | None:
    """What is wrong with the lock at byte ``off`` of header bytes ``hb`` (None: nothing), as a phrase.

    A lock held by a live thread is not wrong (it may be paused: that is not
    death); one whose holder died, one awaiting repair, and one naming a
    thread that does not exist are.
    """
    u32 = struct.unpack_from
    if not kind_ok_at(hb, off):
        return "has damaged bytes (not a robust process-shared mutex): recreate the bus"
    (word,) = u32("<I", hb, off)
    (owner,) = u32("<I", hb, off + 8)
    (pending,) = u32("<I", hb, repair * 4) if repair is not None else (0,)
    tid, died = owner_of(word)
    if owner == NOT_RECOVERABLE:
        return "was released unrepaired and is unusable: run `shmbus recover --force` once no process uses it"
    if died:
        return "was held by a process that died: run `shmbus recover` (its next taker also mends it)"
    if ghost_word(word):
        return (
            f"is held by thread {tid}, which does not exist in this PID namespace: if no process uses "
            "the bus, run `shmbus recover --force`"
        )
    if pending and not tid:
        return "awaits the repair of what a holder left half-done: run `shmbus recover`"
    return None


class _Walk:
    """One pass over a mapped bus: counters, records, then the subscriber table."""

    def __init__(self, path: str, layout: Layout, mm: mmap.mmap) -> None:
        self.path = path
        self.layout = layout
        self.mm = mm
        self.messages = 0
        self.payload_bytes = 0
        self.used_bytes = 0
        self.subscribers = 0

    def run(self) -> Report:
        lay = self.layout
        with memoryview(self.mm) as mv, mv[: lay.ring_offset] as hb, hb.cast("Q") as h, \
                mv[lay.ring_offset :] as ring:  # fmt: skip
            problem = self._locks(hb)
            if problem is None:
                problem = self._ring(h, ring)
            if problem is None and lay.kind == KIND_TOPIC:
                problem = self._subscribers(h)
        return Report(
            path=self.path,
            kind=KIND_NAMES[lay.kind],
            capacity=lay.capacity,
            messages=self.messages,
            used_bytes=self.used_bytes,
            subscribers=self.subscribers,
            problems=() if problem is None else (problem,),
        )

    def _locks(self, hb: memoryview) -> Problem | None:
        """Each lock: intact, not left by a dead holder, not held by a thread that does not exist."""
        if bytes(hb[BOOT_ID : BOOT_ID + 16]) != current_boot_id():
            return None  # words of an earlier boot: the next open resets them
        for role, off, repair in (*LOCKS[self.layout.kind], ("recovery", M_RECOVERY, None)):
            what = lock_state(hb, off, repair)
            if what is not None:
                return Problem(off, f"the {role} lock {what}")
        return None

    def _ring(self, h: memoryview, ring: memoryview) -> Problem | None:
        """The counters, and every record from tail to head."""
        cap, ro = self.layout.capacity, self.layout.ring_offset
        head, tail = h[Q_HEAD], h[Q_TAIL]
        next_seq, tail_seq = h[Q_NEXT_SEQ], h[Q_TAIL_SEQ]
        bytes_in, bytes_out = h[Q_BYTES_IN], h[Q_BYTES_OUT]
        try:
            _ring.check_positions(head, tail, cap)
        except CorruptBus as e:
            blame = Q_TAIL if tail % ALIGN and not head % ALIGN else Q_HEAD
            return Problem(blame * 8, str(e))
        self.used_bytes = head - tail
        pos, seq = tail, tail_seq
        # At most (head - tail) / 16 <= capacity / 16 turns: every record is at
        # least 16 bytes long and _ring.read refuses one that ends past head.
        while pos < head:
            try:
                start, kind, rseq, n, pos = _ring.read(ring, cap, pos, head)
            except CorruptBus as e:
                return Problem(ro + (pos % cap if e.offset is None else e.offset), str(e))
            off = start % cap
            # A Topic skips (never reuses) a sequence number a publisher died
            # holding, so its records only have to increase; a Queue's follow on.
            gap_ok = self.layout.kind == KIND_TOPIC and seq != tail_seq and rseq > seq
            if rseq != seq and not gap_ok:
                expected = "tail_seq" if seq == tail_seq else "one more than the record before"
                return Problem(
                    ro + off, f"record at ring offset {off} has sequence number {rseq}, expected {seq} "
                    f"({expected})",
                )  # fmt: skip
            if kind != REC_RAW:  # msgpack, or an array's header (raw bytes are anything)
                try:
                    _LENIENT.finish(kind, extract(ring, off + RECORD_SIZE, n, kind))
                except DecodeError as e:
                    # An array, and numpy is not installed here: its payload cannot be judged.
                    if not isinstance(e.__cause__, ImportError):
                        return Problem(ro + off, f"record at ring offset {off} (seq {rseq}): {e}")
            seq = rseq + 1
            self.messages += 1
            self.payload_bytes += n
        return self._counters(next_seq, seq, bytes_in, bytes_out)

    def _counters(self, next_seq: int, seq: int, bytes_in: int, bytes_out: int) -> Problem | None:
        """What the header's counters must say about the records just walked."""
        # (a Topic may have skipped numbers after its last record: see _ring's gap rule above)
        if next_seq != seq and not (self.layout.kind == KIND_TOPIC and next_seq > seq):
            return Problem(
                Q_NEXT_SEQ * 8, f"next_seq is {next_seq}, but the ring holds {self.messages} messages "
                f"numbered from tail_seq {seq - self.messages}, so it should be {seq}",
            )  # fmt: skip
        maxsize = self.layout.maxsize
        if maxsize and self.messages > maxsize:
            return Problem(
                Q_NEXT_SEQ * 8, f"the queue holds {self.messages} messages, more than its maxsize {maxsize}"
            )
        # A payload is counted in bytes_in before head moves past it, and out
        # of bytes_out only after: no history, crashes included, breaks these.
        if bytes_out > bytes_in:
            return Problem(Q_BYTES_OUT * 8, f"bytes_out {bytes_out} is more than bytes_in {bytes_in}")
        if bytes_in < self.payload_bytes:
            return Problem(
                Q_BYTES_IN * 8, f"bytes_in is {bytes_in}, less than the {self.payload_bytes} payload "
                "bytes still in the ring",
            )  # fmt: skip
        return None

    def _subscribers(self, h: memoryview) -> Problem | None:
        """A Topic's active subscriber slots: a cursor may lag behind tail, never pass head."""
        lay = self.layout
        head, next_seq = h[Q_HEAD], h[Q_NEXT_SEQ]
        for slot in range(lay.max_subscribers):
            at = lay.subscribers_offset + slot * SUBSCRIBER_SIZE
            base = at // 8
            state = subscriber_state(h[base + S_STATE_PID])
            if state == 0:
                continue
            if state != 1:
                return Problem(at, f"subscriber slot {slot} has state {state}, not 0 (free) or 1 (active)")
            cursor, nxt = h[base + S_CURSOR], h[base + S_NEXT_SEQ]
            if cursor % ALIGN or cursor > head:
                return Problem(
                    at + S_CURSOR * 8,
                    f"subscriber slot {slot} has cursor {cursor}: not a record position up to head {head}",
                )
            if nxt > next_seq:
                return Problem(
                    at + S_NEXT_SEQ * 8,
                    f"subscriber slot {slot} expects sequence number {nxt}, past next_seq {next_seq}",
                )
            self.subscribers += 1
        return None
