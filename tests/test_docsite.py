"""The documentation site builds, and a real browser shows its pages with their content.

The site (mkdocs.yml) is built with ``mkdocs build --strict`` into a temporary directory, served
on a loopback port and opened in headless Chromium, the system's (``/usr/bin/chromium``) through
playwright (tools/docsite.py holds that plumbing, shared with the README's screenshots). That
needs the ``docs`` extra and Chromium, which the suite's own command (the ``test`` extra) does not
install: without them the browser test is skipped, saying what is missing, and CI's docs step,
which installs both, sets ``SHMBUS_DOCSITE_REQUIRED=1`` to turn that skip into a failure.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load_docsite() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("docsite", ROOT / "tools" / "docsite.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["docsite"] = module
    spec.loader.exec_module(module)
    return module


docsite = _load_docsite()


try:
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
except ImportError:  # the docs extra is absent: the browser tests skip (see _missing)
    PlaywrightTimeout = TimeoutError  # type: ignore[assignment,misc]


def _missing() -> list[str]:
    """What the browser test needs and this machine lacks."""
    missing = [
        f"{mod} (pip install -e '.[docs]')"
        for mod in ("mkdocs", "mkdocstrings", "playwright")
        if importlib.util.find_spec(mod) is None
    ]
    if not docsite.CHROMIUM.exists():
        missing.append(f"{docsite.CHROMIUM} (apt-get install chromium)")
    return missing


def test_nav_follows_the_index() -> None:
    """mkdocs.yml's nav lists the pages in the order docs/index.md introduces them."""
    nav = re.findall(r"^\s*- [^:\n]+: ([\w-]+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), re.M)
    linked = re.findall(r"\]\(([\w-]+\.md)(?:#[\w-]*)?\)", (ROOT / "docs" / "index.md").read_text())
    in_order = list(dict.fromkeys(["index.md", *linked]))
    assert nav == in_order
    assert {p.name for p in (ROOT / "docs").glob("*.md")} == set(nav), "a page outside the nav"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, str]]:
    """(a Chromium page, the base URL of the freshly built site it can open)."""
    missing = _missing()
    if missing:
        if os.environ.get("SHMBUS_DOCSITE_REQUIRED") == "1":
            pytest.fail(f"SHMBUS_DOCSITE_REQUIRED=1 but missing: {', '.join(missing)}")
        pytest.skip(f"the docs site check needs {', '.join(missing)}")
    out = tmp_path_factory.mktemp("site")
    docsite.build(out)
    with docsite.serve(out) as base, docsite.browser_page() as page:
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        yield page, base
        assert not errors, f"JavaScript errors in the site: {errors}"


def _open(site: tuple[Any, str], path: str) -> Any:
    page, base = site
    docsite.open_page(page, base + path)
    return page


def _heading(page: Any) -> str:
    """The page's h1, without the permalink sign after it."""
    return str(page.locator("article h1").inner_text()).rstrip("¶").strip()


@pytest.mark.timeout(300)
def test_home_page(site: tuple[Any, str]) -> None:
    page = _open(site, "index.html")
    assert page.title() == "shmbus"
    assert _heading(page) == "shmbus documentation"
    assert page.locator("article").get_by_text("Getting started").count() > 0
    # every page of the nav is one click away
    nav = page.locator("nav.md-nav--primary a.md-nav__link[href$='.html']").evaluate_all(
        "links => links.map(a => a.getAttribute('href'))"
    )
    assert {"api.html", "performance.html", "getting-started.html"} <= set(nav)


@pytest.mark.timeout(300)
def test_api_page_is_made_from_the_docstrings(site: tuple[Any, str]) -> None:
    page = _open(site, "api.html")
    assert page.title() == "API - shmbus"
    assert _heading(page) == "API reference"
    queue = page.locator("[id='shmbus.Queue']")
    assert queue.is_visible()
    assert "Queue" in queue.inner_text()
    assert page.locator("article").get_by_text("A multi-producer, multi-consumer FIFO queue").count() == 1
    for name in ("shmbus.Topic", "shmbus.Queue.put", "shmbus.Subscription", "shmbus.BusNotFound"):
        assert page.locator(f"[id='{name}']").count() == 1, name
    assert "Example::" not in page.locator("article").inner_text()  # read as Markdown (rest_literals)
    # Material's script adds a copy button to each code block (content.code.copy), after load
    buttons = page.locator("article pre button[data-md-type=copy]")
    buttons.first.wait_for(timeout=20_000)
    assert buttons.count() == page.locator("article pre > code").count()


@pytest.mark.timeout(300)
def test_metrics_page_ends_with_the_metrics_module_from_its_docstrings(site: tuple[Any, str]) -> None:
    import shmbus.metrics

    page = _open(site, "metrics.html")
    for name in shmbus.metrics.__all__:
        assert page.locator(f"[id='shmbus.metrics.{name}']").count() == 1, name
    assert page.locator("article").get_by_text("A prometheus_client collector of every bus").count() == 1


@pytest.mark.timeout(300)
def test_performance_page_shows_the_charts(site: tuple[Any, str]) -> None:
    page = _open(site, "performance.html")
    assert page.title() == "Performance - shmbus"
    assert _heading(page) == "Performance"
    charts = page.locator("article img[src^='img/']")
    assert charts.count() >= 3
    sizes = charts.evaluate_all("imgs => imgs.map(i => [i.getAttribute('src'), i.complete, i.naturalWidth])")
    assert all(complete and width > 0 for _, complete, width in sizes), sizes


@pytest.mark.timeout(300)
def test_search_finds_a_page(site: tuple[Any, str]) -> None:
    page = _open(site, "index.html")
    box = page.locator("input.md-search__input")
    results = page.locator(".md-search-result__item")
    # The index loads in a web worker: a query typed before it is ready goes
    # unanswered, so type it again until results come (or the test times out).
    for _ in range(30):
        box.click()
        box.fill("")
        box.press_sequentially("robust mutexes")
        with contextlib.suppress(PlaywrightTimeout):
            results.first.wait_for(timeout=2_000)
            break
    assert results.count() > 0
    assert "robust" in results.first.inner_text().lower()
