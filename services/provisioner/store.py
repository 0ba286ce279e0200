"""Provisioning state per Workspace, in NATS KV (bucket ``kaiten_nodes``, key ``<namespace>.<name>``).

It is what makes the provisioner restartable: the reconcile loop resumes every ``pending`` entry after a
restart, a redelivered plan finds its request already recorded, and a deleted Workspace's entry says
``deleting`` until the provider has released everything. Providers never keep state of their own.
"""

from __future__ import annotations

from nats.js import JetStreamContext

from services.provisioner.deciding import Phase, StoredNodes
from shared.bus.kvstore import KvStore

__all__ = ["NODES_BUCKET", "NodeStore", "Phase", "StoredNodes", "open_store"]

NODES_BUCKET = "kaiten_nodes"


NodeStore = KvStore[StoredNodes]


async def open_store(js: JetStreamContext) -> NodeStore:
    return await KvStore.open(js, NODES_BUCKET, StoredNodes)
