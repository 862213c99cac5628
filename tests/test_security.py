"""Safe defaults: private modes, no symlink following, foreign buses refused unless opted in."""

from __future__ import annotations

import os
import stat

import pytest

import shmbus

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
