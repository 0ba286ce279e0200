"""The reconcile loop of a service with state in NATS KV (the provisioner's, the workload's): every
``interval`` seconds, one pass over each key. A pass that fails only fails for its key; trouble on the
bus (NATS restarting, a request timing out) or a lost lease is expected now and then and is logged as
a warning, to be retried on the next pass — never a crash of the loop, never a traceback."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import nats.errors

from shared.errors import Transient
from shared.metrics import RECONCILE_KEYS, RECONCILE_PASSES

log = logging.getLogger("kaiten.reconcile")
# What a NATS blip raises: nats-py's errors (its TimeoutError is also the builtin one), and the socket's.
BUS_TROUBLE = (TimeoutError, ConnectionError, nats.errors.Error)
RETRY_NEXT_PASS = (Transient, *BUS_TROUBLE)  # a lost lease (LeaseLost) is Transient too


async def reconcile_forever(
    what: str,
    keys: Callable[[], Awaitable[list[str]]],
    one: Callable[[str], Awaitable[None]],
    interval: float,
) -> None:
    while True:
        try:
            todo = await keys()
        except BUS_TROUBLE as exc:
            log.warning("%s: cannot list the keys (%r); next pass in %.1fs", what, exc, interval)
            todo = []
        RECONCILE_KEYS.labels(what).set(len(todo))
        for key in todo:
            try:
                await one(key)
                outcome = "done"
            except RETRY_NEXT_PASS as exc:
                log.warning("%s of %s: %r; next pass", what, key, exc)
                outcome = "retry"
            except Exception:  # one key's trouble must not stop the others
                log.exception("%s of %s failed", what, key)
                outcome = "error"
            RECONCILE_PASSES.labels(what, outcome).inc()
        await asyncio.sleep(interval)
