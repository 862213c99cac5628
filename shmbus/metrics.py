"""Prometheus metrics of the buses on this machine, for ``shmbus export`` or an existing process.

Rule: this module owns the metrics' names, types, labels and help texts, and
the two ways they leave a process (HTTP, a node_exporter textfile); what a
collection reads is ``_scrape``'s. It is the only module that imports
``prometheus_client`` (the ``metrics`` extra: ``pip install 'shmbus[metrics]'``),
and ``import shmbus`` never loads it. docs/metrics.md describes every metric.

Embedding, in a process that already serves Prometheus metrics::

    from prometheus_client import REGISTRY
    from shmbus.metrics import ShmbusCollector

    REGISTRY.register(ShmbusCollector())            # every bus in /dev/shm
    REGISTRY.register(ShmbusCollector(["/var/lib/app/buses"]))  # or named buses and directories

or on its own port: ``shmbus.metrics.start_http_server(9464)``.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from collections.abc import Iterable, Iterator
from typing import Final, Union
from wsgiref.simple_server import WSGIServer

try:
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client import start_http_server as _prometheus_http_server
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
except ImportError as e:  # the extra is not installed: say which one, rather than a bare module name
    raise ModuleNotFoundError(
        f"shmbus.metrics needs prometheus-client ({e}): pip install 'shmbus[metrics]'", name=e.name
    ) from e

from . import _accel
from ._scrape import REASONS, Census, Reading, Scraper

__all__ = [
    "ShmbusCollector",
    "new_registry",
    "start_http_server",
    "write_textfile",
    "text",
    "DEFAULT_ADDR",
    "DEFAULT_PORT",
]

DEFAULT_ADDR: Final = "127.0.0.1"
"""Where ``shmbus export`` listens by default: this machine only (bus names may be private)."""
DEFAULT_PORT: Final = 9464
"""The port ``shmbus export`` listens on by default."""

_Family = Union[CounterMetricFamily, GaugeMetricFamily]

_BUS: Final = ["bus", "kind", "bus_id"]
_SUB: Final = [*_BUS, "subscriber", "pid"]


class ShmbusCollector:
    """A prometheus_client collector of every bus's metrics, read at each scrape.

    Parameters:
        buses: bus names or paths, and directories whose buses to read;
            None (the default) reads every bus in /dev/shm, as ``shmbus ls``
            finds them.

    Reading a bus never changes it: the collector opens each file
    read-only, takes no lock and joins no bus as a participant. A bus that
    cannot be read is left out of that scrape and counted in
    ``shmbus_export_errors_total{reason}``; it is logged once (logger
    ``shmbus``), not at every scrape. Register it in a registry::

        from prometheus_client import REGISTRY
        REGISTRY.register(ShmbusCollector())
    """

    def __init__(self, buses: Iterable[str] | None = None) -> None:
        self._scraper = Scraper(buses)

    def describe(self) -> list[Metric]:
        """The metric families, without samples: a registry checks names with it and scrapes nothing."""
        return list(_families())

    def collect(self) -> Iterator[Metric]:
        """Read every bus now and yield the metric families."""
        census = self._scraper.read()
        fams = _families()
        by_name: dict[str, _Family] = {f.name: f for f in fams}
        for r in census.buses:
            _add_bus(by_name, r)
        _add_exporter(by_name, census)
        yield from fams


def _families() -> list[_Family]:
    def c(name: str, doc: str, labels: list[str] = _BUS) -> _Family:
        return CounterMetricFamily(name, doc, labels=labels)

    def g(name: str, doc: str, labels: list[str] = _BUS) -> _Family:
        return GaugeMetricFamily(name, doc, labels=labels)

    return [
        c("shmbus_in_messages", "Messages put (Queue) or published (Topic), ever."),
        c("shmbus_out_messages", "Messages taken (Queue), or that left the ring to make room (Topic), ever."),
        c("shmbus_in_bytes", "Payload bytes put or published, ever."),
        c("shmbus_out_bytes", "Payload bytes taken from a Queue, ever (Queue only)."),
        g("shmbus_fill_bytes", "Bytes of the ring in use, records and padding."),
        g("shmbus_fill_messages", "Messages in the bus now: waiting (Queue) or still in the ring (Topic)."),
        g("shmbus_capacity_bytes", "Size of the ring in bytes."),
        g("shmbus_oldest_message_min_age_seconds",
          "The oldest message is at least this old (0 when the bus is empty or no sample says more)."),
        g("shmbus_oldest_message_max_age_seconds",
          "The oldest message is at most this old (absent when no sample bounds it; 0 when empty)."),
        c("shmbus_recoveries", "Lock repairs done (a holder died or was cut short), ever."),
        g("shmbus_participants", "Live processes attached to the bus (they have taken one of its locks)."),
        g("shmbus_created_timestamp_seconds", "When the bus was created, seconds since the epoch."),
        g("shmbus_subscriber_lag_messages", "Messages published this subscriber has not read yet.", _SUB),
        c("shmbus_subscriber_lost_messages", "Messages overwritten before this subscriber read them.", _SUB),
        c("shmbus_subscriber_received_messages", "Messages this subscriber has read.", _SUB),
        g("shmbus_accelerated", "1 if the exporting process runs shmbus's C fast path, else 0.", []),
        c("shmbus_export_errors", "Bus files skipped by a collection, by reason, since the exporter started.",
          ["reason"]),
        g("shmbus_export_skipped_files", "Bus files skipped by this collection, by reason.", ["reason"]),
        g("shmbus_export_unreadable_files",
          "Files in a scanned directory the exporter may not read: perhaps another user's buses.", []),
    ]  # fmt: skip


def _add_bus(f: dict[str, _Family], r: Reading) -> None:
    snap = r.snapshot
    st = snap.stats
    kind = st.kind.lower()
    labels = [r.bus, kind, st.bus_id]

    def add(name: str, value: float) -> None:
        f[name].add_metric(labels, value)

    add("shmbus_in_messages", st.put_count)
    add("shmbus_out_messages", st.get_count)
    add("shmbus_in_bytes", st.bytes_in)
    if kind == "queue":
        add("shmbus_out_bytes", st.bytes_out)
    add("shmbus_fill_bytes", st.used_bytes)
    add("shmbus_fill_messages", st.messages)
    add("shmbus_capacity_bytes", st.capacity)
    at_least, at_most = snap.age if snap.age is not None else (0.0, 0.0)
    add("shmbus_oldest_message_min_age_seconds", at_least or 0.0)
    if at_most is not None:
        add("shmbus_oldest_message_max_age_seconds", at_most)
    add("shmbus_recoveries", st.recoveries)
    add("shmbus_participants", len(snap.pids))
    add("shmbus_created_timestamp_seconds", st.created_ns / 1e9)
    for s in snap.subscribers or ():
        sub = [*labels, str(s["slot"]), str(s["pid"])]
        f["shmbus_subscriber_lag_messages"].add_metric(sub, s["lag"])
        f["shmbus_subscriber_lost_messages"].add_metric(sub, s["lost"])
        f["shmbus_subscriber_received_messages"].add_metric(sub, s["received"])


def _add_exporter(f: dict[str, _Family], census: Census) -> None:
    f["shmbus_accelerated"].add_metric([], float(_accel.ENABLED))
    for reason in REASONS:
        f["shmbus_export_errors"].add_metric([reason], census.skipped_total.get(reason, 0))
        f["shmbus_export_skipped_files"].add_metric([reason], census.skipped.get(reason, 0))
    f["shmbus_export_unreadable_files"].add_metric([], census.unreadable)


def new_registry(buses: Iterable[str] | None = None) -> CollectorRegistry:
    """A new prometheus_client registry holding one ``ShmbusCollector(buses)`` and nothing else."""
    registry = CollectorRegistry()
    registry.register(ShmbusCollector(buses))
    return registry


def text(registry: CollectorRegistry) -> str:
    """The metrics of ``registry`` now, in the Prometheus text format (what a textfile holds)."""
    return generate_latest(registry).decode()


def start_http_server(
    port: int = DEFAULT_PORT, addr: str = DEFAULT_ADDR, *, buses: Iterable[str] | None = None,
    registry: CollectorRegistry | None = None,
) -> tuple[WSGIServer, threading.Thread]:  # fmt: skip
    """Serve the buses' metrics over HTTP from a daemon thread, as prometheus_client's function of that name.

    Parameters:
        port, addr: where to listen (port 0: any free port; read it from the
            returned server's ``server_port``).
        buses: as for ``ShmbusCollector``.
        registry: a registry to add a ``ShmbusCollector`` to and serve;
            default: a new one holding only that collector.

    Returns the server and its thread; ``server.shutdown()`` stops it.
    Prometheus text or OpenMetrics is served, as the scraper asks.
    """
    if registry is None:
        registry = new_registry(buses)
    else:
        registry.register(ShmbusCollector(buses))
    return _prometheus_http_server(port, addr, registry=registry)


def write_textfile(path: str | os.PathLike[str], registry: CollectorRegistry) -> None:
    """Write the metrics of ``registry`` to ``path`` for node_exporter's textfile collector, atomically.

    The text goes to a hidden temporary file in the same directory, renamed
    over ``path``: node_exporter never reads half a file, and reads only
    ``*.prom`` names, so it never sees the temporary one. Errors name
    ``path``, never the temporary file. The file is made readable by all
    (mode 644): node_exporter usually runs as another user.
    """
    target = os.path.abspath(os.fspath(path))
    data = generate_latest(registry)
    directory, name = os.path.split(target)
    tmp = ""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            os.fchmod(out.fileno(), 0o644)
        os.replace(tmp, target)
    except OSError as e:
        if tmp:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise type(e)(e.errno, f"cannot write the metrics file {target}: {e.strerror}") from None
