"""The output: the plain-text report (machine, parameters, a table per row, targets, notes) and JSON."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from typing import Any

from ._params import GIB, MIB, ROW_LETTERS, quick_caveat, size_text
from ._targets import MEMCPY_VARIANTS, lookup

__all__ = ["format_table", "write_json"]


def _num(value: float, digits: int = 0) -> str:
    return f"{value:,.{digits}f}"


def _x(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}x"


def _render(rows: list[list[str]]) -> list[str]:
    """Align the columns: the first left, the others right; a rule under the header."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]

    def line(r: list[str]) -> str:
        return "  ".join([r[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(r[1:], widths[1:]))]).rstrip()

    return [line(rows[0]), "  ".join("-" * w for w in widths), *(line(r) for r in rows[1:])]


def _pair_table(key: str, b: Mapping[str, Any]) -> list[str]:
    unit, variants = b["unit"], b["variants"]
    head = f"({b['letter']}) {b['title']}"
    others = [k for k in next((v["ratios"] for v in variants.values() if v.get("ratios")), {})]
    if key == "pingpong":
        header = [head, "p50 us", "p99 us", "p50 of runs", *(f"{o} p50" for o in others), "CPU us/trip"]
    else:
        memcpy_col = ["% of memcpy"] if key == "bytes" else []
        header = [head, unit, "runs: min-max", *others, *memcpy_col, "CPU us/msg"]
    memcpy = max((variants[k].get("value", 0) for k in MEMCPY_VARIANTS if k in variants), default=0)
    rows = [header]
    for v in variants.values():
        if not v["available"]:
            rows.append([v["label"], v["note"], *([""] * (len(header) - 2))])
            continue
        r = v.get("ratios", {})
        if key == "pingpong":
            lo, hi = v["range"]["p50_us"]
            cells = [_num(v["p50_us"], 1), _num(v["p99_us"], 1), f"{lo:.1f}-{hi:.1f}",
                     *(_x(lookup(r, o, "p50_us")) for o in others)]  # fmt: skip
        else:
            lo, hi = v["range"]["value"]
            cells = [_num(v["value"]), f"{_num(lo)}-{_num(hi)}", *(_x(lookup(r, o, "value")) for o in others)]
            if key == "bytes":
                cells.append(f"{100 * v['value'] / memcpy:.0f}%" if memcpy else "")
        rows.append([v["label"], *cells, _num(v["cpu_us_per_msg"], 2)])
    return _render(rows)


def _sweep_table(b: Mapping[str, Any]) -> list[str]:
    title = f"({b['letter']}) {b['title']}"
    header = [title, "count", "transport", "MB/s", "msg/s", "x mp.Queue", "x mp.Pipe", "% of memcpy",
              "CPU us/msg"]  # fmt: skip
    rows = [header]
    for s in b["sizes"].values():
        for i, (t, r) in enumerate(s["transports"].items()):
            first = i == 0
            rows.append([
                size_text(s["size"]) if first else "", _num(s["messages"]) if first else "", t,
                _num(r["mb_per_s"]), _num(r["msg_per_s"]), _x(r["x mp.Queue"]), _x(r["x mp.Pipe"]),
                f"{r['% of memcpy']:.0f}%" if "% of memcpy" in r else "", _num(r["cpu_us_per_msg"], 2),
            ])  # fmt: skip
        if "memcpy" in s:
            rows.append(["", "", "memcpy", _num(s["memcpy"]["mb_per_s"]), "", "", "", "100%", ""])
    return _render(rows)


def _mpmc_table(b: Mapping[str, Any]) -> list[str]:
    header = [
        f"({b['letter']}) {b['title']}",
        "messages",
        "shmbus msg/s",
        "mp.Queue msg/s",
        "x mp.Queue",
        "CPU us/msg: shmbus / mp.Queue",
    ]
    rows = [header]
    for name, s in b["shapes"].items():
        tr = s["transports"]
        p, c = name.split("x")
        rows.append(
            [
                f"{p} producer{'s' * (p != '1')} x {c} consumer{'s' * (c != '1')}",
                _num(s["messages"]),
                _num(tr["shmbus"]["msg_per_s"]),
                _num(tr["mp.Queue"]["msg_per_s"]),
                _x(tr["shmbus"]["x mp.Queue"]),
                f"{tr['shmbus']['cpu_us_per_msg']:.2f} / {tr['mp.Queue']['cpu_us_per_msg']:.2f}",
            ]
        )
    return _render(rows)


