"""``shmbus._check`` and ``shmbus check``: sound buses pass, each kind of damage is named at its byte."""

from __future__ import annotations

import dataclasses
import os
import struct
from pathlib import Path
from typing import Callable

import pytest

import shmbus
from shmbus import _ring, _sync
from shmbus._check import Problem, Report, check, examine
from shmbus._cli import main
from shmbus._file import ALL_ROLES, read_layout_of
from shmbus._format import (
    MAGIC,
    Q_BYTES_IN,
    Q_BYTES_OUT,
    Q_HEAD,
    Q_NEXT_SEQ,
    Q_TAIL,
    REC_MSGPACK,
    REC_RAW,
    RECORD_SIZE,
    S_CURSOR,
    S_NEXT_SEQ,
    S_STATE_PID,
    STATIC_SIZE,
    SUBSCRIBER_SIZE,
    VERSION,
    build_header,
)

CAP = 4096


@dataclasses.dataclass
class Rec:
    """A record as found in the file: where its header is, and what it says."""

    offset: int  # in the file
    kind: int
    seq: int
    length: int
    after_wrap: bool  # the walk followed a wrap marker to reach it


def u64(path: str, index: int) -> int:
    return int(struct.unpack_from("<Q", Path(path).read_bytes(), index * 8)[0])


def poke(path: str, offset: int, fmt: str, value: int) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, struct.pack(fmt, value), offset)
    finally:
        os.close(fd)


def records(path: str) -> list[Rec]:
    """Every record from tail to head, walked with the ring's own reader."""
    lay = read_layout_of(path)
    data = Path(path).read_bytes()
    ring = memoryview(data)[lay.ring_offset :]
    head, tail = u64(path, Q_HEAD), u64(path, Q_TAIL)
    out = []
    while tail < head:
        start, kind, seq, n, nxt = _ring.read(ring, lay.capacity, tail, head)
        out.append(Rec(lay.ring_offset + start % lay.capacity, kind, seq, n, start != tail))
        tail = nxt
    return out


def wrapped_queue(path: str) -> shmbus.Queue:
    """A queue whose live records include a wrap marker: msgpack, bin and raw payloads, some empty."""
    q = shmbus.Queue.create(path, capacity=CAP)
    i = 0
    while True:
        q.put({"i": i, "pad": "x" * (i * 7 % 90)})
        q.put(bytes(range(i % 200)))  # msgpack bin, taken out without its header
        q.put_bytes(b"r" * (i % 3))  # raw, some of length 0
        while q.qsize() > 9:
            q.get_nowait()
        i += 1
        if u64(path, Q_HEAD) > CAP and any(r.after_wrap for r in records(path)):
            return q


@pytest.fixture
def queue(disk_path: str) -> str:
    """A closed, sound, wrapped Queue at ``disk_path`` with 9 messages."""
    wrapped_queue(disk_path).close()
    return disk_path


# -- sound buses -------------------------------------------------------------------------------


def test_a_wrapped_queue_with_bytes_and_raw_payloads_is_sound(queue: str) -> None:
    recs = records(queue)
    assert {r.kind for r in recs} == {REC_MSGPACK, REC_RAW} and any(r.after_wrap for r in recs)
    assert 0 in {r.length for r in recs}
    report = examine(queue)
    assert report.ok and check(queue) == []
    assert (report.kind, report.capacity, report.messages) == ("Queue", CAP, 9)
    assert report.used_bytes == u64(queue, Q_HEAD) - u64(queue, Q_TAIL)
    with shmbus.Queue.open(queue) as q:
        assert len(q.get_many(100, block=False)) == 9  # what check counted is what a reader gets


def test_new_empty_buses_are_sound(disk_path: str, tmp_path: Path) -> None:
    shmbus.Queue.create(disk_path, capacity=CAP).close()
    topic = str(tmp_path / "topic")
    shmbus.Topic.create(topic, capacity=CAP).close()
    try:
        assert examine(disk_path) == Report(os.path.abspath(disk_path), "Queue", CAP, 0, 0, 0, ())
        assert examine(topic) == Report(os.path.abspath(topic), "Topic", CAP, 0, 0, 0, ())
    finally:
        shmbus.unlink(topic)


