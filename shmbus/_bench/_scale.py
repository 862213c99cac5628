"""Row (h): large buses: create+open time by size, and the memory of a process that uses one.

The memory figure comes from a fresh ``python`` (not a fork of this one,
which has imported everything the benchmark needs), read from ``/proc/self/status``.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from multiprocessing.context import ForkContext
from typing import Any

from .. import Queue
from ._channels import bus_name, unlink_quietly
from ._measure import Progress, Role, measure, median
from ._params import GIB, MIB, BenchError, Params, size_text
from ._roles import create_open

__all__ = ["run_scale"]

_MEMORY_PROBE = r"""
import json, sys

def status():
    keys = ("VmRSS", "RssAnon", "RssFile", "RssShmem")
    with open("/proc/self/status") as f:
        pairs = (line.split(":", 1) for line in f)
        return {k: int(v.split()[0]) * 1024 for k, v in pairs if k in keys}

import shmbus
before = status()
q = shmbus.Queue.open(sys.argv[1])
q.put({"seq": 0, "ts": 0.0, "name": "sensor-17", "value": 3.14})
ok = q.get()["seq"] == 0
after = status()
q.close()
print(json.dumps({"before": before, "after": after, "ok": ok}))
"""


def _large_capacity(params: Params) -> tuple[int, str]:
    """The large bus size: 4 GiB if /dev/shm has it free (with a margin), else the fallback."""
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return params.scale_fallback, "/dev/shm not found: fell back"
    free = st.f_bavail * st.f_frsize
    if free >= params.scale_large + 256 * MIB:
        return params.scale_large, f"{free / GIB:.1f} GiB free in /dev/shm"
    return params.scale_fallback, f"only {free / GIB:.1f} GiB free in /dev/shm: fell back"


def run_scale(params: Params, ctx: ForkContext, progress: Progress) -> dict[str, Any]:
    """(h) Create+open time of a small and a large bus; memory of a process using a 1 GiB bus."""
    large, why = _large_capacity(params)
    create: dict[str, Any] = {}
    for cap in (params.scale_small, large):
        s = []
        for rep in range(params.repeats):
            progress.step(f"(h) scale: create+open a {size_text(cap)} bus, run {rep + 1}/{params.repeats}")
            path = bus_name()
            role = Role("creator", "", functools.partial(create_open, path=path, capacity=cap))
            s.append(measure([role], "scratch", params, ctx, options={"path": path})["creator"])
        create[str(cap)] = {
            "capacity": cap,
            "create_open_ms": 1e3 * median(s, "create_open_s"),
            "allocated_bytes": median(s, "allocated_bytes"),
            "samples": [{k: r[k] for k in ("create_open_s", "allocated_bytes")} for r in s],
        }
    memory = [_memory_probe(params, rep, progress) for rep in range(params.repeats)]
    return {
        "letter": "h",
        "title": "scale: large buses",
        "large_capacity": large,
        "large_note": why,
        "create_open": create,
        "memory": {
            "bus_capacity": params.memory_bus,
            **{k: median(memory, k) for k in memory[0] if k != "detail"},
            "samples": memory,
        },
    }


def _memory_probe(params: Params, rep: int, progress: Progress) -> dict[str, Any]:
    """One fresh ``python``: VmRSS after ``import shmbus``, then after opening a bus and a put/get."""
    progress.step(
        f"(h) scale: memory of a process using a {size_text(params.memory_bus)} bus, "
        f"run {rep + 1}/{params.repeats}"
    )
    path = bus_name()
    try:
        Queue.create(path, capacity=params.memory_bus).close()
        # The directory that holds the shmbus package (this file is in shmbus/_bench/).
        here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        path_var = os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "PYTHONPATH": path_var}
        real = os.path.join("/dev/shm", path)
        done = subprocess.run(
            [sys.executable, "-c", _MEMORY_PROBE, real],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if done.returncode != 0:
            raise BenchError(f"the memory probe failed:\n{done.stderr}")
        out = json.loads(done.stdout)
        allocated = os.stat(real).st_blocks * 512
    finally:
        unlink_quietly(path)
    if not out["ok"]:
        raise BenchError("the memory probe got another message back")
    b, a = out["before"], out["after"]
    return {
        "rss_fresh_bytes": b["VmRSS"],
        "rss_after_bytes": a["VmRSS"],
        "rss_delta_bytes": a["VmRSS"] - b["VmRSS"],
        "shmem_delta_bytes": a.get("RssShmem", 0) - b.get("RssShmem", 0),
        "bus_allocated_bytes": allocated,
        "detail": out,
    }
