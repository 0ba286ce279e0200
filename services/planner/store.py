"""The latest plan per Workspace, in NATS KV (bucket ``kaiten_plans``, key ``<namespace>.<name>``).

Replicas and restarts share it; it is derived state (the planner can always replan from the spec),
kept so others can read the current plan without replaying the stream and so a stale redelivery is
recognised: a generation older than the stored one for the same uid is dropped.
"""

from __future__ import annotations

import msgspec
from nats.js import JetStreamContext

from shared.bus.kvstore import KvStore
from shared.planning.model import Plan

PLANS_BUCKET = "kaiten_plans"


class StoredPlan(msgspec.Struct, frozen=True, kw_only=True):
    uid: str
    generation: int
    plan: Plan | None = None  # None when rejected
    reason: str = ""
    message: str = ""


PlanStore = KvStore[StoredPlan]


async def open_store(js: JetStreamContext) -> PlanStore:
    return await KvStore.open(js, PLANS_BUCKET, StoredPlan)
