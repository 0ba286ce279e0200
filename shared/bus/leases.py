"""Per-Workspace leases in a NATS KV bucket: what makes two replicas of a service safe.

Whoever changes a Workspace's state — the consumer runner handling its events, or a service's
reconcile loop passing over it — first takes the Workspace's lease for its role (``<role>.<ns>.<name>``
in ``kaiten_leases``). Taking it is a KV ``create``, which fails when another holder has it
(:class:`LeaseBusy`); an entry expires ``ttl`` seconds after its last refresh, so a crashed holder's
lease frees itself.

:meth:`Leases.hold` refreshes the lease every ``ttl / 3`` while its body runs. If a refresh fails (the
entry expired while this process stalled and another replica may hold it now, or NATS is gone) the
body is cancelled and :class:`LeaseLost` raised: work goes on under a lease or not at all.

A lease may *linger* (``linger`` seconds, off by default): when work held with ``park=True`` ends,
the holder keeps the lease parked instead of deleting it, and the next :meth:`Leases.hold` of that key
in this process takes it back without a round trip. A busy Workspace's burst, delivered over several
fetches, then costs one KV create, not a create and a delete per fetch (the consumer's throughput
nearly tripled, measured by ``benchmarks/bus_throughput.py``). Another replica finds a parked lease
busy, as it found the work itself busy a moment before; the lease is deleted ``linger`` seconds after
its last use, or at :meth:`Leases.close`. Only the consumer's groups park: a reconcile loop that
parked, with a pass interval shorter than the linger, would keep the Workspace from the other replica
for good (a CI run found it: a deletion waited on a lease that was never let go).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from nats.js import JetStreamContext
from nats.js.errors import KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from shared.bus.streams import key_value
from shared.errors import Transient
from shared.tasks import cancel_and_wait

log = logging.getLogger(__name__)
LOCK_BUCKET = "kaiten_leases"
LINGER = 0.5  # s a service's leases stay parked after use: longer than a fetch cycle, short for others


class LeaseBusy(Exception):
    """Another holder (a replica, or this replica's other loop) has this Workspace right now."""


class LeaseLost(Transient):
    """The lease could not be refreshed; the work under it was stopped and should be tried again."""


@dataclass(eq=False)
class _Held:
    """A lease this process has: worked under by ``body``, or parked (``body`` None)."""

    revision: int
    refreshed: float  # monotonic time of the last create/refresh that succeeded
    body: asyncio.Task[Any] | None = None
    lost: BaseException | None = None
    used: float = 0.0  # monotonic time the last work under it ended
    timer: bool = False  # a release check is scheduled (one at a time, not one per use)
    keeper: asyncio.Task[None] | None = None


class Leases:
    """Leases of one role (a service's durable name) on Workspace keys (``ns/name``)."""

    def __init__(self, kv: KeyValue, *, role: str, ttl: float, linger: float = 0.0) -> None:
        self._kv = kv
        self._owner = uuid.uuid4().hex.encode()
        self._role = role
        self.ttl = ttl
        self.linger = linger
        self._held: dict[str, _Held] = {}
        self._releasing: set[asyncio.Task[None]] = set()

    @classmethod
    async def open(cls, js: JetStreamContext, *, role: str, ttl: float = 30.0, linger: float = 0.0) -> Leases:
        return cls(await key_value(js, LOCK_BUCKET, ttl=ttl), role=role, ttl=ttl, linger=linger)

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
    async def hold(self, key: str, *, park: bool = False) -> AsyncIterator[None]:
        """Run the body under ``key``'s lease. Raises :class:`LeaseBusy` at once if it is held (by
        another replica, or by other work in this process), and :class:`LeaseLost` (after cancelling
        the body) if it cannot be kept. ``park``: keep it ``linger`` s afterwards, for the key's next
        work here (its release otherwise, as a parked lease taken back is released after)."""
        body = asyncio.current_task()
        assert body is not None
        held = await self._take(key, body)
        try:
            yield
        except asyncio.CancelledError:
            if held.lost is not None and body.uncancel() == 0:  # our cancel, not a shutdown's
                raise LeaseLost(f"lease on {key} lost: {held.lost!r}") from held.lost
            raise
        finally:
            held.body = None
            if held.lost is None:
                if park and self.linger > 0 and not body.cancelling():
                    self._park(key, held)
                else:
                    await self._drop(key, held)

    async def _take(self, key: str, body: asyncio.Task[Any]) -> _Held:
        held = self._held.get(key)
        if held is not None:
            if held.body is not None:
                raise LeaseBusy(key)  # this process works under it right now (the other loop)
            held.body = body  # claimed before any await: no other coroutine takes it meanwhile
            if time.monotonic() - held.refreshed < self.ttl / 2:
                return held  # parked and fresh: kept by its keeper, ours for at least ttl/2 more
            try:  # parked through a stall: make sure it is still ours before working under it
                held.revision = await self.refresh(key, held.revision)
                held.refreshed = time.monotonic()
                return held
            except Exception:
                held.body = None
                await self._drop(key, held, release=False)
        held = _Held(revision=await self.acquire(key), refreshed=time.monotonic(), body=body)
        self._held[key] = held
        held.keeper = asyncio.create_task(self._keep(key, held), name=f"lease:{self._name(key)}")
        return held

    async def _keep(self, key: str, held: _Held) -> None:
        while True:
            await asyncio.sleep(self.ttl / 3)
            try:
                held.revision = await self.refresh(key, held.revision)
                held.refreshed = time.monotonic()
            except Exception as exc:
                log.warning("lease %s lost (%r): stopping the work under it", self._name(key), exc)
                held.lost = exc
                if self._held.get(key) is held:
                    del self._held[key]
                if held.body is not None:
                    held.body.cancel()
                return

    def _park(self, key: str, held: _Held) -> None:
        held.used = time.monotonic()
        if not held.timer:
            self._park_check(key, held, self.linger)

    def _unpark(self, key: str, held: _Held) -> None:
        """Release a lease unused for ``linger``; one used meanwhile is checked again later."""
        held.timer = False
        if held.body is not None or self._held.get(key) is not held:
            return  # at work (its end parks it again), or already gone
        if (left := held.used + self.linger - time.monotonic()) > 0.001:
            self._park_check(key, held, left)
        else:
            del self._held[key]  # now, not when the task runs: a hold meanwhile must not take it back
            task = asyncio.create_task(self._drop(key, held), name=f"release:{self._name(key)}")
            self._releasing.add(task)
            task.add_done_callback(self._releasing.discard)

    def _park_check(self, key: str, held: _Held, after: float) -> None:
        held.timer = True
        asyncio.get_running_loop().call_later(after, self._unpark, key, held)

    async def _drop(self, key: str, held: _Held, *, release: bool = True) -> None:
        if self._held.get(key) is held:
            del self._held[key]
        if held.keeper is not None and held.keeper is not asyncio.current_task():
            await cancel_and_wait(held.keeper)
        if release:
            await self.release(key, held.revision)

    async def close(self) -> None:
        """Release every parked lease now (a stopping service: another replica may take them)."""
        for key, held in list(self._held.items()):
            if held.body is None:
                await self._drop(key, held)
        if self._releasing:
            await asyncio.gather(*self._releasing, return_exceptions=True)
