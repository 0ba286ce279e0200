"""The workload's work: spec + plan + ready nodes → a deployed serving application; readiness and
failures reported; deletion removes it and reports cleanup.

State per Workspace lives in NATS KV (``kaiten_workloads``): the latest observed spec, the latest plan
(each with its generation) and the phase. A deployment happens when ``nodes.ready`` arrives for the
generation whose spec and plan are both known; a reconcile loop then watches the application until it
is RUNNING (``workload.inference_ready`` with its endpoint) or failed (``workload.inference_failed``).
Everything is keyed and named from the Workspace, so redelivery, restarts and replicas converge: a
reconcile pass takes the Workspace's lease (``shared.bus.leases``, the one the consumer takes for its
events), so a pass on one replica never races a deletion on another, and it writes the record only if
it is still at the revision the pass read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from typing import Any, Literal

import msgspec
from kubernetes_asyncio import client as kclient
from kubernetes_asyncio.client.exceptions import ApiException
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, NoKeysError
from nats.js.kv import KeyValue
from pydantic import ValidationError

from services.workload.backends.base import Backend, Target
from services.workload.render import RenderError, job_id, kaito_sections, serving_config
from shared import events as ev
from shared import logs, telemetry
from shared.api.workspace import Workspace
from shared.bus.leases import LeaseBusy, Leases
from shared.bus.publishing import Publisher
from shared.bus.reconciling import reconcile_forever
from shared.bus.streams import key_value
from shared.errors import InvalidInput, Transient
from shared.kube.errors import classify
from shared.planning.model import plan_from_dict

log = logging.getLogger("kaiten.workload")
BUCKET = "kaiten_workloads"
OWNER = "workload"
Phase = Literal["waiting", "deploying", "ready", "failed", "deleting", "job", "done"]
ACTIVE = ("deploying", "ready", "job")  # phases a reconcile pass follows
REDEPLOY_GRACE_S = 10.0  # a deployment the backend has not heard of for this long is deployed again


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
    nodes_generation: int = 0  # the latest generation whose nodes are ready
    deployed_generation: int = 0
    since: float = 0.0
    message: str = ""
    job: str = ""  # the Ray job submission id of a tuning Workspace
    job_started: bool = False
    trace: dict[str, str] = {}  # the latest event's trace context: a reconcile pass's events continue it

    @property
    def ref(self) -> ev.WorkspaceRef:
        return ev.WorkspaceRef(namespace=self.namespace, name=self.name, uid=self.uid)

    def target(self, workspace: Workspace | None = None) -> Target:
        return Target(
            ref=self.ref,
            api_version=self.api_version,
            generation=self.deployed_generation,
            workspace=workspace,
            plan=plan_from_dict(self.plan) if workspace is not None else None,
            job=self.job,
        )

    def workspace(self) -> Workspace:
        return Workspace.model_validate(
            {"apiVersion": self.api_version, "kind": "Workspace",
             "metadata": {"name": self.name, "namespace": self.namespace}, **self.spec}
        )  # fmt: skip


class Workloads:
    def __init__(
        self,
        *,
        kv: KeyValue,
        backend: Backend,
        publisher: Publisher,
        leases: Leases,
        api: kclient.ApiClient | None = None,
        interval: float = 2.0,
        timeout: float = 900.0,
    ) -> None:
        self._kv = kv
        self._backend = backend
        self._core = kclient.CoreV1Api(api) if api is not None else None
        self._publisher = publisher
        self._leases = leases
        self._interval = interval
        self._timeout = timeout
        self._locks: dict[str, asyncio.Lock] = {}

    @classmethod
    async def open(cls, js: JetStreamContext, **kwargs: Any) -> Workloads:
        return cls(kv=await key_value(js, BUCKET), **kwargs)

    # -- state ----------------------------------------------------------------------------------------

    async def _get(self, key: str) -> Record | None:
        return (await self._entry(key))[0]

    async def _entry(self, key: str) -> tuple[Record | None, int]:
        """The record and its revision (0 when there is none)."""
        try:
            entry = await self._kv.get(key)
        except KeyNotFoundError:
            return None, 0
        record = msgspec.json.decode(entry.value, type=Record) if entry.value else None
        return record, int(entry.revision or 0)

    async def _put(self, key: str, record: Record, *, last: int | None = None) -> int:
        """Store the record; with ``last``, only if it is still at that revision (else
        ``KeyWrongLastSequenceError``). Returns the new revision."""
        if last is None:
            return int(await self._kv.put(key, msgspec.json.encode(record)))
        return int(await self._kv.update(key, msgspec.json.encode(record), last=last))

    def _lock(self, key: str) -> asyncio.Lock:
        return self._locks.setdefault(key, asyncio.Lock())

    # -- events ---------------------------------------------------------------------------------------

    async def handle(self, events: Sequence[ev.AnyEvent]) -> None:
        ref = events[-1].workspace
        key = f"{ref.namespace}.{ref.name}"
        if isinstance(events[-1], ev.WorkspaceDeleting):
            await self._delete(key, events[-1])
            return
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
                    record.plan, record.plan_generation = msgspec.to_builtins(event.plan), event.generation
                elif isinstance(event, ev.NodesReady) and event.generation > record.nodes_generation:
                    record.nodes_generation = event.generation
            record.trace = telemetry.carrier()
            await self._put(key, record)
            # whichever of spec, plan and nodes arrives last (events of one Workspace may reach two
            # replicas in any order) completes the generation and deploys it
            generation = record.plan_generation
            deploy = (
                generation > 0
                and record.spec_generation == generation == record.nodes_generation
                and (generation > record.deployed_generation or record.phase == "waiting")
            )
        if deploy:
            await self._deploy(key)

    async def _deploy(self, key: str) -> None:
        async with self._lock(key):
            record = await self._get(key)
            if record is None or record.phase == "deleting":
                return
            if record.spec_generation != record.plan_generation:
                return  # the spec's plan is not here yet: its nodes.ready will deploy it
            await self._deploy_locked(key, record)
        await self.reconcile(key)

    async def _deploy_locked(self, key: str, record: Record, last: int | None = None) -> None:
        generation = record.plan_generation
        common: dict[str, Any] = {"workspace": record.ref, "generation": generation}
        tuning = bool(record.spec.get("tuning"))
        try:
            workspace = record.workspace()
            record.deployed_generation = generation
            if workspace.tuning is not None:
                record.job = job_id(record.ref, generation)
                sections = kaito_sections(await self._configmap(record.ref, workspace.tuning.config))
                with telemetry.span("tuning job submit", **{"kaito.workspace.key": record.ref.key}):
                    await self._backend.submit(record.target(workspace), sections)
                record.phase, record.job_started = "job", False
                log.info("[%s] gen %d: tuning job %s submitted", record.ref.key, generation, record.job)
            else:
                target = record.target(workspace)
                assert target.plan is not None
                with telemetry.span("ray deploy", **{"kaito.workspace.key": record.ref.key}):
                    await self._backend.deploy(target, serving_config(workspace, target.plan))
                record.phase = "deploying"
        except (RenderError, ValidationError, InvalidInput) as exc:  # InvalidInput: the apiserver refused it
            reason = "InvalidSpec" if isinstance(exc, ValidationError) else exc.reason
            record.phase, record.message = "failed", str(exc)
            failed: ev.Event = (
                ev.JobFailed(reason=reason, message=str(exc), **common)
                if tuning
                else ev.InferenceFailed(reason=reason, message=str(exc), **common)
            )
            await self._publisher.publish(failed)  # then store: a crash between repeats the publish
            await self._put(key, record, last=last)
            log.warning("[%s] gen %d: %s: %s", record.ref.key, generation, reason, exc)
            return
        record.since, record.message = time.time(), ""
        await self._put(key, record, last=last)

    async def _configmap(self, ref: ev.WorkspaceRef, name: str | None) -> str:
        """KAITO's tuning ConfigMap (``training_config.yaml``), if the Workspace names one."""
        if not name:
            return ""
        if self._core is None:
            raise RenderError("InvalidTuningConfig", "no Kubernetes API to read the tuning ConfigMap")
        try:
            cm = await self._core.read_namespaced_config_map(name, ref.namespace)
        except ApiException as exc:
            if exc.status == 404:
                raise RenderError(
                    "InvalidTuningConfig", f"ConfigMap {name} not found in {ref.namespace}"
                ) from exc
            raise classify(exc, f"[{ref.key}] read ConfigMap {name}") from exc
        data = cm.data or {}
        text = data.get("training_config.yaml") or next(iter(data.values()), "")
        return str(text)

    async def _delete(self, key: str, event: ev.WorkspaceDeleting) -> None:
        ref = event.workspace
        async with self._lock(key):
            record = await self._get(key)
            if record is not None and record.uid == ref.uid and record.phase != "deleting":
                record.phase = "deleting"
                await self._put(key, record)
            target = (
                record.target()
                if record is not None and record.uid == ref.uid
                else Target(ref=ref, api_version="", generation=event.generation)
            )
            if not await self._backend.remove(target):
                raise Transient(f"[{ref.key}] workload still being removed", retry_after=self._interval)
            if record is not None and record.uid == ref.uid:
                with contextlib.suppress(KeyNotFoundError):
                    await self._kv.purge(key)
            await self._publisher.publish(
                ev.CleanupDone(workspace=ref, generation=event.generation, owner=OWNER)
            )
            log.info("[%s] workload removed; cleanup done", ref.key)

    # -- the reconcile loop ---------------------------------------------------------------------------

    async def run(self) -> None:
        await reconcile_forever("reconcile", self._keys, self._pass, self._interval)

    async def _keys(self) -> list[str]:
        try:
            return list(await self._kv.keys())
        except NoKeysError:  # nats-py's answer for an empty bucket
            return []

    async def _pass(self, key: str) -> None:
        """One pass under the Workspace's lease; skipped while another holder is acting on it."""
        record = await self._get(key)
        if record is None or record.phase not in ACTIVE:
            return
        try:
            async with self._leases.hold(record.ref.key):
                with (
                    telemetry.resumed(record.trace),
                    logs.about(record.ref, generation=record.spec_generation),
                ):
                    await self.reconcile(key)
        except LeaseBusy:
            return

    async def reconcile(self, key: str) -> None:
        """Follow a deployed application or job one step; the caller holds the Workspace's lease."""
        async with self._lock(key):
            record, revision = await self._entry(key)
            if record is None or record.phase not in ACTIVE:
                return
            try:
                await self._reconcile_locked(key, record, revision)
            except KeyWrongLastSequenceError:
                log.warning("[%s] record changed during the pass (deleted?); its outcome dropped", key)

    async def _reconcile_locked(self, key: str, record: Record, revision: int) -> None:
        common: dict[str, Any] = {"workspace": record.ref, "generation": record.deployed_generation}
        if record.phase == "job":
            await self._reconcile_job(key, record, common, revision)
            return
        try:
            state, message = await self._backend.status(record.target())
        except Transient as exc:
            log.warning("[%s] %s", record.ref.key, exc)
            return
        if state == "absent" and time.time() - record.since > REDEPLOY_GRACE_S:
            # lost (the Ray cluster restarted, someone deleted it, a concurrent write dropped it)
            log.warning("[%s] gen %d: deployment missing; deploying again", record.ref.key,
                        record.deployed_generation)  # fmt: skip
            await self._deploy_locked(key, record, last=revision)
            return
        if state == "pending" and record.phase == "deploying" and time.time() - record.since > self._timeout:
            state, message = "failed", f"not ready after {self._timeout:.0f}s (last state {message})"
        if state == "ready" and record.phase != "ready":
            record.phase = "ready"
            endpoint = self._backend.endpoint(record.target())
            await self._publisher.publish(ev.InferenceReady(endpoint=endpoint, **common))
            await self._put(key, record, last=revision)
            log.info("[%s] serving at %s", record.ref.key, endpoint)
        elif state == "failed":
            record.phase, record.message = "failed", message
            failed = ev.InferenceFailed(reason="DeployFailed", message=message, **common)
            await self._publisher.publish(failed)
            await self._put(key, record, last=revision)
            log.warning("[%s] deploy failed: %s", record.ref.key, message)

    async def _reconcile_job(self, key: str, record: Record, common: dict[str, Any], revision: int) -> None:
        """Ray's view of the job. The job publishes its own progress and outcome (with the adapter's
        digest); what the workload publishes for the same outcome has the same dedupe id and is
        dropped — it only speaks when the job could not (a crash, an OOM kill). Every outcome is
        published before the record that says so is stored: a crash in between repeats the publish."""
        try:
            state, message = await self._backend.job_status(record.target())
        except Transient as exc:
            log.warning("[%s] %s", record.ref.key, exc)
            return
        if state in ("RUNNING", "SUCCEEDED", "FAILED") and not record.job_started:
            record.job_started = True
            await self._publisher.publish(ev.JobStarted(job=record.job, **common))
            revision = await self._put(key, record, last=revision)
        if state == "SUCCEEDED":
            record.phase = "done"
            await self._publisher.publish(ev.JobSucceeded(job=record.job, **common))
            await self._put(key, record, last=revision)
            log.info("[%s] tuning job %s succeeded", record.ref.key, record.job)
        elif state in ("FAILED", "STOPPED"):
            record.phase, record.message = "failed", message
            await self._publisher.publish(
                ev.JobFailed(job=record.job, reason="JobFailed", message=message or state, **common)
            )
            await self._put(key, record, last=revision)
            log.warning("[%s] tuning job %s %s: %s", record.ref.key, record.job, state, message)
        elif state == "ABSENT" and time.time() - record.since > 60:  # Ray lost it (restarted?)
            record.phase, record.message = "failed", f"Ray has no job {record.job} (was Ray restarted?)"
            await self._publisher.publish(
                ev.JobFailed(job=record.job, reason="JobLost", message=record.message, **common)
            )
            await self._put(key, record, last=revision)