def _writer_first(role: str) -> tuple[bool, str]:
    """Sort key: the publisher (or producer) first, then the readers by name."""
    return (not role.startswith(("publisher", "producer")), role)


def _topic_table(b: Mapping[str, Any]) -> list[str]:
    header = [
        f"({b['letter']}) {b['title']}",
        "publish msg/s",
        "% of 0 subs",
        "receive msg/s, each subscriber",
        "x mp.Queue (slowest)",
        "lost, each",
        "publisher CPU us/msg",
        "CPU us/msg",
        "% of a CPU: publisher / subscribers",
    ]
    rows = [header]
    for key, c in b["configs"].items():
        if key == "pingpong":
            continue
        pct = c.get("pct_of_0_subscribers")
        shares = c.get("cpu_share", {})
        rows.append(
            [
                c["label"],
                _num(c["publish_msg_per_s"]) if "publish_msg_per_s" in c else "-",
                f"{pct:.0f}%" if pct is not None else "",
                " / ".join(_num(x) for x in c["receive_msg_per_s"]) or "-",
                _x(lookup(c, "x mp.Queue", "receive_slowest")),
                " / ".join(_num(x) for x in c.get("lost", [])) or "-",
                _num(c["publisher_cpu_us_per_msg"], 2) if "publisher_cpu_us_per_msg" in c else "",
                _num(c["cpu_us_per_msg"], 2),
                " / ".join(f"{shares[k]['pct_of_one_cpu']:.0f}%" for k in sorted(shares, key=_writer_first)),
            ]
        )
    out = _render(rows)
    pp = b["configs"].get("pingpong")
    if pp is not None:
        lo, hi = pp["range"]["p50_us"]
        out.append(
            f"{pp['label']}: p50 {pp['p50_us']:.1f} us (runs {lo:.1f}-{hi:.1f}), p99 {pp['p99_us']:.1f} us, "
            f"CPU {pp['cpu_us_per_msg']:.2f} us/trip"
        )
    return out


def _bridge_table(b: Mapping[str, Any]) -> list[str]:
    header = [f"({b['letter']}) {b['title']}", "msg/s", "runs: min-max", "% of nats-py",
              "CPU us/msg: bridges (out / in)", "nats-server CPU us/msg"]  # fmt: skip
    rows = [header]
    for v in b["variants"].values():
        if not v["available"]:
            rows.append([v["label"], v["note"], *([""] * (len(header) - 2))])
            continue
        lo, hi = v["range"]["value"]
        pct = v.get("pct_of_nats_py")
        split = f" ({v['out_cpu_us_per_msg']:.2f} / {v['in_cpu_us_per_msg']:.2f})" if pct is not None else ""
        server = v.get("server_cpu_us_per_msg")
        rows.append([
            v["label"], _num(v["value"]), f"{_num(lo)}-{_num(hi)}", "" if pct is None else f"{pct:.0f}%",
            f"{v['cpu_us_per_msg']:.2f}{split}", "" if server is None else f"{server:.2f}",
        ])  # fmt: skip
    out = _render(rows)
    out.append("(the baseline's CPU column is its publisher and consumer, nats-py both)")
    return out


def _scale_table(b: Mapping[str, Any]) -> list[str]:
    rows = [[f"({b['letter']}) {b['title']}", "value", "note"]]
    for c in b["create_open"].values():
        rows.append(
            [
                f"create + open a {size_text(c['capacity'])} bus",
                f"{c['create_open_ms']:.2f} ms",
                f"file allocated after: {c['allocated_bytes'] / 1024:,.0f} KiB",
            ]
        )
    m = b["memory"]
    size = size_text(m["bus_capacity"])
    rows += [
        ["VmRSS, fresh python + import shmbus", f"{m['rss_fresh_bytes'] / MIB:.1f} MiB", "baseline"],
        [
            f"VmRSS after opening a {size} bus + put/get 1 msg",
            f"{m['rss_after_bytes'] / MIB:.1f} MiB",
            f"+{m['rss_delta_bytes'] / MIB:.2f} MiB (shared memory: +{m['shmem_delta_bytes'] / MIB:.2f} MiB)",
        ],
        [
            f"/dev/shm memory used by that {size} bus",
            f"{m['bus_allocated_bytes'] / 1024:,.0f} KiB",
            "allocated blocks of the file",
        ],
    ]
    if b["large_capacity"] != 4 * GIB:
        rows.append(["large bus size", size_text(b["large_capacity"]), b["large_note"]])
    return _render(rows)


