"""The workload's work: spec + plan + ready nodes → a deployed serving application; readiness and
failures reported; deletion removes it and reports cleanup.

State per Workspace lives in NATS KV (``kaiten_workloads``): the latest observed spec, the latest plan
(each with its generation) and the phase. A deployment happens when ``nodes.ready`` arrives for the
generation whose spec and plan are both known; a reconcile loop then watches the application until it
is RUNNING (``workload.inference_ready`` with its endpoint) or failed (``workload.inference_failed``).
Everything is keyed and named from the Workspace, so redelivery, restarts and replicas converge.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from typing import Any, Literal

import msgspec
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, NoKeysError
from nats.js.kv import KeyValue
from pydantic import ValidationError

from services.workload.backends.local import LocalRay
from services.workload.render import RenderError, app_name, route_prefix, serve_application, serving_config
from shared import events as ev
from shared.api.workspace import Workspace
from shared.bus.errors import Transient
from shared.bus.publishing import Publisher
from shared.bus.streams import key_value
from shared.planning.model import plan_from_dict

log = logging.getLogger("kaiten.workload")
BUCKET = "kaiten_workloads"
OWNER = "workload"
Phase = Literal["waiting", "deploying", "ready", "failed", "deleting"]


class Record(msgspec.Struct, kw_only=True):
    uid: str
    namespace: str
    name: str
    spec: dict[str, Any] = {}
    api_version: str = "kaito.sh/v1alpha1"
    spec_generation: int = 0
    plan: dict[str, Any] = {}
    plan_generation: int = 0
    phase: Phase = "waiting"
    deployed_generation: int = 0
    since: float = 0.0
    message: str = ""

    @property
    def ref(self) -> ev.WorkspaceRef:
        return ev.WorkspaceRef(namespace=self.namespace, name=self.name, uid=self.uid)


class Workloads:
    def __init__(
        self,
        *,
        kv: KeyValue,
        ray: LocalRay,
        publisher: Publisher,
        interval: float = 2.0,
        timeout: float = 900.0,
    ) -> None:
        self._kv = kv
        self._ray = ray
        self._publisher = publisher
        self._interval = interval
        self._timeout = timeout
        self._locks: dict[str, asyncio.Lock] = {}

    @classmethod
    async def open(cls, js: JetStreamContext, **kwargs: Any) -> Workloads:
        return cls(kv=await key_value(js, BUCKET), **kwargs)

    # -- state ----------------------------------------------------------------------------------------

    async def _get(self, key: str) -> Record | None:
        try:
            entry = await self._kv.get(key)
        except KeyNotFoundError:
            return None
        return msgspec.json.decode(entry.value, type=Record) if entry.value else None

    async def _put(self, key: str, record: Record) -> None:
        await self._kv.put(key, msgspec.json.encode(record))

    def _lock(self, key: str) -> asyncio.Lock:
        return self._locks.setdefault(key, asyncio.Lock())

    # -- events ---------------------------------------------------------------------------------------

    async def handle(self, events: Sequence[ev.AnyEvent]) -> None:
        ref = events[-1].workspace
        key = f"{ref.namespace}.{ref.name}"
        if isinstance(events[-1], ev.WorkspaceDeleting):
            await self._delete(key, events[-1])
            return
        deploy = False
        async with self._lock(key):
            record = await self._get(key)
            if record is None or record.uid != ref.uid:
                record = Record(uid=ref.uid, namespace=ref.namespace, name=ref.name)
            if record.phase == "deleting":
                return
            for event in events:
                if isinstance(event, ev.WorkspaceObserved) and event.generation >= record.spec_generation:
                    record.spec, record.spec_generation = dict(event.spec), event.generation
                    record.api_version = event.api_version
                elif isinstance(event, ev.PlanResolved) and event.generation >= record.plan_generation:
                    record.plan, record.plan_generation = dict(event.plan), event.generation
                elif isinstance(event, ev.NodesReady) and event.generation == record.plan_generation:
                    deploy = event.generation > record.deployed_generation or record.phase == "waiting"
            await self._put(key, record)
        if deploy:
            await self._deploy(key)

    async def _deploy(self, key: str) -> None:
        async with self._lock(key):
            record = await self._get(key)
            if record is None or record.phase == "deleting":
                return
            if record.spec_generation != record.plan_generation:
                return  # the spec's plan is not here yet: its nodes.ready will deploy it
            common: dict[str, Any] = {"workspace": record.ref, "generation": record.plan_generation}
            try:
                workspace = Workspace.model_validate(
                    {"apiVersion": record.api_version, "kind": "Workspace",
                     "metadata": {"name": record.name, "namespace": record.namespace}, **record.spec}
                )  # fmt: skip
                if workspace.tuning is not None:
                    raise RenderError(
                        "TuningNotDeployed",
                        "tuning jobs are not run by the workload service yet (issue 7 is open)",
                    )
                config = serving_config(workspace, plan_from_dict(record.plan))
            except (RenderError, ValidationError) as exc:
                reason = exc.reason if isinstance(exc, RenderError) else "InvalidSpec"
                record.phase, record.message = "failed", str(exc)
                record.deployed_generation = record.plan_generation
                await self._put(key, record)
                await self._publisher.publish(ev.InferenceFailed(reason=reason, message=str(exc), **common))
                return
            await self._ray.deploy(serve_application(record.ref, config))
            record.phase, record.since = "deploying", time.time()
            record.deployed_generation, record.message = record.plan_generation, ""
            await self._put(key, record)
            log.info(
                "[%s] gen %d: %s deploying", record.ref.key, record.plan_generation, app_name(record.ref)
            )
        await self.reconcile(key)

    async def _delete(self, key: str, event: ev.WorkspaceDeleting) -> None:
        ref = event.workspace
        async with self._lock(key):
            record = await self._get(key)
            if record is not None and record.uid == ref.uid and record.phase != "deleting":
                record.phase = "deleting"
                await self._put(key, record)
            if not await self._ray.delete(app_name(ref)):
                raise Transient(
                    f"[{ref.key}] Serve application still being deleted", retry_after=self._interval
                )
            if record is not None and record.uid == ref.uid:
                with contextlib.suppress(KeyNotFoundError):
                    await self._kv.purge(key)
            await self._publisher.publish(
                ev.CleanupDone(workspace=ref, generation=event.generation, owner=OWNER)
            )
            log.info("[%s] workload removed; cleanup done", ref.key)

    # -- the reconcile loop ---------------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            try:
                keys = list(await self._kv.keys())
            except NoKeysError:
                keys = []
            for key in keys:
                try:
                    await self.reconcile(key)
                except Exception:
                    log.exception("reconcile of %s failed", key)
            await asyncio.sleep(self._interval)

    async def reconcile(self, key: str) -> None:
        async with self._lock(key):
            record = await self._get(key)
            if record is None or record.phase != "deploying":
                return
            common: dict[str, Any] = {"workspace": record.ref, "generation": record.deployed_generation}
            try:
                state, message = await self._ray.status(app_name(record.ref))
            except Transient as exc:
                log.warning("[%s] %s", record.ref.key, exc)
                return
            if state == "pending" and time.time() - record.since > self._timeout:
                state, message = "failed", f"not RUNNING after {self._timeout:.0f}s (last state {message})"
            if state == "ready":
                record.phase = "ready"
                await self._put(key, record)
                endpoint = self._ray.serve_url + route_prefix(record.ref)
                await self._publisher.publish(ev.InferenceReady(endpoint=endpoint, **common))
                log.info("[%s] serving at %s", record.ref.key, endpoint)
            elif state == "failed":
                record.phase, record.message = "failed", message
                await self._put(key, record)
                await self._publisher.publish(
                    ev.InferenceFailed(reason="DeployFailed", message=message, **common)
                )
                log.warning("[%s] deploy failed: %s", record.ref.key, message)
