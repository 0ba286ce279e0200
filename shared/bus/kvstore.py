"""A service's state per Workspace in NATS KV, typed: what makes the provisioner and the workload
restartable (a new process reads where the last one stopped) and their replicas safe together (a pass
writes only if the record is still at the revision it read).

- :class:`KvStore` ``[T]``: one bucket of msgspec records (key ``<namespace>.<name>``), JSON on the
  wire; :meth:`KvStore.put` with ``last`` is a compare-and-set on the revision.
- :class:`KeyLocks`: one asyncio lock per key in this process, forgotten when nobody holds or waits
  for it (a service that saw a million Workspaces keeps no million locks).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Generic, TypeVar

import msgspec
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, NoKeysError
from nats.js.kv import KeyValue

from shared.bus.streams import key_value
from shared.events import WorkspaceRef, dec_hook, enc_hook

T = TypeVar("T")
_encoder = msgspec.json.Encoder(enc_hook=enc_hook)


def key_of(ref: WorkspaceRef) -> str:
    """A Workspace's key in a service's bucket (both parts are DNS names: valid KV key characters)."""
    return f"{ref.namespace}.{ref.name}"


class KvStore(Generic[T]):
    """Records of type ``T`` (a msgspec Struct) in one KV bucket."""

    def __init__(self, kv: KeyValue, type_: type[T]) -> None:
        self._kv = kv
        self._decoder = msgspec.json.Decoder(type_, dec_hook=dec_hook)

    @classmethod
    async def open(cls, js: JetStreamContext, bucket: str, type_: type[T]) -> KvStore[T]:
        return cls(await key_value(js, bucket), type_)

    async def get(self, key: str) -> T | None:
        return (await self.entry(key))[0]

    async def entry(self, key: str) -> tuple[T | None, int]:
        """The record and its revision (0 when there is none), for :meth:`put`'s ``last``."""
        try:
            entry = await self._kv.get(key)
        except KeyNotFoundError:
            return None, 0
        record = self._decoder.decode(entry.value) if entry.value else None
        return record, int(entry.revision or 0)

    async def put(self, key: str, record: T, *, last: int | None = None) -> int:
        """Store the record; with ``last``, only if the key is still at that revision (else nats-py's
        ``KeyWrongLastSequenceError``): a pass that read it cannot overwrite a newer write. Returns the
        new revision."""
        data = _encoder.encode(record)
        if last is None:
            return int(await self._kv.put(key, data))
        return int(await self._kv.update(key, data, last=last))

    async def purge(self, key: str) -> None:
        with contextlib.suppress(KeyNotFoundError):
            await self._kv.purge(key)

    async def keys(self) -> list[str]:
        try:
            return list(await self._kv.keys())
        except NoKeysError:  # nats-py's answer for an empty bucket
            return []


class KeyLocks:
    """``async with locks(key):`` — one holder per key at a time in this process; a key's lock lives
    only while someone holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    def __len__(self) -> int:
        return len(self._locks)

    @contextlib.asynccontextmanager
    async def __call__(self, key: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (None, 0))
        if lock is None:
            lock = asyncio.Lock()
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)
