"""The command line, through ``main(argv)`` and through a real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

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
    assert "cannot read size" in capsys.readouterr().err


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
