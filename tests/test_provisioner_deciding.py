"""The provisioner's pure decisions (``services.provisioner.deciding``), by table."""

from __future__ import annotations

import msgspec
import pytest

from services.provisioner.deciding import (
    Phase,
    Provider,
    StoredNodes,
    on_deleting,
    on_plan,
    on_progress,
)
from services.provisioner.handling import request_from_plan
from services.provisioner.providers.base import NodeRequest, Progress
from shared import events as ev
from shared.errors import InvalidInput
from shared.planning.model import Plan
from tests.conftest import PLAN_FIELDS

REF = ev.WorkspaceRef(namespace="ns", name="w", uid="u1")
REQUEST = NodeRequest(workspace=REF, generation=2, instance_type="Standard_NC24ads_A100_v4", count=2)
NODECLAIMS = Provider("nodeclaim", "NodeClaimReady", timeout=100.0)


def plan_event(generation: int = 2, *, with_spec: bool = True) -> ev.PlanResolved:
    spec = {"resource": {"labelSelector": {"matchLabels": {"apps": "llama"}}, "preferredNodes": ["n1"]}}
    event = ev.PlanResolved(
        workspace=REF,
        generation=generation,
        plan=msgspec.convert(PLAN_FIELDS, Plan),
        api_version="kaito.sh/v1beta1",
        spec=ev.WorkspaceSpec.model_validate(spec) if with_spec else None,
        correlation_id="c1",
    )
    return event


def stored(phase: Phase = Phase.PENDING, generation: int = 2, uid: str = "u1", **kw: object) -> StoredNodes:
    request = msgspec.structs.replace(REQUEST, generation=generation)
    return StoredNodes(uid=uid, generation=generation, request=request, phase=phase, since=1000.0, **kw)  # type: ignore[arg-type]


def test_a_plan_becomes_a_request_with_the_specs_labels() -> None:
    request = request_from_plan(plan_event())
    assert (request.instance_type, request.count, request.labels) == (
        "Standard_NC24ads_A100_v4", 2, {"apps": "llama"}
    )  # fmt: skip
    assert request.selector == {"matchLabels": {"apps": "llama"}} and request.preferred_nodes == ("n1",)


def test_a_schema_1_plan_is_refused_with_a_reason() -> None:
    with pytest.raises(InvalidInput) as caught:
        request_from_plan(plan_event(with_spec=False))
    assert caught.value.reason == "PlanTooOld"


@pytest.mark.parametrize(
    ("before", "generation", "requested", "since"),
    [
        (None, 2, True, 5000.0),  # first plan: pending, requested now
        (stored(Phase.PENDING), 2, True, 1000.0),  # redelivered while pending: asked again, same start
        (stored(Phase.READY), 2, False, None),  # redelivered after it settled: nothing
        (stored(Phase.FAILED), 2, False, None),
        (stored(Phase.DELETING), 3, False, None),  # being deleted: nothing is created again
        (stored(Phase.READY, generation=3), 2, False, None),  # older than what is recorded
        (stored(Phase.READY, uid="old"), 2, True, 5000.0),  # a deleted namesake's record: replaced
        (stored(Phase.READY, generation=1), 2, True, 5000.0),  # a new generation: a new request
    ],
)
def test_on_plan(before: StoredNodes | None, generation: int, requested: bool, since: float | None) -> None:
    event = plan_event(generation)
    request = msgspec.structs.replace(REQUEST, generation=generation)
    outcome = on_plan(before, event, request, provider="nodeclaim", now=5000.0, trace={"traceparent": "t"})
    if not requested:
        assert outcome.record is None and outcome.publish == () and outcome.dropped
        return
    assert outcome.record is not None and outcome.record.phase == Phase.PENDING
    assert (outcome.record.since, outcome.record.trace, outcome.record.request) == (
        since,
        {"traceparent": "t"},
        request,
    )
    (event_out,) = outcome.publish
    assert isinstance(event_out, ev.NodesRequested)
    assert (event_out.count, event_out.provider, event_out.correlation_id) == (2, "nodeclaim", "c1")


def test_on_deleting_marks_only_its_own_record_once() -> None:
    marked = on_deleting(stored(Phase.READY), REF)
    assert marked is not None and marked.phase == Phase.DELETING
    assert on_deleting(marked, REF) is None
    assert on_deleting(stored(Phase.READY, uid="old"), REF) is None
    assert on_deleting(None, REF) is None


def kinds(events: tuple[ev.Event, ...]) -> list[str]:
    return [
        f"{e.kind}:{e.type}={e.status}" if isinstance(e, ev.ConditionReported) else e.kind for e in events
    ]


@pytest.mark.parametrize(
    ("progress", "now", "phase", "published"),
    [
        (Progress(state="ready", nodes=("n1", "n2")), 1001.0, Phase.READY,
         ["status.condition:NodeClaimReady=True", "nodes.ready"]),
        (Progress(state="failed", reason="QuotaExceeded", message="no quota"), 1001.0, Phase.FAILED,
         ["status.condition:NodeClaimReady=False", "nodes.failed"]),
        (Progress(state="pending", message="1 of 2 ready"), 1001.0, Phase.PENDING,
         ["status.condition:NodeClaimReady=False", "status.condition:NodesReady=False"]),
        (Progress(state="pending", message="same"), 1001.0, None, []),  # nothing new to say
        (Progress(state="pending", message="same"), 1101.0, Phase.FAILED,  # past the timeout
         ["status.condition:NodeClaimReady=False", "nodes.failed"]),
    ],
)  # fmt: skip
def test_on_progress(progress: Progress, now: float, phase: Phase | None, published: list[str]) -> None:
    before = stored(message="same")
    outcome = on_progress(before, progress, provider=NODECLAIMS, now=now)
    assert kinds(outcome.publish) == published
    assert (outcome.record.phase if outcome.record is not None else None) == phase
    assert outcome.settles == (phase in (Phase.READY, Phase.FAILED))
    if now > 1100:
        failed = outcome.publish[-1]
        assert isinstance(failed, ev.NodesFailed) and failed.reason == "ProvisioningTimedOut"


def test_progress_is_a_warning_only_when_it_is_trouble() -> None:
    def pending(reason: str) -> Progress:
        return Progress(state="pending", reason=reason, message="m")

    quiet = on_progress(stored(), pending("Provisioning"), provider=NODECLAIMS, now=1001.0)
    loud = on_progress(stored(), pending("InsufficientCapacity"), provider=NODECLAIMS, now=1001.0)
    assert [e.warning for e in quiet.publish if isinstance(e, ev.ConditionReported)] == [False, False]
    assert [e.warning for e in loud.publish if isinstance(e, ev.ConditionReported)] == [True, False]


def test_a_provider_without_a_finer_condition_reports_only_the_common_ones() -> None:
    outcome = on_progress(
        stored(), Progress(state="ready", nodes=("n1",)), provider=Provider("local"), now=1.0
    )
    assert kinds(outcome.publish) == ["nodes.ready"]
