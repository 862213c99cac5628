"""What the command line says when the library raises: its own advice, in its own words.

Rule: this module is the one place where a library error becomes a line for
a shell user. The library's errors keep their advice for Python callers
(``pass exist_ok=True``, ``open it with shmbus.Queue.open``) in ``hint``,
apart from the ``fact``; here each error class maps to the advice a shell
user can follow (a command, a flag). An error whose hint has no entry here
prints its fact alone: a Python idiom never reaches the terminal. An
``OSError`` prints its sentence without Python's ``[Errno N]`` and
``: 'path'`` decorations, naming the path once.
"""

from __future__ import annotations

from typing import Callable

from ._errors import (
    BusExists,
    BusNotFound,
    ForeignBus,
    IncompatibleBus,
    MessageTooLarge,
    NoSpace,
    ShmbusError,
    TooManySubscribers,
)

__all__ = ["cli_message", "cli_os_message"]


def _incompatible(e: ShmbusError, path: str) -> str | None:
    kind = e.kind if isinstance(e, IncompatibleBus) else None
    if kind == "Queue":
        return f"take its messages with `shmbus recv {path}`"
    if kind == "Topic":
        return f"follow it with `shmbus tail {path}`, or print its newest message with `shmbus last {path}`"
    return e.hint  # another format version: the library's advice needs no Python


# Error class -> the advice for a shell user, from the error and the bus's path.
_ADVICE: dict[type[ShmbusError], Callable[[ShmbusError, str], str | None]] = {
    BusExists: lambda e, p: f"remove it first with `shmbus rm {p}`, or pass --exist-ok to use it as it is",
    BusNotFound: lambda e, p: "`shmbus ls` lists the buses",
    IncompatibleBus: _incompatible,
    ForeignBus: lambda e, p: (
        "shmbus commands open only buses you own that other users cannot write: run the command as "
        f"the bus's owner, or make the bus private (chmod o-w {p})"
    ),
    TooManySubscribers: lambda e, p: (
        f"`shmbus info {p}` lists them; for more, recreate it with "
        f"`shmbus create {p} --topic --max-subscribers N`"
    ),
    MessageTooLarge: lambda e, p: "recreate the bus with a larger --capacity (`shmbus create`)",
    NoSpace: lambda e, p: (
        "free some space, choose a smaller --capacity, or put the bus on another file system"
    ),
}


def _create_over_other_kind(e: ShmbusError, path: str) -> str | None:
    if isinstance(e, IncompatibleBus) and e.kind is not None:
        return f"choose another path, or remove it first with `shmbus rm {path}`"
    return e.hint  # another format version: the library's advice needs no Python


# (command, error class) -> advice where the general advice would send the user in a circle
# (`shmbus ls` told to run `shmbus ls`) or elsewhere (`create --topic` told to `recv`).
_IN_COMMAND: dict[tuple[str, type[ShmbusError]], Callable[[ShmbusError, str], str | None]] = {
    ("ls", BusNotFound): lambda e, p: "check the path; `shmbus ls` alone lists the buses in /dev/shm",
    ("create", IncompatibleBus): _create_over_other_kind,
}


def cli_message(e: ShmbusError, command: str = "") -> str:
    """The one line the command line prints for ``e``: its fact, then advice a shell user can follow.

    ``command``: the subcommand that failed (``ls``, ``create``...), where its
    advice differs from the general one.
    """
    if e.hint is None:
        return str(e)
    for cls in type(e).__mro__:
        advise = _IN_COMMAND.get((command, cls)) or _ADVICE.get(cls)
        if advise is not None:
            hint = advise(e, e.path or "PATH")
            return f"{e.fact}; {hint}" if hint else e.fact
    return e.fact


def cli_os_message(e: OSError) -> str:
    """The one line the command line prints for ``e``: its sentence and its path, once, without ``[Errno N]``.

    shmbus's own ``OSError`` sentences already name the path (``permission
    denied opening bus /dev/shm/jobs: ...``); the system's (``No such file or
    directory``) get it appended.
    """
    text = e.strerror or str(e)
    name = e.filename
    if name is None or str(name) in text:
        return text
    return f"{text}: {name}"
