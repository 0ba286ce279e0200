"""Per-Workspace leases in a NATS KV bucket: what makes two replicas of a service safe.

Whoever changes a Workspace's state — the consumer runner handling its events, or a service's
reconcile loop passing over it — first takes the Workspace's lease for its role (``<role>.<ns>.<name>``
in ``kaiten_leases``). Taking it is a KV ``create``, which fails when another holder has it
(:class:`LeaseBusy`); an entry expires ``ttl`` seconds after its last refresh, so a crashed holder's
lease frees itself.

:meth:`Leases.hold` refreshes the lease every ``ttl / 3`` while its body runs. If a refresh fails (the
entry expired while this process stalled and another replica may hold it now, or NATS is gone) the
body is cancelled and :class:`LeaseLost` raised: work goes on under a lease or not at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator

from nats.js import JetStreamContext
from nats.js.errors import KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from shared.bus.streams import key_value
from shared.errors import Transient

log = logging.getLogger("kaiten.bus")
LOCK_BUCKET = "kaiten_leases"


class LeaseBusy(Exception):
    """Another holder (a replica, or this replica's other loop) has this Workspace right now."""


class LeaseLost(Transient):
    """The lease could not be refreshed; the work under it was stopped and should be tried again."""


class Leases:
    """Leases of one role (a service's durable name) on Workspace keys (``ns/name``)."""

    def __init__(self, kv: KeyValue, *, role: str, ttl: float) -> None:
        self._kv = kv
        self._owner = uuid.uuid4().hex.encode()
        self._role = role
        self.ttl = ttl

    @classmethod
    async def open(cls, js: JetStreamContext, *, role: str, ttl: float = 30.0) -> Leases:
        return cls(await key_value(js, LOCK_BUCKET, ttl=ttl), role=role, ttl=ttl)

    def _name(self, key: str) -> str:
        return f"{self._role}.{key.replace('/', '.')}"

    async def acquire(self, key: str) -> int:
        try:
            return int(await self._kv.create(self._name(key), self._owner))
        except KeyWrongLastSequenceError as exc:
            raise LeaseBusy(key) from exc

    async def refresh(self, key: str, revision: int) -> int:
        return int(await self._kv.update(self._name(key), self._owner, last=revision))

    async def release(self, key: str, revision: int) -> None:
        with contextlib.suppress(Exception):  # expired or taken over: the TTL cleans up
            await self._kv.delete(self._name(key), last=revision)

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        """Run the body under ``key``'s lease. Raises :class:`LeaseBusy` at once if it is held, and
        :class:`LeaseLost` (after cancelling the body) if it cannot be kept."""
        revision = await self.acquire(key)
        body = asyncio.current_task()
        assert body is not None
        lost: list[BaseException] = []

        async def keep() -> None:
            nonlocal revision
            while True:
                await asyncio.sleep(self.ttl / 3)
                try:
                    revision = await self.refresh(key, revision)
                except Exception as exc:
                    log.warning("lease %s lost (%r): stopping the work under it", self._name(key), exc)
                    lost.append(exc)
                    body.cancel()
                    return

        keeper = asyncio.create_task(keep(), name=f"lease:{self._name(key)}")
        try:
            yield
        except asyncio.CancelledError:
            if lost and body.uncancel() == 0:  # our cancel, not a shutdown's
                raise LeaseLost(f"lease on {key} lost: {lost[0]!r}") from lost[0]
            raise
        finally:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper
            if not lost:
                await self.release(key, revision)
