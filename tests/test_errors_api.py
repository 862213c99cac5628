"""The public surface and the error tree, then every error raised for its case by a real Queue.

Each Queue case puts messages first, triggers the error, and checks that the
bus is intact afterwards: every message still there, in order. Lifecycle
(close, context manager, repr, unlink, lost semaphores) closes the file.
"""

from __future__ import annotations

import contextlib
import errno
import inspect
import logging
import os
import pickle
import queue
import shutil
import stat
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import msgpack
import pytest
from conftest import SHM, TEST_PREFIX, Procs, session_sems

import shmbus
from shmbus import Queue, _accel
from shmbus._errors import __all__ as ERRORS_ALL
from shmbus._format import VERSION

CAP = 4096
LIMIT = CAP - 16  # the largest encoded message a ring of CAP bytes promises to hold
NOBODY = 65534
ROOT = os.geteuid() == 0
QUEUE_ROLES = {"items", "space"}  # format 2: the locks are mutexes in the file, not semaphores


def messages(n: int = 5) -> list[Any]:
    return [{"i": i, "pad": "x" * (i * 7)} for i in range(n)] + [b"raw bytes", [1, None, 2.5]]


def fill(q: Queue, n: int = 5) -> list[Any]:
    msgs = messages(n)
    for m in msgs:
        q.put(m)
    return msgs


def assert_intact(path: str, msgs: list[Any]) -> None:
    """Every message of ``msgs`` is still in the bus at ``path``, in order, and nothing else."""
    with Queue.open(path, allow_shared=True) as q:  # some tests share the bus on purpose
        assert q.qsize() == len(msgs)
        got = [q.get(timeout=5) for _ in msgs]
        assert got == msgs
        assert q.empty()
        with pytest.raises(shmbus.Empty):
            q.get_nowait()


def sem_roles(bus_id: str) -> set[str]:
    """The roles of the semaphores of ``bus_id`` that exist now, from /dev/shm."""
    prefix = f"sem.shmbus.{bus_id}."
    return {n[len(prefix) :] for n in os.listdir(SHM) if n.startswith(prefix)}


def real(name: str) -> str:
    return str(SHM / name)


def header_of(path: str) -> bytearray:
    with open(path, "rb") as f:
        return bytearray(f.read(1024))


def write_header(path: str, header: bytes | bytearray) -> None:
    with open(path, "r+b") as f:
        f.write(header)


def set_version(header: bytearray, version: int) -> None:
    header[8:12] = version.to_bytes(4, "little")
    header[124:128] = zlib.crc32(header[:124]).to_bytes(4, "little")


# -- the public surface ------------------------------------------------------------------------


def test_all_names_exist_once_and_star_import_gives_exactly_them() -> None:
    assert len(set(shmbus.__all__)) == len(shmbus.__all__)
    namespace: dict[str, Any] = {}
    exec("from shmbus import *", namespace)
    assert set(namespace) - {"__builtins__"} == set(shmbus.__all__)


@pytest.mark.parametrize("name", shmbus.__all__)
def test_every_export_is_documented_and_reports_module_shmbus(name: str) -> None:
    obj = getattr(shmbus, name)
    if inspect.isclass(obj) or inspect.isfunction(obj):
        assert obj.__module__ == "shmbus"
        own_doc = vars(obj).get("__doc__") if inspect.isclass(obj) else obj.__doc__
        assert own_doc and own_doc.strip(), f"shmbus.{name} has no docstring of its own"
        if inspect.isclass(obj):
            assert repr(obj) == f"<class 'shmbus.{name}'>"
    else:
        # A constant cannot carry a docstring (docs/gen_api.py documents it); it must be what it says.
        assert name in ("FORMAT_VERSION", "accelerated")
        if name == "FORMAT_VERSION":
            assert obj == VERSION and type(obj) is int
        else:
            assert obj is _accel.ENABLED and type(obj) is bool


@pytest.mark.parametrize("cls", [shmbus.Queue, shmbus.Codec])
def test_public_methods_and_properties_are_documented(cls: type) -> None:
    missing = []
    for attr, member in inspect.getmembers(cls):
        if attr.startswith("_"):
            continue
        documented = bool((inspect.getdoc(member) or "").strip())
        if (callable(member) or isinstance(member, property)) and not documented:
            missing.append(attr)
    assert not missing, f"{cls.__name__} members without a docstring: {missing}"


