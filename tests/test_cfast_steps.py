"""The C fast path reaches the crash tests' named steps at the same stores as Python.

``shmbus/_faults.py`` names the steps of a put and a get (``put:after-lock``,
``get:mid-commit``...); the crash tests kill a process at each. The C path
calls the same hook at the same points, so those tests exercise it too.
Here, with every step recorded instead of fatal, the same operations run on
a C handle and on a pure-Python one: at each step the header words, the
tokens field, the semaphore, the locks and the ring must be the same on both,
and on the C handle every step must have been reached from C. A C path that
stored a counter earlier or later than Python would differ at some step.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any, Callable

import pytest

import shmbus
from shmbus import _accel, _faults
from shmbus._format import (
    I_SPACE_WAITING,
    Q_BYTES_IN,
    Q_BYTES_OUT,
    Q_HEAD,
    Q_NEXT_SEQ,
    Q_TAIL,
    Q_TAIL_SEQ,
    Q_TIME_SAMPLES,
    TIME_SAMPLES,
)

pytestmark = [
    pytest.mark.skipif(not _accel.ENABLED, reason="no C fast path here"),
    pytest.mark.timeout(60),
]

Step = tuple[str, bool, tuple[Any, ...]]


def _snapshot(q: shmbus.Queue) -> tuple[Any, ...]:
    h = q._h64
    assert q._part is not None
    words = [h[i] for i in (Q_HEAD, Q_NEXT_SEQ, Q_BYTES_IN, Q_TAIL, Q_TAIL_SEQ, Q_BYTES_OUT)]
    samples = [h[Q_TIME_SAMPLES + 2 * i] for i in range(TIME_SAMPLES)]
    held = [lk.mutex.word() & 0x3FFFFFFF != 0 for lk in q._locks]
    return (*words, h[q._part.tokens_index], q._h32[I_SPACE_WAITING], q._sems["items"].value,
            *samples, *held, bytes(q._ring))  # fmt: skip


@pytest.fixture
def queues(bus_name: str) -> Iterator[tuple[shmbus.Queue, shmbus.Queue]]:
    c = shmbus.Queue.create(bus_name, capacity="16KiB")
    py = shmbus.Queue.create(bus_name + "-py", capacity="16KiB")
    try:
        py._drop_fast_path()
        for q in (c, py):
            assert q._part is not None
            q._part.claim(q.recover)  # the C get works for a handle with a participant slot
            q._h64[Q_NEXT_SEQ] = q._h64[Q_TAIL_SEQ] = 254  # a time sample falls in the batch below
        yield c, py
    finally:
        c.close()
        py.close()
        shmbus.unlink(bus_name + "-py")  # the bus_name fixture removes the first


def _steps(
    monkeypatch: pytest.MonkeyPatch, q: shmbus.Queue, ops: Callable[[shmbus.Queue], Any]
) -> list[Step]:
    """Run ``ops(q)`` with every step recorded: (step, reached from C, the state there)."""
    out: list[Step] = []

    def record(step: str) -> None:
        from_c = sys._getframe(1).f_code is _accel._c_step.__code__
        out.append((step, from_c, _snapshot(q)))

    monkeypatch.setattr(_faults, "hit", record)
    _faults.arm("put:after-lock")  # armed: Python checks ``armed``, C holds the hook
    try:
        ops(q)
    finally:
        _faults.disarm()
    return out


OPS: dict[str, Callable[[shmbus.Queue], Any]] = {
    "put": lambda q: q.put({"a": 1}),  # C encodes too
    "put_bytes": lambda q: q.put_bytes(b"raw"),  # Python encodes, C writes
    "put_many": lambda q: q.put_many([1, "two", {"3": 3}]),
    "get": lambda q: (q.put_many([1, 2]), _faults.arm("get:after-lock"), q.get()),
    "get_many": lambda q: (q.put_many([1, 2, 3]), _faults.arm("get:after-lock"), q.get_many(3, block=False)),
}
WANT = {
    "put": ["put:after-lock", "put:after-write", "put:mid-publish", "put:before-post"],
    "put_bytes": ["put:after-lock", "put:after-write", "put:mid-publish", "put:before-post"],
    "put_many": ["put:after-lock", *["put:after-write"] * 3, "put:mid-publish", "put:before-post"],
}
GET = ["get:after-token", "get:after-lock", "get:after-copy", "get:mid-commit", "get:before-unlock"]


@pytest.mark.parametrize("op", list(OPS))
def test_c_reaches_every_step_with_the_stores_python_made_there(
    monkeypatch: pytest.MonkeyPatch, queues: tuple[shmbus.Queue, shmbus.Queue], op: str
) -> None:
    c, py = queues
    in_c = _steps(monkeypatch, c, OPS[op])
    in_py = _steps(monkeypatch, py, OPS[op])
    steps = [s for s, _, _ in in_py]
    assert steps[-len(GET) :] == GET if op.startswith("get") else steps == WANT[op]
    assert [s for s, _, _ in in_c] == steps
    assert not any(from_c for _, from_c, _ in in_py)
    # The C handle's own operation ran in C (the puts that fill a get's queue too).
    assert all(from_c for _, from_c, _ in in_c), [(s, f) for s, f, _ in in_c]
    for (step, _, want), (_, _, got) in zip(in_py, in_c):
        assert got == want, f"{op}: the C path's state at {step} differs from Python's"
    assert _snapshot(c) == _snapshot(py)


def test_disarmed_c_calls_no_hook(
    monkeypatch: pytest.MonkeyPatch, queues: tuple[shmbus.Queue, shmbus.Queue]
) -> None:
    c, _ = queues
    calls: list[str] = []
    monkeypatch.setattr(_faults, "hit", calls.append)
    _faults.arm("put:after-lock")
    _faults.disarm()
    c.put(1)
    assert c.get() == 1
    assert calls == []