def test_a_topic_that_dropped_and_wrapped_with_a_lagging_subscriber_is_sound(disk_path: str) -> None:
    with shmbus.Topic.create(disk_path, capacity=CAP, max_subscribers=4) as t:
        lagging = t.subscribe()
        reader = t.subscribe()
        for i in range(400):
            t.publish({"i": i} if i % 3 else b"b" * (i % 70))
            if i % 4 == 0:
                t.publish_bytes(bytes(i % 5))
            reader.get_many(10, block=False)
        # The lagging cursor was overwritten long ago: behind tail is legitimate, never past head.
        slot = read_layout_of(disk_path).subscribers_offset + lagging.slot * SUBSCRIBER_SIZE
        assert u64(disk_path, slot // 8 + S_CURSOR) < u64(disk_path, Q_TAIL)
        report = examine(disk_path)
        assert report.ok, report.problems
        assert (report.kind, report.subscribers) == ("Topic", 2)
        assert report.messages == len(records(disk_path)) and u64(disk_path, Q_TAIL) > CAP
        lagging.close()
        reader.close()


def test_a_ring_full_of_empty_records_is_walked_to_the_end(disk_path: str) -> None:
    with shmbus.Queue.create(disk_path, capacity=CAP) as q:
        for _ in range(CAP // RECORD_SIZE):
            q.put_bytes(b"")
        assert examine(disk_path).messages == CAP // RECORD_SIZE == q.qsize()


# -- damage, named at its byte -----------------------------------------------------------------

Damage = Callable[[str, list[Rec]], int]  # does the damage, returns the offset check must report


def _kind(path: str, recs: list[Rec]) -> int:
    poke(path, recs[2].offset + 4, "<H", 9)
    return recs[2].offset


def _uncommitted(path: str, recs: list[Rec]) -> int:
    poke(path, recs[3].offset + 6, "<H", 0)
    return recs[3].offset


def _length_past_head(path: str, recs: list[Rec]) -> int:
    poke(path, recs[-1].offset, "<I", recs[-1].length + 64)
    return recs[-1].offset


def _seq_gap(path: str, recs: list[Rec]) -> int:
    poke(path, recs[4].offset + 8, "<Q", recs[4].seq + 1)
    return recs[4].offset


def _first_after_wrap(path: str, recs: list[Rec]) -> int:
    rec = next(r for r in recs if r.after_wrap)
    poke(path, rec.offset + 4, "<H", 0)
    return rec.offset  # the ring's first byte: the walk followed the wrap marker


def _head_behind_tail(path: str, recs: list[Rec]) -> int:
    poke(path, Q_HEAD * 8, "<Q", u64(path, Q_TAIL) - 16)
    return Q_HEAD * 8


def _tail_misaligned(path: str, recs: list[Rec]) -> int:
    poke(path, Q_TAIL * 8, "<Q", u64(path, Q_TAIL) + 8)
    return Q_TAIL * 8


def _garbage_payload(path: str, recs: list[Rec]) -> int:
    rec = next(r for r in recs if r.kind == REC_MSGPACK and r.length)
    poke(path, rec.offset + RECORD_SIZE, "<B", 0xC1)  # the one byte msgpack never uses
    return rec.offset


def _next_seq(path: str, recs: list[Rec]) -> int:
    poke(path, Q_NEXT_SEQ * 8, "<Q", u64(path, Q_NEXT_SEQ) + 1)
    return Q_NEXT_SEQ * 8


def _bytes_out(path: str, recs: list[Rec]) -> int:
    poke(path, Q_BYTES_OUT * 8, "<Q", u64(path, Q_BYTES_IN) + 1)
    return Q_BYTES_OUT * 8


def _header_crc(path: str, recs: list[Rec]) -> int:
    poke(path, STATIC_SIZE - 1, "<B", 0x55)  # the last byte the crc covers
    return STATIC_SIZE  # where the crc is


@pytest.mark.parametrize(
    ("damage", "words"),
    [
        (_kind, "kind 9 state 1"),
        (_uncommitted, "state 0"),
        (_length_past_head, "past the written data"),
        (_seq_gap, "expected"),
        (_first_after_wrap, "ring offset 0 has kind"),
        (_head_behind_tail, "positions out of range"),
        (_tail_misaligned, "positions out of range"),
        (_garbage_payload, "not valid msgpack"),
        (_next_seq, "next_seq"),
        (_bytes_out, "bytes_out"),
        (_header_crc, "checksum"),
    ],
)
def test_each_kind_of_damage_is_reported_at_its_offset(queue: str, damage: Damage, words: str) -> None:
    offset = damage(queue, records(queue))
    problems = check(queue)
    assert len(problems) == 1, problems
    assert problems[0].offset == offset and words in problems[0].message, problems[0]
    assert "shmbus check" not in problems[0].message  # no advice to run what is running


def test_a_queue_holding_more_than_its_maxsize_is_reported(queue: str) -> None:
    lay = dataclasses.replace(read_layout_of(queue), maxsize=4)
    fd = os.open(queue, os.O_WRONLY)
    try:
        os.pwrite(fd, build_header(lay)[: STATIC_SIZE + 4], 0)  # a consistent header, crc and all
    finally:
        os.close(fd)
    (problem,) = check(queue)
    assert problem.offset == Q_NEXT_SEQ * 8 and "more than its maxsize 4" in problem.message


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        (S_STATE_PID, 7 | os.getpid() << 32, "state 7"),
        (S_CURSOR, 8, "cursor 8"),
        (S_NEXT_SEQ, 10**6, "past next_seq"),
    ],
)
def test_a_damaged_subscriber_slot_is_reported(disk_path: str, field: int, value: int, words: str) -> None:
    with shmbus.Topic.create(disk_path, capacity=CAP) as t, t.subscribe() as sub:
        t.publish_many(range(5))
        assert len(sub.get_many(5, block=False)) == 5
        at = read_layout_of(disk_path).subscribers_offset + sub.slot * SUBSCRIBER_SIZE
        poke(disk_path, at + field * 8, "<Q", value)
        (problem,) = check(disk_path)
    assert problem.offset == at + field * 8 and words in problem.message


