"""Every event Kaiten's services exchange over NATS, in one module.

Rules (see docs/events.md):
- Events are frozen, versioned msgspec Structs; one tagged union per subject family.
- Each names the Workspace (namespace, name, uid) and the ``generation`` it was derived from.
- Added fields get defaults; a field's type never changes. ``schema`` is bumped on breaking change.
- Subjects are ``kaiten.<family>.<kind>.<namespace>.<name>``: subscribe to one Workspace or all.
- ``Nats-Msg-Id`` = :func:`dedupe_id`: (uid, generation, kind[, discriminator]), so a retried
  publish is not a second event.
- No secret ever goes into an event: specs are carried as the user wrote them (they only *name*
  secrets), never with secret data.
- The Workspace spec is the one typed model the watcher reads objects with
  (:class:`shared.api.workspace.WorkspaceSpec`, lenient: fields a newer CRD adds are ignored). It is
  validated where it is read and carried typed from there: this module's encoder and decoder (and
  :data:`enc_hook`/:data:`dec_hook` for a KV record that holds one) convert it to and from JSON.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from typing import Any, ClassVar, Literal

import msgspec
from pydantic import BaseModel

from shared.api.workspace import WorkspaceSpec
from shared.planning.model import Plan

STREAM = "KAITEN"
SUBJECT_ROOT = "kaiten"
# 2: ``workspace.observed`` carries the spec typed (its never-read labels gone); ``plan.resolved``
# carries the spec it planned for, with the apiVersion and annotations (``resource`` gone: it is
# ``spec.resource``).
SCHEMA_VERSION = 2


class WorkspaceRef(msgspec.Struct, frozen=True, kw_only=True):
    namespace: str
    name: str
    uid: str

    @property
    def key(self) -> str:
        """The per-Workspace ordering key used by consumers."""
        return f"{self.namespace}/{self.name}"


def _new_id() -> str:
    return uuid.uuid4().hex


class Event(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind"):
    """Common envelope. ``kind`` (the tag) is set by msgspec from each subclass's ``tag``."""

    family: ClassVar[str]
    schema: int = SCHEMA_VERSION
    event_id: str = msgspec.field(default_factory=_new_id)
    workspace: WorkspaceRef
    generation: int
    correlation_id: str = ""
    occurred_at: float = msgspec.field(default_factory=time.time)

    @property
    def kind(self) -> str:
        return str(type(self).__struct_config__.tag)

    def discriminator(self) -> str:
        """Extra dedupe key part for kinds that legitimately occur more than once per generation."""
        return ""


# --- workspace family: published by the watcher -------------------------------------------------


class WorkspaceObserved(Event, frozen=True, kw_only=True, tag="workspace.observed"):
    """A Workspace generation the watcher saw for the first time (full spec snapshot)."""

    family: ClassVar[str] = "workspace"
    api_version: str
    spec: WorkspaceSpec  # resource / inference / tuning as in the object, no status, no metadata
    annotations: dict[str, str] = {}  # the object's (kaiten.sh/…, kaito.sh/…): they steer what is deployed


class WorkspaceDeleting(Event, frozen=True, kw_only=True, tag="workspace.deleting"):
    """The Workspace has a deletionTimestamp; owners of external state must clean up."""

    family: ClassVar[str] = "workspace"


WorkspaceEvent = WorkspaceObserved | WorkspaceDeleting


# --- plan family: published by the planner ------------------------------------------------------


class PlanResolved(Event, frozen=True, kw_only=True, tag="plan.resolved"):
    family: ClassVar[str] = "plan"
    plan: Plan
    explanation: str = ""
    # What the plan was made for, so a consumer needs no other event to act on it: the provisioner's
    # nodes carry ``spec.resource``'s labels, the workload deploys ``spec`` with ``plan``. ``None`` only
    # in a schema-1 event (before the spec was carried).
    api_version: str = ""
    spec: WorkspaceSpec | None = None
    annotations: dict[str, str] = {}


class PlanRejected(Event, frozen=True, kw_only=True, tag="plan.rejected"):
    family: ClassVar[str] = "plan"
    reason: str  # CamelCase, e.g. "UnknownPreset"
    message: str


PlanEvent = PlanResolved | PlanRejected


# --- nodes family: published by the provisioner -------------------------------------------------


class NodesRequested(Event, frozen=True, kw_only=True, tag="nodes.requested"):
    family: ClassVar[str] = "nodes"
    provider: str
    count: int
    instance_type: str = ""


class NodesReady(Event, frozen=True, kw_only=True, tag="nodes.ready"):
    family: ClassVar[str] = "nodes"
    provider: str
    nodes: tuple[str, ...]


class NodesFailed(Event, frozen=True, kw_only=True, tag="nodes.failed"):
    family: ClassVar[str] = "nodes"
    provider: str
    reason: str
    message: str


NodesEvent = NodesRequested | NodesReady | NodesFailed


# --- workload family: published by the workload service -----------------------------------------


class InferenceReady(Event, frozen=True, kw_only=True, tag="workload.inference_ready"):
    family: ClassVar[str] = "workload"
    endpoint: str = ""


class InferenceFailed(Event, frozen=True, kw_only=True, tag="workload.inference_failed"):
    family: ClassVar[str] = "workload"
    reason: str
    message: str


class JobStarted(Event, frozen=True, kw_only=True, tag="workload.job_started"):
    family: ClassVar[str] = "workload"
    job: str = ""


class JobSucceeded(Event, frozen=True, kw_only=True, tag="workload.job_succeeded"):
    family: ClassVar[str] = "workload"
    job: str = ""
    output: str = ""


