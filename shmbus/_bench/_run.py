"""The whole run: which rows, in what order, and the JSON-able results with the machine they ran on."""

from __future__ import annotations

import datetime
import functools
import importlib
import multiprocessing as mp
import os
import platform
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from importlib import metadata
from typing import Any, Callable

from .. import __version__, _accel
from ._bridgerow import bridge_steps, run_bridge
from ._measure import Progress
from ._pairs import PAIR_ROWS, pair_steps, run_pair_row
from ._params import OPTIONAL, ROW_LETTERS, Params, params_for
from ._rows import MPMC_TRANSPORTS, SWEEP_MEMCPY, SWEEP_TRANSPORTS, run_mpmc, run_sweep
from ._scale import run_scale
from ._targets import evaluate_targets
from ._topicrow import run_topic, topic_steps

__all__ = ["run", "machine_info"]


def _optional_missing() -> dict[str, str]:
    """The optional comparisons that cannot run here, with why."""
    missing: dict[str, str] = {}
    for transport, (module, _dist) in OPTIONAL.items():
        try:
            importlib.import_module(module)
        except ImportError as e:
            broken = not isinstance(e, ModuleNotFoundError)
            missing[transport] = f"import failed: {e}" if broken else "not installed"
    return missing


def _steps(keys: Sequence[str], params: Params, missing: Mapping[str, str]) -> int:
    n = 0
    for row in PAIR_ROWS:
        if row.key in keys:
            n += pair_steps(row, params, missing)
    if "sizes" in keys:
        n += len(params.sweep_sizes) * (len(SWEEP_TRANSPORTS) + len(SWEEP_MEMCPY)) * params.sweep_repeats
    if "mpmc" in keys:
        n += len(params.mpmc_shapes) * len(MPMC_TRANSPORTS) * params.mpmc_repeats
    if "scale" in keys:
        n += 3 * params.repeats
    if "topic" in keys:
        n += topic_steps(params)
    if "bridge" in keys:
        n += bridge_steps(params)
    return n


def run(
    quick: bool, only: Sequence[str] | None = None, progress: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Run the benchmarks (all, or the row keys in ``only``) and return the results as JSON-able data.

    Raises ``BenchError`` if a measurement fails. ``progress`` is called with a
    short description before each measurement.
    """
    params = params_for(quick)
    ctx = mp.get_context("fork")
    keys = [k for k in ROW_LETTERS if only is None or k in only]
    missing = _optional_missing()
    prog = Progress(_steps(keys, params, missing), progress)
    started = time.monotonic()
    out: dict[str, Any] = {
        "started_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "params": {
            **asdict(params),
            "start_method": "fork",
            "message": {"seq": "i", "ts": "time.time()", "name": "sensor-17", "value": 3.14},
            "optional_missing": missing,
        },
        "benchmarks": {},
    }
    runners: dict[str, Callable[[], dict[str, Any]]] = {
        row.key: functools.partial(run_pair_row, row, params, ctx, prog, missing) for row in PAIR_ROWS
    }
    runners.update(
        sizes=functools.partial(run_sweep, params, ctx, prog),
        mpmc=functools.partial(run_mpmc, params, ctx, prog),
        scale=functools.partial(run_scale, params, ctx, prog),
        topic=functools.partial(run_topic, params, ctx, prog),
        bridge=functools.partial(run_bridge, params, ctx, prog),
    )
    for key in keys:
        out["benchmarks"][key] = runners[key]()
    out["duration_s"] = round(time.monotonic() - started, 2)
    out["targets"] = evaluate_targets(out["benchmarks"])
    return out


def machine_info() -> dict[str, Any]:
    """Where the figures come from: they mean little without it."""

    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"

    try:
        usable: int | None = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = None
    info = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "shmbus": __version__,
        "shmbus_source": _source_revision(),
        "shmbus_c_fast_path": _accel.ENABLED,
        "shmbus_c_fast_path_why_not": _accel.REASON,
        "msgpack": version("msgpack"),
        "posix_ipc": version("posix_ipc"),
        "msgspec": version("msgspec"),  # the optional faster coder of the same msgpack bytes
        **{name: version(dist) for name, (_m, dist) in OPTIONAL.items()},
        # Other work on the machine moves every figure: say how busy it was.
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    return info


def _source_revision() -> str | None:
    """The git commit of a checkout (with "+modified" for local changes), or None when installed."""
    # The shmbus package, all of it: this file is one level down, in shmbus/_bench/.
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", "-C", here, *args], capture_output=True, text=True, timeout=5, check=True
        )
        return done.stdout.strip()

    try:
        rev = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--", ".")
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{rev}+modified" if dirty else rev


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
