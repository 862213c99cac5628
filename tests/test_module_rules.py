"""The one-module rules the docstrings state, checked on the source: who imports what.

``_codec`` is the only module that calls msgpack, ``_sync`` the only one that
touches ``posix_ipc``, ``_ndarray`` the only one that knows numpy, ``metrics`` the only one
that imports prometheus_client. ``_bench``
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
    [("msgpack", {"_codec.py"}), ("msgspec", {"_codec.py"}), ("posix_ipc", {"_sync.py"}),
     ("numpy", {"_ndarray.py"}), ("prometheus_client", {"metrics.py"})],
)
def test_only_its_owner_imports_a_library(library: str, owners: set[str]) -> None:
    users = {p.name for p in PACKAGE.glob("*.py") if library in _imports(p)}
    assert users == owners


@pytest.mark.timeout(30)
def test_the_check_sees_an_import_inside_a_function(tmp_path: pathlib.Path) -> None:
    src = tmp_path / "m.py"
    src.write_text("def f():\n    import msgpack.ext\n    from posix_ipc import O_CREX\n")
    assert _imports(src) == {"msgpack", "posix_ipc"}


# The layers of docs/architecture.md, lowest first: a module imports from its own layer or
# those below, never from above (an import only for type checking excepted). A new module
# must be given a layer here and in the map.
LAYERS: list[set[str]] = [
    {"_errors", "_faults", "_version"},
    {"_mutex", "_sync", "_ndarray"},
    {"_format"},
    {"_anon", "_ring", "_codec", "_stats"},
    {"_recovery"},
    {"_semlife", "_resync", "_zerocopy"},
    {"_file"},
    {"_bus"},
    {"_queue_base", "_cconst", "_accel", "_aio"},
    {"_producer", "_consumer"},
    {"_queue", "_topic", "_subscription", "_last"},
    {"_mpqueues", "_check", "_admin", "_live", "_lines", "_doctor", "_scrape", "_advice", "_bridge_errors",
     "_bridge_config", "_bridge_wire", "_bridge_publish", "_bridge_pull", "_bridge_routes", "_bridge_status"},
    {"_cli", "__init__", "__main__", "_export", "metrics", "bridge", "_bridge_cli"},
]


def _runtime_imports(path: pathlib.Path) -> set[str]:
    """The package's modules ``path`` imports at run time (``if TYPE_CHECKING:`` blocks left out)."""
    out: set[str] = set()
    tree = ast.parse(path.read_text(), str(path))
    typing_only = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
        for inner in ast.walk(node)
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1 and id(node) not in typing_only:
            names = [node.module] if node.module else [alias.name for alias in node.names]
            out.update(name.split(".")[0] for name in names)
    return out


def test_imports_go_down_the_layers() -> None:
    layer_of = {name: i for i, layer in enumerate(LAYERS) for name in layer}
    modules = {p.stem: p for p in PACKAGE.glob("*.py")}
    assert set(modules) <= set(layer_of), "give the new module a layer here and in docs/architecture.md"
    upward = [
        f"{name} (layer {layer_of[name]}) imports {dep} (layer {layer_of[dep]})"
        for name, path in sorted(modules.items())
        for dep in sorted(_runtime_imports(path))
        if dep in layer_of and layer_of[dep] > layer_of[name]
    ]
    assert upward == []
