"""``shmbus._semlife``: semaphores are never removed under live users, nor by a look-alike file,
and concurrent openers of a bus whose semaphores vanished all end on the same ones.

Scenarios that remove semaphores run in a child process with a private
``/dev/shm`` (``unshare --mount`` and a fresh tmpfs), so that nothing of
other sessions on this machine is touched: each scenario is a function of this
module, run as ``python test_semlife.py SCENARIO`` inside the namespace, and
fails by raising. Children are started together with barriers, never sleeps.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path
from typing import Any, Callable

import pytest

import shmbus
from shmbus import _semlife, _sync
from shmbus._format import IDENTITY, IDENTITY_OFFSET, SEMS_BYTE, STATIC_SIZE

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SHM = "/dev/shm"
WAIT = 10.0  # seconds: a bound on a wait that should end at once, never a pacing sleep
TRIALS = 30
OPENERS = 6


# -- the private /dev/shm ------------------------------------------------------------------


def _namespace_problem() -> str | None:
    if os.geteuid() != 0:
        return "needs root to mount a private /dev/shm (unshare --mount)"
    if shutil.which("unshare") is None:
        return "the unshare command is not installed"
    probe = subprocess.run(
        ["unshare", "--mount", "sh", "-c", "mount -t tmpfs shmbus-test /dev/shm"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    if probe.returncode != 0:
        return f"cannot mount a private /dev/shm: {probe.stderr.strip()}"
    return None


@pytest.fixture(scope="module")
def private_shm() -> Callable[..., str]:
    """Run a scenario of this module in a private /dev/shm; return what it printed."""
    problem = _namespace_problem()
    if problem:
        pytest.skip(problem)

    def run(scenario: str, *args: str, pure: bool = False) -> str:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(HERE)]))
        env["SHMBUS_PURE_PYTHON"] = "1" if pure else "0"
        cmd = ["unshare", "--mount", "sh", "-c", 'mount -t tmpfs shmbus-test /dev/shm && exec "$@"', "sh"]
        cmd += [sys.executable, str(Path(__file__).resolve()), scenario, *args]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
        assert out.returncode == 0, f"scenario {scenario} failed:\n{out.stdout}\n{out.stderr}"
        return out.stdout

    return run


# -- helpers for the scenarios (they run inside the namespace) --------------------------------


def _sem_files(bus_id: str) -> dict[str, int]:
    """role -> inode of the semaphores of ``bus_id`` that exist now."""
    return {role: os.lstat(f).st_ino for b, role, f in _sync.list_sems() if b == bus_id}


def _mapped() -> set[int]:
    """The inodes of the /dev/shm files this process has mapped: for a bus on disk, its semaphores.

    By inode, not by name: glibc makes a semaphore under a temporary name and
    links it into place, so a mapping's name in /proc/self/maps may be that
    temporary one, "(deleted)".
    """
    dev = os.stat(SHM).st_dev
    out = set()
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            major, minor = (int(x, 16) for x in parts[3].split(":"))
            if os.makedev(major, minor) == dev and int(parts[4]):
                out.add(int(parts[4]))
    return out


def _remove_all_sems() -> None:
    """As a reboot does: every semaphore of this private /dev/shm is gone."""
    for n in os.listdir(SHM):
        if n.startswith("sem."):
            os.unlink(os.path.join(SHM, n))


def _cls(kind: str) -> Any:
    return shmbus.Topic if kind == "topic" else shmbus.Queue


def _opener(kind: str, path: str, barrier: Any, after: Any, conn: Any, index: int) -> None:
    """Open the bus at the same instant as the others, report the semaphores it uses, then talk."""
    try:
        inherited = _mapped()  # multiprocessing's own semaphores live in /dev/shm too
        barrier.wait(WAIT)
        bus = _cls(kind).open(path)
        with bus:
            sub = bus.subscribe() if kind == "topic" and index else None
            conn.send(("opened", _mapped() - inherited))
            after.wait(WAIT)  # everybody has opened (and subscribed)
            if index == 0:
                for i in range(OPENERS - 1):
                    bus.put(i) if kind == "queue" else bus.publish(i)
                conn.send(("done", None))
            elif kind == "queue":
                conn.send(("done", bus.get(timeout=WAIT)))  # wakes only on the semaphore index 0 posts
            else:
                assert sub is not None
                conn.send(("done", [sub.get(timeout=WAIT) for _ in range(OPENERS - 1)]))
                sub.close()
    except BaseException as e:
        conn.send(("error", repr(e)))
        raise


def scenario_openers(kind: str, trials: str) -> None:
    """``OPENERS`` processes open a bus whose semaphores vanished, at once, ``trials`` times."""
    ctx = mp.get_context("fork")
    folder = tempfile.mkdtemp()
    path = os.path.join(folder, "bus")  # on disk, as a bus that outlives a reboot
    cls = _cls(kind)
    bus = cls.create(path, capacity="64KiB", **({"max_subscribers": 8} if kind == "topic" else {}))
    bus_id = bus.layout.bus_id
    roles = sorted(_sem_files(bus_id))
    bus.close()
    for trial in range(int(trials)):
        _remove_all_sems()
        barrier, after = ctx.Barrier(OPENERS), ctx.Barrier(OPENERS)
        pipes = [ctx.Pipe(duplex=False) for _ in range(OPENERS)]
        kids = [
            ctx.Process(target=_opener, args=(kind, path, barrier, after, tx, i), daemon=True)
            for i, (_, tx) in enumerate(pipes)
        ]
        for k in kids:
            k.start()
        seen = []
        for (rx, _), k in zip(pipes, kids):
            assert rx.poll(2 * WAIT), f"trial {trial}: opener {k.pid} sent nothing"
            status, value = rx.recv()
            assert status == "opened", f"trial {trial}: opener {k.pid} failed: {value}"
            seen.append(value)
        now = _sem_files(bus_id)
        assert sorted(now) == roles, f"trial {trial}: semaphores {sorted(now)}, expected {roles}"
        for m in seen:  # every opener maps exactly the semaphores that exist now, no other
            assert m == set(now.values()), f"trial {trial}: split: {m} vs {now}"
        got = []
        for (rx, _), k in zip(pipes, kids):
            assert rx.poll(2 * WAIT), f"trial {trial}: opener {k.pid} sent nothing"
            status, value = rx.recv()
            assert status == "done", f"trial {trial}: opener {k.pid} failed: {value}"
            got.append(value)
            k.join(WAIT)
            assert k.exitcode == 0, f"trial {trial}: opener {k.pid} exited {k.exitcode}"
        if kind == "queue":
            assert sorted(got[1:]) == list(range(OPENERS - 1)), f"trial {trial}: {got}"
        else:
            assert all(g == list(range(OPENERS - 1)) for g in got[1:]), f"trial {trial}: {got}"
    shmbus.unlink(path)
    assert _sem_files(bus_id) == {}
    print(f"{trials} trials: all {OPENERS} openers on the same semaphores")


def _user(path: str, ready: Any, go: Any, conn: Any, n: int) -> None:
    """A live process using the bus: announces its semaphores, then receives ``n`` messages."""
    try:
        with shmbus.Queue.open(path) as q:
            conn.send(_mapped())
            ready.wait(WAIT)
            go.wait(WAIT)
            conn.send([q.get(timeout=WAIT) for _ in range(n)])
    except BaseException as e:
        conn.send(repr(e))
        raise


def _craft_lookalike(path: str, bus_id: str, owner: int) -> None:
    """A bus file of ``owner`` that carries ``bus_id``: a valid header, its own identity."""
    with shmbus.Queue.create(path, capacity="4KiB") as q:
        old = q.layout.bus_id
    with open(path, "r+b") as f:
        head = bytearray(f.read(STATIC_SIZE))
        head[64:80] = bus_id.encode()
        f.seek(0)
        f.write(head + zlib.crc32(head).to_bytes(4, "little"))
    os.chown(path, owner, owner)
    _sync.unlink_unused(old, shmbus._file.ALL_ROLES)  # the look-alike's own semaphores: not needed


def scenario_lookalikes() -> None:
    """``rm`` of a copy and of a crafted look-alike, and ``gc``, while the real bus is in use."""
    from shmbus import _admin
    from shmbus._cli import main

    ctx = mp.get_context("fork")
    folder = tempfile.mkdtemp()
    os.chmod(folder, 0o755)
    real = os.path.join(folder, "real")
    q = shmbus.Queue.create(real, capacity="64KiB")
    bus_id = q.layout.bus_id
    before = _sem_files(bus_id)
    ready, go = ctx.Barrier(2), ctx.Barrier(2)
    rx, tx = ctx.Pipe(duplex=False)
    user = ctx.Process(target=_user, args=(real, ready, go, tx, 100), daemon=True)
    user.start()
    assert rx.poll(WAIT)
    assert set(before.values()) <= rx.recv()  # the user maps the very semaphores that exist
    ready.wait(WAIT)
    q.close()  # only the other process uses the bus now

    copy = os.path.join(folder, "copy")
    shutil.copyfile(real, copy)
    crafted = os.path.join(folder, "crafted")
    _craft_lookalike(crafted, bus_id, owner=65534)  # another user's file, carrying our id
    assert main(["rm", copy]) == 0
    assert main(["rm", crafted]) == 0
    assert _admin.gc(min_age=0) == []  # the real bus is on disk, unnamed: in use all the same
    assert main(["gc", "--min-age", "0"]) == 0
    assert _sem_files(bus_id) == before, "a look-alike or gc removed the live bus's semaphores"

    with shmbus.Queue.open(real) as q:
        go.wait(WAIT)
        for i in range(100):
            q.put(i)
    assert rx.poll(2 * WAIT)
    assert rx.recv() == list(range(100))
    user.join(WAIT)
    assert user.exitcode == 0

    # Idle now: a crafted file of another user still removes nothing; the real bus's rm does.
    crafted2 = os.path.join(folder, "crafted2")
    _craft_lookalike(crafted2, bus_id, owner=65534)
    assert main(["rm", crafted2]) == 0
    assert _sem_files(bus_id) == before
    assert main(["rm", real]) == 0
    assert _sem_files(bus_id) == {}
    print("look-alikes and gc removed nothing of the live bus")


def _pair(path: str, role: str, ready: Any, go: Any, conn: Any, n: int) -> None:
    try:
        with shmbus.Queue.open(path) as q:
            ready.wait(WAIT)
            go.wait(WAIT)  # the bus file and every removable semaphore are gone by now
            if role == "put":
                for i in range(n):
                    q.put(i, timeout=WAIT)
                conn.send("sent")
            else:
                conn.send([q.get(timeout=WAIT) for _ in range(n)])
    except BaseException as e:
        conn.send(repr(e))
        raise


def scenario_live_users() -> None:
    """``rm`` and ``gc`` while two processes use a bus: semaphores kept until the last one leaves."""
    from shmbus._cli import main

    ctx = mp.get_context("fork")
    path = os.path.join(tempfile.mkdtemp(), "bus")
    with shmbus.Queue.create(path, capacity="4KiB") as q:  # small: the producer waits for space
        bus_id = q.layout.bus_id
    before = _sem_files(bus_id)
    ready, go = ctx.Barrier(3), ctx.Barrier(3)
    pipes = [ctx.Pipe(duplex=False) for _ in range(2)]
    kids = [
        ctx.Process(target=_pair, args=(path, role, ready, go, tx, 2000), daemon=True)
        for role, (_, tx) in zip(("put", "get"), pipes)
    ]
    for k in kids:
        k.start()
    ready.wait(WAIT)
    assert _sync.unlink_unused(bus_id, list(before))[0] == []  # refused: in use
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["rm", path]) == 0
    assert f"kept {len(before)} of its semaphores: in use" in out.getvalue()
    assert not os.path.exists(path)
    assert main(["gc", "--min-age", "0"]) == 0
    assert _sem_files(bus_id) == before, "semaphores removed under live users"
    go.wait(WAIT)
    results = []
    for (rx, _), k in zip(pipes, kids):
        assert rx.poll(3 * WAIT)
        results.append(rx.recv())
        k.join(WAIT)
        assert k.exitcode == 0
    assert results == ["sent", list(range(2000))]
    assert _sem_files(bus_id) == {}, "the last user out did not remove the semaphores"
    print("kept under live users, removed by the last one out")


def scenario_reader_stalls_recreation() -> None:
    """A read-only lock on the sems byte makes a recreating open fail in time, never hang."""
    import fcntl
    import struct
    import time

    path = os.path.join(tempfile.mkdtemp(), "bus")
    with shmbus.Queue.create(path, capacity="4KiB") as q:
        q.put("kept")
    _remove_all_sems()
    fd = os.open(path, os.O_RDONLY)
    lock = struct.pack("hhqqi4x", fcntl.F_RDLCK, os.SEEK_SET, SEMS_BYTE, 1, 0)
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, lock)
    _semlife.RECREATE_TIMEOUT = 0.5
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=f"byte {SEMS_BYTE}"):
        shmbus.Queue.open(path)
    assert time.monotonic() - start < 5
    assert _sem_files(q.layout.bus_id) == {}  # nothing made without the lock
    os.close(fd)
    with shmbus.Queue.open(path) as q2:
        assert q2.get(timeout=WAIT) == "kept"
    shmbus.unlink(path)
    print("a reader's lock delays nobody beyond the deadline")


def _open_sem(name: str, go: Any, conn: Any) -> None:
    import posix_ipc

    go.wait(WAIT)
    s = posix_ipc.Semaphore(name)  # blocks while the remover holds its lease
    conn.send(_mapped())
    s.close()


def scenario_opened_while_being_removed() -> None:
    """An open that races with the removal keeps its semaphore: the name is put back for it."""
    import fcntl
    import time

    import posix_ipc

    name = _sync.sem_name("0123456789abcdef", "items")
    sem = posix_ipc.Semaphore(name, posix_ipc.O_CREX, 0o600, 0)
    sem.close()
    path = f"{SHM}/sem.{name[1:]}"
    ino = os.lstat(path).st_ino
    ctx = mp.get_context("fork")
    rx, tx = ctx.Pipe(duplex=False)
    go = ctx.Event()
    kid = ctx.Process(target=_open_sem, args=(name, go, tx), daemon=True)
    kid.start()  # before the lease: a child holding a copy of its fd would keep it alive
    fd = _sync._lease(path)
    assert fd is not None
    go.set()
    deadline = time.monotonic() + WAIT
    while fcntl.fcntl(fd, fcntl.F_GETLEASE) == fcntl.F_WRLCK:  # the kernel's word: the child is in open
        assert time.monotonic() < deadline, "the child never opened the semaphore"
        os.sched_yield()
    assert not _sync._remove_leased(fd, path, f"{SHM}/sem.shmbus.0123456789abcdef.goneitems")
    assert os.lstat(path).st_ino == ino
    os.close(fd)
    assert rx.poll(WAIT)
    assert ino in rx.recv()
    kid.join(WAIT)
    assert _sync.unlink_unused("0123456789abcdef", ["items"]) == ([path], [])
    assert sorted(os.listdir(SHM)) == [n for n in sorted(os.listdir(SHM)) if not n.startswith("sem.shmbus")]
    print("the racing opener kept its semaphore")


SCENARIOS: dict[str, Callable[..., None]] = {
    "opened_while_being_removed": scenario_opened_while_being_removed,
    "openers": scenario_openers,
    "lookalikes": scenario_lookalikes,
    "live_users": scenario_live_users,
    "reader_stalls_recreation": scenario_reader_stalls_recreation,
}


# -- the tests -----------------------------------------------------------------------------


@pytest.mark.parametrize("pure", [False, True], ids=["c", "pure"])
def test_simultaneous_openers_after_the_semaphores_vanished_share_them(
    private_shm: Callable[..., str], pure: bool
) -> None:
    out = private_shm("openers", "queue", str(TRIALS), pure=pure)
    assert f"{TRIALS} trials" in out


def test_simultaneous_topic_openers_share_the_recreated_semaphores(private_shm: Callable[..., str]) -> None:
    assert "10 trials" in private_shm("openers", "topic", "10")


@pytest.mark.parametrize("pure", [False, True], ids=["c", "pure"])
def test_rm_of_lookalikes_and_gc_spare_a_live_bus(private_shm: Callable[..., str], pure: bool) -> None:
    private_shm("lookalikes", pure=pure)


@pytest.mark.parametrize("pure", [False, True], ids=["c", "pure"])
def test_semaphores_are_kept_under_live_users(private_shm: Callable[..., str], pure: bool) -> None:
    private_shm("live_users", pure=pure)


def test_an_open_racing_with_a_removal_keeps_its_semaphore(private_shm: Callable[..., str]) -> None:
    private_shm("opened_while_being_removed")


def test_a_read_lock_on_the_sems_byte_cannot_hang_an_open(private_shm: Callable[..., str]) -> None:
    private_shm("reader_stalls_recreation")


# -- failed creates (no semaphore removed by anyone else: the ordinary /dev/shm) -------------


@pytest.mark.parametrize("cls", [shmbus.Queue, shmbus.Topic])
@pytest.mark.parametrize(
    "name, error", [("nul\0byte", ValueError), ("n" * 256, OSError), ("no-such-dir/x", FileNotFoundError)]
)
def test_a_failed_create_leaves_nothing_and_names_the_path(
    tmp_path: Path, cls: Any, name: str, error: type[Exception]
) -> None:
    from conftest import session_sems

    path = str(tmp_path / name)
    before, files = session_sems(), set(os.listdir(tmp_path))
    with pytest.raises(error) as info:
        cls.create(path, capacity="4KiB")
    assert session_sems() == before
    assert set(os.listdir(tmp_path)) == files
    assert ".tmp" not in str(info.value)
    if not isinstance(info.value, ValueError):
        assert getattr(info.value, "filename", None) == path


@pytest.mark.parametrize("length", [234, 255])
def test_a_long_name_that_fits_the_directory_creates(tmp_path: Path, length: int) -> None:
    path = str(tmp_path / ("l" * length))
    with shmbus.Queue.create(path, capacity="4KiB") as q:
        q.put("fits")
        assert q.get(timeout=WAIT) == "fits"
        q.unlink()
    assert os.listdir(tmp_path) == []


def test_create_records_the_file_that_owns_the_semaphores(disk_path: str) -> None:
    with shmbus.Queue.create(disk_path, capacity="4KiB") as q:
        st = os.stat(q.path)
        with open(q.path, "rb") as f:
            head = f.read(IDENTITY_OFFSET + IDENTITY.size)
        assert IDENTITY.unpack_from(head, IDENTITY_OFFSET) == (st.st_dev, st.st_ino)
        fd = os.open(q.path, os.O_RDONLY)
        try:
            assert _semlife.owns_sems(fd, head)
        finally:
            os.close(fd)
        copy = disk_path + ".copy"
        shutil.copyfile(q.path, copy)
        fd = os.open(copy, os.O_RDONLY)
        try:
            assert not _semlife.owns_sems(fd, head)  # same bytes, another file
        finally:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(copy)


if __name__ == "__main__":
    SCENARIOS[sys.argv[1]](*sys.argv[2:])