def test_every_error_class_is_exported() -> None:
    assert set(ERRORS_ALL) <= set(shmbus.__all__)


# -- the error tree ----------------------------------------------------------------------------

TREE = [
    (shmbus.BusExists, FileExistsError),
    (shmbus.BusNotFound, FileNotFoundError),
    (shmbus.Empty, queue.Empty),
    (shmbus.Full, queue.Full),
    (shmbus.EncodeError, TypeError),
    (shmbus.NotABus, ValueError),
    (shmbus.CorruptBus, ValueError),
    (shmbus.IncompatibleBus, ValueError),
    (shmbus.MessageTooLarge, ValueError),
    (shmbus.BusClosed, ValueError),
    (shmbus.TooManySubscribers, RuntimeError),
    (shmbus.SequenceAhead, ValueError),
    (shmbus.DecodeError, shmbus.CorruptBus),
    (shmbus.ForeignBus, PermissionError),
    (shmbus.Overwritten, RuntimeError),
    (shmbus.NoSpace, OSError),
]


@pytest.mark.parametrize(("cls", "builtin"), TREE, ids=[c.__name__ for c, _ in TREE])
def test_each_error_inherits_shmbus_error_and_its_builtin(cls: type, builtin: type) -> None:
    assert issubclass(cls, shmbus.ShmbusError)
    assert issubclass(cls, builtin)
    assert issubclass(shmbus.ShmbusError, Exception)
    # Both ways of catching it work on a real instance.
    err = cls("boom", path="/p")
    with pytest.raises(builtin):
        raise err
    with pytest.raises(shmbus.ShmbusError):
        raise err
    assert str(err) == "boom"
    assert err.path == "/p"


def test_tree_covers_every_error() -> None:
    named = {c for c, _ in TREE} | {shmbus.ShmbusError}
    exported = {getattr(shmbus, n) for n in ERRORS_ALL}
    assert named == exported


def test_empty_and_full_have_default_messages() -> None:
    assert str(shmbus.Empty()) == "the bus is empty"
    assert str(shmbus.Full()) == "the bus is full"
    assert shmbus.Empty().path is None


ERRORS = [
    shmbus.ShmbusError("base", path="/a"),
    shmbus.BusExists("exists", path="/dev/shm/x"),
    shmbus.BusNotFound("missing", path="/dev/shm/x"),
    shmbus.NotABus("not a bus", path="/tmp/file"),
    shmbus.CorruptBus("corrupt", path="/b", offset=124),
    shmbus.CorruptBus("corrupt, no offset"),
    shmbus.DecodeError("bad msgpack", path="/b", offset=4096),
    shmbus.IncompatibleBus("v2", path="/c"),
    shmbus.MessageTooLarge("too big", path="/d", size=5003, limit=4080),
    shmbus.EncodeError("cannot encode set"),
    shmbus.BusClosed("closed", path="/e"),
    shmbus.TooManySubscribers("full house", path="/f"),
    shmbus.SequenceAhead("ahead", path="/f", start=9, next_seq=4),
    shmbus.Empty(path="/g"),
    shmbus.Full("custom", path="/h"),
    shmbus.NoSpace("no room", path="/i", size=8192, free=4096),
]


@pytest.mark.parametrize("err", ERRORS, ids=[f"{type(e).__name__}-{i}" for i, e in enumerate(ERRORS)])
def test_errors_pickle_with_their_attributes(err: Exception) -> None:
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        clone = pickle.loads(pickle.dumps(err, protocol))
        assert type(clone) is type(err)
        assert clone.args == err.args
        assert str(clone) == str(err)
        assert vars(clone) == vars(err)
        for attr in ("path", "offset", "size", "limit", "free", "start", "next_seq"):
            assert getattr(clone, attr, "unset") == getattr(err, attr, "unset")


def test_error_attributes_have_meaning() -> None:
    err = shmbus.MessageTooLarge("m", path="/d", size=5003, limit=4080)
    assert (err.path, err.size, err.limit) == ("/d", 5003, 4080)
    corrupt = shmbus.CorruptBus("m", path="/b", offset=124)
    assert (corrupt.path, corrupt.offset) == ("/b", 124)
    assert shmbus.CorruptBus("m").offset is None


def test_full_pickles_with_sent(bus_name: str) -> None:
    with Queue.create(bus_name, capacity=CAP, maxsize=2) as q:
        with pytest.raises(shmbus.Full) as info:
            q.put_many(["a", "b", "c"], block=False)
        assert info.value.sent == 2
        clone = pickle.loads(pickle.dumps(info.value))
        assert (clone.sent, clone.path) == (2, real(bus_name))
        assert [q.get_nowait(), q.get_nowait()] == ["a", "b"]


