"""Running bridges seen from outside: ``shmbus info``/``stats``/``gc`` and the status files, TLS, NKeys.

Real processes only: ``nats-server`` from the fixtures, bridges as ``python -m
shmbus bridge``, ``shmbus info`` as a command. Waits poll an observable state
(what ``info --json`` says, a process exiting), each with a deadline.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest

import shmbus
import shmbus.bridge
from shmbus import _bridge_status

pytestmark = pytest.mark.timeout(120)

nats = pytest.importorskip("nats")  # the test extra installs it: CI never skips
REPO = str(Path(__file__).resolve().parent.parent)
WAIT = 60.0  # seconds for a state to show: far above a healthy run on a loaded machine


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _bridge(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "shmbus", "bridge", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
    )  # fmt: skip


def _stop(proc: subprocess.Popen[str], sig: int = signal.SIGTERM) -> tuple[int, str, str]:
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        out, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return proc.returncode, out, err


def _run(*args: str, timeout: float = 60.0) -> tuple[int, str, str]:
    """``python -m shmbus ARGS``: exit code, stdout, stderr."""
    p = subprocess.run([sys.executable, "-m", "shmbus", *args], capture_output=True, text=True,
                       env=_env(), timeout=timeout)  # fmt: skip
    return p.returncode, p.stdout, p.stderr


def _info(bus: Path) -> dict[str, Any]:
    rc, out, err = _run("info", str(bus), "--json")
    assert rc == 0, err
    return json.loads(out)  # type: ignore[no-any-return]


def _until(what: str, fn: Callable[[], Any], procs: list[subprocess.Popen[str]]) -> Any:
    """Poll ``fn`` (an observable) until it returns something true; fail after ``WAIT`` or on an exit."""
    deadline = time.monotonic() + WAIT
    while True:
        got = fn()
        if got:
            return got
        for p in procs:
            assert p.poll() is None, f"a bridge exited ({p.returncode}) waiting for {what}: {p.stderr.read()}"  # type: ignore[union-attr]
        assert time.monotonic() < deadline, f"no {what} in {WAIT} s"
        time.sleep(0.05)  # a poll of what `shmbus info` reports


def _add_stream(url: str, name: str, subject: str) -> None:
    async def go() -> None:
        nc = await nats.connect(url)
        try:
            await nc.jetstream().add_stream(name=name, subjects=[subject], duplicate_window=120.0)
        finally:
            await nc.close()

    asyncio.run(asyncio.wait_for(go(), 30))


def _route(info: dict[str, Any], direction: str) -> dict[str, Any] | None:
    return next((r for r in info["bridges"] if r["direction"] == direction), None)


# -- status files: shmbus info / stats / gc ----------------------------------------------------


def test_info_and_stats_show_the_routes_on_a_bus_and_their_lag(nats_server: Any, tmp_path: Path) -> None:
    a, b = tmp_path / "a.bus", tmp_path / "b.bus"
    qa = shmbus.Queue.create(str(a), capacity="64KiB")
    qb = shmbus.Queue.create(str(b), capacity="64KiB", maxsize=2)  # fills: the rest waits in the stream
    procs: list[subprocess.Popen[str]] = []
    try:
        _add_stream(nats_server.url, "OPS", "ops.jobs")
        assert _info(a)["bridges"] == []
        qa.put_many([{"i": i} for i in range(5)])
        out = _bridge("queue-to-stream", str(a), "--subject", "ops.jobs", "--server", nats_server.url)
        into = _bridge("stream-to-queue", str(b), "--subject", "ops.jobs", "--server", nats_server.url,
                       "--max-batch", "1")  # fmt: skip
        procs = [out, into]
        row = _until("queue-to-stream moved 5", lambda: (r := _route(_info(a), "queue-to-stream"))
                     and r["moved"] == 5 and r, procs)  # fmt: skip
        assert row["pid"] == out.pid and row["subject"] == "ops.jobs" and row["stream"] == "OPS"
        assert row["lag"] == 0 and row["state"] == "running"
        # Queue B holds 2: the bridge holds a third fetched message; the consumer has the rest pending.
        row = _until("a full queue and messages pending", lambda: (r := _route(_info(b), "stream-to-queue"))
                     and r["moved"] == 2 and r["lag"] > 0 and r, procs)  # fmt: skip
        assert row["pid"] == into.pid and row["lag"] <= 3
        rc, text, err = _run("info", str(b))
        assert rc == 0, err
        assert f"stream-to-queue <- ops.jobs (stream OPS)  pid {into.pid}" in text, text
        rc, text, err = _run("stats", str(b), "--count", "1")
        assert rc == 0 and f"pid {into.pid}" in text and "stream-to-queue" in text, text + err
        assert [qb.get(timeout=WAIT) for _ in range(5)] == [{"i": i} for i in range(5)]
        _until("no lag left", lambda: (r := _route(_info(b), "stream-to-queue"))
               and r["moved"] == 5 and r["lag"] == 0, procs)  # fmt: skip
        # A clean stop removes the file; a killed bridge's is ignored, and `shmbus gc` removes it.
        assert _stop(out)[0] == 0
        assert _info(a)["bridges"] == []
        status_dir = Path(os.environ["SHMBUS_BRIDGE_STATUS_DIR"])
        assert [p.name.split("-")[0] for p in status_dir.glob("*.json")] == [str(into.pid)]
        _stop(into, signal.SIGKILL)
        assert _info(b)["bridges"] == []
        rc, text, _err = _run("gc", "--dry-run")
        assert f"would remove {status_dir}/{into.pid}-0.json" in text, text
        # (Not `shmbus gc` itself here: it would remove other test sessions' semaphores too.)
        assert _bridge_status.remove_stale() == [f"{status_dir}/{into.pid}-0.json"]
        assert not list(status_dir.glob("*.json"))
    finally:
        for p in procs:
            _stop(p, signal.SIGKILL)
        for q in (qa, qb):
            q.unlink()
            q.close()


def test_topic_to_stream_lag_is_how_far_behind_the_newest(nats_server: Any, tmp_path: Path) -> None:
    path = tmp_path / "t.bus"
    t = shmbus.Topic.create(str(path), capacity="1MiB")
    try:
        _add_stream(nats_server.url, "TICKS", "ops.ticks")
        proc = _bridge("topic-to-stream", str(path), "--subject", "ops.ticks", "--server", nats_server.url)
        try:
            _until("a running route", lambda: (r := _route(_info(path), "topic-to-stream"))
                   and r["state"] == "running", [proc])  # fmt: skip
            t.publish_many([{"i": i} for i in range(100)])
            row = _until("100 moved", lambda: (r := _route(_info(path), "topic-to-stream"))
                         and r["moved"] == 100 and r, [proc])  # fmt: skip
            assert row["lag"] == 0 and row["missed"] == 0
        finally:
            rc, _out, err = _stop(proc)
        assert rc == 0, err
    finally:
        t.unlink()
        t.close()


def test_info_shows_a_route_reconnecting_while_the_server_is_away(nats_server: Any, tmp_path: Path) -> None:
    path = tmp_path / "q.bus"
    q = shmbus.Queue.create(str(path), capacity="64KiB")
    try:
        _add_stream(nats_server.url, "AWAY", "ops.away")
        proc = _bridge("queue-to-stream", str(path), "--subject", "ops.away", "--server", nats_server.url)
        try:
            def state() -> str | None:
                r = _route(_info(path), "queue-to-stream")
                return r["state"] if r else None

            _until("a running route", lambda: state() == "running", [proc])
            nats_server.stop()
            _until("a reconnecting route", lambda: state() == "reconnecting", [proc])
            q.put({"while": "away"})
            nats_server.start()
            _until("the message moved after the reconnect",
                   lambda: state() == "running" and _route(_info(path), "queue-to-stream")["moved"] == 1,  # type: ignore[index]
                   [proc])  # fmt: skip
        finally:
            rc, _out, err = _stop(proc)
        assert rc == 0, err
    finally:
        q.unlink()
        q.close()


# -- TLS (a server certificate, a client certificate) and NKeys against real servers -------------


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _leaf(d: Path, name: str, ca: str) -> None:
    """``name``.pem and ``name``.key: a certificate for 127.0.0.1 signed by ``ca``."""
    ext = d / f"{name}.ext"
    ext.write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n"
        "keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth,clientAuth\n"
        "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n"
    )
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout",
             f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)  # fmt: skip
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", ext.name, cwd=d)  # fmt: skip


def _ca(d: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign",
             cwd=d)  # fmt: skip


@pytest.fixture
def certs(tmp_path: Path) -> Path:
    """A throwaway CA with a server and a client certificate, and an unrelated CA (``other``)."""
    d = tmp_path / "certs"
    d.mkdir()
    _ca(d, "ca")
    _ca(d, "other")
    _leaf(d, "server", "ca")
    _leaf(d, "client", "ca")
    return d


def _tls_conf(d: Path) -> str:
    """A server that wants TLS and a client certificate signed by the CA (verify mode)."""
    return (f'tls {{\n  cert_file: "{d}/server.pem"\n  key_file: "{d}/server.key"\n'
            f'  ca_file: "{d}/ca.pem"\n  verify: true\n  timeout: 5\n}}\n')  # fmt: skip


def _moves_one(bus: Path, *conn: str) -> tuple[int, str, str]:
    """A queue-to-stream bridge with ``conn`` moves one message to the stream; its exit and output."""
    q = shmbus.Queue.create(str(bus), capacity="64KiB")
    try:
        q.put({"secret": "no"})
        proc = _bridge("queue-to-stream", str(bus), "--subject", "sec.out", "--create-stream", *conn)
        deadline = time.monotonic() + WAIT
        while q.qsize():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the message did not leave in time"
            time.sleep(0.02)  # polls the queue's state (an observable), with a deadline
        return _stop(proc)
    finally:
        q.unlink()
        q.close()


def test_tls_with_a_client_certificate_moves_messages(
    nats_server_factory: Any, certs: Path, tmp_path: Path
) -> None:
    server = nats_server_factory(extra_conf=_tls_conf(certs))
    url = f"tls://127.0.0.1:{server.port}"
    tls = ("--tls-ca", f"{certs}/ca.pem", "--tls-cert", f"{certs}/client.pem",
           "--tls-key", f"{certs}/client.key")  # fmt: skip
    rc, out, err = _moves_one(tmp_path / "q.bus", "--server", url, *tls)
    assert rc == 0, err
    assert "moved=1" in out, out


def test_tls_with_the_wrong_ca_or_no_client_certificate_fails_in_one_line(
    nats_server_factory: Any, certs: Path, tmp_path: Path
) -> None:
    server = nats_server_factory(extra_conf=_tls_conf(certs))
    url = f"tls://127.0.0.1:{server.port}"
    q = shmbus.Queue.create(str(tmp_path / "q.bus"), capacity="64KiB")
    try:
        base = ("queue-to-stream", str(tmp_path / "q.bus"), "--subject", "sec.out", "--server", url,
                "--connect-timeout", "3")  # fmt: skip
        wrong_ca = _run("bridge", *base, "--tls-ca", f"{certs}/other.pem", "--tls-cert",
                        f"{certs}/client.pem", "--tls-key", f"{certs}/client.key")  # fmt: skip
        no_cert = _run("bridge", *base, "--tls-ca", f"{certs}/ca.pem")
    finally:
        q.unlink()
        q.close()
    for (rc, _out, err), why in ((wrong_ca, "is not trusted"), (no_cert, "check --tls-cert")):
        assert rc == shmbus.bridge.EXIT_TLS, err
        assert err.count("\n") == 1 and err.startswith("shmbus bridge: "), err
        assert why in err, err


def test_nkey_login_moves_messages_and_never_shows_the_seed(nats_server_factory: Any, tmp_path: Path) -> None:
    nkeys = pytest.importorskip("nkeys")  # the test extra installs it: CI never skips
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    public = nkeys.from_seed(bytearray(seed)).public_key.decode()
    conf = f"accounts {{\n  APP {{\n    jetstream: enabled\n    users: [ {{nkey: {public}}} ]\n  }}\n}}\n"
    server = nats_server_factory(extra_conf=conf)
    seed_file = tmp_path / "user.nk"
    seed_file.write_bytes(seed + b"\n")
    rc, out, err = _moves_one(tmp_path / "q.bus", "--server", server.url, "--nkey", str(seed_file))
    assert rc == 0, err
    assert "moved=1" in out, out
    assert seed.decode() not in out + err
    # The wrong seed: refused, in one line, without the seed.
    other = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    seed_file.write_bytes(other + b"\n")
    q = shmbus.Queue.create(str(tmp_path / "r.bus"), capacity="64KiB")
    try:
        rc, out, err = _run("bridge", "queue-to-stream", str(tmp_path / "r.bus"), "--subject", "sec.out",
                            "--server", server.url, "--nkey", str(seed_file))  # fmt: skip
    finally:
        q.unlink()
        q.close()
    assert rc == shmbus.bridge.EXIT_AUTH and err.count("\n") == 1, err
    assert other.decode() not in out + err and seed.decode() not in out + err


def test_a_password_never_appears_in_output(nats_auth_server: Any, tmp_path: Path) -> None:
    users = nats_auth_server.users
    pw = tmp_path / "pw"
    pw.write_text(users.password + "\n")
    rc, out, err = _moves_one(tmp_path / "q.bus", "--server", nats_auth_server.url, "--user", users.user,
                              "--password-file", str(pw), "--json")  # fmt: skip
    assert rc == 0, err
    assert users.password not in out + err
    rc, out, err = _run("bridge", "--help")
    assert users.password not in out


def test_the_guarantees_table_of_bridge_md_is_the_one_of_guarantees_md() -> None:
    def table(page: str) -> str:
        text = (Path(REPO) / "docs" / page).read_text()
        start = text.index("| Route | Lost | Duplicated |")
        return text[start : text.index("\n\n", start)]

    assert table("bridge.md") == table("guarantees.md")
