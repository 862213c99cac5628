"""``shmbus doctor``, ``--version``, ``shmbus.accelerated``, and saying so when C is missing.

The case that matters is a machine where the extension was never built: pip
hides that unless ``-v``. It is made real here by a child process in which
``shmbus._cfast`` cannot be imported, as after an install without a compiler.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import shmbus
from shmbus import _accel, _doctor
from shmbus._cli import main

ROOT = Path(__file__).resolve().parent.parent

# A child with no C extension: an import hook refuses shmbus._cfast, as a missing build does.
_NO_EXTENSION = """
import importlib.abc, sys
class NoExtension(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "shmbus._cfast":
            raise ImportError("No module named 'shmbus._cfast'")
        return None
sys.meta_path.insert(0, NoExtension())
"""


def _child(code: str, *args: str, pure: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "SHMBUS_PURE_PYTHON"}
    if pure is not None:
        env["SHMBUS_PURE_PYTHON"] = pure
    return subprocess.run(
        [sys.executable, "-c", _NO_EXTENSION + textwrap.dedent(code), *args],
        capture_output=True, text=True, timeout=60, env=env, check=False,
    )  # fmt: skip


def test_doctor_reports_this_process(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert f"shmbus          {shmbus.__version__}" in out
    assert ("C fast path     on" in out) == shmbus.accelerated
    for word in ("msgpack", "posix_ipc", "/dev/shm", "semaphores", "open files"):
        assert word in out
    assert main(["doctor", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["c_fast_path"] == {"on": shmbus.accelerated, "why_not": _accel.REASON}
    st = os.statvfs("/dev/shm")
    assert r["shm"]["size"] == st.f_blocks * st.f_frsize and 0 <= r["shm"]["free"] <= r["shm"]["size"]
    assert r["limits"]["open_files"]["soft"] > 0


def test_doctor_survives_a_missing_dev_shm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_doctor, "SHM_DIR", "/nonexistent/shm")
    r = _doctor.report()
    assert "error" in r["shm"] and "cannot be read" in _doctor.render(r)


def test_version_flag_names_the_version_and_the_path(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"shmbus {shmbus.__version__} (")
    assert ("C fast path on" in out) == shmbus.accelerated


def test_the_version_is_written_once() -> None:
    from importlib import metadata

    assert shmbus.__version__ == metadata.version("shmbus")
    assert 'dynamic = ["version"]' in (ROOT / "pyproject.toml").read_text()


def test_without_the_extension_every_place_says_so_and_why(tmp_path: Path) -> None:
    path = str(tmp_path / "q")
    out = _child(
        """
        import logging, sys, shmbus
        from shmbus._cli import main
        logging.basicConfig(level=logging.WARNING, format="LOG %(message)s")
        print("accelerated", shmbus.accelerated)
        q = shmbus.Queue.create(sys.argv[1], capacity="64KiB")
        q2 = shmbus.Queue.open(sys.argv[1])  # a second handle: no second warning
        q.put(1); assert q2.get() == 1
        main(["info", sys.argv[1]])
        main(["doctor"])
        q2.close(); q.close(); q.unlink()
        """,
        path,
    )
    assert out.returncode == 0, out.stderr
    assert "accelerated False" in out.stdout
    warnings = [line for line in out.stderr.splitlines() if line.startswith("LOG ")]
    assert len(warnings) == 1 and "pure Python" in warnings[0] and "not built" in warnings[0]
    assert "note: this Python runs shmbus without its C fast path: the extension" in out.stdout
    assert "C fast path     OFF: the extension shmbus._cfast is not built" in out.stdout
    assert "C compiler" in out.stdout  # and what to do about it


def test_turned_off_on_purpose_there_is_no_warning(tmp_path: Path) -> None:
    out = _child(
        """
        import logging, sys, shmbus
        logging.basicConfig(level=logging.WARNING, format="LOG %(message)s")
        with shmbus.Queue.create(sys.argv[1], capacity="64KiB") as q:
            q.unlink()
        print("accelerated", shmbus.accelerated)
        """,
        str(tmp_path / "q"),
        pure="1",
    )
    assert out.returncode == 0, out.stderr
    assert "accelerated False" in out.stdout and "LOG" not in out.stderr


def test_the_warning_is_logged_once_per_process(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("SHMBUS_PURE_PYTHON", raising=False)
    monkeypatch.setattr(_accel, "ENABLED", False)
    monkeypatch.setattr(_accel, "REASON", "the extension is not built (a test)")
    monkeypatch.setattr(_accel, "_warned", False)
    with caplog.at_level(logging.WARNING, logger="shmbus"):
        _accel.warn_once_if_pure()
        _accel.warn_once_if_pure()
    assert [r.getMessage() for r in caplog.records].count(
        "shmbus runs in pure Python, several times slower per small message: the extension is not built "
        "(a test) (`shmbus doctor` tells more)"
    ) == 1


def test_the_license_file_is_the_one_pyproject_names() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'license = "MIT"' in pyproject and 'license-files = ["LICENSE"]' in pyproject
    assert (ROOT / "LICENSE").read_text().startswith("MIT License\n")


@pytest.mark.timeout(60)
def test_a_missing_build_is_called_that_not_a_circular_import(tmp_path: Path) -> None:
    """The package's sources without any compiled module, as pip leaves them without a compiler."""
    import shutil

    shutil.copytree(
        ROOT / "shmbus", tmp_path / "shmbus", ignore=shutil.ignore_patterns("*.so", "__pycache__")
    )
    code = textwrap.dedent(
        """
        import sys
        # An editable install's finder would bring back the clone's sources and build.
        sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
        sys.path.insert(0, sys.argv[1])
        import shmbus
        from shmbus import _accel
        print(shmbus.__file__)
        print(_accel.REASON)
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in ("SHMBUS_PURE_PYTHON", "PYTHONPATH")}
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=60, env=env,
        check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    where, reason = out.stdout.splitlines()
    assert where.startswith(str(tmp_path))
    assert reason.startswith("the extension shmbus._cfast is not built: reinstall with a C compiler")
    assert "circular" not in reason