# -- BusExists ---------------------------------------------------------------------------------


def test_create_on_an_existing_bus_raises_bus_exists(bus_name: str) -> None:
    with Queue.create(bus_name, capacity=CAP) as q:
        msgs = fill(q)
        bus_id = q.layout.bus_id
        before = session_sems()  # (only ours: other programs may make buses meanwhile)
        for capacity in (CAP, 8 * CAP):
            with pytest.raises(shmbus.BusExists, match="exist_ok") as info:
                Queue.create(bus_name, capacity=capacity)
            assert info.value.path == real(bus_name)
            assert isinstance(info.value, FileExistsError)
        # The failed creates made and removed their own semaphores; the bus kept its own.
        assert session_sems() == before
        assert sem_roles(bus_id) == QUEUE_ROLES
        assert [n for n in os.listdir(SHM) if n.startswith(f".{bus_name}")] == []  # no temp file
    assert_intact(bus_name, msgs)


def test_create_exist_ok_opens_the_existing_bus(bus_name: str) -> None:
    with Queue.create(bus_name, capacity=CAP) as q:
        msgs = fill(q)
        with Queue.create(bus_name, capacity=16 * CAP, exist_ok=True) as again:
            assert again.layout.bus_id == q.layout.bus_id
            assert again.capacity == CAP  # the existing bus, not a new one
            assert again.qsize() == len(msgs)
    assert_intact(bus_name, msgs)


def test_create_exist_ok_on_a_file_that_is_not_a_bus_leaves_it_alone(disk_path: str) -> None:
    Path(disk_path).write_text("precious notes\n")
    with pytest.raises(shmbus.NotABus):
        Queue.create(disk_path, capacity=CAP, exist_ok=True)
    with pytest.raises(shmbus.BusExists):
        Queue.create(disk_path, capacity=CAP)
    assert Path(disk_path).read_text() == "precious notes\n"


# -- BusNotFound -------------------------------------------------------------------------------


def test_open_a_missing_bus_raises_bus_not_found(bus_name: str, tmp_path: Path) -> None:
    with pytest.raises(shmbus.BusNotFound, match="create") as info:
        Queue.open(bus_name)
    assert info.value.path == real(bus_name)
    assert isinstance(info.value, FileNotFoundError)
    with pytest.raises(shmbus.BusNotFound):
        Queue.open(tmp_path / "no" / "such" / "dir" / "bus")
    with pytest.raises(shmbus.BusNotFound):
        shmbus.unlink(bus_name)
    assert not os.path.exists(real(bus_name))  # looking did not create anything


def test_open_with_another_bus_nearby_does_not_touch_it(bus_name: str) -> None:
    with Queue.create(bus_name, capacity=CAP) as q:
        msgs = fill(q)
        with pytest.raises(shmbus.BusNotFound):
            Queue.open(bus_name + "-other")
    assert_intact(bus_name, msgs)


@pytest.mark.parametrize("bad", ["", ".", ".."])
def test_bad_names_raise_value_error(bad: str) -> None:
    with pytest.raises(ValueError, match="bus"):
        Queue.open(bad)


# -- NotABus -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [b"", b"\x93SHM", b"hello, I am a text file\n" * 100, os.urandom(8192), bytes(8192)],
    ids=["empty", "short-magic", "text", "random", "zeros"],
)
def test_open_a_file_that_is_not_a_bus_raises_not_a_bus(disk_path: str, content: bytes) -> None:
    Path(disk_path).write_bytes(content)
    with pytest.raises(shmbus.NotABus) as info:
        Queue.open(disk_path)
    assert info.value.path == disk_path
    assert isinstance(info.value, ValueError)
    assert Path(disk_path).read_bytes() == content  # read, never written


def test_open_a_directory_raises_not_a_bus(disk_path: str) -> None:
    os.mkdir(disk_path)
    with pytest.raises(shmbus.NotABus, match="directory"):
        Queue.open(disk_path)
    with pytest.raises(shmbus.NotABus):
        shmbus.unlink(disk_path)
    assert os.path.isdir(disk_path)


