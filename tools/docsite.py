"""Build the documentation site, serve it on loopback, and look at it in headless Chromium.

What tests/test_docsite.py checks and what the README's screenshots show come from here, so that
both see the same pages in the same browser: the system's Chromium (``/usr/bin/chromium``,
Debian's ``chromium`` package), driven by playwright (the ``docs`` extra), which never downloads a
browser of its own here. ``python tools/docsite.py`` rewrites the screenshots in docs/img.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
# A clean, quiet, offline browser: no sandbox (CI runs as root), no GPU, no
# calls home, and a fresh profile (playwright makes one per launch).
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# The pages the test opens and the README shows: (name, file in the built site).
PAGES = [("home", "index.html"), ("api", "api.html"), ("performance", "performance.html")]
VIEWPORT = {"width": 1280, "height": 800}


def build(dest: Path) -> None:
    """``mkdocs build --strict`` of this checkout into ``dest``; raises with mkdocs' output if it fails."""
    cmd = [sys.executable, "-m", "mkdocs", "build", "--strict", "--clean", "-q", "-d", str(dest)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"mkdocs build --strict failed:\n{done.stdout}{done.stderr}")


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # a test's output is not the place for an access log


@contextlib.contextmanager
def serve(site: Path) -> Iterator[str]:
    """Serve ``site`` on a free loopback port, in a thread; yields the base URL."""
    handler = functools.partial(_QuietHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@contextlib.contextmanager
def browser_page() -> Iterator[Any]:
    """A page of a fresh headless Chromium (``/usr/bin/chromium``), closed afterwards."""
    from playwright.sync_api import sync_playwright  # the docs extra: imported only here

    with tempfile.TemporaryDirectory(prefix="shmbus-chromium-") as profile, sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            profile,
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": VIEWPORT["width"], "height": VIEWPORT["height"]},  # playwright's TypedDict
        )
        try:
            yield context.new_page()
        finally:
            context.close()


def open_page(page: Any, url: str) -> None:
    """Load ``url`` and wait until it and its images have loaded."""
    page.goto(url, wait_until="load", timeout=30_000)


def screenshots(dest: Path) -> list[Path]:
    """Build the site and write one PNG of each page of ``PAGES`` (the top of it) into ``dest``."""
    out = []
    with tempfile.TemporaryDirectory(prefix="shmbus-site-") as tmp:
        site = Path(tmp) / "site"
        build(site)
        with serve(site) as base, browser_page() as page:
            for name, path in PAGES:
                open_page(page, base + path)
                if name == "performance":
                    page.goto(base + path + "#charts")  # the charts, under their heading
                    page.wait_for_timeout(500)  # the header's title change is animated
                file = dest / f"site-{name}.png"
                page.screenshot(path=str(file), animations="disabled")
                out.append(file)
    return out


def main() -> None:
    for file in screenshots(ROOT / "docs" / "img"):
        print(f"wrote {file.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
