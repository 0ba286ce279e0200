"""Pure status logic: which conditions an event implies, and how they merge into the status.

Conditions follow KAITO: ``ResourceReady``, ``InferenceReady``, ``JobStarted``, ``WorkspaceSucceeded``
plus finer ones (``Planned``, ``NodesReady``, ``NodeClaimReady``, …). A condition derived from an
older generation never overwrites one derived from a newer generation; ``lastTransitionTime``
moves only when ``status`` changes.

Within a generation, events can arrive out of order: a message handed to a watcher that was killed is
redelivered ``ack_wait`` later, after newer ones were applied. So each condition remembers when the
event that last set it occurred (``status.conditionEventTimes``, µs since the epoch, written in the
same patch as the condition), and an update from an event older than that is stale and dropped.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from shared import events as ev
from shared.planning.model import Plan


@dataclass(frozen=True)
class ConditionUpdate:
    type: str
    status: str
    reason: str
    message: str
    generation: int
    occurred_us: int = 0  # when the event behind it occurred (µs since the epoch); 0: unknown


@dataclass(frozen=True)
class KubeWarning:
    reason: str
    message: str
    dedupe: str  # stable per fact, so a redelivered event posts the same Kubernetes Event


@dataclass
class StatusChange:
    """Everything one batch of events of one Workspace implies."""

    conditions: list[ConditionUpdate] = field(default_factory=list)
    warnings: list[KubeWarning] = field(default_factory=list)
    worker_nodes: tuple[str, ...] | None = None
    plan: dict[str, Any] | None = None  # status.plan (a summary) and status.targetNodeCount
    cleaned_up_by: set[str] = field(default_factory=set)
    deleting: bool = False


def _c(type_: str, status: str, reason: str, message: str, event: ev.Event) -> ConditionUpdate:
    return ConditionUpdate(type_, status, reason, message, event.generation, round(event.occurred_at * 1e6))


def _failure(change: StatusChange, event: ev.Event, reason: str, message: str, *types: str) -> None:
    for type_ in types:
        change.conditions.append(_c(type_, "False", reason, message, event))
    change.warnings.append(KubeWarning(reason, message, ev.dedupe_id(event)))


def apply_event(change: StatusChange, event: ev.AnyEvent) -> None:
    match event:
        case ev.PlanResolved():
            change.conditions.append(_c("Planned", "True", "PlanResolved", event.explanation, event))
            change.plan = plan_status(event.plan, event.generation)
        case ev.PlanRejected():
            _failure(
                change, event, event.reason, event.message, "Planned", "ResourceReady", "WorkspaceSucceeded"
            )
        case ev.NodesRequested():
            what = (
                f"{event.count} × {event.instance_type}" if event.instance_type else f"{event.count} node(s)"
            )
            msg = f"requested {what} from {event.provider}"
            change.conditions += [
                _c("NodesReady", "False", "NodesRequested", msg, event),
                _c("ResourceReady", "False", "Provisioning", msg, event),
            ]
        case ev.NodesReady():
            msg = f"{len(event.nodes)} node(s) ready: {', '.join(event.nodes)}"
            change.conditions += [
                _c("NodesReady", "True", "NodesReady", msg, event),
                _c("ResourceReady", "True", "ResourceReady", msg, event),
            ]
            change.worker_nodes = tuple(event.nodes)
        case ev.NodesFailed():
            _failure(
                change,
                event,
                event.reason,
                event.message,
                "NodesReady",
                "ResourceReady",
                "WorkspaceSucceeded",
            )
        case ev.InferenceReady():
            msg = f"serving at {event.endpoint}" if event.endpoint else "inference is ready"
            change.conditions += [
                _c("InferenceReady", "True", "InferenceReady", msg, event),
                _c("WorkspaceSucceeded", "True", "WorkspaceSucceeded", msg, event),
            ]
        case ev.InferenceFailed():
            _failure(change, event, event.reason, event.message, "InferenceReady", "WorkspaceSucceeded")
        case ev.JobStarted():
            msg = f"tuning job {event.job} started" if event.job else "tuning job started"
            change.conditions += [
                _c("JobStarted", "True", "JobStarted", msg, event),
                _c("WorkspaceSucceeded", "Unknown", "JobRunning", msg, event),
            ]
        case ev.JobSucceeded():
            msg = f"adapter written to {event.output}" if event.output else "tuning job succeeded"
            change.conditions.append(_c("WorkspaceSucceeded", "True", "JobSucceeded", msg, event))
        case ev.JobFailed():
            _failure(change, event, event.reason, event.message, "WorkspaceSucceeded")
        case ev.ConditionReported():
            change.conditions.append(_c(event.type, event.status, event.reason, event.message, event))
            if event.warning:
                change.warnings.append(KubeWarning(event.reason, event.message, ev.dedupe_id(event)))
        case ev.CleanupDone():
            change.cleaned_up_by.add(event.owner)
        case ev.WorkspaceDeleting():
            change.deleting = True
        case _:
            pass  # not status-bearing (observed, tuning progress)


def plan_status(plan: Plan, generation: int) -> dict[str, Any]:
    """The short plan summary shown in ``status.plan`` (the full plan lives in NATS KV)."""
    summary = {
        "instanceType": plan.sku,
        "nodes": plan.nodes,
        "gpusPerNode": plan.gpus_per_node,
        "engine": plan.engine,
        "dtype": plan.dtype,
        "maxModelLen": plan.max_model_len,
        "parallelism": f"TP{plan.tensor_parallel} PP{plan.pipeline_parallel} DP{plan.data_parallel}",
        "observedGeneration": generation,
    }
    return {key: value for key, value in summary.items() if value not in ("", None)}


def fold(events: Iterable[ev.AnyEvent]) -> StatusChange:
    """Coalesce a burst: later updates of the same condition win, in event order."""
    change = StatusChange()
    for event in events:
        apply_event(change, event)
    return change


def fresh(
    updates: Sequence[ConditionUpdate], seen: dict[str, int]
) -> tuple[list[ConditionUpdate], dict[str, int]]:
    """The updates not older than what already set their condition (``seen``: condition type → µs of
    the event that set it), in order, and ``seen`` advanced past them."""
    kept: list[ConditionUpdate] = []
    latest = dict(seen)
    for update in updates:
        if update.occurred_us < latest.get(update.type, 0):
            continue  # a stale redelivery: a newer event already set this condition
        latest[update.type] = update.occurred_us
        kept.append(update)
    return kept, latest


def merge_conditions(
    current: Sequence[dict[str, Any]], updates: Sequence[ConditionUpdate], now: str
) -> list[dict[str, Any]]:
    """The new ``status.conditions`` list (a merge patch replaces lists whole)."""
    merged = {c["type"]: dict(c) for c in current if "type" in c}
    order = [c["type"] for c in current if "type" in c]
    for update in updates:
        old = merged.get(update.type)
        if old is not None and int(old.get("observedGeneration") or 0) > update.generation:
            continue  # stale: a newer generation already spoke
        changed = old is None or old.get("status") != update.status
        merged[update.type] = {
            "type": update.type,
            "status": update.status,
            "reason": update.reason or "Unknown",
            "message": update.message,
            "observedGeneration": update.generation,
            "lastTransitionTime": now if changed else old.get("lastTransitionTime", now),  # type: ignore[union-attr]
        }
        if old is None:
            order.append(update.type)
    return [merged[t] for t in order]


def workspace_state(conditions: Sequence[dict[str, Any]], *, tuning: bool, previous: str | None) -> str:
    """``status.state`` by KAITO's rules. Tuning: Failed, Succeeded, Running (job started) or Pending.
    Inference: Ready while resources and inference are ready; once it has been Ready or NotReady it
    is NotReady otherwise, before that Pending."""
    status = {c.get("type"): c.get("status") for c in conditions}
    if tuning:
        succeeded = status.get("WorkspaceSucceeded")
        if succeeded == "True":
            return "Succeeded"
        if succeeded == "False":
            return "Failed"
        return "Running" if status.get("JobStarted") == "True" else "Pending"
    if status.get("InferenceReady") == "True" and status.get("ResourceReady") == "True":
        return "Ready"
    return "NotReady" if previous in ("Ready", "NotReady") else "Pending"


def finalizer_removable(cleaned_up_by: Iterable[str], owners: Iterable[str]) -> bool:
    return set(owners) <= set(cleaned_up_by)