def test_open_a_fifo_raises_not_a_bus_without_blocking(disk_path: str) -> None:
    os.mkfifo(disk_path)
    with pytest.raises(shmbus.NotABus, match="regular file"):
        Queue.open(disk_path)
    with pytest.raises(shmbus.NotABus):
        shmbus.unlink(disk_path)
    assert stat.S_ISFIFO(os.lstat(disk_path).st_mode)


def test_open_a_symlink_raises_not_a_bus_and_leaves_both_alone(tmp_path: Path) -> None:
    target = str(tmp_path / "real-bus")
    link = str(tmp_path / "link")
    try:
        with Queue.create(target, capacity=CAP) as q:
            msgs = fill(q)
        os.symlink(target, link)
        with pytest.raises(shmbus.NotABus, match="symbolic link") as info:
            Queue.open(link)
        assert info.value.path == link
        with pytest.raises(shmbus.NotABus):
            shmbus.unlink(link)
        with pytest.raises(shmbus.BusExists):
            Queue.create(link, capacity=CAP)
        assert os.path.islink(link)
        assert os.readlink(link) == target
        assert_intact(target, msgs)
    finally:
        with contextlib.suppress(shmbus.BusNotFound):
            shmbus.unlink(target)


def test_open_a_dangling_symlink_raises_not_a_bus(tmp_path: Path) -> None:
    link = tmp_path / "dangling"
    link.symlink_to(tmp_path / "nowhere")
    with pytest.raises(shmbus.NotABus):
        Queue.open(link)
    assert not (tmp_path / "nowhere").exists()


# -- IncompatibleBus ---------------------------------------------------------------------------


@pytest.mark.parametrize("version", [VERSION - 1, VERSION + 1, 0])
def test_a_bus_of_another_version_raises_incompatible_bus(disk_path: str, version: int) -> None:
    with Queue.create(disk_path, capacity=CAP) as q:
        msgs = fill(q)
        bus_id = q.layout.bus_id
    original = header_of(disk_path)
    patched = bytearray(original)
    set_version(patched, version)
    write_header(disk_path, patched)
    with pytest.raises(shmbus.IncompatibleBus, match=f"version {version}") as info:
        Queue.open(disk_path)
    assert info.value.path == disk_path
    assert isinstance(info.value, ValueError)
    assert header_of(disk_path) == patched  # the refused open wrote nothing
    assert sem_roles(bus_id) == QUEUE_ROLES  # and removed nothing
    write_header(disk_path, original)
    assert_intact(disk_path, msgs)


# -- CorruptBus --------------------------------------------------------------------------------


