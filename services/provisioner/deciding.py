"""The provisioner's decisions, pure: a stored request and what just happened (a plan, the provider's
progress) → the events to publish and the record to store. No I/O here; ``handling`` carries
outcomes out (publish first, then store: a crash in between repeats the publish, whose dedupe id keeps
it one event) and the tables in ``tests/test_provisioner_deciding.py`` pin every rule.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import msgspec

from services.provisioner.providers.base import NodeRequest, Progress
from shared import events as ev

OWNER = "provisioner"
QUIET_REASONS = ("Provisioning", "WaitingForNodeClaims")  # progress, not worth a Warning Event


class Phase(enum.StrEnum):
    PENDING = "pending"  # asked of the provider; the reconcile loop follows it
    READY = "ready"
    FAILED = "failed"
    DELETING = "deleting"  # the Workspace is deleted: nothing is created for it any more


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

    @property
    def ref(self) -> ev.WorkspaceRef:
        return self.request.workspace


@dataclass(frozen=True)
class Outcome:
    publish: tuple[ev.Event, ...] = ()
    record: StoredNodes | None = None  # to store; None: the stored record stays as it is
    dropped: str = ""  # why nothing is done (for the log)

    @property
    def settles(self) -> bool:
        return self.record is not None and self.record.phase in (Phase.READY, Phase.FAILED)


@dataclass(frozen=True)
class Provider:
    """What the decisions need to know of the provider."""

    name: str
    condition: str = ""  # its finer condition type ("NodeClaimReady"), or ""
    timeout: float = 1800.0  # s a request may stay pending


def on_plan(
    stored: StoredNodes | None,
    event: ev.PlanResolved,
    request: NodeRequest,
    *,
    provider: str,
    now: float,
    trace: dict[str, str],
) -> Outcome:
    """A plan for ``request``: record it pending and say it is requested — unless the Workspace is
    being deleted, a newer generation is recorded, or this very request has settled already."""
    ref = event.workspace
    if stored is not None and stored.uid != ref.uid:
        stored = None  # a deleted namesake's
    if stored is not None and (stored.phase == Phase.DELETING or stored.generation > event.generation):
        return Outcome(dropped=f"plan of generation {event.generation} dropped ({stored.phase})")
    same = stored is not None and stored.request == request
    if same and stored is not None and stored.phase != Phase.PENDING:
        return Outcome(dropped=f"plan of generation {event.generation} already {stored.phase}")
    record = StoredNodes(
        uid=ref.uid,
        generation=event.generation,
        request=request,
        phase=Phase.PENDING,
        since=stored.since if same and stored is not None else now,
        trace=trace,
    )
    requested = ev.NodesRequested(
        workspace=ref,
        generation=event.generation,
        correlation_id=event.correlation_id,
        provider=provider,
        count=request.count,
        instance_type=request.instance_type,
    )
    return Outcome(publish=(requested,), record=record)


def on_deleting(stored: StoredNodes | None, ref: ev.WorkspaceRef) -> StoredNodes | None:
    """The record to store before releasing: marked deleting, so no pass creates anything again."""
    if stored is not None and stored.uid == ref.uid and stored.phase != Phase.DELETING:
        return msgspec.structs.replace(stored, phase=Phase.DELETING)
    return None


def on_progress(stored: StoredNodes, progress: Progress, *, provider: Provider, now: float) -> Outcome:
    """The provider's answer for a pending request: ready, failed (or pending past the timeout), or a
    new progress message worth a condition."""
    if progress.state == "pending" and now - stored.since > provider.timeout:
        progress = Progress(
            state="failed",
            reason="ProvisioningTimedOut",
            message=f"nodes not ready after {provider.timeout:.0f}s: {progress.message}",
        )
    ref, generation = stored.ref, stored.generation
    if progress.state == "ready":
        return Outcome(
            publish=(
                *_finer(provider, stored, "True", "Ready", progress.message),
                ev.NodesReady(
                    workspace=ref, generation=generation, provider=provider.name, nodes=progress.nodes
                ),
            ),
            record=msgspec.structs.replace(
                stored, phase=Phase.READY, nodes=progress.nodes, message=progress.message
            ),
        )
    if progress.state == "failed":
        failed = ev.NodesFailed(
            workspace=ref,
            generation=generation,
            provider=provider.name,
            reason=progress.reason,
            message=progress.message,
        )
        return Outcome(
            publish=(*_finer(provider, stored, "False", progress.reason, progress.message), failed),
            record=msgspec.structs.replace(
                stored, phase=Phase.FAILED, reason=progress.reason, message=progress.message
            ),
        )
    if progress.message == stored.message:
        return Outcome()
    reason = progress.reason or "Provisioning"
    nodes_ready = ev.ConditionReported(
        workspace=ref,
        generation=generation,
        type="NodesReady",
        status="False",
        reason=reason,
        message=progress.message,
        reporter=OWNER,
    )
    return Outcome(
        publish=(*_finer(provider, stored, "False", reason, progress.message), nodes_ready),
        record=msgspec.structs.replace(stored, reason=progress.reason, message=progress.message),
    )


def _finer(
    provider: Provider, stored: StoredNodes, status: ev.ConditionStatus, reason: str, message: str
) -> tuple[ev.Event, ...]:
    """The provider's finer condition (``NodeClaimReady`` for NodeClaims), when it has one."""
    if not provider.condition:
        return ()
    return (
        ev.ConditionReported(
            workspace=stored.ref,
            generation=stored.generation,
            type=provider.condition,
            status=status,
            reason=reason,
            message=message,
            reporter=OWNER,
            warning=status == "False" and reason not in QUIET_REASONS,
        ),
    )
