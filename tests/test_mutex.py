"""The bus locks (``_mutex``, ``_recovery.Lock``): owned atomically, seen dead at once, never split.

Each property is checked with real processes and real kills: a holder that
dies at any instant, however it dies (SIGKILL, ``os._exit``, ``sys.exit`` in a
signal handler), leaves a lock the next taker gets and mends; a paused holder
keeps its lock; a lock word from an earlier boot or naming a thread that does
not exist is found by ``shmbus check`` and cleared by ``recover --force``.
"""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import threading
from multiprocessing.connection import Connection
from typing import Any

import pytest

import shmbus
from shmbus import _check, _mutex
from shmbus._format import BOOT_ID, I_HEAD_REPAIR, M_HEAD, M_TAIL, Q_RECOVERIES

CHILD_TIMEOUT = 30.0


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shmbus", *args], capture_output=True, text=True, timeout=60, check=False
    )


def _hold_and_exit(conn: Connection, path: str, role: str, how: str) -> None:
    """Child: take a lock and leave without releasing it, in one of the ways processes end."""
    q = shmbus.Queue.open(path)
    lock = q._head_lock if role == "head" else q._tail_lock
    assert lock.acquire(None)
    conn.send(os.getpid())
    conn.close()
    if how == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if how == "exit":
        os._exit(0)
    # sys.exit from a signal handler: Python unwinds, nothing here releases the lock.
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    os.kill(os.getpid(), signal.SIGTERM)
    signal.pause()


@pytest.mark.parametrize("how", ["kill", "exit", "sys.exit"])
@pytest.mark.parametrize("role", ["head", "tail"])
def test_a_dead_holder_s_lock_is_taken_and_mended_at_once(
    bus_name: str, procs: Any, role: str, how: str
) -> None:
    q = shmbus.Queue.create(bus_name, capacity="64KiB")
    q.put_many(range(5))
    rx, tx = procs.ctx.Pipe(duplex=False)
    child = procs.start(_hold_and_exit, tx, q.path, role, how)
    child_pid = rx.recv()
    child.join(CHILD_TIMEOUT)
    assert child.exitcode is not None and child_pid == child.pid
    lock = q._head_lock if role == "head" else q._tail_lock
    tid, died, _ = lock.state()
    assert (tid, died) == (0, True), "the kernel marks the lock of a process that ended holding it"
    assert [p.message for p in _check.check(q.path)] == [
        f"the {role} lock was held by a process that died: run `shmbus recover` "
        "(its next taker also mends it)"
    ]
    # No grace period, no recovery slice: the next taker gets it now.
    q.put(5, timeout=0)
    assert q.get_many(10, timeout=0) == list(range(6))
    assert q._h64[Q_RECOVERIES] == 1
    assert lock.state() == (0, False, False)
    assert _check.check(q.path) == []
    q.close()


def _hold_until_told(conn: Connection, path: str) -> None:
    q = shmbus.Queue.open(path)
    try:
        assert q._head_lock.acquire(None)
        conn.send("held")
        assert conn.recv() == "release"
    finally:
        q._head_lock.release()
    conn.send("released")


def test_a_paused_holder_keeps_its_lock(bus_name: str, procs: Any) -> None:
    """SIGSTOP is not death: nothing frees the lock of a stopped process, recover included."""
    q = shmbus.Queue.create(bus_name, capacity="64KiB")
    parent, child_end = procs.ctx.Pipe()
    child = procs.start(_hold_until_told, child_end, q.path)
    assert parent.recv() == "held"
    os.kill(child.pid, signal.SIGSTOP)
    try:
        assert q.recover() == 0
        with pytest.raises(shmbus.Full):
            q.put("x", timeout=0.3)
        proc = _cli("recover", q.path)
        assert proc.returncode == 0, proc.stderr  # a lock held by a live process is not a problem
        assert _check.check(q.path) == []
        tid, died, pending = q._head_lock.state()
        assert tid and not died and not pending
    finally:
        os.kill(child.pid, signal.SIGCONT)
    parent.send("release")
    assert parent.recv() == "released"
    q.put("x", timeout=1)
    assert q.get(timeout=1) == "x"
    assert q._h64[Q_RECOVERIES] == 0
    q.close()


