"""The documentation is tested like code: README.md and docs/*.md.

* Every ```python block runs, each in a fresh interpreter (a file of its own,
  so ``multiprocessing`` can import it), with a timeout, and must leave
  nothing in /dev/shm. A block that is deliberately a fragment is preceded by
  ``<!-- not-run: reason -->``; it must still compile, and such blocks stay
  rare.
* Examples name their buses ``docs-...``. The test rewrites that prefix to one
  of its own session, so that two test sessions (or a user's real buses)
  never collide, and it can tell what an example left behind.
* Every ``shmbus ...`` command line in a shell block parses with the CLI's
  own parser, every CLI command has its section in docs/cli.md with all its
  options, and docs/api.md is what docs/gen_api.py makes of the code now.
* Every relative link points to a file that exists, and every ``#anchor`` to
  a heading of its page.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import re
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from shmbus import _bench, _cli

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
SHM = Path("/dev/shm")
PREFIX = "docs-"  # what examples call their buses
SESSION = f"docs{os.getpid()}-"  # what this session calls them instead
BLOCK_TIMEOUT = 20.0  # seconds per example; they take well under one
RUN_LANGS = {"python", "py"}
SHELL_LANGS = {"sh", "shell", "console", "bash"}
NOT_RUN = re.compile(r"<!--\s*not-run:\s*(.*?)\s*-->")
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})(?P<lang>[\w+-]*)\s*$")

# Loaded first by every example (and by its spawned children): records the id
# of each bus the example creates, so that its semaphores can be checked too.
PRELUDE = """\
import os

from shmbus import _sync

_real_create_sems = _sync.create_sems


def _recording(bus_id, initial, mode):
    with open(os.environ["SHMBUS_DOCS_IDS"], "a") as f:
        f.write(bus_id + "\\n")
    return _real_create_sems(bus_id, initial, mode)


_sync.create_sems = _recording
"""


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    not_run: str | None  # the reason, for a fragment

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def fenced_blocks(page: Path) -> list[Block]:
    """Every fenced code block of a Markdown page, with its language and not-run mark."""
    lines = page.read_text().splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = len(m["indent"]), m["fence"], m["lang"].lower()
        previous = next((p for p in reversed(lines[:i]) if p.strip()), "")
        mark = NOT_RUN.search(previous)
        body = []
        j = i + 1
        while j < len(lines) and not _closes(lines[j], fence):
            line = lines[j]
            body.append(line[min(indent, len(line) - len(line.lstrip())) :])  # the fence's indent
            j += 1
        blocks.append(Block(page, i + 1, lang, "\n".join(body) + "\n", mark[1] if mark else None))
        i = j + 1
    return blocks


def _closes(line: str, fence: str) -> bool:
    """True if ``line`` closes a block opened by ``fence`` (same character, at least as long)."""
    m = FENCE.match(line)
    return bool(m) and m["fence"][0] == fence[0] and len(m["fence"]) >= len(fence) and not m["lang"]


def _outside_fences(page: Path) -> list[str]:
    """The lines of a page that are not inside a fenced code block."""
    out: list[str] = []
    fence = ""
    for line in page.read_text().splitlines():
        if fence:
            fence = "" if _closes(line, fence) else fence
        elif FENCE.match(line):
            fence = FENCE.match(line)["fence"]  # type: ignore[index]
        else:
            out.append(line)
    return out


ALL_BLOCKS = [b for page in PAGES for b in fenced_blocks(page)]
RUNNABLE = [b for b in ALL_BLOCKS if b.lang in RUN_LANGS and b.not_run is None]
FRAGMENTS = [b for b in ALL_BLOCKS if b.lang in RUN_LANGS and b.not_run is not None]
SHELL = [b for b in ALL_BLOCKS if b.lang in SHELL_LANGS]


# -- running the examples ----------------------------------------------------------


def _ours() -> list[str]:
    """Entries of this session's examples in /dev/shm: bus files and their temporary names."""
    return sorted(n for n in os.listdir(SHM) if n.startswith((SESSION, "." + SESSION)))


