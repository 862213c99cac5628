"""Why a bridge stops: one error class per reason, each with its exit code.

Rule: every way ``shmbus bridge`` can fail on purpose is a ``BridgeError``
subclass here, carrying the exit code the command returns and a message
that fits on one line and never holds a secret (a password, a seed).
"""

from __future__ import annotations

from typing import Final

from ._errors import ShmbusError

__all__ = [
    "EXIT_OK", "EXIT_BUS", "EXIT_CONFIG", "EXIT_UNREACHABLE", "EXIT_AUTH", "EXIT_PERMISSION",
    "EXIT_NO_STREAM", "EXIT_TLS", "BridgeError", "BridgeConfigError", "ServerUnreachable", "AuthFailed",
    "PermissionDenied", "StreamNotFound", "TLSFailed",
]  # fmt: skip

EXIT_OK: Final = 0  # stopped by SIGTERM/SIGINT (or stop()), everything in flight settled
EXIT_BUS: Final = 1  # a local bus failed (not found, corrupt), as for every shmbus command
EXIT_CONFIG: Final = 2  # bad flags or config file, as argparse's bad usage
EXIT_UNREACHABLE: Final = 3  # no server answered within the connect timeout
EXIT_AUTH: Final = 4  # the server refused the credentials
EXIT_PERMISSION: Final = 5  # the account may not publish or subscribe on a subject the bridge uses
EXIT_NO_STREAM: Final = 6  # no stream holds the subject (and --create-stream was not given)
EXIT_TLS: Final = 7  # the TLS handshake failed (a server certificate not trusted, say)


class BridgeError(ShmbusError):
    """A bridge cannot run; ``exit_code`` is what ``shmbus bridge`` returns for it."""

    exit_code = EXIT_BUS


class BridgeConfigError(BridgeError, ValueError):
    """The routes or the connection options are wrong (flags or config file)."""

    exit_code = EXIT_CONFIG


class ServerUnreachable(BridgeError, ConnectionError):
    """No NATS server answered within the connect timeout."""

    exit_code = EXIT_UNREACHABLE


class AuthFailed(BridgeError, PermissionError):
    """The NATS server refused the credentials (authorization violation, bad credentials)."""

    exit_code = EXIT_AUTH


class PermissionDenied(BridgeError, PermissionError):
    """The account may not use a subject the bridge needs (publish or subscribe)."""

    exit_code = EXIT_PERMISSION


class StreamNotFound(BridgeError, LookupError):
    """No JetStream stream holds a route's subject, and the bridge was not asked to create one."""

    exit_code = EXIT_NO_STREAM


class TLSFailed(BridgeError, ConnectionError):
    """The TLS handshake with the server failed: its certificate not trusted, or ours refused."""

    exit_code = EXIT_TLS
