"""JSON lines in and out of a bus: ``shmbus send``, ``shmbus recv``, and how a message reads as JSON.

Rule: this module owns the JSON rendering of messages, and keeps it
reversible. JSON has no bytes and no NaN or infinity, so tagged objects
stand for them, in both directions:

* ``{"$bytes": "<base64>"}`` is ``bytes`` (standard, padded base64);
* ``{"$float": "nan"}``, ``"inf"`` or ``"-inf"`` is that float;
* ``{"$msgpack": "<base64>"}`` is the message encoded with msgpack: what
  ``dumps`` prints for a message it cannot render as JSON (nested too
  deep for the JSON encoder), so that it is printed, never dropped;
* ``{"$dict": {...}}`` is a dict that would otherwise read as a tag: one
  whose only key is ``$bytes``, ``$float``, ``$msgpack`` or ``$dict``.

So ``from_json(to_json(m)) == m`` for every message of str-keyed maps, lists
and scalars, and ``to_json(from_json(j)) == j`` for every JSON value ``j``
that ``from_json`` accepts (it refuses a malformed tag rather than guess).
Some renderings are one way: a map key that is not a str becomes its JSON
text (``{1: "a"}`` prints as ``{"1": "a"}``), a tuple or an array becomes a
list, and any other object ``{"$repr": "<its repr>"}`` (reading back as that
dict).

``recv`` never loses a message to Ctrl-C: SIGINT is held back while a
message is in hand, so the interrupt lands between messages (exit 130).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import io
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from typing import IO, Any, Callable

from ._advice import cli_message
from ._codec import DEFAULT_CODEC
from ._errors import DecodeError, Empty, EncodeError, MessageTooLarge, ShmbusError
from ._file import read_layout_of, resolve_path
from ._format import KIND_QUEUE, REC_MSGPACK
from ._queue import Queue
from ._topic import Topic

__all__ = ["to_json", "from_json", "dumps", "cmd_send", "cmd_recv"]

_TAGS = ("$bytes", "$float", "$msgpack", "$dict")
_SPECIAL = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
_SLICE = 0.1  # seconds recv waits at a time before looking for a Ctrl-C


def _is_tag(d: dict[Any, Any]) -> bool:
    return len(d) == 1 and next(iter(d)) in _TAGS


def to_json(obj: Any) -> Any:
    """A message made JSON-safe, reversibly: bytes become ``{"$bytes": "<base64>"}`` (see the module)."""
    if isinstance(obj, (bytes, bytearray)):
        return {"$bytes": base64.b64encode(obj).decode("ascii")}
    if isinstance(obj, float) and not math.isfinite(obj):
        return {"$float": repr(obj)}  # 'nan', 'inf' or '-inf'
    if isinstance(obj, dict):
        out = {k if isinstance(k, str) else _strict_dumps(k): to_json(v) for k, v in obj.items()}
        return {"$dict": out} if _is_tag(obj) else out
    if isinstance(obj, (list, tuple)):
        return [to_json(v) for v in obj]
    if hasattr(obj, "tolist"):  # a numpy array or scalar
        return to_json(obj.tolist())
    if obj is None or isinstance(obj, (str, int, float)):
        return obj
    return {"$repr": repr(obj)}  # anything else (a msgpack Timestamp...), one way: printed, not lost


def from_json(obj: Any) -> Any:
    """The message a JSON value stands for: the inverse of ``to_json``.

    Raises ``ValueError`` for a malformed tag, such as ``{"$bytes": 5}``.
    """
    if isinstance(obj, dict):
        if _is_tag(obj):
            ((tag, value),) = obj.items()
            if tag == "$bytes":
                return _unbase64(value, tag)
            if tag == "$float":
                if value not in _SPECIAL:
                    raise ValueError(f'"$float" holds "nan", "inf" or "-inf", not {json.dumps(value)}')
                return _SPECIAL[value]
            if tag == "$msgpack":
                try:
                    return DEFAULT_CODEC.finish(REC_MSGPACK, _unbase64(value, tag))
                except DecodeError as e:
                    raise ValueError(f'"$msgpack" holds base64 of a msgpack message ({e})') from None
            if not isinstance(value, dict) or not _is_tag(value):
                raise ValueError('"$dict" wraps only an object that reads as a tag, such as {"$bytes": ""}')
            return {k: from_json(v) for k, v in value.items()}
        return {k: from_json(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [from_json(v) for v in obj]
    return obj


def _unbase64(value: Any, tag: str) -> bytes:
    bad = ValueError(f'"{tag}" holds standard padded base64, such as "AP8="')
    if not isinstance(value, str):
        raise bad
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise bad from None
    if base64.b64encode(data).decode("ascii") != value:
        raise bad  # non-canonical, such as "AP9=": it would print back as other text
    return data


def _strict_dumps(obj: Any) -> str:
    return json.dumps(to_json(obj), allow_nan=False)


def dumps(obj: Any) -> str:
    """One message as one line of JSON (strict: no NaN, which ``jq`` and most parsers refuse).

    Never fails: a message nested too deep for the JSON encoder prints as
    ``{"$msgpack": "<base64>"}``, and one msgpack cannot encode either as
    ``{"$repr": "..."}``.
    """
    try:
        return _strict_dumps(obj)
    except (RecursionError, ValueError, TypeError):
        pass
    try:
        kind, prefix, body, _ = DEFAULT_CODEC.encode(obj)
        if kind == REC_MSGPACK:
            data = prefix + bytes(body) if body is not None else prefix
            return json.dumps({"$msgpack": base64.b64encode(data).decode("ascii")})
    except EncodeError:
        pass
    try:
        text = repr(obj)
    except RecursionError:
        text = f"<a {type(obj).__name__} nested too deep to print>"
    return json.dumps({"$repr": text})


def _open(path: str) -> Queue | Topic:
    return Queue.open(path) if read_layout_of(path).kind == KIND_QUEUE else Topic.open(path)


# -- send ----------------------------------------------------------------------


def cmd_send(args: argparse.Namespace) -> int:
    """``shmbus send PATH [JSON ...]``: put or publish each argument, or each line of stdin."""
    where = "argument" if args.values else "line"
    source = [os.fsencode(v) for v in args.values] if args.values else _stdin_lines()
    messages = _messages(enumerate(source, 1), args.raw)
    sent = 0
    try:
        if args.values:
            messages = iter(list(messages))  # every argument is checked before any is sent
        with _open(args.path) as bus:
            send: Callable[[Any], None]
            if isinstance(bus, Queue):
                send = bus.put_bytes if args.raw else bus.put
            else:
                send = bus.publish_bytes if args.raw else bus.publish
            for n, msg in messages:
                try:
                    send(msg)
                except (EncodeError, MessageTooLarge) as e:
                    raise _BadInput(n, f"could not be sent: {cli_message(e)}") from None
                sent += 1
    except _BadInput as e:
        real = resolve_path(args.path)
        done = f"the {sent} message(s) before it were sent" if sent else "nothing was sent"
        raise ShmbusError(f"{real}: {where} {e.n} {e.problem}; {done}", path=real) from None
    return 0


class _BadInput(Exception):
    def __init__(self, n: int, problem: str) -> None:
        super().__init__(n, problem)
        self.n, self.problem = n, problem


def _messages(numbered: Iterable[tuple[int, bytes]], raw: bool) -> Iterator[tuple[int, Any]]:
    """``(line number, message)``: the lines as bytes (``raw``), or each non-blank one read as JSON."""
    for n, line in numbered:
        if raw:
            yield n, line
        elif line.strip():
            yield n, _parse(n, line)


def _parse(n: int, line: bytes) -> Any:
    try:
        return from_json(json.loads(line.decode("utf-8")))
    except UnicodeDecodeError:
        raise _BadInput(n, "is not UTF-8") from None
    except json.JSONDecodeError as e:
        raise _BadInput(n, f"is not JSON ({e.msg} at column {e.colno})") from None
    except ValueError as e:
        raise _BadInput(n, f"is not a message: {e}") from None


def _stdin_lines() -> Iterator[bytes]:
    """The lines of standard input as bytes, without their newline, as they arrive."""
    stream: IO[bytes] = sys.stdin.buffer
    for line in stream:
        yield line[:-1] if line.endswith(b"\n") else line


# -- recv ----------------------------------------------------------------------


def cmd_recv(args: argparse.Namespace) -> int:
    """``shmbus recv PATH``: take messages from a Queue and print them as JSON lines."""
    if read_layout_of(args.path).kind != KIND_QUEUE:
        real = resolve_path(args.path)
        raise ShmbusError(
            f"{real} is a Topic, which has no receivers, only subscribers: follow it with "
            f"`shmbus tail {args.path}`",
            path=real,
        )
    with Queue.open(args.path) as q:
        return _drain(q, args.count, args.timeout, sys.stdout, raw=args.raw)


def raw_line(data: bytes) -> str:
    """A message's bytes as one line for ``recv --raw``: the text itself when it is UTF-8 without a newline.

    Other bytes (not UTF-8, or holding a line break, which would split the
    line) print as ``{"$bytes": "<base64>"}``, as without ``--raw``.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return dumps(data)
    return dumps(data) if "\n" in text or "\r" in text else text


