"""Pulling a JetStream consumer's messages in rounds, with requests kept ahead of the rounds.

Rule: a ``Puller`` hands out messages in the order the server delivered
them and acknowledges none (its caller acks each one after the local put:
``_bridge_routes``). It keeps pull requests for up to about two rounds
outstanding, so the server sends the next round's messages while the
caller puts this one's; the consumer's ``max_ack_pending`` still bounds
what is delivered and not acknowledged.

Why not nats-py's ``PullSubscription.fetch``: it waits for each message of
a batch in a task of its own (``next_msg``), a task, a uuid and a timer per
message, about as much as everything else the bridge does with it. Here
one subscription callback appends each message to a list.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

__all__ = ["Puller"]

_API = "$JS.API"  # the bridge's JetStream context uses the default API prefix
_MAX_BYTES = 64 * 1024 * 1024  # bytes one request may bring (the subscription's pending limit is above)
_PENDING_BYTES = 4 * _MAX_BYTES
# Status codes that end a pull request: no messages (404), its expiry (408), a
# limit it hit (409: max ack pending, max bytes...). 100 is an idle heartbeat.
_ENDS_REQUEST = ("404", "408", "409")
_PENDING_MSGS = "Nats-Pending-Messages"  # on a 408/409: how many of the request's batch it did not send


class Puller:
    """An in-route's pull consumer: ``start()`` (bind or create it), ``fetch()``, ``stop()``."""

    def __init__(self, nc: Any, js: Any, stream: str, subject: str, durable: str | None, config: Any) -> None:
        self._nc = nc
        self._js = js
        self._stream = stream
        self._subject = subject
        self._durable = durable
        self._config = config
        self._sub: Any = None
        self._next = ""  # the subject a pull request goes to
        self._inbox = ""
        self._msgs: list[Any] = []
        self._arrived = asyncio.Event()
        self._asked = 0  # messages requested and neither delivered nor given up by the server
        self._asked_until = 0.0  # when the last request expires: past it, nothing more is coming

    async def start(self) -> None:
        """Bind the durable consumer (created if missing) or create one for this run; subscribe."""
        import nats.js.errors

        name = self._durable
        try:
            if name is None:
                raise nats.js.errors.NotFoundError
            await self._js.consumer_info(self._stream, name)
        except nats.js.errors.NotFoundError:
            config = self._config
            config.filter_subject = self._subject
            if name:
                config.name = config.durable_name = name
            else:
                name = config.name = self._nc.new_inbox().rsplit(".", 1)[-1]
            await self._js.add_consumer(self._stream, config=config)
        self._next = f"{_API}.CONSUMER.MSG.NEXT.{self._stream}.{name}"
        self._inbox = self._nc.new_inbox()
        self._sub = await self._nc.subscribe(self._inbox, cb=self._on_msg, pending_bytes_limit=_PENDING_BYTES)

    async def stop(self) -> None:
        """Unsubscribe (messages delivered and not acknowledged are delivered again later)."""
        if self._sub is not None:
            sub, self._sub = self._sub, None
            await sub.unsubscribe()

    async def _on_msg(self, m: Any) -> None:
        headers = m.headers
        status = headers.get("Status") if headers and not m.data else None
        if status is None:
            self._msgs.append(m)
            self._asked -= 1
            self._arrived.set()
        elif status in _ENDS_REQUEST:
            # No wake-up: a round without messages waits out its timeout, so a server that
            # answers every request at once (a consumer deleted under us) is asked twice a second.
            left = headers.get(_PENDING_MSGS)
            self._asked = max(0, self._asked - int(left)) if left and left.isdigit() else 0

    def held(self) -> list[Any]:
        """Messages delivered and not yet handed out (a caller that holds a round up keeps them alive)."""
        return list(self._msgs)

    async def fetch(self, batch: int, timeout: float) -> list[Any]:
        """Up to ``batch`` of the messages delivered so far, oldest first, waiting up to ``timeout`` for one.

        Returns [] when none came in time. (At most ``batch``: a bridge killed
        between its put and its acks has its guarantees stated per round.)
        """
        now = time.monotonic()
        if now > self._asked_until:  # every request expired: whatever was asked is not coming
            self._asked = 0
        if self._asked < batch:
            await self._request(batch, timeout)
        if not self._msgs:
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), timeout)
            except asyncio.TimeoutError:
                return []
        if len(self._msgs) <= batch:
            msgs, self._msgs = self._msgs, []
        else:
            msgs, self._msgs = self._msgs[:batch], self._msgs[batch:]
        return msgs

    async def _request(self, batch: int, timeout: float) -> None:
        expires = timeout * 4  # outlives a few rounds: fewer requests, and no gap between them
        body = {"batch": batch, "expires": int(expires * 1e9), "max_bytes": _MAX_BYTES}
        await self._nc.publish(self._next, json.dumps(body).encode(), reply=self._inbox)
        self._asked += batch
        self._asked_until = time.monotonic() + expires
