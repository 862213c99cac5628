"""The command line, through ``main(argv)`` and through a real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import packable_depth

import shmbus
from shmbus._cli import main, to_json

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_create_info_rm_round_trip(bus_name: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["create", bus_name, "--capacity", "1MiB", "--maxsize", "5"]) == 0
    with shmbus.Queue.open(bus_name) as q:
        q.put_many([1, 2, 3])
    capsys.readouterr()
    assert main(["info", bus_name, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["kind"], info["capacity"], info["maxsize"], info["messages"]) == ("Queue", 1 << 20, 5, 3)
    assert main(["info", bus_name]) == 0
    assert "messages        3" in capsys.readouterr().out
    assert main(["rm", bus_name]) == 0
    with pytest.raises(shmbus.BusNotFound):
        shmbus.Queue.open(bus_name)


def test_errors_are_one_line_with_exit_code_1(bus_name: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", bus_name]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and bus_name in err and "Traceback" not in err


def test_bad_usage_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["create", "x", "--capacity", "lots"])
    assert e.value.code == 2
    assert "argument --capacity: expected a size" in capsys.readouterr().err


def test_topic_create_info_and_tail(bus_name: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["create", bus_name, "--topic", "--capacity", "64KiB"]) == 0
    with shmbus.Topic.open(bus_name) as t:
        t.publish_many([{"a": b"\x00\xff"}, "hi", [1, 2.5, None]])
    capsys.readouterr()
    assert main(["info", bus_name, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["kind"], info["put_count"], info["oldest_seq"], info["newest_seq"]) == ("Topic", 3, 0, 2)
    assert main(["tail", bus_name, "--from", "earliest", "--count", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line) for line in lines] == [{"a": {"$bytes": "AP8="}}, "hi", [1, 2.5, None]]


def test_last_prints_the_newest_message_or_fails_on_an_empty_topic(
    bus_name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["create", bus_name, "--topic", "--capacity", "64KiB"]) == 0
    capsys.readouterr()
    assert main(["last", bus_name]) == 1
    assert "holds no message" in capsys.readouterr().err
    with shmbus.Topic.open(bus_name) as t:
        t.publish_many([{"a": 1}, {"b": b"\x00"}])
        assert t.subscribers() == []
    assert main(["last", bus_name]) == 0
    assert json.loads(capsys.readouterr().out) == {"b": {"$bytes": "AA=="}}


def test_to_json_is_reversible_for_bytes() -> None:
    assert to_json({"k": [b"ab", {"n": b""}]}) == {"k": [{"$bytes": "YWI="}, {"n": {"$bytes": ""}}]}


def test_info_through_a_real_subprocess(bus_name: str) -> None:
    with shmbus.Queue.create(bus_name, capacity="64KiB") as q:
        q.put("x")
    out = subprocess.run(
        [sys.executable, "-m", "shmbus", "info", bus_name, "--json"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert json.loads(out.stdout)["messages"] == 1
    missing = subprocess.run(
        [sys.executable, "-m", "shmbus", "info", bus_name + "-nope"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode == 1 and "no bus at" in missing.stderr


def test_examples_pipeline_runs() -> None:
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / "pipeline.py"), "--jobs", "5000", "--workers", "2"],
        capture_output=True, text=True, timeout=100, check=True,
    )  # fmt: skip
    assert "every job back exactly once" in out.stdout


# -- send, recv, stats -------------------------------------------------------------

import argparse  # noqa: E402
import base64  # noqa: E402
import io  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import pickle  # noqa: E402
import signal  # noqa: E402
import time  # noqa: E402
from subprocess import PIPE  # noqa: E402
from typing import Any  # noqa: E402

import msgpack  # noqa: E402

from shmbus import _live  # noqa: E402
from shmbus._cli import _parser, from_json  # noqa: E402
from shmbus._format import Q_RECOVERIES, Q_TIME_SAMPLES, SAMPLE_WRITING, TIME_SAMPLES  # noqa: E402
from shmbus._stats import oldest_age, record_time  # noqa: E402

# JSON values that must come out of `send | recv` as the very same text.
ROUND_TRIP = [
    {"nested": {"list": [1, [2, [3, {}]], []], "empty": {}}, "z": None, "": "empty key"},
    "unicode: \u00e9 \u00fc \u6f22\u5b57 \U0001f389 \u0000 \n \t \"quoted\" \\ /",
    0, -1, 2**63 - 1, -(2**63), 2**64 - 1,
    1.5, -0.0, 1e300, 5e-324, 0.1, 1.0,
    True, False, None, [], {}, "",
    {"$bytes": "AP8="}, {"data": {"$bytes": ""}}, [{"$bytes": base64.b64encode(bytes(range(256))).decode()}],
    {"$float": "nan"}, {"$float": "-inf"}, {"x": {"$float": "inf"}},
    {"$dict": {"$bytes": "not base64 at all"}}, {"$bytes": "AP8=", "other": 1},
]  # fmt: skip


def _stdin(monkeypatch: pytest.MonkeyPatch, data: bytes) -> None:
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(data)))


def _lines(out: str) -> list[Any]:
    return [json.loads(line) for line in out.splitlines()]


def test_to_json_and_from_json_invert_each_other() -> None:
    msgs = [b"\x00\xff", {"k": [b"", 1.5, None]}, {"$bytes": "AP8="}, {"$dict": 1}, {"$float": b""}, "$x"]
    for m in msgs:
        assert from_json(json.loads(json.dumps(to_json(m)))) == m
    nan = from_json(to_json(math.nan))
    assert math.isnan(nan) and from_json(to_json(-math.inf)) == -math.inf
    for j in ROUND_TRIP:
        assert to_json(from_json(j)) == j
    # One-way renderings, documented: non-str keys become their JSON text, tuples lists.
    assert to_json({1: (b"a", 2)}) == {"1": [{"$bytes": "YQ=="}, 2]}
    assert to_json([msgpack.Timestamp(1, 0)]) == [{"$repr": "Timestamp(seconds=1, nanoseconds=0)"}]
    for bad in ({"$bytes": 5}, {"$bytes": "AP8"}, {"$bytes": "AP9="}, {"$float": "1.5"}, {"$dict": {"a": 1}}):
        with pytest.raises(ValueError):
            from_json(bad)


def test_send_arguments_and_stdin_then_recv(
    bus_name: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    with shmbus.Queue.create(bus_name, capacity="64KiB") as q:
        assert main(["send", bus_name, '{"task": 1}', "[1, 2.5]", '{"$bytes": "AP8="}', "-3"]) == 0
        _stdin(monkeypatch, b'"from stdin"\n\n   \n{"n": null}\n{"$float": "nan"}')  # no final newline
        assert main(["send", bus_name]) == 0
        assert q.qsize() == 7
        assert q.get_many(4) == [{"task": 1}, [1, 2.5], b"\x00\xff", -3]
        capsys.readouterr()
        assert main(["recv", bus_name, "--count", "2"]) == 0
        assert _lines(capsys.readouterr().out) == ["from stdin", {"n": None}]
        assert main(["recv", bus_name, "--timeout", "0"]) == 0  # drains the rest, then stops
        assert _lines(capsys.readouterr().out) == [{"$float": "nan"}]
        assert main(["recv", bus_name, "--timeout", "0"]) == 0 and capsys.readouterr().out == ""


def test_send_stops_at_a_bad_line_after_sending_the_ones_before(
    bus_name: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    with shmbus.Queue.create(bus_name, capacity="64KiB") as q:
        _stdin(monkeypatch, b'1\n\n"two"\n{oops\n4\n')
        assert main(["send", bus_name]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err
        assert q.path in err and "line 4 is not JSON" in err and "the 2 message(s) before it were sent" in err
        assert q.get_many(10, block=False) == [1, "two"]
        # Arguments are all checked first: nothing is sent.
        assert main(["send", bus_name, "1", '{"$bytes": "??"}']) == 1
        assert "argument 2 is not a message" in capsys.readouterr().err and q.qsize() == 0
        _stdin(monkeypatch, b"1\n\xff\n")
        assert main(["send", bus_name]) == 1 and "line 2 is not UTF-8" in capsys.readouterr().err
        assert main(["send", bus_name, str(2**64)]) == 1  # msgpack has no such int
        assert "argument 1 could not be sent" in capsys.readouterr().err
        q.get_many(10, block=False)


def test_send_raw_and_to_a_topic(
    bus_name: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    with shmbus.Queue.create(bus_name, capacity="64KiB") as q:
        _stdin(monkeypatch, b"not json\n\n\xff\xfe raw\n")
        assert main(["send", bus_name, "--raw"]) == 0
        assert [q.get_bytes() for _ in range(3)] == [b"not json", b"", b"\xff\xfe raw"]
        q.unlink()
    with shmbus.Topic.create(bus_name, capacity="64KiB") as t, t.subscribe() as sub:
        assert main(["send", bus_name, '{"a": [1]}', '"b"']) == 0
        assert main(["send", "--raw", bus_name, "c"]) == 0
        assert sub.get_many(10, block=False) == [{"a": [1]}, "b", b"c"]
        assert main(["recv", bus_name]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "is a Topic" in err and f"shmbus tail {bus_name}" in err


@pytest.mark.parametrize(
    "argv",
    [
        ["recv", "x", "--count", "0"], ["recv", "x", "--timeout", "-1"], ["recv", "x", "--timeout", "nan"],
        ["stats", "x", "--interval", "soon"], ["stats", "x", "--count", "many"],
    ],
)  # fmt: skip
def test_bad_values_of_the_new_commands_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and "Traceback" not in capsys.readouterr().err


def test_missing_bus_is_one_line_exit_1(bus_name: str, capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["send", bus_name, "1"], ["recv", bus_name], ["stats", bus_name, "--count", "1"]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and bus_name in err and "no bus at" in err


def test_every_command_help_has_an_example(capsys: pytest.CaptureFixture[str]) -> None:
    (commands,) = [a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction)]
    assert {"send", "recv", "stats"} <= set(commands.choices)
    for cmd in set(commands.choices) - {"bench"}:  # bench passes --help on to its own parser
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        assert f"shmbus {cmd} " in capsys.readouterr().out.split("example")[1]


def _shmbus(*args: str) -> list[str]:
    # SIGINT back to Python's handler: a test run in the background inherits it ignored.
    code = (
        "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "from shmbus._cli import main; sys.exit(main(sys.argv[1:]))"
    )
    return [sys.executable, "-c", code, *args]


def test_producer_piped_into_send_and_recv_round_trip_json_exactly(bus_name: str) -> None:
    lines = [json.dumps(v) for v in ROUND_TRIP]
    with shmbus.Queue.create(bus_name, capacity="256KiB") as q:
        recv = subprocess.Popen(
            _shmbus("recv", bus_name, "--count", str(len(lines))),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        producer = subprocess.Popen(
            [sys.executable, "-c", "import sys; sys.stdout.write(sys.stdin.read())"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        )  # fmt: skip
        send = subprocess.Popen(_shmbus("send", bus_name), stdin=producer.stdout, stderr=subprocess.PIPE)
        assert producer.stdout is not None
        producer.stdout.close()  # send holds the read end now
        try:
            producer.communicate(("\n".join(lines) + "\n").encode(), timeout=60)
            _, send_err = send.communicate(timeout=60)
            out, err = recv.communicate(timeout=60)
        finally:
            for p in (producer, send, recv):
                p.kill()
                p.wait()
        assert (producer.returncode, send.returncode, send_err) == (0, 0, b"")
        assert (recv.returncode, err) == (0, "")
        assert out.splitlines() == lines
        assert q.qsize() == 0


def test_send_sends_each_line_as_it_arrives(bus_name: str) -> None:
    argv = _shmbus("send", bus_name)
    with shmbus.Queue.create(bus_name, capacity="64KiB") as q, subprocess.Popen(argv, stdin=PIPE) as send:
        try:
            assert send.stdin is not None
            for i in range(3):  # the next line is written only once the last one is in the queue
                send.stdin.write(b'{"i": %d}\n' % i)
                send.stdin.flush()
                assert q.get(timeout=30) == {"i": i}
            send.stdin.close()
            assert send.wait(timeout=60) == 0
        finally:
            send.kill()


def test_recv_ctrl_c_exits_130_and_loses_no_message(bus_name: str) -> None:
    with shmbus.Queue.create(bus_name, capacity="1MiB") as q:
        q.put_many(range(3000))
        p = subprocess.Popen(_shmbus("recv", bus_name), stdout=PIPE, stderr=PIPE, text=True)
        try:
            assert p.stdout is not None
            first = p.stdout.readline()  # it is running, and taking messages
            p.send_signal(signal.SIGINT)
            out = first + p.stdout.read()  # not communicate(): it would skip what readline buffered
            assert p.stderr is not None
            err = p.stderr.read()
            p.wait(timeout=60)
        finally:
            p.kill()
            p.wait()
            for f in (p.stdout, p.stderr):
                if f is not None:
                    f.close()
        printed = [json.loads(line) for line in out.splitlines()]
        assert (p.returncode, err) == (130, "")
        assert printed == list(range(len(printed)))
        assert q.get_many(3000, block=False) == list(range(len(printed), 3000))  # the others are all there


def test_recv_puts_the_message_in_hand_back_when_its_output_closes(bus_name: str) -> None:
    with shmbus.Queue.create(bus_name, capacity="64KiB") as q:
        q.put("first")
        with subprocess.Popen(_shmbus("recv", bus_name), stdout=PIPE, stderr=PIPE, text=True) as p:
            try:
                assert p.stdout is not None and p.stderr is not None
                assert json.loads(p.stdout.readline()) == "first"
                p.stdout.close()
                q.put("second")  # recv takes it, cannot print it
                assert p.wait(timeout=60) == 1
                err = p.stderr.read()
            finally:
                p.kill()
        assert err.count("\n") == 1 and "output closed" in err and "went back" in err and q.path in err
        assert q.get(timeout=10) == "second"


class _Traffic:
    """Stands in for the wait between two refreshes of `shmbus stats`: known traffic, known time."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, between: Any, seconds: float = 2.0) -> None:
        self.now = 1000.0
        self.between, self.seconds = between, seconds
        monkeypatch.setattr(_live, "_clock", lambda: self.now)
        monkeypatch.setattr(_live, "_sleep", self.sleep)

    def sleep(self, interval: float) -> None:
        self.between()
        self.now += self.seconds


