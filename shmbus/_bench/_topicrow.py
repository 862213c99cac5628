"""Row (t): a Topic's publisher and subscribers, against mp.Queue one at a time in the same row.

Each configuration is measured ``repeats`` times in rotated order, the
mp.Queue baseline among them, so the ratios compare figures taken under the
same load (``--only t`` needs no other row):

* ``0``, ``1``, ``3``: the small dicts published one at a time, with that many
  subscriber processes reading with ``get_many(256)``;
* ``batch``: ``publish_many`` of 256 to one subscriber's ``get_many(256)``;
* ``mp.Queue``: the baseline, ``put``/``get`` one at a time;
* ``pingpong``: a round trip through two Topics (publish; a subscriber
  answers on the other), default spin.
"""

from __future__ import annotations

from collections.abc import Mapping
from multiprocessing.context import ForkContext
from typing import Any

from .._format import parse_size
from ._measure import Progress, Role, cpu_detail, cpu_s, first_start_ns, measure, median, medians, rotations
from ._params import BenchError, Params, size_text
from ._roles import consume_single, echo, ping, produce_single, publish, publish_batches, subscribe

__all__ = ["TOPIC_CONFIGS", "topic_steps", "run_topic"]

# The configurations, in the table's order; the numbers are the subscriber counts.
TOPIC_CONFIGS: tuple[str, ...] = ("0", "1", "3", "batch", "mp.Queue", "pingpong")


def topic_steps(params: Params) -> int:
    return len(_keys(params)) * params.repeats


def _keys(params: Params) -> list[str]:
    counts = [str(k) for k in params.topic_subscribers]
    return [*counts, *(k for k in TOPIC_CONFIGS if not k.isdigit())]


def _roles(key: str) -> tuple[list[Role], str, bool]:
    """(the roles, the transport, two-way) of one configuration."""
    if key == "mp.Queue":
        return [Role("producer", "producer", produce_single), Role("consumer", "consumer", consume_single)], \
            "mp.Queue", False  # fmt: skip
    if key == "pingpong":
        return [Role("producer", "producer", ping), Role("consumer", "consumer", echo)], "topic", True
    first = publish_batches if key == "batch" else publish
    n = 1 if key == "batch" else int(key)
    roles = [Role("publisher", "producer", first)]
    roles += [Role(f"subscriber{i}", "consumer", subscribe) for i in range(n)]
    return roles, "topic", False


def run_topic(params: Params, ctx: ForkContext, progress: Progress) -> dict[str, Any]:
    """(t) Every configuration, ``params.repeats`` times in rotated order; medians and ratios."""
    keys = _keys(params)
    samples: dict[str, list[dict[str, Any]]] = {k: [] for k in keys}
    for rep, order in enumerate(rotations(keys, params.repeats)):
        for key in order:
            progress.step(f"(t) topic: {_label(key)}, run {rep + 1}/{params.repeats}")
            roles, transport, two_way = _roles(key)
            reports = measure(roles, transport, params, ctx, two_way=two_way)
            samples[key].append(_sample(key, reports, params))
    configs = {k: _summary(k, s) for k, s in samples.items()}
    _add_ratios(configs)
    ring = parse_size(params.topic_capacity)
    return {
        "letter": "t",
        "title": f"Topic, {params.topic_messages:,} small dicts, {size_text(ring)} ring",
        "configs": configs,
    }


def _label(key: str) -> str:
    if key.isdigit():
        n = int(key)
        return f"publish, {n} subscriber{'s' * (n != 1)}"
    return {
        "batch": "publish_many/get_many(256), 1 subscriber",
        "mp.Queue": "mp.Queue put/get, one at a time (baseline)",
        "pingpong": "ping-pong through two Topics, default spin",
    }[key]


def _cpu_shares(reports: Mapping[str, Mapping[str, Any]], elapsed: float) -> dict[str, dict[str, float]]:
    """Each process's CPU: its % of all the measurement's CPU, and % of one CPU over the elapsed time."""
    total = cpu_s(reports)
    out = {}
    for name, r in reports.items():
        mine = r["cpu_user_s"] + r["cpu_sys_s"]
        share = 100 * mine / total if total else 0.0
        out[name] = {"pct_of_all": share, "pct_of_one_cpu": 100 * mine / elapsed}
    return out


