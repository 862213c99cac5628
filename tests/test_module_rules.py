"""The one-module rules the docstrings state, checked on the source: who imports what.

``_codec`` is the only module that calls msgpack, ``_sync`` the only one that
touches ``posix_ipc``, ``_ndarray`` the only one that knows numpy. ``_bench``
is left out: it measures other channels too (zmq with its own msgpack).
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "shmbus"


def _imports(path: pathlib.Path) -> set[str]:
    """Top-level names of every module ``path`` imports, at any depth (a function's lazy import too)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.add(node.module.split(".")[0])
    return out


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("library", "owners"),
    [("msgpack", {"_codec.py"}), ("posix_ipc", {"_sync.py"}), ("numpy", {"_ndarray.py"})],
)
def test_only_its_owner_imports_a_library(library: str, owners: set[str]) -> None:
    users = {p.name for p in PACKAGE.glob("*.py") if library in _imports(p)}
    assert users == owners


@pytest.mark.timeout(30)
def test_the_check_sees_an_import_inside_a_function(tmp_path: pathlib.Path) -> None:
    src = tmp_path / "m.py"
    src.write_text("def f():\n    import msgpack.ext\n    from posix_ipc import O_CREX\n")
    assert _imports(src) == {"msgpack", "posix_ipc"}
