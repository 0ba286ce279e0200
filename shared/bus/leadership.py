"""One leader among a service's replicas, for work that one replica does for all (the watcher's watch,
the provisioner's and the workload's reconcile passes): a NATS KV entry (``kaiten_leaders``, key: the
service) that expires ``LEADER_TTL`` seconds after its holder last refreshed it. controller-runtime's
leader election, on the bus instead of a Lease object.

- The holder refreshes every ``ttl / 3`` (every ``poll`` after a failure). It steps down at once when
  the entry is no longer its own (it expired while this process stalled, and another replica took
  it), or once no refresh has succeeded for ``ttl / 2`` (NATS away): before anyone else can lead.
- The others try to take it every ``poll`` seconds: a leader that stops (SIGTERM) deletes the entry and
  a follower leads within ``poll``; one that crashed is replaced within ``ttl + poll``.
- The identity is the replica's (``KAITEN_REPLICA_ID``, the pod's name in the chart; else hostname:pid):
  a process restarted under the same identity (a container restart), or one whose refresh failed while
  NATS was away, takes its entry back at once instead of waiting it out. Replicas' identities differ.

Leadership here is an economy, not a safety property: every action a leader takes is idempotent and two
replicas acting at once (during a takeover, or a stall longer than the TTL) are safe, as they were
before there was a leader. It saves the second replica's share of the work.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from shared.bus.streams import key_value
from shared.metrics import LEADING
from shared.tasks import cancel_and_wait

log = logging.getLogger(__name__)
LEADER_BUCKET = "kaiten_leaders"
LEADER_TTL = 8.0  # s: a crashed leader's replica waits at most this (+ poll) before another leads
POLL = 1.0  # s between a follower's tries


class Leadership:
    def __init__(self, kv: KeyValue, *, key: str, identity: str, ttl: float, poll: float = POLL) -> None:
        self._kv = kv
        self.key = key
        self._identity = identity.encode()
        self.ttl = ttl
        self.poll = poll
        self.leading = False
        self._revision: int | None = None
        self._refreshed = 0.0  # monotonic time the entry was last written by us
        self._flip = asyncio.Event()  # set (and replaced) at each change of ``leading``
        LEADING.labels(key).set(0)

    @classmethod
    async def open(
        cls, js: JetStreamContext, *, key: str, identity: str, ttl: float = LEADER_TTL, poll: float = POLL
    ) -> Leadership:
        """Open the bucket (its TTL is the first opener's) and make the first try, so a lone replica
        leads from its first step."""
        kv = await key_value(js, LEADER_BUCKET, ttl=ttl)
        leadership = cls(kv, key=key, identity=identity, ttl=ttl, poll=poll)
        await leadership._campaign()
        return leadership

    async def run(self) -> None:
        """Keep (or seek) leadership until cancelled; a leader that stops hands the entry back."""
        failed = False
        try:
            while True:
                await asyncio.sleep(self.poll if failed or not self.leading else self.ttl / 3)
                try:
                    await (self._refresh() if self.leading else self._campaign())
                    failed = False
                except Exception as exc:  # NATS slow or away: the entry holds for a while yet
                    failed = True
                    if self.leading and time.monotonic() - self._refreshed > self.ttl / 2:
                        log.warning("leadership of %s lost: not refreshed for %.0fs (%r)",
                                    self.key, time.monotonic() - self._refreshed, exc)  # fmt: skip
                        self._set(False)
        finally:
            if self.leading:
                self._set(False)
                await self._hand_back()

    async def changed(self, leading: bool) -> None:
        """Return once ``self.leading`` is not ``leading``."""
        while self.leading == leading:
            flip = self._flip
            await flip.wait()

    async def _campaign(self) -> None:
        try:
            revision = int(await self._kv.create(self.key, self._identity))
        except (KeyWrongLastSequenceError, KeyNotFoundError):  # held (or expiring as we asked)
            try:  # ours, from before a restart or a NATS outage? then take it back now
                entry = await self._kv.get(self.key)
                if entry.value != self._identity or entry.revision is None:
                    return
                revision = int(await self._kv.update(self.key, self._identity, last=entry.revision))
            except (KeyNotFoundError, KeyWrongLastSequenceError):  # gone or changed meanwhile: next poll
                return
        self._revision, self._refreshed = revision, time.monotonic()
        self._set(True)

    async def _refresh(self) -> None:
        assert self._revision is not None
        try:
            self._revision = int(await self._kv.update(self.key, self._identity, last=self._revision))
        except KeyWrongLastSequenceError:  # a refresh that timed out may have been written after all
            try:
                entry = await self._kv.get(self.key)
            except KeyNotFoundError:
                entry = None
            if entry is None or entry.value != self._identity or entry.revision is None:
                log.warning("leadership of %s expired and was taken over", self.key)
                self._set(False)
                return
            self._revision = int(await self._kv.update(self.key, self._identity, last=entry.revision))
        self._refreshed = time.monotonic()

    async def _hand_back(self) -> None:
        """Delete the entry if it is still ours (its revision may be newer than the one we know: a
        refresh the stop cut short may have been written), so a follower leads within its poll."""
        with contextlib.suppress(Exception):  # expired, taken over, or NATS away: it expires by itself
            entry = await self._kv.get(self.key)
            if entry.value == self._identity and entry.revision is not None:
                await self._kv.delete(self.key, last=entry.revision)

    def _set(self, leading: bool) -> None:
        if leading != self.leading:
            self.leading = leading
            LEADING.labels(self.key).set(int(leading))
            log.info("%s %s", "leading" if leading else "following", self.key)
            self._flip.set()
            self._flip = asyncio.Event()


async def standby() -> None:
    """A follower's work: none (for :func:`led`)."""
    await asyncio.Event().wait()


async def led(
    leadership: Leadership,
    lead: Callable[[], Coroutine[Any, Any, None]],
    follow: Callable[[], Coroutine[Any, Any, None]],
) -> None:
    """Run ``lead()`` while leading and ``follow()`` while not, the one cancelled when leadership changes
    and the other started. Either returning or raising ends this too (as it would have alone)."""
    while True:
        leading = leadership.leading
        work = asyncio.create_task((lead if leading else follow)())
        change = asyncio.create_task(leadership.changed(leading))
        try:
            await asyncio.wait({work, change}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            await cancel_and_wait(work, change)
        if not work.cancelled():
            work.result()  # raises what it raised
            return
