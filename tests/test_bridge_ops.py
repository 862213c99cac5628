"""Running bridges seen from outside: ``shmbus info``/``stats``/``gc`` and the status files, TLS, NKeys.

Real processes only: ``nats-server`` from the fixtures, bridges as ``python -m
shmbus bridge``, ``shmbus info`` as a command. Waits poll an observable state
(what ``info --json`` says, a process exiting), each with a deadline.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest

import shmbus
import shmbus.bridge
from shmbus import _bridge_status

pytestmark = pytest.mark.timeout(120)

nats = pytest.importorskip("nats")  # the test extra installs it: CI never skips
REPO = str(Path(__file__).resolve().parent.parent)
WAIT = 60.0  # seconds for a state to show: far above a healthy run on a loaded machine


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _bridge(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "shmbus", "bridge", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
    )  # fmt: skip


def _stop(proc: subprocess.Popen[str], sig: int = signal.SIGTERM) -> tuple[int, str, str]:
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        out, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return proc.returncode, out, err


def _run(*args: str, timeout: float = 60.0) -> tuple[int, str, str]:
    """``python -m shmbus ARGS``: exit code, stdout, stderr."""
    p = subprocess.run([sys.executable, "-m", "shmbus", *args], capture_output=True, text=True,
                       env=_env(), timeout=timeout)  # fmt: skip
    return p.returncode, p.stdout, p.stderr


def _info(bus: Path) -> dict[str, Any]:
    rc, out, err = _run("info", str(bus), "--json")
    assert rc == 0, err
    return json.loads(out)  # type: ignore[no-any-return]


def _until(what: str, fn: Callable[[], Any], procs: list[subprocess.Popen[str]]) -> Any:
    """Poll ``fn`` (an observable) until it returns something true; fail after ``WAIT`` or on an exit."""
    deadline = time.monotonic() + WAIT
    while True:
        got = fn()
        if got:
            return got
        for p in procs:
            assert p.poll() is None, f"a bridge exited ({p.returncode}) waiting for {what}: {p.stderr.read()}"  # type: ignore[union-attr]
        assert time.monotonic() < deadline, f"no {what} in {WAIT} s"
        time.sleep(0.05)  # a poll of what `shmbus info` reports


def _add_stream(url: str, name: str, subject: str) -> None:
    async def go() -> None:
        nc = await nats.connect(url)
        try:
            await nc.jetstream().add_stream(name=name, subjects=[subject], duplicate_window=120.0)
        finally:
            await nc.close()

    asyncio.run(asyncio.wait_for(go(), 30))


def _route(info: dict[str, Any], direction: str) -> dict[str, Any] | None:
    return next((r for r in info["bridges"] if r["direction"] == direction), None)


# -- status files: shmbus info / stats / gc ----------------------------------------------------


def test_info_and_stats_show_the_routes_on_a_bus_and_their_lag(nats_server: Any, tmp_path: Path) -> None:
    a, b = tmp_path / "a.bus", tmp_path / "b.bus"
    qa = shmbus.Queue.create(str(a), capacity="64KiB")
    qb = shmbus.Queue.create(str(b), capacity="64KiB", maxsize=2)  # fills: the rest waits in the stream
    procs: list[subprocess.Popen[str]] = []
    try:
        _add_stream(nats_server.url, "OPS", "ops.jobs")
        assert _info(a)["bridges"] == []
        qa.put_many([{"i": i} for i in range(5)])
        out = _bridge("queue-to-stream", str(a), "--subject", "ops.jobs", "--server", nats_server.url)
        into = _bridge("stream-to-queue", str(b), "--subject", "ops.jobs", "--server", nats_server.url,
                       "--max-batch", "1")  # fmt: skip
        procs = [out, into]
        row = _until("queue-to-stream moved 5", lambda: (r := _route(_info(a), "queue-to-stream"))
                     and r["moved"] == 5 and r, procs)  # fmt: skip
        assert row["pid"] == out.pid and row["subject"] == "ops.jobs" and row["stream"] == "OPS"
        assert row["lag"] == 0 and row["state"] == "running"
        # Queue B holds 2: the bridge holds a third fetched message; the consumer has the rest pending.
        row = _until("a full queue and messages pending", lambda: (r := _route(_info(b), "stream-to-queue"))
                     and r["moved"] == 2 and r["lag"] > 0 and r, procs)  # fmt: skip
        assert row["pid"] == into.pid and row["lag"] <= 3
        rc, text, err = _run("info", str(b))
        assert rc == 0, err
        assert f"stream-to-queue <- ops.jobs (stream OPS)  pid {into.pid}" in text, text
        rc, text, err = _run("stats", str(b), "--count", "1")
        assert rc == 0 and f"pid {into.pid}" in text and "stream-to-queue" in text, text + err
        assert [qb.get(timeout=WAIT) for _ in range(5)] == [{"i": i} for i in range(5)]
        _until("no lag left", lambda: (r := _route(_info(b), "stream-to-queue"))
               and r["moved"] == 5 and r["lag"] == 0, procs)  # fmt: skip
        # A clean stop removes the file; a killed bridge's is ignored, and `shmbus gc` removes it.
        assert _stop(out)[0] == 0
        assert _info(a)["bridges"] == []
        status_dir = Path(os.environ["SHMBUS_BRIDGE_STATUS_DIR"])
        assert [p.name.split("-")[0] for p in status_dir.glob("*.json")] == [str(into.pid)]
        _stop(into, signal.SIGKILL)
        assert _info(b)["bridges"] == []
        rc, text, _err = _run("gc", "--dry-run")
        assert f"would remove {status_dir}/{into.pid}-0.json" in text, text
        # (Not `shmbus gc` itself here: it would remove other test sessions' semaphores too.)
        assert _bridge_status.remove_stale() == [f"{status_dir}/{into.pid}-0.json"]
        assert not list(status_dir.glob("*.json"))
    finally:
        for p in procs:
            _stop(p, signal.SIGKILL)
        for q in (qa, qb):
            q.unlink()
            q.close()


def test_topic_to_stream_lag_is_how_far_behind_the_newest(nats_server: Any, tmp_path: Path) -> None:
    path = tmp_path / "t.bus"
    t = shmbus.Topic.create(str(path), capacity="1MiB")
    try:
        _add_stream(nats_server.url, "TICKS", "ops.ticks")
        proc = _bridge("topic-to-stream", str(path), "--subject", "ops.ticks", "--server", nats_server.url)
        try:
            _until("a running route", lambda: (r := _route(_info(path), "topic-to-stream"))
                   and r["state"] == "running", [proc])  # fmt: skip
            t.publish_many([{"i": i} for i in range(100)])
            row = _until("100 moved", lambda: (r := _route(_info(path), "topic-to-stream"))
                         and r["moved"] == 100 and r, [proc])  # fmt: skip
            assert row["lag"] == 0 and row["missed"] == 0
        finally:
            rc, _out, err = _stop(proc)
        assert rc == 0, err
    finally:
        t.unlink()
        t.close()
