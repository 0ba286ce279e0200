"""Provisioning state per Workspace, in NATS KV (bucket ``kaiten_nodes``, key ``<namespace>.<name>``).

It is what makes the provisioner restartable: the reconcile loop resumes every ``pending`` entry after a
restart, a redelivered plan finds its request already recorded, and a deleted Workspace's entry says
``deleting`` until the provider has released everything. Providers never keep state of their own.
"""

from __future__ import annotations

import contextlib
from typing import Literal

import msgspec
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, NoKeysError
from nats.js.kv import KeyValue

from services.provisioner.providers.base import NodeRequest
from shared.bus.streams import key_value
from shared.events import WorkspaceRef

NODES_BUCKET = "kaiten_nodes"
Phase = Literal["pending", "ready", "failed", "deleting"]


class StoredNodes(msgspec.Struct, frozen=True, kw_only=True):
    uid: str
    generation: int
    request: NodeRequest
    phase: Phase
    since: float  # when this request was first made (monotonic across restarts: wall clock)
    nodes: tuple[str, ...] = ()
    reason: str = ""
    message: str = ""
    trace: dict[str, str] = {}  # the plan's trace context: a reconcile pass's events continue it


def key_of(ref: WorkspaceRef) -> str:
    return f"{ref.namespace}.{ref.name}"


class NodeStore:
    def __init__(self, kv: KeyValue) -> None:
        self._kv = kv

    @classmethod
    async def open(cls, js: JetStreamContext) -> NodeStore:
        return cls(await key_value(js, NODES_BUCKET))

    async def get_key(self, key: str) -> StoredNodes | None:
        return (await self.get_entry(key))[0]

    async def get_entry(self, key: str) -> tuple[StoredNodes | None, int]:
        """The entry and its revision (0 when there is none), for :meth:`put`'s ``last``."""
        try:
            entry = await self._kv.get(key)
        except KeyNotFoundError:
            return None, 0
        if not entry.value:
            return None, int(entry.revision or 0)
        return msgspec.json.decode(entry.value, type=StoredNodes), int(entry.revision or 0)

    async def get(self, ref: WorkspaceRef) -> StoredNodes | None:
        return await self.get_key(key_of(ref))

    async def put(self, ref: WorkspaceRef, stored: StoredNodes, *, last: int | None = None) -> None:
        """Write the entry; with ``last``, only if it is still at that revision (else
        ``KeyWrongLastSequenceError``): a pass that read it cannot overwrite a newer write."""
        if last is None:
            await self._kv.put(key_of(ref), msgspec.json.encode(stored))
        else:
            await self._kv.update(key_of(ref), msgspec.json.encode(stored), last=last)

    async def forget(self, ref: WorkspaceRef) -> None:
        with contextlib.suppress(KeyNotFoundError):
            await self._kv.purge(key_of(ref))

    async def keys(self) -> list[str]:
        try:
            return list(await self._kv.keys())
        except NoKeysError:  # nats-py's answer for an empty bucket
            return []