def _drain(q: Queue, count: int | None, timeout: float | None, out: IO[str], raw: bool = False) -> int:
    n = 0
    with _sigint_held() as interrupted:
        deadline = None if timeout is None else time.monotonic() + timeout
        while count is None or n < count:
            interrupted()
            wait = _SLICE if deadline is None else min(_SLICE, max(deadline - time.monotonic(), 0.0))
            try:
                msg = q.get_bytes(timeout=wait) if raw else q.get(timeout=wait)
            except Empty:
                if deadline is not None and time.monotonic() >= deadline:
                    break
                continue
            _emit(q, msg, out, raw)
            n += 1
            if timeout is not None:
                deadline = time.monotonic() + timeout
    return 0


def _emit(q: Queue, msg: Any, out: IO[str], raw: bool) -> None:
    line = (raw_line(msg) if raw else dumps(msg)) + "\n"
    try:
        out.write(line)
        out.flush()
    except BrokenPipeError:
        # The reader is gone: the message in hand goes back (at the end), not to waste.
        with contextlib.suppress(OSError, ValueError, io.UnsupportedOperation):
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, out.fileno())  # no second error when Python flushes stdout at exit
            os.close(null)
        try:
            if raw:
                q.put_bytes(msg, timeout=1.0)
            else:
                q.put(msg, timeout=1.0)
            fate = "went back to the end of the queue"
        except ShmbusError:
            fate = "could not go back (the queue is full) and is lost"
        raise ShmbusError(f"{q.path}: the output closed; the message in hand {fate}", path=q.path) from None


@contextlib.contextmanager
def _sigint_held() -> Iterator[Callable[[], None]]:
    """Hold SIGINT back (in the main thread, with Python's handler); yield a check that raises it.

    A Ctrl-C that lands after ``get`` took a message and before it is
    printed would lose it: held back, it is raised by the check instead,
    between two messages.
    """
    if threading.current_thread() is not threading.main_thread() or (
        signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield lambda: None
        return

    def check() -> None:
        if signal.SIGINT in signal.sigpending():
            signal.sigwait({signal.SIGINT})  # consume it: it must not fire again on unblocking
            raise KeyboardInterrupt

    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield check
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