class JobFailed(Event, frozen=True, kw_only=True, tag="workload.job_failed"):
    family: ClassVar[str] = "workload"
    job: str = ""
    reason: str
    message: str


WorkloadEvent = InferenceReady | InferenceFailed | JobStarted | JobSucceeded | JobFailed


# --- tuning family: published by the tuning job --------------------------------------------------


class TuningProgress(Event, frozen=True, kw_only=True, tag="tuning.progress"):
    family: ClassVar[str] = "tuning"
    step: int
    total_steps: int = 0
    epoch: float = 0.0
    loss: float | None = None
    learning_rate: float | None = None
    tokens_per_second: float | None = None
    eta_seconds: float | None = None

    def discriminator(self) -> str:
        return str(self.step)


TuningEvent = TuningProgress


# --- status family: any service; what the status writer turns into conditions -------------------

ConditionStatus = Literal["True", "False", "Unknown"]


class ConditionReported(Event, frozen=True, kw_only=True, tag="status.condition"):
    """A service's statement about one condition (finer ones such as ``NodeClaimReady`` too)."""

    family: ClassVar[str] = "status"
    type: str
    status: ConditionStatus
    reason: str
    message: str = ""
    warning: bool = False  # also post a Kubernetes Event of type Warning
    reporter: str = ""

    def discriminator(self) -> str:
        # The message is part of the fact: progress ("1 of 2 ready", then "2 of 2 …") must not be
        # dropped as a duplicate of the first report; the same report twice still is.
        digest = hashlib.sha256(self.message.encode()).hexdigest()[:12]
        return f"{self.type}:{self.status}:{self.reason}:{digest}"


class CleanupDone(Event, frozen=True, kw_only=True, tag="status.cleanup_done"):
    """An owner of external state (provisioner, workload, …) finished cleaning up a deleted Workspace."""

    family: ClassVar[str] = "status"
    owner: str

    def discriminator(self) -> str:
        return self.owner


StatusEvent = ConditionReported | CleanupDone

AnyEvent = WorkspaceEvent | PlanEvent | NodesEvent | WorkloadEvent | TuningEvent | StatusEvent


def enc_hook(obj: Any) -> Any:
    """msgspec's hook for the pydantic spec: its JSON as the user wrote it."""
    if isinstance(obj, WorkspaceSpec):
        return obj.as_json()
    raise NotImplementedError(f"cannot encode {type(obj).__name__}")


def dec_hook(type_: type, obj: Any) -> Any:
    """msgspec's hook for the pydantic spec; a spec that does not validate is a ``ValidationError``
    of the message (the watcher publishes only specs that do)."""
    if isinstance(type_, type) and issubclass(type_, BaseModel):
        return type_.model_validate(obj)
    if type_ is object:  # a field typed ``object`` takes any JSON value, as it did without a hook
        return obj
    raise NotImplementedError(f"cannot decode {type_}")


_encoder = msgspec.json.Encoder(enc_hook=enc_hook)
_decoder: msgspec.json.Decoder[AnyEvent] = msgspec.json.Decoder(AnyEvent, dec_hook=dec_hook)


def subject_for(event: Event) -> str:
    """``kaiten.<family>.<kind>.<namespace>.<name>``."""
    kind = event.kind.split(".", 1)[1]
    ref = event.workspace
    return f"{SUBJECT_ROOT}.{event.family}.{kind}.{ref.namespace}.{ref.name}"


def subject_filter(family: str = "*", kind: str = "*", namespace: str = "*", name: str = "*") -> str:
    return f"{SUBJECT_ROOT}.{family}.{kind}.{namespace}.{name}"


def dedupe_id(event: Event) -> str:
    """The ``Nats-Msg-Id``: the same fact published twice is stored once."""
    parts = [event.workspace.uid, str(event.generation), event.kind]
    if extra := event.discriminator():
        parts.append(extra)
    return ":".join(parts)


def encode(event: Event) -> bytes:
    return _encoder.encode(event)


def decode(data: bytes) -> AnyEvent:
    """Decode any Kaiten event; raises ``msgspec.ValidationError``/``DecodeError`` on bad input."""
    return _decoder.decode(data)


def json_schema() -> dict[str, Any]:
    """A JSON Schema (2020-12) of every event, generated from the Structs above: what a consumer in
    another language validates against. Checked in as ``docs/events.schema.json`` (a test fails when it
    is stale; ``python -m shared.events docs/events.schema.json`` rewrites it)."""
    spec = WorkspaceSpec.model_json_schema(by_alias=True, ref_template="#/$defs/{model}")
    spec_defs = spec.pop("$defs", {})

    def schema_hook(type_: type) -> dict[str, Any]:
        if type_ is WorkspaceSpec:
            return {"$ref": "#/$defs/WorkspaceSpec"}
        raise NotImplementedError(f"no schema for {type_}")

    schema = msgspec.json.schema(AnyEvent, schema_hook=schema_hook)
    defs = schema.setdefault("$defs", {})
    clashes = sorted(set(defs) & {*spec_defs, "WorkspaceSpec"})
    assert not clashes, f"event and spec schemas both define {clashes}"
    defs.update(spec_defs, WorkspaceSpec=spec)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": f"Kaiten events, schema {SCHEMA_VERSION}",
        **schema,
    }


def render_json_schema() -> str:
    return json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 2:
        sys.exit("usage: python -m shared.events PATH  (writes the events' JSON Schema to PATH)")
    with open(sys.argv[1], "w", encoding="utf-8") as out:
        out.write(render_json_schema())
