"""Safe defaults: private modes, no symlink following, foreign buses refused unless opted in."""

from __future__ import annotations

import fcntl
import os
import signal
import stat
import struct
import subprocess
import sys
import time
from typing import Any

import pytest

import shmbus
from shmbus import _faults

CAP = 8192


def _mode(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_files_and_semaphores_are_private_by_default(bus_name: str) -> None:
    old = os.umask(0)  # the default must not depend on the caller's umask
    try:
        with shmbus.Queue.create(bus_name, capacity=CAP) as q:
            sems = [n for n in os.listdir("/dev/shm") if n.startswith(f"sem.shmbus.{q.layout.bus_id}.")]
            assert _mode(q.path) == 0o600
            assert sems and all(_mode(f"/dev/shm/{n}") == 0o600 for n in sems)
    finally:
        os.umask(old)


def test_a_group_mode_is_kept_despite_the_umask(bus_name: str) -> None:
    old = os.umask(0o077)
    try:
        with shmbus.Topic.create(bus_name, capacity=CAP, mode=0o660) as t, t.subscribe():
            sems = [n for n in os.listdir("/dev/shm") if n.startswith(f"sem.shmbus.{t.layout.bus_id}.")]
            assert _mode(t.path) == 0o660
            assert {_mode(f"/dev/shm/{n}") for n in sems} == {0o660}  # sub<i> included
    finally:
        os.umask(old)


def test_a_bus_of_another_user_is_refused_unless_opted_in(bus_name: str) -> None:
    with shmbus.Queue.create(bus_name, capacity=CAP) as q:
        q.put("kept")
        path = q.path
    os.chown(path, 65534, 65534)  # tests run as root: hand the file to "nobody"
    with pytest.raises(shmbus.ForeignBus, match="allow_shared=True") as e:
        shmbus.Queue.open(bus_name)
    assert isinstance(e.value, PermissionError) and e.value.path == path
    with shmbus.Queue.open(bus_name, allow_shared=True) as q:
        assert q.get(timeout=1) == "kept"
    # Back to root: a file of another user never gets root's semaphores removed (see test_semlife).
    os.chown(path, 0, 0)


def test_a_world_writable_bus_is_refused_unless_opted_in(bus_name: str) -> None:
    with shmbus.Queue.create(bus_name, capacity=CAP) as q:
        os.chmod(q.path, 0o666)
    with pytest.raises(shmbus.ForeignBus, match="writable by every user"):
        shmbus.Queue.open(bus_name)
    with shmbus.Queue.open(bus_name, allow_shared=True) as q:
        q.put(1)
        assert q.get(timeout=1) == 1


def test_a_planted_symlink_is_never_followed(tmp_path: os.PathLike[str], disk_path: str) -> None:
    target = os.path.join(os.fspath(tmp_path), "victim")
    with open(target, "wb") as f:
        f.write(b"precious")
    os.symlink(target, disk_path)
    with pytest.raises(shmbus.BusExists):
        shmbus.Queue.create(disk_path, capacity=CAP)  # O_EXCL link: the link is not replaced
    with pytest.raises(shmbus.NotABus, match="symbolic link"):
        shmbus.Queue.open(disk_path)
    with open(target, "rb") as f:
        assert f.read() == b"precious"
    os.unlink(disk_path)


def test_no_pickle_anywhere() -> None:
    import pathlib

    src = pathlib.Path(shmbus.__file__).parent
    for py in src.rglob("*.py"):  # subpackages (shmbus/_bench/) too
        text = py.read_text()
        assert "import pickle" not in text and "pickle.loads" not in text, py.name


# -- a user who can only read the file ---------------------------------------------------

READER_UID = 64123  # a user of its own: no one else on the machine runs as it


def _read_locker(conn: Any, path: str, upto: int) -> None:
    """Child, as another user with read access only: read-lock every byte of the header it can.

    On each "again" it tries the bytes it could not lock before (those of
    participants that have died since); on "stop" it exits.
    """
    os.setgid(READER_UID)
    os.setuid(READER_UID)
    fd = os.open(path, os.O_RDONLY)
    with pytest.raises(PermissionError):
        os.open(path, os.O_RDWR)  # it really can only read
    flock = struct.Struct("hhqqi4x")
    todo = set(range(upto))
    while True:
        for byte in sorted(todo):
            try:
                fcntl.fcntl(fd, fcntl.F_OFD_SETLK, flock.pack(fcntl.F_RDLCK, os.SEEK_SET, byte, 1, 0))
                todo.discard(byte)
            except OSError:
                pass  # a live participant's write lock: try again later
        conn.send(len(todo))
        if conn.recv() == "stop":
            return


def _die_holding_a_token(path: str, ready: Any) -> None:
    q = shmbus.Queue.open(path, allow_shared=True)
    q._part.claim(q.recover)  # a participant slot, before the reader locks the free ones
    ready.set()
    _faults.arm("get:after-token")
    q.get(timeout=30)  # dies once it took the token for the message the test puts


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a child as another user")
def test_a_user_who_can_only_read_cannot_fake_or_block_liveness(bus_name: str, procs: Any) -> None:
    """Read locks everywhere: a dead participant still counts as dead, nothing hangs, nothing is lost."""
    q = shmbus.Queue.create(bus_name, capacity=CAP, mode=0o644)
    ready = procs.ctx.Event()
    victim = procs.start(_die_holding_a_token, q.path, ready)
    assert ready.wait(30)
    parent, child = procs.ctx.Pipe()
    reader = procs.start(_read_locker, child, q.path, q.layout.ring_offset)
    assert parent.recv() >= 1  # the victim's slot byte, at least, is write-locked
    q.put("precious")
    victim.join(30)
    assert victim.exitcode == -signal.SIGKILL  # died holding the message's token
    parent.send("again")
    assert parent.recv() == 0  # now every byte of the header is read-locked, the dead one's too
    started = time.monotonic()
    assert q.get(timeout=10) == "precious"  # its token given back: the read lock did not fake life
    assert q.recover() == 0  # reaped already; returns at once
    proc = subprocess.run(
        [sys.executable, "-m", "shmbus", "recover", q.path], capture_output=True, text=True, timeout=30,
        check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    q.put("more", timeout=1)
    assert q.get(timeout=1) == "more"
    assert time.monotonic() - started < 10
    parent.send("stop")
    reader.join(30)
    assert reader.exitcode == 0
    q.close()
