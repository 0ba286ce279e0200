"""Connect to NATS with a bounded start-up wait and bounded reconnect backoff."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl

import nats
from nats.aio.client import Client

from shared.bus.errors import BusUnavailable

log = logging.getLogger(__name__)


async def connect(
    url: str,
    *,
    name: str,
    connect_timeout: float = 10.0,
    reconnect_wait: float = 0.5,
    max_reconnect_attempts: int = 120,
    user_credentials: str | None = None,
    user: str | None = None,
    password: str | None = None,
    inbox_prefix: str = "_INBOX",
    ca_file: str | None = None,
    closed: asyncio.Event | None = None,
) -> Client:
    """Connect or raise :class:`BusUnavailable` after ``connect_timeout`` seconds.

    Reconnects after start-up are bounded too (``max_reconnect_attempts`` × ``reconnect_wait``,
    one minute by default); past that the client closes and the service's supervisor restarts it.
    """

    client: list[Client] = []  # set once connected; lets the callback tell a drain from a failure

    async def on_disconnect() -> None:
        if client and (client[0].is_draining or client[0].is_closed):
            return
        log.warning("NATS disconnected (%s); reconnecting", name)

    async def on_reconnect() -> None:
        log.info("NATS reconnected (%s)", name)

    async def on_error(err: Exception) -> None:
        log.warning("NATS error (%s): %s", name, err)

    async def on_closed() -> None:  # ``closed`` is set once the client gives up (or is closed)
        if closed is not None:
            closed.set()

    try:
        nc = await asyncio.wait_for(
            nats.connect(
                url,
                name=name,
                connect_timeout=min(2.0, connect_timeout),
                allow_reconnect=True,
                reconnect_time_wait=reconnect_wait,
                max_reconnect_attempts=max_reconnect_attempts,
                disconnected_cb=on_disconnect,
                reconnected_cb=on_reconnect,
                error_cb=on_error,
                closed_cb=on_closed,
                user_credentials=user_credentials,
                user=user,
                password=password,
                inbox_prefix=inbox_prefix,
                tls=ssl.create_default_context(cafile=ca_file) if ca_file else None,
            ),
            timeout=connect_timeout,
        )
    except (TimeoutError, OSError, nats.errors.NoServersError) as exc:
        raise BusUnavailable(f"NATS at {url} not reachable within {connect_timeout:g}s: {exc}") from exc
    client.append(nc)
    return nc


async def close(nc: Client, wait_s: float = 5.0) -> None:
    """Flush what was published, then close the connection.

    Not ``drain()``: when a subscription's queue does not empty in time, nats-py's drain cancels its
    gathered future and never retrieves it, and asyncio logs a CancelledError traceback at shutdown.
    By the time a service closes, its components have stopped intake and finished (or given up) their
    work; anything not acked is redelivered by JetStream, so draining buys nothing.
    """
    if nc.is_closed:
        return
    with contextlib.suppress(Exception):
        await asyncio.wait_for(nc.flush(), wait_s)
    with contextlib.suppress(Exception):
        await asyncio.wait_for(nc.close(), wait_s)
