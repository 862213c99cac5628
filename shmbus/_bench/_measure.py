"""One measurement: fork a child per role over a fresh channel, and collect and check their reports.

Also the helpers every row applies to those reports and their repeats
(CPU time, start stamp, medians, rotated order), and ``Progress``, which
counts the measurements of a run.
"""

from __future__ import annotations

import os
import resource
import statistics
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from multiprocessing import connection
from multiprocessing.context import ForkContext
from multiprocessing.synchronize import Barrier
from typing import Any, Callable

from ._channels import CHANNELS, Channel, Options
from ._params import BARRIER_TIMEOUT_S, MEASUREMENT_TIMEOUT_S, BenchError, Params
from ._roles import RoleFn, now_ns

__all__ = [
    "Role",
    "Hook",
    "measure",
    "cpu_s",
    "cpu_detail",
    "first_start_ns",
    "Progress",
    "median",
    "medians",
    "rotations",
]


def _cpu() -> tuple[float, float]:
    """User and system CPU seconds of this process, all threads included."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime, ru.ru_stime


@dataclass(frozen=True)
class Role:
    """One child of a measurement: its name (unique), which end it opens, what it runs."""

    name: str
    side: str
    fn: RoleFn


def _child(
    role: Role,
    channel: Channel,
    params: Params,
    barrier: Barrier,
    report_to: connection.Connection,
) -> None:
    """Body of a child process: run one role and send a report to the parent, always."""
    report: dict[str, Any] = {"role": role.name, "pid": os.getpid()}
    start: dict[str, Any] = {}

    def go() -> None:
        barrier.wait(BARRIER_TIMEOUT_S)
        start["t_ns"] = now_ns()
        start["cpu"] = _cpu()

    try:
        ep = channel.endpoint(role.side)
        try:
            report.update(role.fn(ep, params, go))
            t_end = now_ns()
            ep.flush()
            user, sys_ = _cpu()
        finally:
            ep.close()
        report.update(
            t_start_ns=start["t_ns"],
            t_end_ns=t_end,
            cpu_user_s=user - start["cpu"][0],
            cpu_sys_s=sys_ - start["cpu"][1],
        )
    except BaseException:
        report["error"] = traceback.format_exc()
        barrier.abort()  # the others must not wait at the barrier for a child that will never come
    try:
        report_to.send(report)
    finally:
        report_to.close()


# Called by the parent once every named role has reported (with the channel).
Hook = tuple[frozenset[str], Callable[[Channel], None]]


def _collect(
    procs: dict[str, Any], conns: dict[str, connection.Connection], channel: Channel | None,
    hook: Hook | None, who: str = "",
) -> dict[str, dict[str, Any]]:
    """Wait for every child's report; raise BenchError at the first failure (``who``: whose roles)."""
    deadline = time.monotonic() + MEASUREMENT_TIMEOUT_S
    pending = {c: role for role, c in conns.items()}
    reports: dict[str, dict[str, Any]] = {}
    while pending:
        left = deadline - time.monotonic()
        ready = connection.wait(list(pending), left) if left > 0 else []
        if not ready:
            raise BenchError(
                f"no report from the {who}{', '.join(pending.values())} "
                f"after {MEASUREMENT_TIMEOUT_S:.0f} s: stuck"
            )
        for c in ready:
            assert isinstance(c, connection.Connection)
            role = pending.pop(c)
            try:
                rep = c.recv()
            except EOFError:
                procs[role].join(1)
                raise BenchError(
                    f"the {who}{role} died without a report (exit code {procs[role].exitcode})"
                ) from None
            if "error" in rep:
                raise BenchError(f"the {who}{role} failed:\n{rep['error']}")
            reports[role] = rep
        if hook is not None and hook[0] <= reports.keys():
            assert channel is not None
            hook[1](channel)
            hook = None
    return reports


def _reap(procs: dict[str, Any], grace: float) -> None:
    """Join every child, killing those still alive after ``grace`` seconds."""
    for p in procs.values():
        p.join(grace)
        if p.is_alive():
            p.kill()
            p.join()
        p.close()


# What a child of ``run_children`` runs: given ``go`` (call it once set up: it meets the
# others at the barrier and starts the clock), it does its part and returns nothing.
Body = Callable[[Callable[[], None]], None]