def _targets_table(targets: list[dict[str, Any]]) -> list[str]:
    rows = [["targets", "measures", "this run", "verdict"]]
    for t in targets:
        value = "not measured" if t["value"] is None else f"{t['value']:,.2f}"
        verdict = {True: "met", False: "MISSED", None: "-"}[t["met"]]
        rows.append([t["target"], t["measures"], value, verdict])
    return _render(rows)


_NOTES = [
    "x Y = how many times faster than Y, from the same run (rates: mine / Y's; latencies: Y's / mine).",
    "CPU = user+sys time of all the processes (producers, consumers, their threads) per message",
    "(per round trip for (d) and the Topic ping-pong). MB = 10**6 bytes. [info] lines are not",
    "targets' baselines: they send a whole batch as one message. Method and caveats: the docstring",
    "of shmbus/_bench/__init__.py.",
]


def _runs_text(p: dict[str, Any]) -> str:
    if p["repeats"] == p["sweep_repeats"] == p["mpmc_repeats"] == 1:
        return "one run of each measurement"
    return f"medians of {p['repeats']} runs ({p['sweep_repeats']} for (e), {p['mpmc_repeats']} for (f))"


def format_table(results: dict[str, Any]) -> str:
    """The plain-text report: machine lines, parameters, one table per row, targets, notes."""
    m, p, b = results["machine"], results["params"], results["benchmarks"]
    kind = "quick" if p["quick"] else "full"
    src = f" ({m['shmbus_source']})" if m.get("shmbus_source") else ""
    if "shmbus_c_fast_path" in m:  # (older JSON files do not say)
        why = m.get("shmbus_c_fast_path_why_not") or "pure Python"
        src += ", C fast path " + ("on" if m["shmbus_c_fast_path"] else f"OFF ({why})")
    caveat = quick_caveat(p)
    text = [] if caveat is None else [caveat]
    text += [
        f"machine: {m['platform']}, {m['cpu_model']}, {m['cpu_count']} CPUs ({m['cpus_usable']} usable), "
        f"{m['memory_bytes'] / GIB:.0f} GiB; {m['python_implementation']} {m['python']}",
        f"shmbus {m['shmbus']}{src}, msgpack {m['msgpack']}, msgspec {m.get('msgspec', 'not installed')}, "
        f"posix_ipc {m['posix_ipc']}, "
        f"faster-fifo {m['faster-fifo']}, pyzmq {m['pyzmq']}; "
        f"load average {' '.join(map(str, m['load_average_at_start']))} at start",
        f"{kind} run, {results['duration_s']:.0f} s; {_runs_text(p)}; fork start method; "
        f"shmbus Queue capacity {p['capacity']}",
    ]
    for key in ROW_LETTERS:
        if key not in b:
            continue
        text.append("")
        if key in ("single", "batch", "bytes", "pingpong"):
            text += _pair_table(key, b[key])
        elif key == "sizes":
            text += _sweep_table(b[key])
        elif key == "mpmc":
            text += _mpmc_table(b[key])
        elif key == "topic":
            text += _topic_table(b[key])
        elif key == "bridge":
            text += _bridge_table(b[key])
        else:
            text += _scale_table(b[key])
    text += ["", *_targets_table(results["targets"]), "", *_NOTES]
    return "\n".join(text)


def write_json(path: str, results: dict[str, Any]) -> None:
    text = json.dumps(results, indent=2) + "\n"
    if path == "-":
        sys.stdout.write(text)
        return
    # Written aside and renamed, so a crash never leaves a half-written file.
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as e:  # name the file the user asked for, not the one written aside
        raise type(e)(e.errno, e.strerror, path) from None