def _sample(key: str, reports: dict[str, dict[str, Any]], params: Params) -> dict[str, Any]:
    if key == "mp.Queue":
        end, n = reports["consumer"], params.small_messages
        if end["count"] != n:
            raise BenchError(f"topic/mp.Queue: received {end['count']} of {n}")
        elapsed = (end["t_end_ns"] - first_start_ns(reports)) / 1e9
        return {"receive_msg_per_s": [n / elapsed], "cpu_us_per_msg": cpu_s(reports) / n * 1e6,
                "cpu_s": cpu_detail(reports), "cpu_share": _cpu_shares(reports, elapsed)}  # fmt: skip
    if key == "pingpong":
        ping_ = reports["producer"]
        n = params.pingpong_warmup + params.pingpong_round_trips
        if ping_["count"] != n:
            raise BenchError(f"topic/pingpong: {ping_['count']} round trips of {n}")
        sample = {k: ping_[k] for k in ("p50_us", "p99_us", "min_us", "max_us", "mean_us")}
        sample["cpu_us_per_msg"] = cpu_s(reports) / n * 1e6
        return sample
    return _fanout_sample(reports, params.topic_messages)


def _fanout_sample(reports: dict[str, dict[str, Any]], n: int) -> dict[str, Any]:
    pub = reports["publisher"]
    subs = [reports[name] for name in sorted(reports) if name != "publisher"]
    for s in subs:
        if s["received"] + s["lost"] != n:
            raise BenchError(f"topic: a subscriber received {s['received']} and lost {s['lost']} of {n}")
    t0 = first_start_ns(reports)
    published = (pub["t_end_ns"] - pub["t_start_ns"]) / 1e9
    elapsed = (max([pub["t_end_ns"], *(s["t_last_ns"] for s in subs)]) - t0) / 1e9
    return {
        "publish_elapsed_s": published,
        "publish_msg_per_s": n / published,
        "publisher_cpu_us_per_msg": (pub["cpu_user_s"] + pub["cpu_sys_s"]) / n * 1e6,
        "receive_msg_per_s": [s["received"] / ((s["t_last_ns"] - t0) / 1e9) for s in subs],
        "received": [s["received"] for s in subs],
        "lost": [s["lost"] for s in subs],
        "cpu_us_per_msg": cpu_s(reports) / n * 1e6,
        "cpu_s": cpu_detail(reports),
        "cpu_share": _cpu_shares(reports, elapsed),
    }


def _summary(key: str, s: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"label": _label(key), "cpu_us_per_msg": median(s, "cpu_us_per_msg"), "samples": s}
    if key.isdigit():
        out["subscribers"] = int(key)
    if key == "pingpong":
        out.update({m: median(s, m) for m in ("p50_us", "p99_us")})
        out["range"] = {m: [min(x[m] for x in s), max(x[m] for x in s)] for m in ("p50_us", "p99_us")}
        return out
    out["receive_msg_per_s"] = medians(s, "receive_msg_per_s")
    if key != "mp.Queue":
        out.update(
            publish_msg_per_s=median(s, "publish_msg_per_s"),
            publisher_cpu_us_per_msg=median(s, "publisher_cpu_us_per_msg"),
            lost=medians(s, "lost"),
            lost_total=max(sum(x["lost"]) for x in s),  # the worst run: a target wants none lost in any
        )
    # Each process's share, from the median run by elapsed CPU (its figures stay consistent).
    mid = sorted(s, key=lambda x: x["cpu_us_per_msg"])[len(s) // 2]
    out["cpu_share"] = mid["cpu_share"]
    return out


def _add_ratios(configs: dict[str, dict[str, Any]]) -> None:
    """Rates against mp.Queue one at a time, and each publish rate as a % of 0 subscribers'."""
    base = configs.get("mp.Queue", {}).get("receive_msg_per_s", [None])[0]
    zero = configs.get("0", {}).get("publish_msg_per_s")
    for key, c in configs.items():
        if key in ("mp.Queue", "pingpong"):
            continue
        if base:
            c["x mp.Queue"] = {
                "publish": c["publish_msg_per_s"] / base,
                "receive_each": [r / base for r in c["receive_msg_per_s"]],
                "receive_slowest": min(c["receive_msg_per_s"]) / base if c["receive_msg_per_s"] else None,
            }
        if zero and key.isdigit():
            c["pct_of_0_subscribers"] = 100 * c["publish_msg_per_s"] / zero
