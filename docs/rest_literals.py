"""A griffe extension for the documentation site: reST literal-block markers read as Markdown.

The docstrings introduce a code example the reStructuredText way, a paragraph ending in ``::``
followed by an indented block (what ``help()`` and docs/gen_api.py read). Markdown already
shows the indented block as code; this turns the marker into the one colon reST displays
(``Example::`` reads ``Example:``; a line of ``::`` alone disappears). mkdocs.yml loads it.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

# A line ending in "::" that introduces a block: the text before it is kept, with one colon.
_MARKER = re.compile(r"(?m)^(?P<indent>[ \t]*)(?P<text>.*?)[ \t]*::[ \t]*$")


def markdown_literals(doc: str) -> str:
    """``doc`` with each ``text::`` line made ``text:`` and each bare ``::`` line removed."""
    return _MARKER.sub(lambda m: f"{m['indent']}{m['text']}:" if m["text"] else "", doc)


class RestLiterals(griffe.Extension):
    """Rewrites every docstring griffe loads with `markdown_literals`."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = markdown_literals(obj.docstring.value)