def _body_child(role: str, body: Body, barrier: Barrier, report_to: connection.Connection) -> None:
    """A child of ``run_children``: run ``body``, then report its times and CPU, or its error, always."""
    report: dict[str, Any] = {"role": role}
    start: dict[str, Any] = {}

    def go() -> None:
        barrier.wait(BARRIER_TIMEOUT_S)
        start["t_ns"], start["cpu"] = now_ns(), _cpu()

    try:
        body(go)
        t_end, (user, sys_) = now_ns(), _cpu()
        report.update(t_start_ns=start["t_ns"], t_end_ns=t_end,
                      cpu_s=user + sys_ - start["cpu"][0] - start["cpu"][1])  # fmt: skip
    except BaseException:
        report["error"] = traceback.format_exc()
        barrier.abort()  # the others must not wait at the barrier for a child that will never come
    try:
        report_to.send(report)
    finally:
        report_to.close()


def run_children(ctx: ForkContext, bodies: Mapping[str, Body], who: str = "") -> dict[str, dict[str, Any]]:
    """Fork one child per role running its ``Body``; return their reports (times and CPU).

    For rows whose children make their own channel (the bridge's ends, the nats-py pair):
    the same barrier, collection and reaping as ``measure``; BenchError on a failure or
    past the timeout (``who`` names whose roles, in its message). Forked, so a body may be
    a closure.
    """
    procs: dict[str, Any] = {}
    conns: dict[str, connection.Connection] = {}
    ok = False
    try:
        barrier = ctx.Barrier(len(bodies))
        for role, body in bodies.items():
            r, w = ctx.Pipe(duplex=False)
            conns[role] = r
            proc = ctx.Process(
                target=_body_child, args=(role, body, barrier, w), name=f"shmbus-bench-{role}", daemon=True
            )
            try:
                proc.start()
            finally:
                w.close()  # (only the child holds the write end: its death reads as EOF)
            procs[role] = proc
        reports = _collect(procs, conns, None, None, who)
        ok = True
    finally:
        _reap(procs, 10.0 if ok else 0.0)
        for c in conns.values():
            c.close()
    return reports


def measure(
    roles: Sequence[Role],
    transport: str,
    params: Params,
    ctx: ForkContext,
    *,
    two_way: bool = False,
    options: Options | None = None,
    hook: Hook | None = None,
) -> dict[str, dict[str, Any]]:
    """Run ``roles`` once, each in its own child, over a fresh channel; return their reports."""
    channel = CHANNELS[transport](ctx, two_way, params, options or {})
    procs: dict[str, Any] = {}
    conns: dict[str, connection.Connection] = {}
    ok = False
    try:
        barrier = ctx.Barrier(len(roles))
        for role in roles:
            r, w = ctx.Pipe(duplex=False)
            conns[role.name] = r
            proc = ctx.Process(
                target=_child,
                args=(role, channel, params, barrier, w),
                name=f"shmbus-bench-{role.name}",
                daemon=True,
            )
            try:
                proc.start()
            finally:
                # Only the child holds the write end now, so its death reads as EOF.
                w.close()
            procs[role.name] = proc
        reports = _collect(procs, conns, channel, hook)
        ok = True
    finally:
        # A healthy child exits right after reporting; after a failure nobody waits.
        _reap(procs, 10.0 if ok else 0.0)
        for c in conns.values():
            c.close()
        channel.close()
    return reports


# -- what the rows make of the reports, and of repeats ----------------------------------------


def cpu_s(reports: Mapping[str, Mapping[str, Any]]) -> float:
    """User+sys CPU seconds of every child of one measurement, together."""
    return float(sum(r["cpu_user_s"] + r["cpu_sys_s"] for r in reports.values()))


def cpu_detail(reports: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    return {name: {"user": r["cpu_user_s"], "sys": r["cpu_sys_s"]} for name, r in reports.items()}


def first_start_ns(reports: Mapping[str, Mapping[str, Any]]) -> int:
    """The earliest post-barrier stamp: where a measurement starts."""
    return min(int(r["t_start_ns"]) for r in reports.values())


def median(samples: Sequence[Mapping[str, Any]], key: str) -> float:
    return float(statistics.median(s[key] for s in samples))


def medians(samples: Sequence[Mapping[str, Any]], key: str) -> list[float]:
    """Element-wise medians of a list-valued figure (one value per subscriber)."""
    return [float(statistics.median(column)) for column in zip(*(s[key] for s in samples))]


def rotations(keys: Sequence[str], repeats: int) -> list[list[str]]:
    """The order of each repeat: rotated, so no variant always runs first (cold) or last."""
    n = len(keys)
    return [list(keys[r % n :]) + list(keys[: r % n]) for r in range(repeats)] if n else []


# -- progress ------------------------------------------------------------------------------


class Progress:
    """Counts the measurements of a run and shows which one runs now."""

    def __init__(self, total: int, show: Callable[[str], None] | None) -> None:
        self.total = total
        self.done = 0
        self.show = show

    def step(self, what: str) -> None:
        self.done += 1
        if self.show is not None:
            self.show(f"[{self.done}/{self.total}] {what}")