def _sems_of(ids: list[str]) -> list[str]:
    prefixes = tuple(f"sem.shmbus.{i}." for i in ids)
    return sorted(n for n in os.listdir(SHM) if n.startswith(prefixes)) if ids else []


def _clean(names: list[str]) -> None:
    for n in names:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(SHM / n)


def _run(path: Path, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run a script in its own process group; kill the whole group if it overruns."""
    proc = subprocess.Popen(
        [sys.executable, str(path)], cwd=cwd, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    try:
        out, err = proc.communicate(timeout=BLOCK_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        err += f"\n(killed after {BLOCK_TIMEOUT} s)"
        return subprocess.CompletedProcess(proc.args, -signal.SIGKILL, out, err)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # children an example forgot
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _numbered(code: str) -> str:
    return "\n".join(f"{n:4} | {line}" for n, line in enumerate(code.splitlines(), 1))


@pytest.mark.parametrize("block", RUNNABLE, ids=[b.where for b in RUNNABLE])
def test_example_runs_and_leaves_nothing(block: Block, tmp_path: Path) -> None:
    ids_file = tmp_path / "bus-ids"
    ids_file.touch()
    (tmp_path / "_docs_prelude.py").write_text(PRELUDE)
    script = tmp_path / "example.py"
    script.write_text("import _docs_prelude  # noqa: F401\n" + block.code.replace(PREFIX, SESSION))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "SHMBUS_DOCS_IDS": str(ids_file),
    }
    try:
        result = _run(script, tmp_path, env)
    finally:
        leftovers = _ours() + _sems_of(ids_file.read_text().split())
        _clean(leftovers)
    assert result.returncode == 0, (
        f"{block.where}: the example failed (exit {result.returncode})\n{_numbered(block.code)}\n"
        f"--- stdout\n{result.stdout}--- stderr (line numbers are one more than above)\n{result.stderr}"
    )
    assert not leftovers, f"{block.where}: the example left these in /dev/shm: {leftovers}"


def test_examples_name_their_buses_docs() -> None:
    """A bare bus name in an example starts with ``docs-``: the test can then isolate and clean it."""
    call = re.compile(r"""\b(?:create|open|unlink)\(\s*(["'])([^"'/]+)\1""")
    bad = [
        f"{b.where}: {m[2]!r}" for b in RUNNABLE for m in call.finditer(b.code) if not m[2].startswith(PREFIX)
    ]
    assert not bad, f"name the buses of examples 'docs-...': {bad}"


def test_fragments_are_marked_compile_and_stay_rare() -> None:
    for b in FRAGMENTS:
        assert b.not_run, f"{b.where}: say why the block is not run: <!-- not-run: reason -->"
        compile(b.code, b.where, "exec")  # a fragment is still valid Python
    assert len(FRAGMENTS) <= max(3, len(RUNNABLE) // 10), (
        f"{len(FRAGMENTS)} fragments for {len(RUNNABLE)} runnable examples: make them runnable"
    )


def test_the_docs_have_examples_to_run() -> None:
    assert len(RUNNABLE) >= 20, "the extractor found almost no examples: is the fence syntax changed?"


# -- the command line ----------------------------------------------------------------


def _subcommands() -> dict[str, list[argparse.ArgumentParser]]:
    """Every ``shmbus`` subcommand and the parsers whose options it accepts."""
    action = next(a for a in _cli._parser()._actions if isinstance(a, argparse._SubParsersAction))
    out = {name: [p] for name, p in action.choices.items()}
    # `bench` hands everything after it to the benchmark's own parser.
    out["bench"].append(_bench._parser())
    return out


def _shell_commands(block: Block) -> list[list[str]]:
    """The arguments of every ``shmbus`` (or ``python -m shmbus``) command in a shell block."""
    commands = []
    for raw in block.code.splitlines():
        lex = shlex.shlex(raw.strip().removeprefix("$ "), posix=True, punctuation_chars=True)
        lex.whitespace_split = True
        words = list(lex)  # comments dropped, and operators (| && ; >) are words of their own
        while words:
            n = next((i for i, w in enumerate(words) if w and set(w) <= set("|&;<>()")), len(words))
            command, words = words[:n], words[n + 1 :]
            if command[:3] == ["python", "-m", "shmbus"]:
                command = ["shmbus", *command[3:]]
            if command[:1] == ["shmbus"] and len(command) > 1:
                commands.append(command[1:])
    return commands


SHELL_COMMANDS = [(b, argv) for b in SHELL for argv in _shell_commands(b)]


@pytest.mark.parametrize(
    ("block", "argv"), SHELL_COMMANDS, ids=[f"{b.where}:{' '.join(a)}" for b, a in SHELL_COMMANDS]
)
def test_shell_examples_are_valid_command_lines(
    block: Block, argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    # `bench` takes the benchmark's options, which its own parser checks.
    parser = _bench._parser() if argv[:1] == ["bench"] else _cli._parser()
    try:
        parser.parse_args(argv[1:] if argv[:1] == ["bench"] else argv)
    except SystemExit as e:
        err = capsys.readouterr().err
        assert e.code == 0, f"{block.where}: `shmbus {' '.join(argv)}` does not parse: {err}"


def _sections(text: str) -> dict[str, str]:
    """The text under each ``## `shmbus NAME` `` heading of docs/cli.md."""
    parts = re.split(r"(?m)^## `shmbus ([\w-]+)`.*$", text)
    return dict(zip(parts[1::2], parts[2::2]))


def test_every_cli_command_is_documented_with_its_options() -> None:
    sections = _sections((DOCS / "cli.md").read_text())
    commands = _subcommands()
    assert sorted(sections) == sorted(commands), "docs/cli.md must have one section per command, no more"
    for name, parsers in commands.items():
        options = {
            opt
            for p in parsers
            for action in p._actions
            for opt in action.option_strings
            if opt.startswith("--") and opt != "--help"
        }
        missing = sorted(o for o in options if o not in sections[name])
        assert not missing, f"docs/cli.md, `shmbus {name}`: options not documented: {missing}"


# -- the API reference -------------------------------------------------------------


def test_api_reference_is_up_to_date() -> None:
    spec = importlib.util.spec_from_file_location("gen_api", DOCS / "gen_api.py")
    assert spec is not None and spec.loader is not None
    gen_api = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen_api)
    assert (DOCS / "api.md").read_text() == gen_api.render(), (
        "docs/api.md is out of date: run `python docs/gen_api.py`"
    )


# -- links ------------------------------------------------------------------------------

INLINE_LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REF_LINK = re.compile(r"(?m)^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def _prose(page: Path) -> list[str]:
    """The page's lines outside fenced code blocks, with inline code removed."""
    return [re.sub(r"(`+)(?:(?!\1).)+\1", "", line) for line in _outside_fences(page)]


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"<[^>]+>", "", text).replace("`", "")
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """The anchors of a page's headings (a repeated heading gets ``-1``, ``-2``...)."""
    found: set[str] = set()
    counts: dict[str, int] = {}
    for line in _outside_fences(page):
        h = HEADING.match(line)
        if h:
            s = slug(h[2])
            n = counts.get(s, 0)
            counts[s] = n + 1
            found.add(s if n == 0 else f"{s}-{n}")
    return found


def _links(page: Path) -> list[str]:
    text = "\n".join(_prose(page))
    return INLINE_LINK.findall(text) + REF_LINK.findall(text)


LINKS = [(page, target) for page in PAGES for target in _links(page)]


def test_pages_have_links_to_check() -> None:
    assert len(LINKS) > 50


@pytest.mark.parametrize(("page", "target"), LINKS, ids=[f"{p.name}->{t}" for p, t in LINKS])
def test_relative_links_resolve(page: Path, target: str) -> None:
    if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
        return
    path, _, anchor = target.partition("#")
    dest = (page.parent / path).resolve() if path else page
    assert dest.exists(), f"{page.relative_to(ROOT)}: link to {target}: no such file"
    if anchor and dest.suffix == ".md":
        assert anchor in anchors(dest), f"{page.relative_to(ROOT)}: link to {target}: no such heading"
