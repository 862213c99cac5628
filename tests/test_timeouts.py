"""The one timeout rule (``_sync.check_timeout``, ``_sync.deadline``) and every call that takes a timeout.

A negative or NaN timeout is refused with the same ``ValueError`` by every public
call, blocking or not, synchronous or asyncio, before it sends or takes
anything; None waits for ever and 0 does not wait.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Callable

import pytest

import shmbus
from shmbus import _sync

MESSAGE = "'timeout' must be a non-negative number"


def test_check_timeout_refuses_only_a_negative_or_nan_timeout() -> None:
    for ok in (None, 0, 0.0, 1e-9, 5, 1e9, float("inf")):
        _sync.check_timeout(ok)
    for bad in (-1, -0.5, -1e-9, float("nan"), float("-inf")):
        with pytest.raises(ValueError, match=MESSAGE):
            _sync.check_timeout(bad)


def test_deadline_is_on_the_monotonic_clock() -> None:
    assert _sync.deadline(None) is None
    before = time.monotonic()
    d = _sync.deadline(2.0)
    assert d is not None and before + 2.0 <= d <= time.monotonic() + 2.0
    with pytest.raises(ValueError, match=MESSAGE):
        _sync.deadline(-1)


def _queue_calls(q: shmbus.Queue) -> dict[str, Callable[[float], Any]]:
    def view(t: float) -> None:
        with q.get_view(timeout=t):
            pass

    def reserve(t: float) -> None:
        with q.reserve(8, timeout=t):
            pass

    return {
        "put": lambda t: q.put("x", timeout=t),
        "put nowait-mode": lambda t: q.put("x", False, t),
        "put_bytes": lambda t: q.put_bytes(b"x", timeout=t),
        "put_many": lambda t: q.put_many(["x", "y"], timeout=t),
        "get": lambda t: q.get(timeout=t),
        "get nowait-mode": lambda t: q.get(False, t),
        "get_bytes": lambda t: q.get_bytes(timeout=t),
        "get_many": lambda t: q.get_many(3, timeout=t),
        "get_view": view,
        "reserve": reserve,
    }


@pytest.mark.parametrize("bad", [-1, float("nan")], ids=["negative", "nan"])
@pytest.mark.parametrize("queued", [0, 2])
def test_every_queue_call_refuses_a_bad_timeout_and_changes_nothing(
    bus_name: str, queued: int, bad: float
) -> None:
    with shmbus.JoinableQueue.create(bus_name, capacity="64KiB") as q:
        q.put_many(range(queued))
        for name, call in _queue_calls(q).items():
            with pytest.raises(ValueError, match=MESSAGE):
                call(bad)
            assert q.qsize() == queued, name
        with pytest.raises(ValueError, match=MESSAGE):
            q.join(bad)

        async def main() -> None:
            for name, coro in [
                ("aget", lambda: q.aget(bad)),
                ("aget_many", lambda: q.aget_many(2, bad)),
                ("aput", lambda: q.aput("x", bad)),
                ("aput_many", lambda: q.aput_many(["x"], bad)),
            ]:
                with pytest.raises(ValueError, match=MESSAGE):
                    await coro()
                assert q.qsize() == queued, name

        asyncio.run(main())
        assert q.get_many(10, block=False) == list(range(queued))  # nothing went in or out
        q.unlink()


@pytest.mark.parametrize("bad", [-1, float("nan")], ids=["negative", "nan"])
def test_every_subscription_call_refuses_a_bad_timeout(bus_name: str, bad: float) -> None:
    with shmbus.Topic.create(bus_name, capacity="64KiB") as t, t.subscribe() as sub:
        t.publish(1)
        with pytest.raises(ValueError, match=MESSAGE):
            sub.get(timeout=bad)
        with pytest.raises(ValueError, match=MESSAGE):
            sub.get_many(2, timeout=bad)
        with pytest.raises(ValueError, match=MESSAGE), sub.get_view(timeout=bad):
            pass

        async def main() -> None:
            with pytest.raises(ValueError, match=MESSAGE):
                await sub.aget(bad)
            with pytest.raises(ValueError, match=MESSAGE):
                await sub.aget_many(2, bad)

        asyncio.run(main())
        assert sub.get(timeout=0) == 1  # nothing was consumed
        t.unlink()
