"""The latest plan per Workspace, in NATS KV (bucket ``kaiten_plans``, key ``<namespace>.<name>``).

Replicas and restarts share it; it is derived state (the planner can always replan from the spec),
kept so others can read the current plan without replaying the stream and so a stale redelivery is
recognised: a generation older than the stored one for the same uid is dropped.
"""

from __future__ import annotations

import contextlib
from typing import Any

import msgspec
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from shared.bus.streams import key_value
from shared.events import WorkspaceRef

PLANS_BUCKET = "kaiten_plans"


class StoredPlan(msgspec.Struct, frozen=True, kw_only=True):
    uid: str
    generation: int
    plan: dict[str, Any] | None = None  # plan_to_dict(plan), or None when rejected
    reason: str = ""
    message: str = ""


def key_of(ref: WorkspaceRef) -> str:
    return f"{ref.namespace}.{ref.name}"  # both DNS names: valid KV key characters


class PlanStore:
    def __init__(self, kv: KeyValue) -> None:
        self._kv = kv

    @classmethod
    async def open(cls, js: JetStreamContext) -> PlanStore:
        return cls(await key_value(js, PLANS_BUCKET))

    async def get(self, ref: WorkspaceRef) -> StoredPlan | None:
        try:
            entry = await self._kv.get(key_of(ref))
        except KeyNotFoundError:
            return None
        if not entry.value:
            return None
        return msgspec.json.decode(entry.value, type=StoredPlan)

    async def put(self, ref: WorkspaceRef, stored: StoredPlan) -> None:
        await self._kv.put(key_of(ref), msgspec.json.encode(stored))

    async def forget(self, ref: WorkspaceRef) -> None:
        with contextlib.suppress(KeyNotFoundError):
            await self._kv.purge(key_of(ref))
