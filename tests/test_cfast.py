"""The optional C fast path (shmbus/_cfast.c) against the pure-Python path.

The C code does only the common case of a single put and get, so the rest of
the suite, run with it (the default when it is built), already holds it to
every behaviour. Here: it is really in use; both paths read each other's
records, across processes, through wraps and waits; closing a handle frees
the mapping. The whole suite passing again in pure Python
(``SHMBUS_PURE_PYTHON=1``, what a machine without a compiler runs) is a step of
its own in ``.ci/run``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

import shmbus
from shmbus import _accel
from shmbus._consumer import _KIND_NAMES
from shmbus._zerocopy import Record

ROOT = Path(__file__).resolve().parent.parent
_BUILT = _accel.ENABLED or os.environ.get("SHMBUS_PURE_PYTHON", "") not in ("", "0")
needs_c = pytest.mark.skipif(not _accel.ENABLED, reason="no C compiler here: shmbus runs in pure Python")


def test_the_extension_is_built_wherever_a_compiler_is() -> None:
    # Without this, a test run that imports the sources (not the built package)
    # would silently test only the pure-Python path.
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler on this machine: pure Python is what it gets")
    assert _BUILT, "shmbus._cfast is not built: install with `python -m pip install -e '.[test]'`"


def _python(code: str, *args: str, pure: bool, timeout: float = 60.0) -> str:
    env = dict(os.environ, SHMBUS_PURE_PYTHON="1" if pure else "0")
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        env=env, capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return out.stdout


@needs_c
def test_the_fast_path_is_in_use_and_the_switch_turns_it_off(bus_name: str) -> None:
    with shmbus.Queue.create(bus_name, capacity="64KiB") as q:
        assert q._fast is not None
        with shmbus.Queue.create(bus_name + "-max", capacity="64KiB", maxsize=4) as bounded:
            assert bounded._fast is None, "maxsize queues take the Python path"
            bounded.unlink()
        q.unlink()
    code = "import shmbus._accel as a; print(a.ENABLED)"
    assert _python(code, pure=True).strip() == "False"
    assert _python(code, pure=False).strip() == "True"


@needs_c
def test_close_releases_the_mapping_and_later_calls_raise_bus_closed(bus_name: str) -> None:
    q = shmbus.Queue.create(bus_name, capacity="64KiB")
    q.put({"a": 1})
    q.close()  # would raise BufferError if the C object still held the mapping
    with pytest.raises(shmbus.BusClosed):
        q.put(1)
    with pytest.raises(shmbus.BusClosed):
        q.get_nowait()
    with shmbus.Queue.open(bus_name) as q2:
        assert q2.get_nowait() == {"a": 1}
        q2.unlink()


_PRODUCE = """
    import sys, shmbus
    q = shmbus.Queue.open(sys.argv[1])
    for i in range(int(sys.argv[2])):
        q.put({"i": i, "pad": "x" * (i % 97)}, timeout=30)
    q.put(b"bytes message", timeout=30)
    q.put_bytes(b"raw", timeout=30)
    print(shmbus._accel.ENABLED)
"""

_CONSUME = """
    import sys, shmbus
    q = shmbus.Queue.open(sys.argv[1])
    for i in range(int(sys.argv[2])):
        m = q.get(timeout=30)
        assert m == {"i": i, "pad": "x" * (i % 97)}, (i, m)
    assert q.get(timeout=30) == b"bytes message"
    assert q.get(timeout=30) == b"raw"
    print(shmbus._accel.ENABLED)