def test_release_is_a_no_op_for_a_lock_another_thread_holds(bus_name: str) -> None:
    q = shmbus.Queue.create(bus_name, capacity="64KiB")
    lock = q._head_lock
    held, go = threading.Event(), threading.Event()

    def holder() -> None:
        try:
            assert lock.acquire(None)
            held.set()
            go.wait(CHILD_TIMEOUT)
        finally:
            lock.release()

    t = threading.Thread(target=holder)
    t.start()
    assert held.wait(CHILD_TIMEOUT)
    lock.release()  # not ours: nothing happens
    assert lock.state()[0] != 0 and not lock.owned()
    assert not lock.try_acquire()
    go.set()
    t.join(CHILD_TIMEOUT)
    assert lock.try_acquire()
    lock.release()
    q.close()


def test_a_signal_handler_s_exception_comes_out_of_a_lock_wait(bus_name: str, procs: Any) -> None:
    """A wait for a lock another process holds ends within a slice when a handler raises."""
    q = shmbus.Queue.create(bus_name, capacity="64KiB")
    parent, child_end = procs.ctx.Pipe()
    child = procs.start(_hold_until_told, child_end, q.path)
    assert parent.recv() == "held"

    class Alarm(Exception):
        pass

    def on_alarm(*_: object) -> None:
        raise Alarm

    old = signal.signal(signal.SIGALRM, on_alarm)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.1)
        with pytest.raises(Alarm):
            q.put("x")  # blocks on the head lock
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert not q._head_lock.owned()
    parent.send("release")
    assert parent.recv() == "released"
    child.join(CHILD_TIMEOUT)
    q.put("y", timeout=1)
    assert q.get(timeout=1) == "y"
    q.close()


def _word(q: shmbus.Queue, off: int, value: int) -> None:
    struct.pack_into("<I", q._mm, off, value)


def test_a_lock_naming_a_thread_that_does_not_exist_needs_force(bus_name: str) -> None:
    q = shmbus.Queue.create(bus_name, capacity="64KiB")
    q.put("kept")
    ghost = 0x3FFFFFF0  # above any pid_max: no such thread
    _word(q, M_TAIL, ghost)
    problems = [p.message for p in _check.check(q.path)]
    assert len(problems) == 1 and f"held by thread {ghost}" in problems[0]
    with pytest.raises(shmbus.CorruptBus, match="does not exist"):
        q.get(timeout=5)  # no death will ever free it: a clear error after one wait slice, not a hang
    proc = _cli("recover", q.path)
    assert proc.returncode == 1 and "--force" in proc.stderr
    proc = _cli("recover", "--force", q.path)
    assert proc.returncode == 0, proc.stderr
    assert _check.check(q.path) == []
    assert q.get(timeout=1) == "kept"
    q.close()


