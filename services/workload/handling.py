"""The workload's work: a plan (with the spec it was made for) + ready nodes → a deployed serving
application or tuning job; readiness and failures reported; deletion removes it and reports cleanup.

State per Workspace lives in NATS KV (``kaiten_workloads``, a :class:`~services.workload.deciding.Record`):
the latest plan and spec, the generation whose nodes are ready, and the phase. ``plan.resolved``
carries everything to deploy, so two streams are joined, not three: a deployment happens when the
generation's plan and ``nodes.ready`` are both in, whichever came last. A reconcile loop
(``shared.bus.reconciling.Reconciler``) then follows the application until it is RUNNING
(``workload.inference_ready`` with its endpoint) or failed (``workload.inference_failed``), or the
job until it ends.

What to do is decided by ``deciding`` (pure); this module carries it out. Everything is keyed and
named from the Workspace, so redelivery, restarts and replicas converge: a reconcile pass takes the
Workspace's lease (the one the consumer takes for its events), so a pass on one replica never races a
deletion on another, and it writes the record only if it is still at the revision the pass read.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from kubernetes_asyncio import client as kclient
from kubernetes_asyncio.client.exceptions import ApiException
from nats.js import JetStreamContext
from nats.js.errors import KeyWrongLastSequenceError
from pydantic import ValidationError

from services.workload import deciding
from services.workload.backends.base import Backend, Target
from services.workload.deciding import FOLLOWED, Phase, Record, Step
from services.workload.render import RenderError, job_id, kaito_sections, serving_config
from shared import events as ev
from shared import logs, telemetry
from shared.api.workspace import Workspace
from shared.bus.kvstore import KeyLocks, KvStore, key_of
from shared.bus.leases import Leases
from shared.bus.publishing import Publisher
from shared.bus.reconciling import Reconciler
from shared.errors import InvalidInput, Transient
from shared.kube.errors import classify

log = logging.getLogger(__name__)
BUCKET = "kaiten_workloads"
OWNER = "workload"


def target(record: Record, workspace: Workspace | None = None) -> Target:
    return Target(
        ref=record.ref,
        api_version=record.api_version,
        generation=record.deployed_generation,
        workspace=workspace,
        plan=record.plan if workspace is not None else None,
        job=record.job,
        template=record.template,
    )


class Workloads:
    def __init__(
        self,
        *,
        store: KvStore[Record],
        backend: Backend,
        publisher: Publisher,
        leases: Leases,
        api: kclient.ApiClient | None = None,
        interval: float = 2.0,
        timeout: float = 900.0,
    ) -> None:
        self._store = store
        self._backend = backend
        self._core = kclient.CoreV1Api(api) if api is not None else None
        self._publisher = publisher
        self._interval = interval
        self._timeout = timeout
        self._locks = KeyLocks()
        self._reconciler = Reconciler(
            "reconcile",
            store=store,
            leases=leases,
            due=lambda _key, record: record.phase in FOLLOWED,
            step=self.reconcile,
            interval=interval,
        )

    @classmethod
    async def open(cls, js: JetStreamContext, **kwargs: Any) -> Workloads:
        return cls(store=await KvStore.open(js, BUCKET, Record), **kwargs)

    # -- events ---------------------------------------------------------------------------------------

    async def handle(self, events: Sequence[ev.AnyEvent]) -> None:
        last = events[-1]
        key = key_of(last.workspace)
        if isinstance(last, ev.WorkspaceDeleting):
            await self._delete(key, last)
            return
        for event in events:
            if isinstance(event, ev.PlanResolved) and event.spec is None:
                raise InvalidInput(
                    f"plan.resolved of schema {event.schema} carries no spec (a planner older than "
                    "this service); apply the Workspace again once the planner is upgraded",
                    reason="PlanTooOld",
                )
        async with self._locks(key):
            record = await self._store.get(key)
            if record is not None and record.uid == last.workspace.uid and record.phase == Phase.DELETING:
                return
            record, deploy = deciding.absorb(record, events, telemetry.carrier())
            await self._store.put(key, record)
        if deploy:
            await self._deploy(key)

    async def _deploy(self, key: str) -> None:
        async with self._locks(key):
            record, revision = await self._store.entry(key)
            if record is None or record.phase == Phase.DELETING:
                return
            if record.nodes_generation != record.generation:
                return  # a newer plan came meanwhile: its nodes.ready will deploy it
            await self._deploy_locked(key, record, revision)
        await self.reconcile(key)

    async def _deploy_locked(self, key: str, record: Record, revision: int) -> None:
        """Hand the record's generation to the backend; a refusal (an invalid spec, a config the
        apiserver will not take) fails the generation, with the reason."""
        job = job_id(record.ref, record.generation) if record.tuning else ""
        submitting = deciding.deployed(record, job=job, now=time.time())  # what is stored once it took
        try:
            workspace = record.workspace()
            if workspace.tuning is not None:
                name = workspace.tuning.config or ""
                sections = kaito_sections(
                    await self._configmap(record.ref, name),
                    name=name,
                    namespace=record.ref.namespace,
                    method=workspace.tuning.method,
                )
                with telemetry.span("tuning job submit", **{"kaito.workspace.key": record.ref.key}):
                    await self._backend.submit(target(submitting, workspace), sections)
                logs.of(log, record.ref).info("gen %d: tuning job %s submitted", record.generation, job)
            elif record.template:
                with telemetry.span("template deploy", **{"kaito.workspace.key": record.ref.key}):
                    await self._backend.deploy_template(target(submitting, workspace))
            else:
                assert record.plan is not None
                with telemetry.span("ray deploy", **{"kaito.workspace.key": record.ref.key}):
                    config = serving_config(workspace, record.plan)
                    await self._backend.deploy(target(submitting, workspace), config)
        except (RenderError, ValidationError, InvalidInput) as exc:  # InvalidInput: the apiserver refused it
            reason = "InvalidSpec" if isinstance(exc, ValidationError) else exc.reason
            await self._carry_out(key, deciding.refused(record, reason, str(exc)), revision)
            logs.of(log, record.ref).warning("gen %d: %s: %s", record.generation, reason, exc)
            return
        await self._store.put(key, submitting, last=revision)

    async def _configmap(self, ref: ev.WorkspaceRef, name: str) -> dict[str, str] | None:
        """The data of KAITO's tuning ConfigMap, if the Workspace names one."""
        if not name:
            return None
        if self._core is None:
            raise RenderError("InvalidTuningConfig", "no Kubernetes API to read the tuning ConfigMap")
        try:
            cm = await self._core.read_namespaced_config_map(name, ref.namespace)
        except ApiException as exc:
            if exc.status == 404:
                raise RenderError(
                    "InvalidTuningConfig",
                    f"ConfigMap '{name}' specified in 'config' not found in namespace '{ref.namespace}'",
                ) from exc
            raise classify(exc, f"[{ref.key}] read ConfigMap {name}") from exc
        return dict(cm.data or {})

    async def _delete(self, key: str, event: ev.WorkspaceDeleting) -> None:
        ref = event.workspace
        async with self._locks(key):
            record = await self._store.get(key)
            ours = record is not None and record.uid == ref.uid
            if record is not None and ours and record.phase != Phase.DELETING:
                record = deciding.deleting(record)
                await self._store.put(key, record)
            gone = target(record) if record is not None and ours else Target(ref, "", event.generation)
            if not await self._backend.remove(gone):
                raise Transient(f"[{ref.key}] workload still being removed", retry_after=self._interval)
            if ours:
                await self._store.purge(key)
            await self._publisher.publish(
                ev.CleanupDone(workspace=ref, generation=event.generation, owner=OWNER)
            )
            logs.of(log, ref).info("workload removed; cleanup done")

    # -- the reconcile loop ---------------------------------------------------------------------------

    async def run(self) -> None:
        await self._reconciler.run()

    async def reconcile(self, key: str) -> None:
        """Follow a deployed application or job one step; the caller holds the Workspace's lease."""
        async with self._locks(key):
            record, revision = await self._store.entry(key)
            if record is None or record.phase not in FOLLOWED:
                return
            try:
                await self._follow(key, record, revision)
            except KeyWrongLastSequenceError:
                logs.of(log, record.ref).warning("record changed during the pass (deleted?); outcome dropped")

    async def _follow(self, key: str, record: Record, revision: int) -> None:
        try:
            if record.phase == Phase.JOB:
                job_state, message = await self._backend.job_status(target(record))
                step = deciding.follow_job(record, job_state, message, now=time.time())
            else:
                state, message = await self._backend.status(target(record))
                step = deciding.follow(
                    record,
                    state,
                    message,
                    endpoint=self._backend.endpoint(target(record)),
                    now=time.time(),
                    timeout=self._timeout,
                )
        except Transient as exc:
            logs.of(log, record.ref).warning("%s", exc)
            return
        if step.redeploy:
            logs.of(log, record.ref).warning("gen %d: deployment missing; deploying again",
                        record.deployed_generation)  # fmt: skip
            await self._deploy_locked(key, record, revision)
            return
        await self._carry_out(key, step, revision)
        if step.record is not None:
            self._log(record, step.record)

    async def _carry_out(self, key: str, step: Step, revision: int) -> None:
        for event in step.publish:
            await self._publisher.publish(event)
        if step.record is not None:
            await self._store.put(key, step.record, last=revision)

    def _log(self, before: Record, after: Record) -> None:
        about = logs.of(log, before.ref)
        if after.phase == before.phase:
            return
        if after.phase == Phase.READY:
            about.info("serving at %s", self._backend.endpoint(target(after)))
        elif after.phase == Phase.DONE:
            about.info("tuning job %s succeeded", after.job)
        elif after.phase == Phase.FAILED:
            about.warning("gen %d failed: %s", after.deployed_generation, after.message)