def test_an_array_is_decoded_and_a_malformed_array_header_reported(disk_path: str) -> None:
    np = pytest.importorskip("numpy")
    with shmbus.Queue.create(disk_path, capacity=CAP) as q:
        q.put("first")
        q.put(np.arange(6, dtype="<i4").reshape(2, 3))
    assert examine(disk_path).messages == 2 and check(disk_path) == []
    rec = records(disk_path)[1]
    poke(disk_path, rec.offset + RECORD_SIZE, "<H", 3)  # the array header's length: not a multiple of 16
    (problem,) = check(disk_path)
    assert problem.offset == rec.offset and "array message is malformed" in problem.message


# -- what check refuses, and what it leaves alone ---------------------------------------------


def test_what_is_not_a_bus_raises(tmp_path: Path) -> None:
    with pytest.raises(shmbus.BusNotFound):
        check(tmp_path / "missing")
    (tmp_path / "text").write_text("hello")
    with pytest.raises(shmbus.NotABus):
        check(tmp_path / "text")
    with pytest.raises(shmbus.NotABus):
        check(str(tmp_path) + "/")


@pytest.mark.parametrize("version", [VERSION - 1, VERSION + 1])
def test_a_bus_of_another_version_raises_incompatible_bus(queue: str, version: int) -> None:
    poke(queue, len(MAGIC), "<I", version)  # the version follows the magic (the crc is not redone)
    with pytest.raises(shmbus.IncompatibleBus, match=f"version {version}"):
        check(queue)


def test_check_only_reads_and_needs_no_semaphore(queue: str) -> None:
    bus_id = read_layout_of(queue).bus_id
    _sync.unlink_sems(bus_id, ALL_ROLES)  # as after a reboot: a disk bus without its semaphores
    before = Path(queue).read_bytes()
    assert check(queue) == []
    assert Path(queue).read_bytes() == before
    assert not [n for n in os.listdir("/dev/shm") if bus_id in n]


def test_problem_prints_its_offset() -> None:
    assert str(Problem(128, "head is odd")) == "byte 128: head is odd"
    assert str(Problem(None, "something")) == "something"
    with pytest.raises(dataclasses.FrozenInstanceError):
        Problem(1, "x").offset = 2  # type: ignore[misc]


# -- the command ---------------------------------------------------------------------------


def test_cli_check_ok_prints_a_summary(queue: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", queue]) == 0
    used = examine(queue).used_bytes
    assert capsys.readouterr().out == f"{queue}: ok (Queue, 9 messages, {used} of {CAP} ring bytes used)\n"


def test_cli_check_prints_the_first_problem_on_one_line(
    queue: str, capsys: pytest.CaptureFixture[str]
) -> None:
    offset = _kind(queue, records(queue))
    assert main(["check", queue]) == 1
    out = capsys.readouterr().out
    assert out.startswith(f"{queue}: byte {offset}: ") and out.count("\n") == 1


def test_cli_check_on_what_is_not_a_bus_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(tmp_path / "missing")]) == 1
    assert "no bus at" in capsys.readouterr().err
