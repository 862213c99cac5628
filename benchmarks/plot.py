"""Charts from a ``shmbus bench --json`` file: ``python benchmarks/plot.py RESULTS.json [--out DIR]``.

Writes three PNG files (the ones docs/performance.md shows):

- ``ratios.png``: every variant of (a)-(d) and the Topic (t) as a ratio to
  mp.Queue from the same run (log scale; 1 = mp.Queue), with the project's
  targets drawn where there is one;
- ``sizes.png``: the message-size sweep (e), MB/s and msg/s against size;
- ``mpmc.png``: producers x consumers (f), total msg/s of shmbus and mp.Queue.

Needs matplotlib (``pip install 'shmbus[plot]'``).
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path
from typing import Any

# Run from a checkout without installing: the package is one directory up.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shmbus._bench._params import size_text  # sizes written as the bench's tables write them

COLORS = {
    "shmbus": "#1f77b4",
    "mp.Queue": "#7f7f7f",
    "mp.Pipe": "#bcbd22",
    "faster-fifo": "#ff7f0e",
    "pyzmq": "#2ca02c",
    "none": "#9467bd",  # the memcpy ceiling
    "topic": "#1f77b4",
    "topic receive": "#aec7e8",
}
TARGET = "#d62728"


def _load_matplotlib() -> Any:
    try:
        import matplotlib
    except ImportError:
        sys.exit(
            "benchmarks/plot.py needs matplotlib: pip install 'shmbus[plot]' (or pip install matplotlib)"
        )
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


# -- ratios (a)-(d), (t) -------------------------------------------------------------------


def _pair_bars(b: dict[str, Any], metric: str, other: str = "mp.Queue") -> list[tuple[str, float, str]]:
    """(label, ratio to ``other``, transport) for each measured variant of one row."""
    bars = []
    for v in b["variants"].values():
        if v.get("available") and f"x {other}" in v.get("ratios", {}):
            bars.append((v["label"], v["ratios"][f"x {other}"][metric], v["transport"]))
    return bars


def _topic_label(c: dict[str, Any]) -> str:
    if "label" in c:
        return str(c["label"])
    n = c["subscribers"]  # (older JSON files have no labels)
    return f"publish, {n} subscriber{'s' * (n != 1)}"


def _topic_bars(t: dict[str, Any], queue_rate: float) -> list[tuple[str, float, str]]:
    # The publishing configurations (0, 1, 3 subscribers, batches); the row's own mp.Queue
    # baseline and its ping-pong (a latency) are no bars here.
    pubs = [c for c in t["configs"].values() if "publish_msg_per_s" in c]
    bars = [(_topic_label(c), c["publish_msg_per_s"] / queue_rate, "topic") for c in pubs]
    for c in pubs:
        if c["receive_msg_per_s"]:
            label = _topic_label(c)
            what = f"{label}: receive"
            if "subscribers" in c:
                what = label.replace("publish", "receive, slowest", 1)
            bars.append((what, min(c["receive_msg_per_s"]) / queue_rate, "topic receive"))
    return bars


Panel = tuple[str, list[tuple[str, float, str]], list[tuple[float, str]]]

# (row key, metric, what the ratio is to, the targets for it: shmbus bench's targets table)
PAIR_PANELS: list[tuple[str, str, str, list[tuple[float, str]]]] = [
    ("single", "value", "x mp.Queue msg/s", [(3, "target 3x"), (4, "target 4x")]),
    ("batch", "value", "x mp.Queue one at a time", [(5, "target 5x"), (8, "target 8x")]),
    ("bytes", "value", "x mp.Queue MB/s", [(10, "target 10x"), (25, "target 25x")]),
    ("pingpong", "p50_us", "p50 latency, x mp.Queue (higher: lower latency)", []),
    ("pingpong", "p99_us", "p99 latency, x mp.Queue (higher: lower latency)", []),
]


def _panels(results: dict[str, Any]) -> list[Panel]:
    """(title, bars, target lines) for each panel of the ratios chart."""
    b = results["benchmarks"]
    panels: list[Panel] = []
    for key, metric, what, targets in PAIR_PANELS:
        if key in b:
            title = f"({b[key]['letter']}) {b[key]['title']}: {what}"
            panels.append((title, _pair_bars(b[key], metric), targets))
    queue_rate = b.get("single", {}).get("variants", {}).get("mp.Queue", {}).get("value")
    if "topic" in b and queue_rate:
        zero = b["topic"]["configs"]["0"]["publish_msg_per_s"] / queue_rate
        title = f"(t) {b['topic']['title']}: x mp.Queue msg/s of (a)"
        panels.append((title, _topic_bars(b["topic"], queue_rate), [(0.8 * zero, "80% of 0 subscribers")]))
    return panels


# Characters of a panel title per line: what fits over the bars of a 10-inch figure at 9.5 pt.
_TITLE_CHARS = 64


def plot_ratios(plt: Any, results: dict[str, Any], out: Path) -> Path:
    from matplotlib import ticker

    panels = _panels(results)
    heights = [len(bars) + 1.5 for _, bars, _ in panels]
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 0.36 * sum(heights) + 1),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)  # fmt: skip
    for ax, (title, bars, targets) in zip(axes[:, 0], panels):
        labels = [label for label, _, _ in bars]
        values = [v for _, v, _ in bars]
        ys = range(len(bars))[::-1]
        ax.barh(list(ys), values, color=[COLORS.get(t, "#8c564b") for _, _, t in bars], height=0.7)
        ax.set_yticks(list(ys), labels, fontsize=8.5)
        ax.set_xscale("log")
        ax.axvline(1, color="black", linewidth=0.8)
        for value, text in targets:
            ax.axvline(value, color=TARGET, linestyle=":", linewidth=1.2)
            # x in data, y in axes fraction: the label stays inside the panel, at its top
            ax.text(value, 0.97, text + " ", transform=ax.get_xaxis_transform(), color=TARGET,
                    fontsize=7.5, rotation=90, ha="right", va="top",
                    bbox={"facecolor": "white", "alpha": 0.85, "edgecolor": "none", "pad": 1})  # fmt: skip
        for y, v in zip(ys, values):
            ax.annotate(
                f"{v:.2f}x", (v, y), xytext=(3, 0), textcoords="offset points", va="center", fontsize=7.5
            )
        lo = min([*values, *(t for t, _ in targets), 1.0])
        hi = max([*values, *(t for t, _ in targets), 1.0])
        ax.set_xlim(lo / 1.6, hi * 2.2)
        ax.xaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        # Wrapped: the panel starts right of the longest label, and a long title ran off the figure.
        ax.set_title(textwrap.fill(title, _TITLE_CHARS), fontsize=9.5, loc="left")
        ax.grid(axis="x", which="both", alpha=0.25)
    fig.suptitle(_caption(results), fontsize=8, y=0.999, va="top")
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    path = out / "ratios.png"
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


# -- (e) sizes, (f) producers x consumers ------------------------------------------------------


def plot_sizes(plt: Any, results: dict[str, Any], out: Path) -> Path | None:
    sweep = results["benchmarks"].get("sizes")
    if sweep is None:
        return None
    sizes = [s["size"] for s in sweep["sizes"].values()]
    transports = list(next(iter(sweep["sizes"].values()))["transports"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for t in transports:
        mbs = [s["transports"][t]["mb_per_s"] for s in sweep["sizes"].values()]
        rate = [s["transports"][t]["msg_per_s"] for s in sweep["sizes"].values()]
        style = {"color": COLORS.get(t), "marker": "o", "markersize": 4, "label": t}
        left.plot(sizes, mbs, **style)
        right.plot(sizes, rate, **style)
    for ax, unit in ((left, "MB/s (10**6 bytes/s)"), (right, "messages/s")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(sizes, [size_text(s) for s in sizes], rotation=45, fontsize=8)
        ax.set_xlabel("message size (bytes payload)")
        ax.set_ylabel(unit)
        ax.grid(which="both", alpha=0.25)
        ax.legend(fontsize=8)
    left.set_title("(e) throughput by message size", fontsize=10, loc="left")
    right.set_title("(e) message rate by message size", fontsize=10, loc="left")
    fig.suptitle(_caption(results), fontsize=8, y=0.995, va="top")
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    path = out / "sizes.png"
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def plot_mpmc(plt: Any, results: dict[str, Any], out: Path) -> Path | None:
    mpmc = results["benchmarks"].get("mpmc")
    if mpmc is None:
        return None
    shapes = list(mpmc["shapes"].values())
    transports = list(shapes[0]["transports"])
    fig, ax = plt.subplots(figsize=(10, 4.2))
    width = 0.8 / len(transports)
    for i, t in enumerate(transports):
        xs = [k + (i - (len(transports) - 1) / 2) * width for k in range(len(shapes))]
        values = [s["transports"][t]["msg_per_s"] for s in shapes]
        ax.bar(xs, values, width=width, color=COLORS.get(t), label=t)
    for k, s in enumerate(shapes):
        top = max(x["msg_per_s"] for x in s["transports"].values())
        ratio = s["transports"]["shmbus"].get("x mp.Queue")
        if ratio:
            ax.annotate(f"{ratio:.2f}x", (k, top), xytext=(0, 3), textcoords="offset points", ha="center",
                        fontsize=8)  # fmt: skip
    ax.set_xticks(range(len(shapes)), [f"{s['producers']}P x {s['consumers']}C" for s in shapes])
    from matplotlib import ticker

    ax.set_ylabel("total messages/s")
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v / 1000:,.0f}k"))
    ax.set_ylim(0, ax.get_ylim()[1] * 1.08)  # room for the ratio labels
    ax.set_title("(f) producers x consumers on one queue, small dicts (label: shmbus x mp.Queue)",
                 fontsize=10, loc="left")  # fmt: skip
    ax.grid(axis="y", alpha=0.25)
    ax.legend(fontsize=8)
    fig.suptitle(_caption(results), fontsize=8, y=0.995, va="top")
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    path = out / "mpmc.png"
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def _caption(results: dict[str, Any]) -> str:
    m = results["machine"]
    kind = "quick" if results["params"]["quick"] else "full"
    return (
        f"shmbus bench, {kind} run {results['started_at']}: {m['cpu_model']}, {m['cpus_usable']} CPUs, "
        f"{m['python_implementation']} {m['python']}, load {m['load_average_at_start'][0]} at start"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Charts (PNG) from a `shmbus bench --json` file.")
    parser.add_argument("results", type=Path, help="the JSON written by shmbus bench --json PATH")
    parser.add_argument(
        "--out", type=Path, default=Path("docs/img"), help="directory for the PNGs (docs/img)"
    )
    args = parser.parse_args(argv)
    plt = _load_matplotlib()
    results = json.loads(args.results.read_text(encoding="utf-8"))
    args.out.mkdir(parents=True, exist_ok=True)
    for path in (plot_ratios(plt, results, args.out), plot_sizes(plt, results, args.out),
                 plot_mpmc(plt, results, args.out)):  # fmt: skip
        if path is not None:
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
