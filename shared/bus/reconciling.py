"""The reconcile loop of a service with state in NATS KV (the provisioner's, the workload's): every
``interval`` seconds, one pass over each key. A pass that fails only fails for its key; trouble on the
bus (NATS restarting, a request timing out) or a lost lease is expected now and then and is logged as
a warning, to be retried on the next pass — never a crash of the loop, never a traceback.

:class:`Reconciler` is the one loop both services run: over a :class:`~shared.bus.kvstore.KvStore`,
each record that still needs following is stepped under the Workspace's lease — the one the consumer
takes for the Workspace's events — so a pass on one replica never interleaves with event handling (a
deletion, say) on another. A Workspace whose lease is held elsewhere is skipped: its holder is acting
on it already, and the next pass comes round again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Generic, Protocol, TypeVar

import nats.errors

from shared import logs, telemetry
from shared.bus.kvstore import KvStore
from shared.bus.leases import LeaseBusy, Leases
from shared.errors import Transient
from shared.events import WorkspaceRef
from shared.metrics import RECONCILE_KEYS, RECONCILE_PASSES

log = logging.getLogger(__name__)
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


class Followed(Protocol):
    """What a reconciled record says about itself."""

    @property
    def ref(self) -> WorkspaceRef: ...
    @property
    def generation(self) -> int: ...
    @property
    def trace(self) -> dict[str, str]: ...  # the trace its last event came with: a pass continues it


R = TypeVar("R", bound=Followed)


class Reconciler(Generic[R]):
    """Every ``interval`` s, ``step(key)`` for each record ``due(key, record)`` says to follow, under
    the record's Workspace lease, in its trace and with its Workspace on every log record."""

    def __init__(
        self,
        name: str,
        *,
        store: KvStore[R],
        leases: Leases,
        due: Callable[[str, R], bool],
        step: Callable[[str], Awaitable[None]],
        interval: float,
    ) -> None:
        self._name = name
        self._store = store
        self._leases = leases
        self._due = due
        self._step = step
        self._interval = interval

    async def run(self) -> None:
        await reconcile_forever(self._name, self._store.keys, self.pass_over, self._interval)

    async def pass_over(self, key: str) -> None:
        record = await self._store.get(key)
        if record is None or not self._due(key, record):
            return
        try:
            async with self._leases.hold(record.ref.key):  # not parked: see shared.bus.leases
                with telemetry.resumed(record.trace), logs.about(record.ref, generation=record.generation):
                    await self._step(key)
        except LeaseBusy:
            return
