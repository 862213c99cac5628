"""docs/format.md against shmbus/_format.py: the spec's field tables are the code's.

Every Markdown table of docs/format.md whose columns include an offset, a
``Size`` and a ``Field`` is read, and its rows (offset, size, name) must be
exactly the rows of the ``_format`` field table its section describes, in
both directions: no field of the code missing from the spec, no row of the
spec missing from the code. The header's sections together must tile bytes
0..1023 with no gap and no overlap.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from shmbus import _format
from shmbus._format import Field

pytestmark = pytest.mark.timeout(30)

SPEC = Path(__file__).resolve().parent.parent / "docs" / "format.md"
# Section heading (its start) -> the field table it documents.
SECTIONS: dict[str, tuple[str, tuple[Field, ...]]] = {
    "Static block": ("header", _format.HEADER_FIELDS),
    "Producer line": ("header", _format.HEADER_FIELDS),
    "Consumer line": ("header", _format.HEADER_FIELDS),
    "Recovery line": ("header", _format.HEADER_FIELDS),
    "Bytes 320..1023": ("header", _format.HEADER_FIELDS),
    "Time samples": ("sample", _format.SAMPLE_FIELDS),
    "Participant table": ("participant", _format.PARTICIPANT_FIELDS),
    "Subscriber table": ("subscriber", _format.SUBSCRIBER_FIELDS),
    "Record framing": ("record", _format.RECORD_FIELDS),
}
# Rows of the record table that are not part of its fixed header: the payload and its padding.
VARIABLE = {"payload", "padding"}


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def spec_tables(text: str) -> dict[str, set[Field]]:
    """The field rows of the spec, grouped by the ``_format`` table their section documents."""
    found: dict[str, set[Field]] = {}
    heading = ""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
            continue
        if not line.startswith("|") or (i and lines[i - 1].startswith("|")):
            continue  # not the first row of a table
        columns = [c.lower() for c in _cells(line)]
        if not (columns[0].endswith("offset") and "size" in columns and "field" in columns):
            continue
        section = [name for name in SECTIONS if heading.startswith(name)]
        assert section, f"docs/format.md: a field table under {heading!r}, which test_spec.py does not know"
        group = found.setdefault(SECTIONS[section[0]][0], set())
        size_at, name_at = columns.index("size"), columns.index("field")
        for row in lines[i + 2 :]:
            if not row.startswith("|"):
                break
            cells = _cells(row)
            name = cells[name_at].strip("`")
            if name in VARIABLE and section[0] == "Record framing":
                continue
            group.add(Field(name, int(cells[0]), int(cells[size_at])))
    return found


@pytest.fixture(scope="module")
def tables() -> dict[str, set[Field]]:
    return spec_tables(SPEC.read_text())


@pytest.mark.parametrize("group", sorted({g for g, _ in SECTIONS.values()}))
def test_the_spec_and_the_code_have_the_same_fields(tables: dict[str, set[Field]], group: str) -> None:
    (code,) = {t for g, t in SECTIONS.values() if g == group}
    in_code, in_spec = set(code), tables.get(group, set())
    assert not in_code - in_spec, f"in shmbus/_format.py, not in docs/format.md: {sorted(in_code - in_spec)}"
    assert not in_spec - in_code, f"in docs/format.md, not in shmbus/_format.py: {sorted(in_spec - in_code)}"


@pytest.mark.parametrize(("fields", "size"), [
    (_format.HEADER_FIELDS, _format.HEADER_MIN), (_format.PARTICIPANT_FIELDS, _format.PARTICIPANT_SIZE),
    (_format.SUBSCRIBER_FIELDS, _format.SUBSCRIBER_SIZE), (_format.RECORD_FIELDS, _format.RECORD_SIZE),
    (_format.SAMPLE_FIELDS, 16),
])  # fmt: skip
def test_each_table_tiles_its_bytes(fields: tuple[Field, ...], size: int) -> None:
    at = 0
    for f in sorted(fields, key=lambda f: f.offset):
        assert f.offset == at, f"gap or overlap before {f}"
        at += f.size
    assert at == size


def test_named_fields_are_unique() -> None:
    for fields in (_format.HEADER_FIELDS, _format.PARTICIPANT_FIELDS, _format.SUBSCRIBER_FIELDS):
        names = [f.name for f in fields if f.name != "reserved"]
        assert len(names) == len(set(names))


def test_the_static_block_struct_in_the_spec_is_the_codes() -> None:
    (fmt,) = re.findall(r'the block is `"([^"]+)"`', SPEC.read_text())
    assert fmt == _format.STATIC.format


def test_the_static_struct_follows_the_field_table() -> None:
    # STATIC unpacks the static block field by field: its sizes are the table's, in order.
    sizes = [f.size for f in _format.HEADER_FIELDS if f.offset < _format.STATIC_SIZE]
    codes = re.findall(r"(\d*)([sIQ])", _format.STATIC.format)
    assert sizes == [int(n) if c == "s" else {"I": 4, "Q": 8}[c] for n, c in codes]


def test_the_parser_sees_a_drift() -> None:
    text = SPEC.read_text().replace("| 156 | 4 | u32 | `head_repair` |", "| 160 | 4 | u32 | `head_repair` |")
    assert Field("head_repair", 160, 4) in spec_tables(text)["header"]