def test_a_truncated_bus_raises_corrupt_bus(disk_path: str) -> None:
    with Queue.create(disk_path, capacity=16 * CAP) as q:
        msgs = fill(q)  # all in the first half of the ring
        bus_id = q.layout.bus_id
    size = os.path.getsize(disk_path)
    os.truncate(disk_path, size // 2)
    with pytest.raises(shmbus.CorruptBus, match="truncated") as info:
        Queue.open(disk_path)
    assert (info.value.path, info.value.offset) == (disk_path, size // 2)
    assert os.path.getsize(disk_path) == size // 2  # not "repaired", not removed
    assert sem_roles(bus_id) == QUEUE_ROLES
    # Nothing the failed open did stands in the way once the file is whole again.
    os.truncate(disk_path, size)
    assert_intact(disk_path, msgs)


def test_a_damaged_record_raises_corrupt_bus_and_loses_nothing(disk_path: str) -> None:
    with Queue.create(disk_path, capacity=CAP) as q:
        msgs = fill(q)
        state_at = q.layout.ring_offset + 6  # the first record's state field
        with open(disk_path, "r+b") as f:
            f.seek(state_at)
            good = f.read(2)
            f.seek(state_at)
            f.write(b"\0\0")  # as if its producer died before committing it
        with pytest.raises(shmbus.CorruptBus) as info:
            q.get(timeout=5)
        assert info.value.offset == 0
        assert q.qsize() == len(msgs)
        with pytest.raises(shmbus.CorruptBus):  # still there, still refused
            q.get_nowait()
        with open(disk_path, "r+b") as f:
            f.seek(state_at)
            f.write(good)
    assert_intact(disk_path, msgs)


def test_unlink_removes_a_corrupt_bus_and_its_semaphores(disk_path: str) -> None:
    with Queue.create(disk_path, capacity=CAP) as q:
        bus_id = q.layout.bus_id
    header = header_of(disk_path)
    header[124] ^= 0xFF  # crc broken: the bus can no longer be opened
    write_header(disk_path, header)
    with pytest.raises(shmbus.CorruptBus):
        Queue.open(disk_path)
    shmbus.unlink(disk_path)
    assert not os.path.exists(disk_path)
    assert sem_roles(bus_id) == set()


# -- EncodeError, DecodeError, MessageTooLarge -------------------------------------------------


@pytest.mark.parametrize("bad", [object(), {1, 2}, {"nested": [set()]}, 2**64])
def test_an_object_msgpack_cannot_encode_raises_encode_error(bus_name: str, bad: Any) -> None:
    with Queue.create(bus_name, capacity=CAP) as q:
        msgs = fill(q)
        with pytest.raises(shmbus.EncodeError) as info:
            q.put(bad)
        assert isinstance(info.value, TypeError)
        with pytest.raises(shmbus.EncodeError):
            q.put_nowait(bad)
        with pytest.raises(shmbus.EncodeError):
            q.put_many(["fine", bad, "fine too"])  # all or nothing
        assert q.qsize() == len(msgs)
    assert_intact(bus_name, msgs)


def _refuse_ext(code: int, data: bytes) -> object:
    raise ValueError(f"ext type {code}: no ext_hook accepts it")


def test_an_ext_type_the_codec_refuses_raises_decode_error_for_that_message_only(
    bus_name: str,
) -> None:
    codec = shmbus.Codec(unpack_options={"ext_hook": _refuse_ext})
    with Queue.create(bus_name, capacity=CAP, codec=codec) as q:
        q.put("before")
        q.put(msgpack.ExtType(42, b"opaque"))
        q.put("after")
        assert q.get(timeout=5) == "before"
        with pytest.raises(shmbus.DecodeError, match="ext_hook") as info:
            q.get(timeout=5)
        assert isinstance(info.value, shmbus.CorruptBus)
        assert q.get(timeout=5) == "after"
        assert q.empty()


def test_a_message_larger_than_the_ring_raises_message_too_large(bus_name: str) -> None:
    with Queue.create(bus_name, capacity=CAP) as q:
        msgs = fill(q)
        cases = [
            (lambda: q.put(b"x" * 5000), 5000 + 3),  # bin16 header: 3 bytes
            (lambda: q.put(b"x" * (LIMIT - 2)), LIMIT + 1),  # bin16 header: 3 bytes
            (lambda: q.put_bytes(b"x" * (LIMIT + 1)), LIMIT + 1),
            (lambda: q.put("s" * 100_000), len(msgpack.packb("s" * 100_000))),
            (lambda: q.put_nowait(list(range(5000))), len(msgpack.packb(list(range(5000))))),
            (lambda: q.put_many(["ok", b"y" * 70_000]), 70_000 + 5),  # bin32 header
        ]
        for action, size in cases:
            # Raised at once, even by a blocking put on a bus that has room for nothing else.
            with pytest.raises(shmbus.MessageTooLarge, match="capacity") as info:
                action()
            err = info.value
            assert (err.size, err.limit, err.path) == (size, LIMIT, real(bus_name))
            assert err.size > err.limit
            assert q.qsize() == len(msgs)
    assert_intact(bus_name, msgs)


def test_a_message_of_exactly_limit_bytes_fits_an_empty_queue(bus_name: str) -> None:
    with Queue.create(bus_name, capacity=CAP) as q:
        for data in (b"m" * (LIMIT - 3), b"r" * LIMIT):
            if len(data) == LIMIT:
                q.put_bytes(data, block=False)
                assert q.get_bytes(timeout=5) == data
            else:
                q.put(data, block=False)  # 3-byte bin16 header: exactly LIMIT encoded
                assert q.get(timeout=5) == data


@pytest.mark.parametrize("first", [16, 2000, LIMIT - 16, LIMIT])
def test_a_message_of_exactly_limit_bytes_fits_an_empty_queue_wherever_its_head_is(
    bus_name: str, first: int
) -> None:
    # MessageTooLarge.limit is "the largest the bus accepts". Once a message has
    # moved the ring's head off offset 0, an empty queue must still take it,
    # or a blocking put waits for space that no consumer can ever free.
    with Queue.create(bus_name, capacity=CAP) as q:
        q.put_bytes(b"f" * first)
        assert q.get_bytes(timeout=5) == b"f" * first
        assert q.empty()
        data = b"L" * LIMIT
        try:
            q.put_bytes(data, block=False)
        except shmbus.Full:
            pytest.fail(
                f"put_bytes of {LIMIT} bytes (the limit) into an EMPTY queue of capacity {CAP} "
                f"raised Full after a first message of {first} bytes moved the head"
            )
        assert q.get_bytes(timeout=5) == data


# -- Empty and Full ----------------------------------------------------------------------------


def test_empty_is_raised_on_an_empty_queue(bus_name: str) -> None:
    with Queue.create(bus_name, capacity=CAP) as q:
        for get in (q.get_nowait, lambda: q.get(block=False), lambda: q.get(timeout=0)):
            with pytest.raises(shmbus.Empty) as info:
                get()
            assert isinstance(info.value, queue.Empty)
            assert info.value.path == real(bus_name)
        assert q.get_many(10, block=False) == []
        q.put("now one")
        assert q.get_nowait() == "now one"


def test_full_is_raised_on_a_full_queue_and_nothing_is_lost(bus_name: str) -> None:
    with Queue.create(bus_name, capacity=CAP, maxsize=3) as q:
        msgs = ["a", "b", "c"]
        q.put_many(msgs)
        assert q.full()
        for put in (lambda: q.put_nowait("d"), lambda: q.put("d", timeout=0)):
            with pytest.raises(shmbus.Full) as info:
                put()
            assert isinstance(info.value, queue.Full)
            assert info.value.path == real(bus_name)
        assert q.qsize() == 3
    assert_intact(bus_name, msgs)


def test_full_by_bytes(bus_name: str) -> None:
    with Queue.create(bus_name, capacity=CAP) as q:
        sent = []
        with pytest.raises(shmbus.Full):
            for i in range(CAP):
                msg = b"%03d" % i + b"." * 97  # 100 bytes + 2 header + 16 record -> 128 in the ring
                q.put_nowait(msg)
                sent.append(msg)
        assert len(sent) == CAP // 128
        assert q.full()
    assert_intact(bus_name, sent)


# -- PermissionError (as another user) ---------------------------------------------------------


@contextlib.contextmanager
def denied(path: str, mode_if_not_root: int) -> Iterator[None]:
    """Make ``path`` refuse the stranger: as root, the child is another user; else chmod us out."""
    if ROOT:
        yield
        return
    old = stat.S_IMODE(os.stat(path).st_mode)
    os.chmod(path, mode_if_not_root)
    try:
        yield
    finally:
        os.chmod(path, old)


def as_stranger(procs: Procs, action: Callable[[], Any]) -> tuple[str, int | None, str]:
    """Run ``action`` as uid/gid 65534 in a forked child; return (error type, errno, message).

    ``("ok", None, repr(result))`` if it raised nothing. Not root: run it here.
    """

    def attempt() -> tuple[str, int | None, str]:
        try:
            return ("ok", None, repr(action()))
        except Exception as e:
            return (type(e).__name__, getattr(e, "errno", None), str(e))

    if not ROOT:
        return attempt()
    reader, writer = procs.ctx.Pipe(duplex=False)

    def child() -> None:
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            assert os.geteuid() == NOBODY
            writer.send(attempt())
        except BaseException as e:
            writer.send(("child setup failed", None, repr(e)))

    procs.start(child)
    assert reader.poll(60), "the child sent no answer"
    outcome = reader.recv()
    procs.join_all()
    assert outcome[0] != "child setup failed", outcome
    return outcome  # type: ignore[no-any-return]


@pytest.fixture
def shm_dir() -> Iterator[str]:
    """A directory in /dev/shm (which every user can traverse), removed after the test."""
    d = str(SHM / f"{TEST_PREFIX}{uuid.uuid4().hex[:12]}.d")
    os.mkdir(d)
    os.chmod(d, 0o755)
    yield d
    for entry in os.listdir(d):
        with contextlib.suppress(shmbus.ShmbusError):
            shmbus.unlink(os.path.join(d, entry))
    shutil.rmtree(d, ignore_errors=True)


def take_one(path: str) -> Any:
    # A stranger opts in to a bus it does not own (ForeignBus otherwise), so
    # that what these tests see is the operating system's permission check.
    with Queue.open(path, allow_shared=True) as q:
        return q.get_nowait()


def test_a_stranger_with_access_can_use_a_shared_bus(procs: Procs, bus_name: str) -> None:
    # The control for the tests below: the child is able to open a bus when allowed.
    with Queue.create(bus_name, capacity=CAP, mode=0o666) as q:
        q.put("for anyone")
        assert as_stranger(procs, lambda: take_one(bus_name)) == ("ok", None, "'for anyone'")
        assert q.empty()


def test_a_stranger_opening_a_private_bus_gets_permission_error(procs: Procs, bus_name: str) -> None:
    with Queue.create(bus_name, capacity=CAP, mode=0o600) as q:
        msgs = fill(q)
        assert stat.S_IMODE(os.stat(real(bus_name)).st_mode) == 0o600
        with denied(real(bus_name), 0):
            kind, errno_, message = as_stranger(procs, lambda: take_one(bus_name))
            assert (kind, errno_) == ("PermissionError", errno.EACCES)
            assert real(bus_name) in message
            # Nor can the stranger remove it (the file cannot even be read).
            kind, errno_, _ = as_stranger(procs, lambda: shmbus.unlink(bus_name))
            assert (kind, errno_) == ("PermissionError", errno.EACCES)
    assert_intact(bus_name, msgs)


def test_a_stranger_with_the_file_but_not_the_semaphores_gets_permission_error(
    procs: Procs, bus_name: str
) -> None:
    with Queue.create(bus_name, capacity=CAP, mode=0o600) as q:
        msgs = fill(q)
        sems = [str(SHM / f"sem.shmbus.{q.layout.bus_id}.{r}") for r in sorted(QUEUE_ROLES)]
    os.chmod(real(bus_name), 0o666)
    with contextlib.ExitStack() as stack:
        for s in sems:
            stack.enter_context(denied(s, 0))
        kind, errno_, message = as_stranger(procs, lambda: take_one(bus_name))
    assert (kind, errno_) == ("PermissionError", errno.EACCES)
    assert "semaphore" in message
    assert_intact(bus_name, msgs)


def test_a_stranger_in_a_directory_without_permission_gets_permission_error(
    procs: Procs, shm_dir: str
) -> None:
    path = os.path.join(shm_dir, "bus")
    with Queue.create(path, capacity=CAP, mode=0o666) as q:
        msgs = fill(q)
    os.chmod(shm_dir, 0o700)
    with denied(shm_dir, 0):
        kind, errno_, _ = as_stranger(procs, lambda: take_one(path))
    assert (kind, errno_) == ("PermissionError", errno.EACCES)
    os.chmod(shm_dir, 0o755)
    assert_intact(path, msgs)


def test_a_stranger_creating_in_a_directory_without_permission_gets_permission_error(
    procs: Procs, shm_dir: str
) -> None:
    path = os.path.join(shm_dir, "new-bus")
    with denied(shm_dir, 0o500):
        kind, errno_, message = as_stranger(procs, lambda: Queue.create(path, capacity=CAP).close())
    assert (kind, errno_) == ("PermissionError", errno.EACCES)
    assert "directory" in message
    assert os.listdir(shm_dir) == []  # and the no-leak fixture checks its semaphores went too


# -- BusClosed and the lifecycle ---------------------------------------------------------------


def test_use_after_close_raises_bus_closed(bus_name: str) -> None:
    q = Queue.create(bus_name, capacity=CAP)
    msgs = fill(q)
    q.close()
    assert q.closed
    calls: list[Callable[[], Any]] = [
        lambda: q.put("x"), lambda: q.put_nowait("x"), lambda: q.put_many(["x"]),
        lambda: q.put_bytes(b"x"), q.get, q.get_nowait, lambda: q.get(timeout=1),
        lambda: q.get_many(3), lambda: q.get_many(3, block=False), q.get_bytes,
        q.qsize, q.empty, q.full, q.flush, lambda: pickle.dumps(q),
    ]  # fmt: skip
    for call in calls:
        with pytest.raises(shmbus.BusClosed, match="closed") as info:
            call()
        assert info.value.path == real(bus_name)
        assert isinstance(info.value, ValueError)
    assert_intact(bus_name, msgs)


def test_close_is_idempotent_and_per_handle(bus_name: str) -> None:
    a = Queue.create(bus_name, capacity=CAP)
    b = Queue.open(bus_name)
    a.put(1)
    a.close()
    a.close()
    assert a.closed
    assert not b.closed
    b.put(2)
    assert [b.get(timeout=5), b.get(timeout=5)] == [1, 2]
    b.close()
    b.close()
    assert b.closed


def test_context_manager_closes_even_on_error(bus_name: str) -> None:
    with Queue.create(bus_name, capacity=CAP) as q:
        assert not q.closed
        q.put("kept")
    assert q.closed
    with pytest.raises(ZeroDivisionError), Queue.open(bus_name) as q2:
        assert q2.get(timeout=5) == "kept"
        q2.put("also kept")
        1 / 0  # noqa: B018
    assert q2.closed
    assert_intact(bus_name, ["also kept"])


def test_repr_shows_path_and_qsize(bus_name: str) -> None:
    q = Queue.create(bus_name, capacity=CAP)
    q.put_many(["a", "b", "c"])
    text = repr(q)
    assert text.startswith("<shmbus.Queue ")
    assert repr(real(bus_name)) in text
    assert "qsize=3" in text
    assert f"capacity={CAP}" in text
    q.get()
    assert "qsize=2" in repr(q)
    q.close()
    assert repr(q) == f"<shmbus.Queue {real(bus_name)!r} closed>"


@pytest.mark.parametrize("maxsize", [0, 4])
def test_unlink_removes_the_file_and_the_semaphores(bus_name: str, maxsize: int) -> None:
    q = Queue.create(bus_name, capacity=CAP, maxsize=maxsize)
    bus_id = q.layout.bus_id
    roles = QUEUE_ROLES | ({"slots"} if maxsize else set())
    assert sem_roles(bus_id) == roles
    assert os.path.exists(real(bus_name))
    q.put("still readable")
    q.unlink()
    assert not os.path.exists(real(bus_name))
    # The open handle works on until closed, on the same semaphores; nobody can open the bus again.
    assert sem_roles(bus_id) == roles
    assert q.get(timeout=5) == "still readable"
    with pytest.raises(shmbus.BusNotFound):
        Queue.open(bus_name)
    with pytest.raises(shmbus.BusNotFound):
        shmbus.unlink(bus_name)
    q.close()  # the last user out removes the semaphores
    assert sem_roles(bus_id) == set()


def test_module_unlink_on_a_disk_bus(disk_path: str) -> None:
    with Queue.create(disk_path, capacity=CAP) as q:
        bus_id = q.layout.bus_id
    shmbus.unlink(Path(disk_path))
    assert not os.path.exists(disk_path)
    assert sem_roles(bus_id) == set()


@pytest.mark.parametrize(
    "content",
    [b"", b"just text\n", b"\x93SHMBUX\n" + bytes(2000)],
    ids=["empty", "text", "almost-magic"],
)
def test_unlink_on_a_file_that_is_not_a_bus_raises_not_a_bus_and_keeps_it(
    disk_path: str, content: bytes
) -> None:
    Path(disk_path).write_bytes(content)
    with pytest.raises(shmbus.NotABus, match="refusing") as info:
        shmbus.unlink(disk_path)
    assert info.value.path == disk_path
    assert Path(disk_path).read_bytes() == content


@pytest.mark.parametrize("maxsize", [0, 3])
def test_a_bus_whose_semaphores_vanished_reopens_with_its_messages(
    disk_path: str, maxsize: int, caplog: pytest.LogCaptureFixture
) -> None:
    # A disk-backed bus survives a reboot; its semaphores (in /dev/shm) do not.
    with Queue.create(disk_path, capacity=CAP, maxsize=maxsize) as q:
        msgs = ["one", {"two": 2}, b"three"][: (maxsize - 1) if maxsize else 3]
        q.put_many(msgs)
        bus_id = q.layout.bus_id
    roles = QUEUE_ROLES | ({"slots"} if maxsize else set())
    assert sem_roles(bus_id) == roles
    for role in roles:
        os.unlink(SHM / f"sem.shmbus.{bus_id}.{role}")
    assert sem_roles(bus_id) == set()

    with caplog.at_level(logging.WARNING, logger="shmbus"), Queue.open(disk_path) as q:
        assert sem_roles(bus_id) == roles
        for role in roles:
            assert stat.S_IMODE(os.stat(SHM / f"sem.shmbus.{bus_id}.{role}").st_mode) == 0o600
        assert q.qsize() == len(msgs)
        if maxsize:
            q.put_nowait("last slot")  # slots were rebuilt as maxsize - queued
            with pytest.raises(shmbus.Full):
                q.put_nowait("one too many")
            msgs = [*msgs, "last slot"]
        else:
            q.put("more")
            msgs = [*msgs, "more"]
    assert any("missing" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert_intact(disk_path, msgs)
