"""A file system too small for the bus: ``preallocate=True`` refuses it at create, else a warning.

Without it a bus file is sparse, and the first put that reaches a page the
file system cannot back would die of SIGBUS. Each scenario runs in a private
mount namespace with a 1 MiB tmpfs, so nothing on the machine fills up.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

SCENARIO = r"""
import logging, os, sys
import shmbus

logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="%(message)s")
where = sys.argv[1]
path = os.path.join(where, "bus")
try:
    shmbus.Queue.create(path, capacity="4MiB", preallocate=True)
except shmbus.NoSpace as e:
    assert isinstance(e, OSError) and e.path == path and e.size > 4 << 20 and e.free <= 1 << 20, vars(e)
    print("refused:", e)
assert not os.path.exists(path) and os.listdir(where) == [], os.listdir(where)  # nothing left
with shmbus.Queue.create(path, capacity="4MiB") as q:  # sparse: allowed, with a warning
    q.put("fits", timeout=1)
    assert q.get(timeout=1) == "fits"
    q.unlink()
with shmbus.Queue.create(path, capacity="256KiB", preallocate=True) as q:  # fits: reserved now
    assert os.stat(path).st_blocks * 512 >= 256 << 10
    q.unlink()
print("done")
"""


def _problem() -> str | None:
    if os.geteuid() != 0:
        return "needs root to mount a small tmpfs in a private mount namespace"
    if shutil.which("unshare") is None:
        return "the unshare command is not installed"
    return None


@pytest.mark.skipif(_problem() is not None, reason=str(_problem()))
@pytest.mark.parametrize("pure", ["0", "1"])
def test_a_bus_larger_than_its_file_system(pure: str) -> None:
    with tempfile.TemporaryDirectory() as where:
        env = dict(os.environ, PYTHONPATH=str(REPO), SHMBUS_PURE_PYTHON=pure)
        cmd = [
            "unshare", "--mount", "sh", "-c",
            'mount -t tmpfs -o size=1m shmbus-test "$1" && exec "$2" -c "$3" "$1"',
            "sh", where, sys.executable, SCENARIO,
        ]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("refused: cannot create ") and "bytes free" not in lines[0]
    assert "has" in lines[0] and "free some space" in lines[0]
    assert any("dies of SIGBUS" in line and "preallocate=True" in line for line in lines), lines
    assert lines[-1] == "done"
