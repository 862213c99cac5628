"""shmbus.metrics and ``shmbus export``: a live exporter scraped over HTTP while processes use the buses.

The figures scraped are checked against ``stats()`` read just before and just
after the scrape (counters move meanwhile: a scraped counter lies between the
two). Bad files in the scanned directory, a bus removed or recreated between
scrapes, and the textfile mode are tested through the real command.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Procs

prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

import shmbus  # noqa: E402
from shmbus import _export, _live, metrics  # noqa: E402
from shmbus._cli import main  # noqa: E402
from shmbus._format import Q_NEXT_SEQ  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _parse(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def _one(samples: Samples, name: str, **labels: str) -> float:
    found = [v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= ls]
    assert len(found) == 1, f"{name} {labels}: {len(found)} samples"
    return found[0]


def _buses(samples: Samples) -> dict[str, str]:
    """bus label -> bus_id label, from the shmbus_capacity_bytes samples."""
    out = {}
    for (n, ls), _ in samples.items():
        if n == "shmbus_capacity_bytes":
            d = dict(ls)
            out[d["bus"]] = d["bus_id"]
    return out


# -- processes that keep the buses moving ------------------------------------------------


def _producer(path: str, stop: Any) -> None:
    with shmbus.Queue.open(path) as q:
        while not stop.is_set():
            with contextlib.suppress(shmbus.Full):
                q.put(b"x" * 100, timeout=0.05)


def _consumer(path: str, stop: Any) -> None:
    with shmbus.Queue.open(path) as q:
        while not stop.is_set():
            with contextlib.suppress(shmbus.Empty):
                q.get(timeout=0.05)


def _publisher(path: str, stop: Any) -> None:
    with shmbus.Topic.open(path) as t:
        while not stop.is_set():
            t.publish({"n": 1})
            time.sleep(0.0005)  # a pace, not a synchronisation: the subscriber keeps up, mostly


def _subscriber(path: str, stop: Any) -> None:
    with shmbus.Topic.open(path) as t, t.subscribe() as sub:
        while not stop.is_set():
            with contextlib.suppress(shmbus.Empty):
                sub.get(timeout=0.05)


def _wait_for(cond: Any, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)  # polling the bus's counters


# -- the exporter as a subprocess -----------------------------------------------------------


@contextlib.contextmanager
def _exporter(*args: str) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """``shmbus export ARGS --listen 127.0.0.1:0``: yields its metrics URL and the process."""
    p = subprocess.Popen(
        [sys.executable, "-m", "shmbus", "export", *args, "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert p.stdout is not None
        line = p.stdout.readline()
        m = re.search(r"(http://\S+/metrics)", line)
        assert m, f"exporter said {line!r}; stderr: {p.stderr.read() if p.poll() is not None else ''}"
        yield m[1], p
    finally:
        p.terminate()
        p.wait(10)
        for f in (p.stdout, p.stderr):
            if f is not None:
                f.close()


def _scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=10) as r:
        assert r.status == 200
        return _parse(r.read().decode())


def _damage(path: str) -> None:
    """Change the capacity field of the static block: the header's crc no longer matches."""
    with open(path, "r+b") as f:
        f.seek(16)
        b = f.read(1)
        f.seek(16)
        f.write(bytes([b[0] ^ 0x40]))


