"""The live view of ``shmbus stats``: rates, fill, backlog and processes, refreshed in place.

Rule: this module reads a bus and never writes it. Each refresh opens the
file read-only, copies the header and tables with one ``pread`` and closes
it: no semaphore is opened, no participant slot claimed, so watching a bus
cannot change it. Rates are differences of the header counters between two
refreshes; the age of the oldest message comes from the header's time
samples (see ``_format``), so it is a bound, not an exact figure, unless the
oldest message carries a sample itself.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import IO, Any

from . import _bridge_status, _recovery
from ._file import open_fd, read_layout, resolve_path
from ._format import KIND_TOPIC
from ._stats import Stats, header_stats, oldest_age, subscriber_rows

__all__ = ["Snapshot", "snapshot", "render", "run"]

# Module-level so that tests can stand in for the clock and the wait.
_clock = time.monotonic
_sleep = time.sleep

_HOME, _CLEAR, _CLEAR_LINE, _CLEAR_BELOW = "\x1b[H", "\x1b[2J", "\x1b[K", "\x1b[J"


@dataclass(frozen=True)
class Snapshot:
    """One reading of a bus: its counters and what the header tells of its processes."""

    stats: Stats
    at: float  # when, on the monotonic clock (seconds)
    age: tuple[float | None, float | None] | None  # oldest message: (at least, at most) seconds
    subscribers: list[dict[str, int]] | None  # Topic only
    pids: list[int]  # live participants
    bridges: list[dict[str, Any]] = field(default_factory=list)  # routes of live bridges on this bus


def snapshot(path: str) -> Snapshot:
    """Read the bus at ``path`` once (read-only). Raises what ``read_layout`` raises."""
    real = resolve_path(path)
    fd = open_fd(real, os.O_RDONLY)
    try:
        layout = read_layout(fd, real)
        data = os.pread(fd, layout.ring_offset, 0).ljust(layout.ring_offset, b"\0")
        at, now_ns = _clock(), time.time_ns()
        h = memoryview(data).cast("Q")
        pids = _recovery.live_participants(fd, h, layout)
    finally:
        os.close(fd)
    subs = subscriber_rows(h, layout) if layout.kind == KIND_TOPIC else None
    bridges = _bridge_status.routes_on(real)
    return Snapshot(header_stats(real, layout, h), at, oldest_age(h, now_ns), subs, pids, bridges)


def render(prev: Snapshot | None, cur: Snapshot) -> str:
    """The text of one refresh; rates need ``prev`` (the refresh before, of the same bus)."""
    st = cur.stats
    dt = cur.at - prev.at if prev is not None else 0.0
    before = prev if prev is not None and dt > 0 else None

    def rate(now: int, then: int | None, scale: float = 1.0, fmt: str = "{:.0f}") -> str:
        return "-" if then is None else fmt.format(max(now - then, 0) / dt / scale)

    def flow(count: str, nbytes: str) -> str:
        c, b = getattr(st, count), getattr(st, nbytes)
        c0, b0 = (getattr(before.stats, count), getattr(before.stats, nbytes)) if before else (None, None)
        return f"{rate(c, c0):>9} msg/s {rate(b, b0, 1e6, '{:.2f}'):>8} MB/s  (total {c} messages, {b} bytes)"

    rows = [(st.kind, f"{st.path}  {time.strftime('%H:%M:%S')}")]
    if cur.subscribers is None:
        rows += [
            ("in", flow("put_count", "bytes_in")),
            ("out", flow("get_count", "bytes_out")),
            ("waiting", f"{st.messages} messages, oldest {_age(cur.age)}"),
        ]
    else:
        rows += [
            ("published", flow("put_count", "bytes_in")),
            ("in the ring", f"{st.messages} messages, oldest {_age(cur.age)}"),
        ]
    rows.append(("fill", f"{st.used_bytes} of {st.capacity} bytes ({st.fill:.1%})"))
    if cur.subscribers is not None:
        rows.append(("subscribers", f"{len(cur.subscribers)} of {st.max_subscribers}"))
        old: dict[tuple[int, int], int] = {}
        if before is not None and before.subscribers is not None:
            old = {(s["slot"], s["pid"]): s["received"] for s in before.subscribers}
        rows += [
            (
                f"  slot {s['slot']}",
                f"pid {s['pid']}  {rate(s['received'], old.get((s['slot'], s['pid']))):>6} msg/s  "
                f"lag {s['lag']}  lost {s['lost']}  received {s['received']}",
            )
            for s in cur.subscribers
        ]
    pids = ", ".join(str(p) for p in sorted(cur.pids))
    rows.append(("processes", f"{len(cur.pids)}" + (f": {pids}" if pids else "")))
    rows += _bridge_status.render(cur.bridges)
    return "\n".join(f"{k:15} {v}".rstrip() for k, v in rows)


def _age(age: tuple[float | None, float | None] | None) -> str:
    if age is None:
        return "none"
    at_least, at_most = age
    if at_least is not None and at_least == at_most:
        return _duration(at_least)
    if at_least is not None and at_most is not None:
        return f"{_duration(at_least)} to {_duration(at_most)}"
    if at_most is not None:
        return f"at most {_duration(at_most)}"
    if at_least is not None:
        return f"over {_duration(at_least)}"
    return "unknown"


def _duration(s: float) -> str:
    if s < 1:
        return f"{s * 1000:.0f}ms"
    if s < 60:
        return f"{s:.1f}s"
    m = int(s // 60)
    if m < 60:
        return f"{m}m{int(s % 60):02d}s"
    return f"{m // 60}h{m % 60:02d}m"


def run(path: str, interval: float, count: int | None, out: IO[str]) -> int:
    """Show the bus every ``interval`` seconds, ``count`` times (None: until Ctrl-C).

    On a terminal each refresh redraws the screen; otherwise each is
    appended, followed by a blank line.
    """
    tty = out.isatty()
    prev: Snapshot | None = None
    n = 0
    while True:
        cur = snapshot(path)
        if prev is not None and prev.stats.bus_id != cur.stats.bus_id:
            prev = None  # the bus was removed and created again: its counters start over
        text = render(prev, cur)
        if tty:
            lines = (line + _CLEAR_LINE for line in text.split("\n"))
            out.write((_CLEAR if n == 0 else "") + _HOME + "\n".join(lines) + "\n" + _CLEAR_BELOW)
        else:
            out.write(text + "\n\n")
        out.flush()
        n += 1
        if count is not None and n >= count:
            return 0
        prev = cur
        _sleep(interval)
