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
import base64
import contextlib
import logging
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import msgspec
import yaml
from kubernetes_asyncio import client as kclient
from kubernetes_asyncio.client.exceptions import ApiException
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, NoKeysError
from nats.js.kv import KeyValue
from pydantic import ValidationError

from services.workload.backends.local import LocalJobs, LocalRay
from services.workload.render import (
    RenderError,
    app_name,
    job_id,
    kaito_sections,
    route_prefix,
    serve_application,
    serving_config,
    tuning_config,
)
from shared import events as ev
from shared.api.workspace import Workspace
from shared.bus.errors import Transient
from shared.bus.publishing import Publisher
from shared.bus.streams import key_value
from shared.kube.errors import classify
from shared.planning.model import plan_from_dict

log = logging.getLogger("kaiten.workload")
BUCKET = "kaiten_workloads"
OWNER = "workload"
Phase = Literal["waiting", "deploying", "ready", "failed", "deleting", "job", "done"]


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
    job: str = ""  # the Ray job submission id of a tuning Workspace
    job_started: bool = False

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
        api: kclient.ApiClient | None = None,
        nats_url: str = "",
        work_dir: str = "",
        allow_loopback_urls: bool = False,
        interval: float = 2.0,
        timeout: float = 900.0,
    ) -> None:
        self._kv = kv
        self._ray = ray
        self._jobs = LocalJobs(ray)
        self._core = kclient.CoreV1Api(api) if api is not None else None
        self._nats_url = nats_url
        self._work = Path(work_dir or Path.home() / ".local" / "state" / "kaiten" / "workload")
        self._allow_loopback = allow_loopback_urls
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
                    await self._submit_job(key, record, workspace)
                    return
                config = serving_config(workspace, plan_from_dict(record.plan))
            except (RenderError, ValidationError) as exc:
                reason = exc.reason if isinstance(exc, RenderError) else "InvalidSpec"
                record.phase, record.message = "failed", str(exc)
                record.deployed_generation = record.plan_generation
                await self._put(key, record)
                failed: ev.Event = (
                    ev.JobFailed(reason=reason, message=str(exc), **common)
                    if record.spec.get("tuning")
                    else ev.InferenceFailed(reason=reason, message=str(exc), **common)
                )
                await self._publisher.publish(failed)
                return
            await self._ray.deploy(serve_application(record.ref, config))
            record.phase, record.since = "deploying", time.time()
            record.deployed_generation, record.message = record.plan_generation, ""
            await self._put(key, record)
            log.info(
                "[%s] gen %d: %s deploying", record.ref.key, record.plan_generation, app_name(record.ref)
            )
        await self.reconcile(key)

    async def _submit_job(self, key: str, record: Record, workspace: Workspace) -> None:
        """A tuning Workspace: its job config (and the push secret, as a 0600 file) on disk, then a Ray
        job whose submission id is derived from the Workspace and generation."""
        ref, generation = record.ref, record.plan_generation
        tuning = workspace.tuning
        assert tuning is not None
        sections = kaito_sections(await self._configmap(ref, tuning.config)) if tuning.config else {}
        work = self._work / key / f"g{generation}"
        await asyncio.to_thread(work.mkdir, parents=True, exist_ok=True)
        push = await self._push_secret(ref, tuning.output.image_push_secret, work / "push")
        config = tuning_config(
            workspace,
            plan_from_dict(record.plan),
            ref,
            generation,
            sections=sections,
            push_secret=push,
            nats_url=self._nats_url,
            work_dir=str(work / "job"),
            allow_loopback_urls=self._allow_loopback,
        )
        path = work / "job.yaml"
        await asyncio.to_thread(path.write_text, yaml.safe_dump(config))
        submission = job_id(ref, generation)
        await self._jobs.submit(submission, f"{sys.executable} -m services.tuning --config {path}")
        record.phase, record.job, record.job_started = "job", submission, False
        record.since, record.deployed_generation, record.message = time.time(), generation, ""
        await self._put(key, record)
        log.info("[%s] gen %d: tuning job %s submitted", ref.key, generation, submission)

    async def _configmap(self, ref: ev.WorkspaceRef, name: str) -> str:
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

    async def _push_secret(self, ref: ev.WorkspaceRef, name: str | None, directory: Path) -> str | None:
        """The docker config json of the push Secret, written for the job alone (mode 0600)."""
        if not name:
            return None
        if self._core is None:
            raise RenderError("InvalidPushSecret", "no Kubernetes API to read the push Secret")
        try:
            secret = await self._core.read_namespaced_secret(name, ref.namespace)
        except ApiException as exc:
            if exc.status == 404:
                raise RenderError("InvalidPushSecret", f"Secret {name} not found in {ref.namespace}") from exc
            raise classify(exc, f"[{ref.key}] read Secret {name}") from exc
        encoded = (secret.data or {}).get(".dockerconfigjson")
        if not encoded:
            raise RenderError("InvalidPushSecret", f"Secret {name} has no .dockerconfigjson")

        def write() -> None:
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            target = directory / ".dockerconfigjson"
            target.write_bytes(base64.b64decode(encoded))
            target.chmod(0o600)

        await asyncio.to_thread(write)
        return str(directory)

    async def _delete(self, key: str, event: ev.WorkspaceDeleting) -> None:
        ref = event.workspace
        async with self._lock(key):
            record = await self._get(key)
            if record is not None and record.uid == ref.uid and record.phase != "deleting":
                record.phase = "deleting"
                await self._put(key, record)
            if record is not None and record.job and not await self._jobs.stop(record.job):
                raise Transient(
                    f"[{ref.key}] tuning job {record.job} still stopping", retry_after=self._interval
                )
            if not await self._ray.delete(app_name(ref)):
                raise Transient(
                    f"[{ref.key}] Serve application still being deleted", retry_after=self._interval
                )
            if record is not None and record.uid == ref.uid:
                with contextlib.suppress(KeyNotFoundError):
                    await self._kv.purge(key)
            await asyncio.to_thread(shutil.rmtree, self._work / key, True)  # job configs, the secret copy
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
            if record is None or record.phase not in ("deploying", "job"):
                return
            common: dict[str, Any] = {"workspace": record.ref, "generation": record.deployed_generation}
            if record.phase == "job":
                await self._reconcile_job(key, record, common)
                return
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

    async def _reconcile_job(self, key: str, record: Record, common: dict[str, Any]) -> None:
        """Ray's view of the job. The job publishes its own progress and outcome (with the adapter's
        digest); what the workload publishes for the same outcome has the same dedupe id and is
        dropped — it only speaks when the job could not (a crash, an OOM kill)."""
        try:
            state, message = await self._jobs.status(record.job)
        except Transient as exc:
            log.warning("[%s] %s", record.ref.key, exc)
            return
        if state in ("RUNNING", "SUCCEEDED", "FAILED") and not record.job_started:
            record.job_started = True
            await self._put(key, record)
            await self._publisher.publish(ev.JobStarted(job=record.job, **common))
        if state == "SUCCEEDED":
            record.phase = "done"
            await self._put(key, record)
            await self._publisher.publish(ev.JobSucceeded(job=record.job, **common))
            log.info("[%s] tuning job %s succeeded", record.ref.key, record.job)
        elif state in ("FAILED", "STOPPED"):
            record.phase, record.message = "failed", message
            await self._put(key, record)
            await self._publisher.publish(
                ev.JobFailed(job=record.job, reason="JobFailed", message=message or state, **common)
            )
            log.warning("[%s] tuning job %s %s: %s", record.ref.key, record.job, state, message)
        elif state == "ABSENT" and time.time() - record.since > 60:  # Ray lost it (restarted?)
            record.phase, record.message = "failed", f"Ray has no job {record.job} (was Ray restarted?)"
            await self._put(key, record)
            await self._publisher.publish(
                ev.JobFailed(job=record.job, reason="JobLost", message=record.message, **common)
            )