@pytest.fixture
def bus_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory of disk buses; every bus left in it is removed with its semaphores."""
    d = tmp_path / "buses"
    d.mkdir()
    yield d
    for f in d.iterdir():
        with contextlib.suppress(shmbus.ShmbusError, OSError):
            shmbus.unlink(str(f))


@pytest.mark.timeout(90)
def test_a_live_exporter_agrees_with_stats_while_processes_run(bus_dir: Path, procs: Procs) -> None:
    qpath, tpath = str(bus_dir / "jobs"), str(bus_dir / "ticks")
    shmbus.Queue.create(qpath, capacity=64 * 1024).close()
    shmbus.Topic.create(tpath, capacity=64 * 1024).close()
    stop = procs.ctx.Event()
    for target, path in ((_producer, qpath), (_consumer, qpath), (_publisher, tpath), (_subscriber, tpath)):
        procs.start(target, path, stop)
    with shmbus.Queue.open(qpath) as q, shmbus.Topic.open(tpath) as t:
        _wait_for(lambda: q.stats().get_count > 0 and len(t.subscribers()) == 1, "the processes to start")
        _wait_for(lambda: t.subscribers()[0]["received"] > 0, "the subscriber to read")
        with _exporter(str(bus_dir)) as (url, p):
            before: Samples = {}
            for _ in range(3):
                s1, sub1, pids1 = q.stats(), t.subscribers()[0], _live.snapshot(qpath).pids
                m = _scrape(url)
                s2, sub2, pids2 = q.stats(), t.subscribers()[0], _live.snapshot(qpath).pids
                jobs = {"bus": qpath, "kind": "queue", "bus_id": s1.bus_id}
                assert s1.put_count <= _one(m, "shmbus_in_messages_total", **jobs) <= s2.put_count
                assert s1.get_count <= _one(m, "shmbus_out_messages_total", **jobs) <= s2.get_count
                assert s1.bytes_in <= _one(m, "shmbus_in_bytes_total", **jobs) <= s2.bytes_in
                assert s1.bytes_out <= _one(m, "shmbus_out_bytes_total", **jobs) <= s2.bytes_out
                assert 0 <= _one(m, "shmbus_fill_messages", **jobs) <= s2.put_count - s1.get_count
                assert 0 <= _one(m, "shmbus_fill_bytes", **jobs) <= s1.capacity
                assert _one(m, "shmbus_capacity_bytes", **jobs) == s1.capacity
                assert _one(m, "shmbus_recoveries_total", **jobs) == s1.recoveries == s2.recoveries
                if pids1 == pids2:
                    assert _one(m, "shmbus_participants", **jobs) == len(pids1)
                assert p.pid not in pids2  # the exporter never joins a bus
                low = _one(m, "shmbus_oldest_message_min_age_seconds", **jobs)
                high = [v for (n, ls), v in m.items()
                        if n == "shmbus_oldest_message_max_age_seconds" and ("bus", qpath) in ls]  # fmt: skip
                assert low >= 0 and all(low <= h for h in high)
                sub = {"bus": tpath, "subscriber": str(sub1["slot"]), "pid": str(sub1["pid"])}
                got = _one(m, "shmbus_subscriber_received_messages_total", **sub)
                assert sub1["received"] <= got <= sub2["received"]
                assert sub1["lost"] <= _one(m, "shmbus_subscriber_lost_messages_total", **sub) <= sub2["lost"]
                assert _one(m, "shmbus_subscriber_lag_messages", **sub) >= 0
                assert _one(m, "shmbus_accelerated") == float(shmbus.accelerated)
                for key, value in before.items():  # counters never go back
                    if key[0].endswith("_total") and key in m:
                        assert m[key] >= value, key
                before = m
    stop.set()
    procs.join_all()


@pytest.mark.timeout(60)
def test_bad_files_and_a_bus_removed_or_recreated_never_break_the_endpoint(bus_dir: Path) -> None:
    damaged, junk, gone = str(bus_dir / "damaged"), bus_dir / "notes.txt", str(bus_dir / "gone")
    shmbus.Queue.create(damaged, capacity=4096).close()
    _damage(damaged)
    junk.write_bytes(b"not a bus\n" * 100)
    q = shmbus.Queue.create(gone, capacity=4096)
    q.put(1)
    first_id = q.stats().bus_id
    q.close()
    with _exporter(str(bus_dir)) as (url, p):
        m = _scrape(url)
        assert _buses(m) == {gone: first_id}  # the damaged bus and the text file are not exported
        assert _one(m, "shmbus_export_skipped_files", reason="corrupt") == 1
        assert _one(m, "shmbus_export_skipped_files", reason="not_a_bus") == 0  # not ours: no error
        shmbus.unlink(gone)
        m = _scrape(url)
        assert _buses(m) == {}
        assert _one(m, "shmbus_export_errors_total", reason="corrupt") == 2
        with shmbus.Queue.create(gone, capacity=4096) as again:
            new_id = again.stats().bus_id
        m = _scrape(url)
        assert _buses(m) == {gone: new_id} and new_id != first_id  # new series, not a counter reset
        assert _one(m, "shmbus_in_messages_total", bus=gone) == 0
        p.terminate()
        p.wait(10)
        assert p.stderr is not None
        log = p.stderr.read()
    assert [line for line in log.splitlines() if "damaged" in line] == [
        f"shmbus export: skipping {damaged} (corrupt): " + _corrupt_message(damaged)
    ]  # once, not at each of the three scrapes
    assert "notes.txt" not in log


def _corrupt_message(path: str) -> str:
    with pytest.raises(shmbus.CorruptBus) as e:
        _live.snapshot(path)
    return str(e.value)


@pytest.mark.timeout(60)
def test_the_textfile_is_written_atomically_and_readable(bus_dir: Path, tmp_path: Path) -> None:
    with shmbus.Queue.create(str(bus_dir / "jobs"), capacity=4096) as q:
        q.put_many([1, 2, 3])
        bus_id = q.stats().bus_id
    out_dir = tmp_path / "textfile"
    out_dir.mkdir()
    out = out_dir / "shmbus.prom"
    r = subprocess.run(
        [sys.executable, "-m", "shmbus", "export", str(bus_dir), "--textfile", str(out), "--once"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert os.listdir(out_dir) == ["shmbus.prom"]  # no temporary file left
    assert stat.S_IMODE(out.stat().st_mode) == 0o644  # node_exporter runs as another user
    m = _parse(out.read_text())
    assert _one(m, "shmbus_fill_messages", bus=str(bus_dir / "jobs"), bus_id=bus_id) == 3


@pytest.mark.timeout(60)
def test_a_textfile_error_names_the_file_not_the_temporary_one(tmp_path: Path) -> None:
    target = tmp_path / "no-such-dir" / "shmbus.prom"
    r = subprocess.run(
        [sys.executable, "-m", "shmbus", "export", str(tmp_path), "--textfile", str(target), "--once"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and str(target) in r.stderr, r.stderr
    assert ".tmp" not in r.stderr and ".shmbus.prom." not in r.stderr


# -- in process ------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_named_files_that_are_not_buses_are_counted_by_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    junk = tmp_path / "junk"
    junk.write_bytes(b"\0" * 8192)
    registry = metrics.new_registry([str(junk), str(tmp_path / "missing")])
    m = _parse(metrics.text(registry))
    assert _one(m, "shmbus_export_skipped_files", reason="not_a_bus") == 1
    assert _one(m, "shmbus_export_skipped_files", reason="missing") == 1
    assert _buses(m) == {}

    def denied(path: str) -> Any:
        raise PermissionError(13, "permission denied", path)

    monkeypatch.setattr(_live, "snapshot", denied)  # (as root, no mode keeps us out)
    m = _parse(metrics.text(registry))
    assert _one(m, "shmbus_export_skipped_files", reason="permission") == 2
    assert _one(m, "shmbus_export_errors_total", reason="not_a_bus") == 1
    assert _one(m, "shmbus_export_errors_total", reason="permission") == 2


@pytest.mark.timeout(30)
def test_a_bus_of_another_version_is_skipped_as_incompatible(disk_path: str) -> None:
    shmbus.Queue.create(disk_path, capacity=4096).close()
    with open(disk_path, "r+b") as f:
        f.seek(8)
        f.write((99).to_bytes(4, "little"))
    m = _parse(metrics.text(metrics.new_registry([disk_path])))
    assert _one(m, "shmbus_export_skipped_files", reason="incompatible") == 1


@pytest.mark.timeout(30)
def test_counters_hold_their_highest_value_when_a_repair_takes_one_back(disk_path: str) -> None:
    with shmbus.Queue.create(disk_path, capacity=4096) as q:
        q.put_many([1, 2, 3])
    registry = metrics.new_registry([disk_path])
    assert _one(_parse(metrics.text(registry)), "shmbus_in_messages_total") == 3
    with open(disk_path, "r+b") as f:  # as the repair of a put cut short may do
        f.seek(Q_NEXT_SEQ * 8)
        f.write((2).to_bytes(8, "little"))
    assert shmbus.Queue.open(disk_path).stats().put_count == 2
    assert _one(_parse(metrics.text(registry)), "shmbus_in_messages_total") == 3


@pytest.mark.timeout(30)
def test_help_shows_the_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["export", "--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # (argparse wraps lines at the terminal's width)
    assert "(default: 127.0.0.1:9464)" in out and "(default: 15.0)" in out and "every bus in /dev/shm" in out
    assert f"{metrics.DEFAULT_ADDR}:{metrics.DEFAULT_PORT}" == _export.DEFAULT_LISTEN


@pytest.mark.timeout(30)
def test_import_shmbus_does_not_load_prometheus_client() -> None:
    code = "import sys, shmbus, shmbus._cli; print('prometheus_client' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert r.stdout.strip() == "False", r.stderr


def _exported_names() -> set[str]:
    return {
        f.name + ("_total" if f.type == "counter" else "")
        for f in metrics.ShmbusCollector().describe()
    }


@pytest.mark.timeout(30)
def test_the_grafana_dashboard_uses_only_exported_metrics() -> None:
    dash = json.loads((ROOT / "docs" / "grafana-shmbus.json").read_text())
    exprs: list[str] = []

    def walk(x: Any) -> None:
        if isinstance(x, dict):
            exprs.extend(v for k, v in x.items() if k == "expr" and isinstance(v, str))
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    walk(dash["panels"])
    used = {n for e in exprs for n in re.findall(r"\bshmbus_[a-z_]+", e)}
    assert used, "no panel queries a shmbus metric"
    assert used <= _exported_names(), used - _exported_names()
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for word in ("throughput", "fill", "lag", "recoveries"):
        assert word in titles


@pytest.mark.timeout(30)
def test_the_metrics_page_describes_every_metric() -> None:
    page = (ROOT / "docs" / "metrics.md").read_text()
    missing = sorted(n for n in _exported_names() if f"`{n}`" not in page)
    assert not missing


@pytest.mark.timeout(30)
def test_without_the_extra_export_says_what_to_install() -> None:
    code = (
        "import sys; sys.modules['prometheus_client'] = None\n"  # (as if not installed)
        "from shmbus._cli import main; sys.exit(main(['export', '--once']))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "pip install 'shmbus[metrics]'" in r.stderr, r.stderr


@pytest.mark.timeout(30)
def test_without_the_extra_importing_shmbus_metrics_says_what_to_install() -> None:
    code = (
        "import sys; sys.modules['prometheus_client'] = None\n"  # (as if not installed)
        "import shmbus\n"  # the core needs no extra
        "try:\n    import shmbus.metrics\n"
        "except ModuleNotFoundError as e:\n    print(e.name, '|', e)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    name, said = r.stdout.strip().split(" | ")
    assert name == "prometheus_client"
    assert said.startswith("shmbus.metrics needs prometheus-client (")
    assert said.endswith("pip install 'shmbus[metrics]'")


@pytest.mark.timeout(30)
def test_a_skipped_file_is_logged_in_plain_words(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    missing, private = str(tmp_path / "missing"), str(tmp_path / "private")
    metrics.text(metrics.new_registry([missing]))
    real_snapshot = _live.snapshot

    def denied(path: str) -> Any:
        if path == private:  # (as root, no mode keeps us out)
            raise PermissionError(13, f"permission denied opening bus {path}: ask its owner", path)
        return real_snapshot(path)

    monkeypatch.setattr(_live, "snapshot", denied)
    metrics.text(metrics.new_registry([private]))
    assert [r.getMessage() for r in caplog.records] == [
        f"shmbus export: skipping {missing} (missing): no bus at {missing}",  # no advice to create it
        f"shmbus export: skipping {private} (permission): "
        f"permission denied opening bus {private}: ask its owner",
    ]