def _field(block: str, name: str) -> str:
    (line,) = [ln.strip() for ln in block.splitlines() if ln.strip().startswith(name + " ")]
    return " ".join(line[len(name) :].split())


def test_stats_queue_rates_fill_backlog_and_age(
    bus_name: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    with shmbus.Queue.create(bus_name, capacity="1MiB") as q:
        q.put_bytes(b"x" * 1000)

        def between() -> None:
            for _ in range(500):
                q.put_bytes(b"x" * 1000)
            q.get_many(200)

        _Traffic(monkeypatch, between)
        assert main(["stats", bus_name, "--count", "2", "--interval", "2"]) == 0
        first, second, rest = capsys.readouterr().out.split("\n\n")
        assert rest == "" and "\x1b[" not in first  # not a terminal: plain blocks, one a refresh
        assert _field(first, "Queue").startswith(q.path)
        assert _field(first, "in") == "- msg/s - MB/s (total 1 messages, 1000 bytes)"
        assert _field(first, "waiting").startswith("1 messages, oldest ")
        assert _field(first, "processes") == "0"  # it has only put: a producer claims no participant slot
        assert _field(second, "processes") == "1: " + str(os.getpid())  # its get claimed one
        assert _field(second, "in") == "250 msg/s 0.25 MB/s (total 501 messages, 501000 bytes)"
        assert _field(second, "out") == "100 msg/s 0.10 MB/s (total 200 messages, 200000 bytes)"
        used = 301 * 1024  # 16-byte record header, 1000 bytes, padding to 16
        assert _field(second, "fill") == f"{used} of {1 << 20} bytes ({used / (1 << 20):.1%})"
        # Messages 0 and 256 carry time samples; the oldest (200) lies between them.
        assert _field(second, "waiting").startswith("301 messages, oldest ")
        assert " to " in _field(second, "waiting")
        q.get_many(301)
        assert main(["stats", bus_name, "--count", "1"]) == 0
        assert _field(capsys.readouterr().out, "waiting") == "0 messages, oldest none"


def test_stats_topic_subscribers(
    bus_name: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    with shmbus.Topic.create(bus_name, capacity="64KiB", max_subscribers=4) as t, t.subscribe() as sub:
        t.publish_many(range(10))

        def between() -> None:
            t.publish_many(range(40))
            sub.get_many(30)

        _Traffic(monkeypatch, between)
        assert main(["stats", bus_name, "--count", "2"]) == 0
        first, second, _ = capsys.readouterr().out.split("\n\n")
        assert _field(first, "subscribers") == "1 of 4"
        assert _field(first, "slot 0") == f"pid {os.getpid()} - msg/s lag 10 lost 0 received 0"
        assert _field(second, "published").startswith("20 msg/s")
        assert _field(second, "slot 0") == f"pid {os.getpid()} 15 msg/s lag 20 lost 0 received 30"
        assert _field(second, "in the ring").startswith("50 messages, oldest ")


def test_stats_and_ls_count_live_processes_only(bus_name: str, capsys: pytest.CaptureFixture[str]) -> None:
    with shmbus.Queue.create(bus_name, capacity="64KiB") as q:
        code = "import sys, shmbus; q = shmbus.Queue.open(sys.argv[1]); q.put(1); q.get(); print(); input()"
        with subprocess.Popen([sys.executable, "-u", "-c", code, bus_name], stdin=PIPE, stdout=PIPE) as child:
            try:
                assert child.stdout is not None
                child.stdout.readline()  # it has got a message: a consumer is a participant (items tokens)
                assert main(["stats", bus_name, "--count", "1"]) == 0
                assert _field(capsys.readouterr().out, "processes") == f"1: {child.pid}"
                assert main(["ls", "--json"]) == 0
                (row,) = [b for b in json.loads(capsys.readouterr().out)["buses"] if b["path"] == q.path]
                assert row["participants"] == 1
            finally:
                child.kill()  # its slot stays marked live, but its OFD lock is gone with it
                child.wait()
        assert main(["stats", bus_name, "--count", "1"]) == 0
        assert _field(capsys.readouterr().out, "processes") == "0"


def test_stats_draws_in_place_on_a_terminal(bus_name: str) -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    with shmbus.Queue.create(bus_name, capacity="64KiB"):
        out = Tty()
        assert _live.run(bus_name, 0.0, 2, out) == 0
    frames = out.getvalue().split("\x1b[H")
    assert frames[0] == "\x1b[2J" and len(frames) == 3  # cleared once, then home before each frame
    assert all(f.endswith("\x1b[J") and "\x1b[K\n" in f for f in frames[1:])


def _samples(h: memoryview) -> dict[int, int]:
    end = Q_TIME_SAMPLES + 2 * TIME_SAMPLES
    return {h[i]: h[i + 1] for i in range(Q_TIME_SAMPLES, end, 2) if h[i + 1]}


def test_time_samples_bound_the_oldest_message_age(bus_name: str) -> None:
    s = 10**9
    with shmbus.Queue.create(bus_name, capacity="1MiB") as q:
        h = q._h64
        assert oldest_age(h, time.time_ns()) is None  # empty
        q.put("first")
        (t0,) = _samples(h).values()
        assert oldest_age(h, t0 + 5 * s) == (5.0, 5.0)  # the oldest message carries the sample: exact
        q.put_many(range(299))  # a batch samples its last multiple of 256
        t256 = _samples(h)[256]
        q.get_many(10)
        assert oldest_age(h, t256 + 2 * s) == (2.0, (t256 + 2 * s - t0) / s)  # a range
        q.get_many(250)
        assert oldest_age(h, t256 + 2 * s) == (None, 2.0)  # past the last sample: at most
        i = next(i for i in range(Q_TIME_SAMPLES, Q_TIME_SAMPLES + 16, 2) if h[i] == 256)
        h[i] = SAMPLE_WRITING  # a sample being written is skipped
        assert oldest_age(h, t256 + 2 * s) == (None, (t256 + 2 * s - t0) / s)
        q.get_many(100)
    with shmbus.Topic.create(bus_name + "-t", capacity="64KiB") as t:
        try:
            t.publish_many(range(257))  # a Topic samples each 256th record
            assert sorted(_samples(t._h64)) == [0, 256]
        finally:
            t.unlink()


def test_sparse_samples_survive_a_deep_backlog() -> None:
    h = memoryview(bytearray(1024)).cast("Q")
    for seq in range(0, 81920 + 1, 256):
        record_time(h, seq)
    seqs = [h[i] for i in range(Q_TIME_SAMPLES, Q_TIME_SAMPLES + 2 * TIME_SAMPLES, 2)]
    # The last four multiples of 256, then the last multiple of 2048, 16384, 131072 and 1048576.
    assert seqs == [81920, 81152, 81408, 81664, 81920, 81920, 0, 0]


def _die_holding_the_head_lock(path: str) -> None:
    import os
    import signal

    q = shmbus.Queue.open(path)
    q._head_lock.acquire(None)
    os.kill(os.getpid(), signal.SIGKILL)


def test_recover_frees_a_dead_holders_lock(bus_name: str, capsys: pytest.CaptureFixture[str]) -> None:
    import multiprocessing as mp

    with shmbus.Queue.create(bus_name, capacity="64KiB") as q:
        p = mp.get_context("fork").Process(target=_die_holding_the_head_lock, args=(q.path,))
        p.start()
        p.join(30)
        assert p.exitcode == -9 and q._head_lock.state() == (0, True, False)  # marked by the kernel
        assert main(["check", bus_name]) == 1
        assert "the head lock was held by a process that died" in capsys.readouterr().out
        assert main(["recover", bus_name]) == 0
        out, err = capsys.readouterr()
        assert f"{bus_name}: 0 dead process(es) found" in out and err == ""  # a producer claims no slot
        assert q._head_lock.state() == (0, False, False) and q._head_lock.mutex.word() == 0
        assert q._h64[Q_RECOVERIES] == 1
        assert main(["check", bus_name]) == 0
        q.put_nowait("flows again")
        assert q.get_nowait() == "flows again"


def _deep(depth: int) -> object:
    x: object = {"leaf": b"\x00"}
    for _ in range(depth):
        x = [x]
    return x


@pytest.mark.parametrize("depth", [600, 1023])
def test_recv_and_tail_print_a_message_too_deep_for_json_in_the_fallback_form(
    bus_name: str, capsys: pytest.CaptureFixture[str], depth: int
) -> None:
    import msgpack

    msg = _deep(min(depth, packable_depth()))  # (older msgpack on 3.9/3.10 packs fewer levels)
    with shmbus.Queue.create(bus_name, capacity="64KiB") as q:
        q.put_many(["before", msg, "after"])
        capsys.readouterr()
        assert main(["recv", bus_name, "--timeout", "0"]) == 0
        lines = capsys.readouterr().out.splitlines()
        q.unlink()
    assert len(lines) == 3 and json.loads(lines[0]) == "before" and json.loads(lines[2]) == "after"
    printed = json.loads(lines[1])
    if packable_depth(margin=0) == 1025:  # JSON renders fewer levels than msgpack packs: the fallback
        assert isinstance(printed, dict) and list(printed) == ["$msgpack"]
    # (older msgpack on 3.9/3.10 packs nothing JSON cannot render: either form, never dropped)
    assert msgpack.packb(from_json(printed)) == msgpack.packb(msg)  # (== itself overflows at this depth)

    assert main(["create", bus_name, "--topic", "--capacity", "64KiB"]) == 0
    with shmbus.Topic.open(bus_name) as t:
        t.publish_many(["before", msg, "after"])
        capsys.readouterr()
        assert main(["tail", bus_name, "--from", "earliest", "--count", "3"]) == 0
        assert capsys.readouterr().out.splitlines() == lines
        t.unlink()


def test_tuple_keys_print_as_their_json_text(bus_name: str, capsys: pytest.CaptureFixture[str]) -> None:
    with shmbus.Queue.create(bus_name, capacity="64KiB") as q:
        q.put({(1, 2): "a"})
        capsys.readouterr()
        assert main(["recv", bus_name, "--count", "1"]) == 0
        assert json.loads(capsys.readouterr().out) == {"[1, 2]": "a"}
        q.unlink()


# -- the command line's own language ---------------------------------------------


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    (commands,) = [a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(commands.choices)


def test_every_command_and_argument_has_help_and_shows_its_default() -> None:
    (commands,) = [a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction)]
    assert all(c.help for c in commands._choices_actions)
    for name, parser in _subparsers().items():
        text = " ".join(parser.format_help().split())
        for a in parser._actions:
            assert a.help, f"shmbus {name} {a.dest}: no help text"
            flag = a.default is False and a.nargs == 0  # a flag's default is its absence
            if not a.option_strings or a.default is None or a.default == argparse.SUPPRESS or flag:
                continue
            shown = {str(a.default), format(a.default, "g") if isinstance(a.default, float) else ""}
            assert any(f"(default: {v})" in text for v in shown if v), f"shmbus {name} {a.option_strings[0]}"


@pytest.mark.parametrize(
    ("argv", "said", "not_said"),
    [
        (["create", "{b}"], "remove it first with `shmbus rm /dev/shm/{b}`, or pass --exist-ok", "exist_ok="),
        (["tail", "{b}", "--count", "1"], "take its messages with `shmbus recv /dev/shm/{b}`", ".open"),
        (["last", "{b}"], "`shmbus recv", "shmbus.Queue"),
        (["rm", "{b}-nope"], "no bus at /dev/shm/{b}-nope; `shmbus ls` lists the buses", "create it first"),
        (["info", "{b}-nope"], "`shmbus ls`", "shmbus.Queue.create"),
        (["ls", "{b}-nope"], "check the path; `shmbus ls` alone lists", "create it first"),
        (["create", "{b}", "--topic", "--exist-ok"], "choose another path, or remove it first", "recv"),
    ],
)  # fmt: skip
def test_errors_give_command_line_advice(
    argv: list[str], said: str, not_said: str, bus_name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with shmbus.Queue.create(bus_name, capacity="64KiB"):
        assert main([a.format(b=bus_name) for a in argv]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and said.format(b=bus_name) in err and not_said not in err


def test_library_errors_keep_their_python_advice(bus_name: str) -> None:
    with shmbus.Queue.create(bus_name, capacity="64KiB"):
        with pytest.raises(shmbus.BusExists, match="pass exist_ok=True") as e:
            shmbus.Queue.create(bus_name)
        assert e.value.fact == f"a file already exists at /dev/shm/{bus_name}"
        with pytest.raises(shmbus.IncompatibleBus, match=r"open it with shmbus\.Queue\.open") as inc:
            shmbus.Topic.open(bus_name)
        assert inc.value.kind == "Queue"
        again = pickle.loads(pickle.dumps(inc.value))
        assert (str(again), again.fact, again.hint, again.kind) == (
            str(inc.value), inc.value.fact, inc.value.hint, "Queue"
        )


def test_create_exist_ok_uses_the_bus_there(bus_name: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["create", bus_name, "--capacity", "64KiB"]) == 0
    assert main(["create", bus_name, "--capacity", "1MiB", "--exist-ok"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"exists: Queue /dev/shm/{bus_name} (65536 bytes)"
    assert main(["create", bus_name, "--topic", "--exist-ok"]) == 1  # the other kind is still an error
    assert "is a shmbus Queue, not a Topic" in capsys.readouterr().err
    assert main(["rm", bus_name]) == 0


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--maxsize", "-1"], "--maxsize"), (["--max-subscribers", "0", "--topic"], "--max-subscribers"),
        (["--max-subscribers", "257", "--topic"], "--max-subscribers"),
        (["--capacity", "1000"], "--capacity"), (["--capacity", "2TiB"], "--capacity"),
    ],
)  # fmt: skip
def test_bad_values_name_the_option(argv: list[str], flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["create", "never-made", *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"argument {flag}: expected" in err
    assert not any(word in err for word in ("maxsize must", "max_subscribers", "pass maxsize"))


def test_options_go_anywhere_and_recv_raw_prints_text(
    bus_name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with shmbus.Queue.create(bus_name, capacity="64KiB") as q:
        assert main(["send", bus_name, "--raw", "caf\u00e9", "two words"]) == 0
        assert main(["send", bus_name, "first", "--raw", "second"]) == 0
        q.put_bytes(b"\xff\x00")
        q.put_bytes(b"two\nlines")
        capsys.readouterr()
        assert main(["recv", bus_name, "--timeout", "0", "--raw"]) == 0
        assert capsys.readouterr().out.splitlines() == [
            "caf\u00e9", "two words", "first", "second",
            '{"$bytes": "/wA="}', '{"$bytes": "dHdvCmxpbmVz"}',
        ]  # fmt: skip


def test_ls_capacity_and_semaphores_match_create_and_dev_shm(
    bus_name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    for argv, capacity in ((["--capacity", "3MiB"], "3MiB"), (["--capacity", "100000", "--topic",
                           "--max-subscribers", "5"], "100KiB")):  # fmt: skip
        assert main(["create", bus_name, *argv]) == 0
        capsys.readouterr()
        assert main(["ls"]) == 0
        out = capsys.readouterr().out.splitlines()
        (row,) = [r.split() for r in out if r.startswith(f"/dev/shm/{bus_name} ")]
        with shmbus.Queue.open(bus_name) if "--topic" not in argv else shmbus.Topic.open(bus_name) as bus:
            bus_id = bus.stats().bus_id
            assert shmbus._format.parse_size(row[4]) == bus.capacity
        sems = [f for f in os.listdir("/dev/shm") if f.startswith(f"sem.shmbus.{bus_id}.")]
        assert (row[4], int(row[8])) == (capacity, len(sems))
        assert len(sems) == (5 if "--topic" in argv else 2)
        assert main(["rm", bus_name]) == 0


def test_no_error_names_a_temporary_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from shmbus._bench._report import write_json

    target = tmp_path / "missing-dir" / "bench.json"
    with pytest.raises(OSError) as e:
        write_json(str(target), {})
    assert str(target) in str(e.value) and ".tmp" not in str(e.value)
    assert main(["create", str(tmp_path / "missing-dir" / "bus")]) == 1
    err = capsys.readouterr().err
    assert "missing-dir/bus" in err and ".tmp" not in err


def test_an_os_error_is_its_sentence_and_path_once(
    bus_name: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from shmbus._advice import cli_os_message

    assert cli_os_message(FileNotFoundError(2, "No such file or directory", "/x")) == (
        "No such file or directory: /x"
    )
    assert cli_os_message(OSError("plain")) == "plain"
    with shmbus.Queue.create(bus_name, capacity="64KiB") as q:
        real_open = os.open

        def denied(path: Any, *args: Any, **kwargs: Any) -> int:
            if path == q.path:  # what another user's private bus answers
                raise PermissionError(13, "Permission denied", path)
            return real_open(path, *args, **kwargs)

        with monkeypatch.context() as m:
            m.setattr(os, "open", denied)
            assert main(["info", bus_name]) == 1
    assert capsys.readouterr().err == (
        f"shmbus info: permission denied opening bus {q.path}: ask its owner to share it "
        "(mode 660 and a group you are in) or run as that user\n"
    )


def test_ls_says_how_many_files_it_may_not_read(
    bus_name: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    with shmbus.Queue.create(bus_name, capacity="64KiB") as q:
        real_access, real_open = os.access, os.open

        def private(path: Any, *args: Any, **kwargs: Any) -> Any:
            if path == q.path:  # another user's private bus (as root, no mode keeps us out)
                raise PermissionError(13, "Permission denied", path)
            return real_open(path, *args, **kwargs)

        with monkeypatch.context() as m:
            m.setattr(os, "access", lambda path, mode: path != q.path and real_access(path, mode))
            m.setattr(os, "open", private)
            assert main(["ls", "--json"]) == 0
            assert main(["ls"]) == 0
    listing, text = capsys.readouterr().out.split("\n", 1)
    found = json.loads(listing)
    assert q.path in found["unreadable_files"] and q.path not in {b["path"] for b in found["buses"]}
    n = len(found["unreadable_files"])
    assert f"{n} file(s) in /dev/shm you may not read, not listed" in text.splitlines()[-1]
    assert q.path not in text


@pytest.mark.timeout(60)
def test_a_reader_that_leaves_early_is_no_error(bus_name: str) -> None:
    """`shmbus info jobs | head -1`: no "Broken pipe" line, no traceback at exit; 141 as for any tool."""
    with shmbus.Queue.create(bus_name, capacity="64KiB") as q:
        p = subprocess.Popen(_shmbus("info", bus_name), stdout=PIPE, stderr=PIPE)
        assert p.stdout is not None
        p.stdout.close()  # the reader is gone before the first line is written
        _, err = p.communicate(timeout=30)
        assert (p.returncode, err) == (141, b"")
        q.unlink()


def test_a_stray_argument_is_reported_under_its_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["doctor", "extra"])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert err.startswith("usage: shmbus doctor")
    assert "shmbus doctor: error: unrecognized arguments: extra" in err