def test_a_holder_that_dies_while_it_is_looked_up_is_not_a_ghost(
    bus_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The word names a live-looking thread; it dies between the word's read and the /proc look
    (the kernel marks the word OWNER_DIED, then its /proc entry goes): a dead holder, not a ghost."""
    with shmbus.Queue.create(bus_name, capacity="64KiB") as q:
        tid = 0x3FFFFFF0  # (no such thread: /proc has no entry for it)
        _word(q, M_TAIL, tid)
        mutex = q._tail_lock.mutex
        real_exists = os.path.exists

        def dies_meanwhile(path: Any) -> bool:
            if path == f"/proc/{tid}":
                _word(q, M_TAIL, tid | _mutex.OWNER_DIED)  # what the kernel does at the holder's death
            return real_exists(path)

        monkeypatch.setattr(os.path, "exists", dies_meanwhile)
        assert not mutex.ghost()
        monkeypatch.undo()
        _word(q, M_TAIL, tid)
        assert mutex.ghost()  # unchanged across the look: a true ghost
        _word(q, M_TAIL, 0)
        q.unlink()


def test_locks_of_an_earlier_boot_are_reset_at_open(disk_path: str) -> None:
    """A disk bus whose machine crashed: its lock words name threads of the last boot."""
    q = shmbus.Queue.create(disk_path, capacity="64KiB")
    q.put("survives")
    _word(q, M_HEAD, 0x3FFFFFF0)  # held by a thread of "the last boot"
    q._mm[BOOT_ID : BOOT_ID + 16] = b"\x01" * 16
    q.close()
    assert _check.check(disk_path) == []  # stale words are not judged: the next open resets them
    with shmbus.Queue.open(disk_path) as q2:
        assert q2._mm[BOOT_ID : BOOT_ID + 16] != b"\x01" * 16
        q2.put("after", timeout=1)
        assert q2.get_many(5, timeout=1) == ["survives", "after"]


def test_a_damaged_mutex_is_refused_at_open(bus_name: str) -> None:
    q = shmbus.Queue.create(bus_name, capacity="64KiB")
    _word(q, M_TAIL + 16, 0x21)  # another kind of mutex (e.g. priority-inheriting): never run it
    q.close()
    with pytest.raises(shmbus.CorruptBus, match="tail lock"):
        shmbus.Queue.open(bus_name)
    problems = [p.message for p in _check.check(bus_name)]
    assert problems and "damaged" in problems[0]


def test_a_repair_left_pending_is_done_by_the_next_holder(bus_name: str) -> None:
    """A repairer that died (or could not finish) leaves the repair word set: the next taker mends."""
    q = shmbus.Queue.create(bus_name, capacity="64KiB")
    q.put_many(["a", "b"])
    h = q._h64
    q._h32[I_HEAD_REPAIR] = 1
    h[1 + 136 // 8 - 1] += 5  # next_seq (byte 136) left ahead of the records by a dead producer
    assert "awaits the repair" in _check.check(q.path)[0].message
    q.put("c", timeout=1)
    assert q._h32[I_HEAD_REPAIR] == 0
    assert q.get_many(5, timeout=1) == ["a", "b", "c"]
    assert _check.check(q.path) == []
    q.close()


def test_the_initial_mutex_bytes_are_what_the_format_says() -> None:
    assert len(_mutex.INIT_BYTES) == _mutex.MUTEX_SIZE
    assert _mutex.KIND_WORD == 0x92  # ERRORCHECK | ROBUST | PSHARED, in glibc's kind word
    assert _mutex.INIT_BYTES[:16] == bytes(16) and _mutex.INIT_BYTES[20:] == bytes(44)


def _interrupted_get(q: shmbus.Queue) -> None:
    """What a get does when a signal handler's exception lands right after it removed a message."""
    fast = q._fast
    if fast is not None:
        assert fast.get_obj(q._part.tokens_index or 0, 0.0) == "a" or q._part.tokens_index == 0
    if fast is None or not q._part.tokens_index:
        q._begin(True, None)
        assert q._items.try_acquire()
        assert q._take1() is not None
        fast = None
    q._keep(fast)


def test_a_message_an_interrupted_get_removed_comes_back_first(bus_name: str) -> None:
    q = shmbus.Queue.create(bus_name, capacity="64KiB")
    q._begin(True, None)  # a participant slot, as any get claims
    q.put_many(["a", "b"])
    _interrupted_get(q)
    assert q.qsize() == 1 and len(q._kept) == 1
    assert q.get(timeout=1) == "a"
    assert q.get(timeout=1) == "b"
    q.close()


def test_a_closing_handle_gives_its_kept_messages_back(bus_name: str) -> None:
    q = shmbus.Queue.create(bus_name, capacity="64KiB")
    q._begin(True, None)
    q.put_many(["a", "b"])
    _interrupted_get(q)
    q.close()  # "a" goes back, at the end
    with shmbus.Queue.open(bus_name) as q2:
        assert q2.get_many(5, timeout=1) == ["b", "a"]
