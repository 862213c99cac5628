"""The C fast path's constants: generated from Python, and checked again at load.

``shmbus/_format.h`` is written by ``tools/gen_cheader.py`` from the list in
``shmbus/_cconst.py``; the extension hands back what it was compiled with
(``_cfast.CONSTANTS``) and ``_accel.check_constants`` refuses a build that
disagrees with Python, naming the constant.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from shmbus import _accel, _cconst, _codec, _format, _ring

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(60)


def _generator() -> Any:
    spec = importlib.util.spec_from_file_location("gen_cheader", ROOT / "tools" / "gen_cheader.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_generated_header_is_up_to_date() -> None:
    gen = _generator()
    assert gen.HEADER.read_text() == gen.render(), (
        f"shmbus/_format.h is stale: regenerate it with `{gen.COMMAND}`, then rebuild the extension"
    )


def test_the_header_says_it_is_generated_and_how_to_regenerate() -> None:
    text = (ROOT / "shmbus" / "_format.h").read_text()
    assert "do not edit" in text and "python tools/gen_cheader.py" in text


def test_the_c_source_uses_no_format_number_of_its_own() -> None:
    # Every constant of the list is defined by the header alone, never again in the C file.
    source = (ROOT / "shmbus" / "_cfast.c").read_text()
    for cname, _, _ in _cconst.CONSTANTS:
        assert f"#define {cname} " not in source, cname
    assert '#include "_format.h"' in source


def test_every_constant_comes_from_where_it_is_defined() -> None:
    want = _cconst.expected()
    assert want["Q_HEAD"] == _format.Q_HEAD and want["HOT_WINDOW"] == _ring.HOT_WINDOW
    assert want["BIN8"] == _codec._BIN8 and want["PUT_HELD"] == _accel.PUT_HELD
    assert want["REC_SEQ"] == 8 and want["SAMPLE_WRITING"] == (1 << 64) - 1


def _fake_extension(constants: dict[str, int]) -> types.ModuleType:
    module = types.ModuleType("fake_cfast")
    module.CONSTANTS = constants  # type: ignore[attr-defined]
    return module


def test_a_build_with_the_same_constants_is_accepted() -> None:
    assert _accel.check_constants(_fake_extension(_cconst.expected()))


@pytest.mark.parametrize(("module", "name", "cname"), [
    (_format, "Q_HEAD", "Q_HEAD"), (_format, "REC_WRAP", "REC_WRAP"), (_ring, "HOT_WINDOW", "HOT_WINDOW"),
    (_codec, "_BIN32", "BIN32"), (_cconst, "PUT_HELD", "PUT_HELD"), (_format, "SAMPLE_EVERY", "SAMPLE_EVERY"),
])  # fmt: skip
def test_a_constant_that_moved_disables_c_with_a_warning_naming_it(
    monkeypatch: pytest.MonkeyPatch, module: types.ModuleType, name: str, cname: str
) -> None:
    compiled = _cconst.expected()  # what a build from before the change hands back
    monkeypatch.setattr(module, name, getattr(module, name) + 1)
    with pytest.warns(RuntimeWarning, match=rf"\b{cname}\b") as caught:
        assert not _accel.check_constants(_fake_extension(compiled))
    assert len(caught) == 1


def test_a_record_field_that_moved_disables_c(monkeypatch: pytest.MonkeyPatch) -> None:
    compiled = _cconst.expected()
    fields = tuple(f._replace(offset=9) if f.name == "seq" else f for f in _format.RECORD_FIELDS)
    monkeypatch.setattr(_format, "RECORD_FIELDS", fields)
    with pytest.warns(RuntimeWarning, match=r"\bREC_SEQ\b"):
        assert not _accel.check_constants(_fake_extension(compiled))


def test_a_missing_or_extra_constant_disables_c() -> None:
    compiled = _cconst.expected()
    del compiled["M_TAIL"]
    compiled["SOMETHING_NEW"] = 1
    with pytest.warns(RuntimeWarning, match=r"M_TAIL, SOMETHING_NEW"):
        assert not _accel.check_constants(_fake_extension(compiled))
    with pytest.warns(RuntimeWarning, match=r"RECORD_SIZE"):
        assert not _accel.check_constants(types.ModuleType("no_constants"))


@pytest.mark.skipif(not _accel.ENABLED, reason="the C fast path is not built here")
def test_the_built_extension_matches_python() -> None:
    from shmbus import _cfast

    assert _cconst.expected() == _cfast.CONSTANTS
    assert _cconst.mismatches(_cfast.CONSTANTS) == []


def test_the_header_ships_with_the_sources() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"_format.h"' in pyproject and '"_cfast.pyi"' in pyproject
    assert "shmbus/_format.h" in (ROOT / "setup.py").read_text()
    assert sys.modules.get("shmbus._cconst") is _cconst
