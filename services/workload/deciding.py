"""The workload's decisions, pure: a Workspace's record and what just happened (its events, the
backend's view of the deployment or job) → the record to store, the events to publish, and whether to
deploy. No I/O here; ``handling`` carries the outcomes out, publishing first and storing after (a crash
in between repeats a publish, whose dedupe id keeps it one event). ``tests/test_workload_deciding.py``
pins every rule as a table.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

import msgspec

from shared import events as ev
from shared.api.workspace import ObjectMeta, Workspace, WorkspaceSpec
from shared.planning.model import Plan

REDEPLOY_GRACE_S = 10.0  # a deployment the backend has not heard of for this long is deployed again
JOB_LOST_S = 60.0  # a job Ray has not heard of for this long is lost (Ray restarted?)


class Phase(enum.StrEnum):
    WAITING = "waiting"  # for the plan, the spec or the nodes of the latest generation
    DEPLOYING = "deploying"  # deployed; the reconcile loop follows it to ready or failed
    READY = "ready"
    FAILED = "failed"
    DELETING = "deleting"
    JOB = "job"  # a tuning job submitted; the reconcile loop follows it
    DONE = "done"  # the tuning job succeeded


FOLLOWED = (Phase.DEPLOYING, Phase.READY, Phase.JOB)  # phases a reconcile pass follows


class Record(msgspec.Struct, frozen=True, kw_only=True):
    uid: str
    namespace: str
    name: str
    api_version: str = "kaito.sh/v1alpha1"
    spec: WorkspaceSpec | None = None  # what the latest plan was made for
    annotations: dict[str, str] = {}  # the Workspace's, with that spec (the serving API key Secret, …)
    plan: Plan | None = None
    generation: int = 0  # the generation of spec and plan
    phase: Phase = Phase.WAITING
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

    @property
    def tuning(self) -> bool:
        return self.spec is not None and self.spec.tuning is not None

    @property
    def template(self) -> bool:
        """Inference from the Workspace's own pod template (KAITO's ``inference.template``)."""
        inference = self.spec.inference if self.spec is not None else None
        return inference is not None and inference.template is not None

    def workspace(self) -> Workspace:
        """The Workspace the record deploys (raises pydantic's ``ValidationError`` on an apiVersion this
        service does not know)."""
        assert self.spec is not None
        meta = ObjectMeta(
            name=self.name,
            namespace=self.namespace,
            uid=self.uid,
            generation=self.generation,
            annotations=self.annotations,
        )
        return Workspace.of(self.spec, api_version=self.api_version, metadata=meta)


@dataclass(frozen=True)
class Step:
    """An outcome: publish these, then store ``record`` (None: the stored record stays)."""

    publish: tuple[ev.Event, ...] = ()
    record: Record | None = None
    redeploy: bool = False  # the deployment is gone: deploy the record's generation again


def absorb(
    record: Record | None, events: Sequence[ev.AnyEvent], trace: dict[str, str]
) -> tuple[Record, bool]:
    """Fold a Workspace's events (plans with their spec, nodes ready) into its record; and whether the
    record's generation is now complete — plan and nodes both there, whichever came last (events of
    one Workspace may reach two replicas in any order) — and not yet deployed."""
    ref = events[-1].workspace
    if record is None or record.uid != ref.uid:
        record = Record(uid=ref.uid, namespace=ref.namespace, name=ref.name)
    changes: dict[str, object] = {"trace": trace}
    generation, nodes = record.generation, record.nodes_generation
    for event in events:
        if isinstance(event, ev.PlanResolved) and event.generation >= generation:
            generation = event.generation
            changes.update(
                spec=event.spec,
                annotations=event.annotations,
                plan=event.plan,
                api_version=event.api_version,
                generation=generation,
            )
        elif isinstance(event, ev.NodesReady) and event.generation > nodes:
            nodes = event.generation
            changes.update(nodes_generation=nodes)
    record = msgspec.structs.replace(record, **changes)
    deploy = (
        generation > 0
        and generation == nodes
        and (generation > record.deployed_generation or record.phase == Phase.WAITING)
    )
    return record, deploy


def deleting(record: Record) -> Record:
    return msgspec.structs.replace(record, phase=Phase.DELETING)


def deployed(record: Record, *, job: str, now: float) -> Record:
    """The record once the backend took the deployment (or the tuning job ``job``)."""
    phase = Phase.JOB if record.tuning else Phase.DEPLOYING
    return msgspec.structs.replace(
        record,
        phase=phase,
        deployed_generation=record.generation,
        job=job or record.job,
        job_started=False if job else record.job_started,
        since=now,
        message="",
    )


def refused(record: Record, reason: str, message: str) -> Step:
    """The generation cannot be deployed (an invalid spec, a config the apiserver refuses)."""
    ref, generation = record.ref, record.generation
    failed: ev.Event = (
        ev.JobFailed(workspace=ref, generation=generation, reason=reason, message=message)
        if record.tuning
        else ev.InferenceFailed(workspace=ref, generation=generation, reason=reason, message=message)
    )
    stored = msgspec.structs.replace(
        record, phase=Phase.FAILED, message=message, deployed_generation=record.generation
    )
    return Step(publish=(failed,), record=stored)


def follow(record: Record, state: str, message: str, *, endpoint: str, now: float, timeout: float) -> Step:
    """The backend's view of a deployed serving application (``state``: pending, ready, failed or
    absent) → ready (with its endpoint), failed, deployed again, or nothing new."""
    if state == "absent" and now - record.since > REDEPLOY_GRACE_S:
        return Step(redeploy=True)  # lost: the Ray cluster restarted, someone deleted it
    if state == "pending" and record.phase == Phase.DEPLOYING and now - record.since > timeout:
        state, message = "failed", f"not ready after {timeout:.0f}s (last state {message})"
    generation = record.deployed_generation
    if state == "ready" and record.phase != Phase.READY:
        ready = ev.InferenceReady(workspace=record.ref, generation=generation, endpoint=endpoint)
        return Step(publish=(ready,), record=msgspec.structs.replace(record, phase=Phase.READY))
    if state == "failed":
        failed = ev.InferenceFailed(
            workspace=record.ref, generation=generation, reason="DeployFailed", message=message
        )
        return Step(
            publish=(failed,), record=msgspec.structs.replace(record, phase=Phase.FAILED, message=message)
        )
    return Step()


def follow_job(record: Record, state: str, message: str, *, now: float) -> Step:
    """Ray's view of the tuning job → started, succeeded, failed, lost, or nothing new. The job
    publishes its own progress and outcome (with the adapter's digest); what is decided here for the
    same outcome has the same dedupe id and is dropped — it only speaks when the job could not (a
    crash, an OOM kill)."""
    ref, generation, job = record.ref, record.deployed_generation, record.job
    publish: list[ev.Event] = []
    changes: dict[str, object] = {}
    if state in ("RUNNING", "SUCCEEDED", "FAILED") and not record.job_started:
        publish.append(ev.JobStarted(workspace=ref, generation=generation, job=job))
        changes.update(job_started=True)
    if state == "SUCCEEDED":
        publish.append(ev.JobSucceeded(workspace=ref, generation=generation, job=job))
        changes.update(phase=Phase.DONE)
    elif state in ("FAILED", "STOPPED"):
        publish.append(
            ev.JobFailed(
                workspace=ref, generation=generation, job=job, reason="JobFailed", message=message or state
            )
        )
        changes.update(phase=Phase.FAILED, message=message)
    elif state == "ABSENT" and now - record.since > JOB_LOST_S:
        lost = f"Ray has no job {job} (was Ray restarted?)"
        publish.append(
            ev.JobFailed(workspace=ref, generation=generation, job=job, reason="JobLost", message=lost)
        )
        changes.update(phase=Phase.FAILED, message=lost)
    if not changes:
        return Step()
    return Step(publish=tuple(publish), record=msgspec.structs.replace(record, **changes))