"""


@needs_c
@pytest.mark.parametrize("producer_pure", [True, False], ids=["python-to-c", "c-to-python"])
def test_each_path_reads_the_others_records_across_wraps_and_waits(
    bus_name: str, producer_pure: bool
) -> None:
    n = 20_000  # through a 16 KiB ring: hundreds of wraps, and both sides wait for each other
    with shmbus.Queue.create(bus_name, capacity="16KiB") as q:
        env_p = dict(os.environ, SHMBUS_PURE_PYTHON="1" if producer_pure else "0")
        env_c = dict(os.environ, SHMBUS_PURE_PYTHON="0" if producer_pure else "1")
        args = [q.path, str(n)]
        consumer = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(_CONSUME), *args], env=env_c,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        producer = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(_PRODUCE), *args], env=env_p,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        outs = [p.communicate(timeout=90) for p in (producer, consumer)]
        assert producer.returncode == 0 and consumer.returncode == 0, outs
        assert [o[0].strip() for o in outs] == [str(not producer_pure), str(producer_pure)]
        assert q.qsize() == 0
        stats = q.stats()
        assert stats.put_count == stats.get_count == n + 2
        assert stats.bytes_in == stats.bytes_out
        q.unlink()


def test_a_negative_timeout_is_refused_every_time_and_never_leaves_the_lock_held(bus_name: str) -> None:
    # A bad timeout must be refused before any lock is taken, not found after:
    # every put and get here, C or Python, leaves every lock free.
    with shmbus.Queue.create(bus_name, capacity="64KiB") as q:
        for i in range(600):
            with pytest.raises(ValueError, match="timeout"):
                q.put({"i": i}, timeout=-1)
            with pytest.raises(ValueError, match="timeout"):
                q.put_many([{"i": i}], timeout=-1)
            q.put({"i": i}, timeout=1)
            with pytest.raises(ValueError, match="timeout"):
                q.get(timeout=-1)
            with pytest.raises(ValueError, match="timeout"):
                q.get_many(3, timeout=-1)
            assert q.get(timeout=1) == {"i": i}
        assert q.qsize() == 0
        for lock in q._locks:  # consistent and unlocked: no owner, no OWNER_DIED, no repair pending
            assert lock.state() == (0, False, False) and lock.mutex.word() == 0, lock.role
        q.unlink()


def _raise_at_c_call(name: str) -> Any:
    """A profile hook that raises KeyboardInterrupt as the C function ``name`` is about to run.

    It stands for a signal handler's exception landing in a get after its
    prologue and before its C call: exactly one, then the hook removes itself.
    """

    def hook(frame: Any, event: str, arg: Any) -> None:
        if event == "c_call" and getattr(arg, "__name__", "") == name:
            sys.setprofile(None)
            raise KeyboardInterrupt

    return hook


@needs_c
@pytest.mark.parametrize(
    ("call", "c_name"),
    [("get", "get_obj"), ("get_bytes", "take_many"), ("get_many", "take_many_obj")],
)
def test_an_exception_before_the_c_call_keeps_nothing_an_earlier_get_returned(
    bus_name: str, call: str, c_name: str
) -> None:
    with shmbus.Queue.create(bus_name, capacity="64KiB") as q:
        q.put_many(["a", "b", "c"])
        first = q.get_many(1) if call == "get_many" else getattr(q, call)()
        assert first in (["a"], "a", b"\xa1a")  # from C, which keeps a reference to it
        sys.setprofile(_raise_at_c_call(c_name))
        try:
            with pytest.raises(KeyboardInterrupt):
                q.get_many(1) if call == "get_many" else getattr(q, call)()
        finally:
            sys.setprofile(None)
        # Not "a" again: the earlier get returned it; nothing was taken by the interrupted one.
        assert q.get_many(5, block=False) == ["b", "c"]
        q.unlink()


_EDGES: list[Any] = [
    0, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**63 - 1, 2**64 - 1,
    -1, -32, -33, -128, -129, -(2**15) - 1, -(2**31) - 1, -(2**63),
    0.0, -0.0, 3.14, float("inf"), "", "a" * 31, "a" * 32, "a" * 255, "a" * 256, "a" * 65536, "é€😀",
    b"", b"x" * 255, b"x" * 256, b"x" * 65536, None, True, False,
    [], [1] * 15, [1] * 16, [1] * 65536, (1, "two"), {str(i): i for i in range(16)},
    {1: "int key", b"k": "bytes key", 1.5: None, None: [], False: {}},
]  # fmt: skip


@pytest.mark.timeout(60)
def test_a_batch_c_encodes_and_decodes_itself_is_msgpacks(bus_name: str) -> None:
    """put_many/get_many of plain messages: msgpack's bytes, unpackb's messages (msgspec or not)."""
    import msgpack

    with shmbus.Queue.create(bus_name, capacity="4MiB") as q:
        if q._fast is None:
            pytest.skip("no C fast path")
        q.put_many(_EDGES)
        assert [q.get_bytes(timeout=5) for _ in _EDGES] == [
            o if type(o) is bytes else msgpack.packb(o) for o in _EDGES
        ]
        q.put_many(_EDGES)
        got = q.get_many(len(_EDGES), timeout=5)
        expected = [msgpack.unpackb(msgpack.packb(o), strict_map_key=False) for o in _EDGES]
        assert repr(got) == repr(expected)


@needs_c
def test_get_records_in_c_gives_pythons_records_and_refuses_a_foreign_view(bus_name: str) -> None:
    with shmbus.Queue.create(bus_name, capacity="64KiB") as q:
        msgs: list[Any] = [{"i": i} for i in range(5)]
        for _ in range(3):  # past a wrap: the C scan follows wrap markers as Python does
            q.put_many(msgs * 300)
            q.get_many(1500)
        q.put_many(msgs)
        q.put_bytes(b"raw")
        fast = q._fast
        assert fast is not None
        batch = q.get_records(100)
        c_side = [(r.seq, r.kind, bytes(r.data)) for r in batch]
        assert all(type(r) is Record and r.data.readonly for r in batch)
        assert len(batch) == 6
        batch.consume(0)  # the same records for the Python path
        q._drop_fast_path()
        with q.get_records(100) as batch:
            assert [(r.seq, r.kind, bytes(r.data)) for r in batch] == c_side
        assert q.empty()
        with shmbus.Queue.create(bus_name + "-b", capacity="64KiB") as other:
            other_fast = other._fast
            assert other_fast is not None
            with pytest.raises(ValueError, match="not this queue's ring"):
                other_fast.scan_records(memoryview(bytes(65536)), Record, _KIND_NAMES, 1)
            with pytest.raises(TypeError):
                other_fast.scan_records(other._ring.toreadonly(), dict, _KIND_NAMES, 1)
            other.unlink()
        q.unlink()
