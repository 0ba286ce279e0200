"""The workload's pure decisions (``services.workload.deciding``), by table."""

from __future__ import annotations

import msgspec
import pytest

from services.workload.deciding import (
    JOB_LOST_S,
    REDEPLOY_GRACE_S,
    Phase,
    Record,
    absorb,
    deployed,
    follow,
    follow_job,
    refused,
)
from shared import events as ev
from shared.api.workspace import WorkspaceSpec
from shared.planning.model import Plan
from tests.conftest import PLAN_FIELDS

REF = ev.WorkspaceRef(namespace="ns", name="w", uid="u1")
PLAN = msgspec.convert(PLAN_FIELDS, Plan)
SPEC = WorkspaceSpec.model_validate(
    {"resource": {"labelSelector": {"matchLabels": {"a": "b"}}}, "inference": {"preset": {"name": "p"}}}
)
TUNING = WorkspaceSpec.model_validate(
    {"resource": {"labelSelector": {"matchLabels": {"a": "b"}}},
     "tuning": {"preset": {"name": "p"}, "input": {"urls": ["https://x/d.jsonl"]},
                "output": {"image": "r/a:1"}}}
)  # fmt: skip


def plan(generation: int, uid: str = "u1") -> ev.PlanResolved:
    ref = msgspec.structs.replace(REF, uid=uid)
    return ev.PlanResolved(
        workspace=ref, generation=generation, plan=PLAN, spec=SPEC, api_version="kaito.sh/v1beta1"
    )


def nodes(generation: int) -> ev.NodesReady:
    return ev.NodesReady(workspace=REF, generation=generation, provider="p", nodes=("n1",))


def record(**kw: object) -> Record:
    fields: dict[str, object] = {
        "uid": "u1",
        "namespace": "ns",
        "name": "w",
        "spec": SPEC,
        "plan": PLAN,
        **kw,
    }
    return Record(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("before", "events", "generation", "deploy"),
    [
        (None, [plan(1)], 1, False),  # nodes not ready yet
        (None, [nodes(1)], 0, False),  # no plan yet
        (None, [plan(1), nodes(1)], 1, True),  # both in one batch
        (record(generation=1), [nodes(1)], 1, True),  # nodes came last
        (record(nodes_generation=1), [plan(1)], 1, True),  # the plan came last (another order)
        (record(generation=1, nodes_generation=1, deployed_generation=1, phase=Phase.READY),
         [nodes(1)], 1, False),  # a redelivery of what is deployed
        (record(generation=1, nodes_generation=1, deployed_generation=1, phase=Phase.READY),
         [plan(2)], 2, False),  # a new generation waits for its nodes
        (record(generation=2, nodes_generation=1), [plan(1)], 2, False),  # an older plan is dropped
        (record(generation=1, nodes_generation=1, deployed_generation=1, phase=Phase.WAITING),
         [nodes(1)], 1, True),  # a deploy that never happened (crash before it) happens now
        (record(generation=3, nodes_generation=3, deployed_generation=3, phase=Phase.READY, uid="old"),
         [plan(1), nodes(1)], 1, True),  # a deleted namesake's record starts over
    ],
)  # fmt: skip
def test_absorb(before: Record | None, events: list[ev.AnyEvent], generation: int, deploy: bool) -> None:
    after, deploys = absorb(before, events, {"traceparent": "t"})
    assert (after.generation, deploys, after.trace) == (generation, deploy, {"traceparent": "t"})
    assert after.uid == "u1"
    if any(isinstance(e, ev.PlanResolved) and e.generation == generation for e in events):
        assert (after.spec, after.plan, after.api_version) == (SPEC, PLAN, "kaito.sh/v1beta1")


def test_deployed_and_refused() -> None:
    serving = deployed(record(generation=2, message="old"), job="", now=50.0)
    assert (serving.phase, serving.deployed_generation, serving.since, serving.message) == (
        Phase.DEPLOYING, 2, 50.0, ""
    )  # fmt: skip
    tuning = deployed(record(generation=2, spec=TUNING), job="kaiten-w-2", now=50.0)
    assert (tuning.phase, tuning.job, tuning.job_started) == (Phase.JOB, "kaiten-w-2", False)
    step = refused(record(generation=2), "InvalidInferenceConfig", "bad key")
    assert step.record is not None and (step.record.phase, step.record.message) == (Phase.FAILED, "bad key")
    (failed,) = step.publish
    assert isinstance(failed, ev.InferenceFailed) and failed.reason == "InvalidInferenceConfig"
    (failed,) = refused(record(generation=2, spec=TUNING), "InvalidTuningConfig", "x").publish
    assert isinstance(failed, ev.JobFailed) and failed.generation == 2


@pytest.mark.parametrize(
    ("phase", "state", "age", "published", "after", "redeploy"),
    [
        (Phase.DEPLOYING, "pending", 1.0, [], None, False),
        (Phase.DEPLOYING, "ready", 1.0, ["workload.inference_ready"], Phase.READY, False),
        (Phase.READY, "ready", 1.0, [], None, False),  # said already
        (Phase.DEPLOYING, "failed", 1.0, ["workload.inference_failed"], Phase.FAILED, False),
        (Phase.DEPLOYING, "pending", 901.0, ["workload.inference_failed"], Phase.FAILED, False),  # timeout
        (Phase.READY, "pending", 901.0, [], None, False),  # a ready app restarting is not timed out
        (Phase.DEPLOYING, "absent", 1.0, [], None, False),  # just deployed: the backend catches up
        (Phase.READY, "absent", REDEPLOY_GRACE_S + 1, [], None, True),  # lost: deployed again
    ],
)
def test_follow(
    phase: Phase, state: str, age: float, published: list[str], after: Phase | None, redeploy: bool
) -> None:
    before = record(generation=2, deployed_generation=2, phase=phase, since=100.0)
    step = follow(before, state, "why", endpoint="http://e/chat", now=100.0 + age, timeout=900.0)
    assert [e.kind for e in step.publish] == published and step.redeploy == redeploy
    assert (step.record.phase if step.record is not None else None) == after
    for event in step.publish:
        assert event.generation == 2
        if isinstance(event, ev.InferenceReady):
            assert event.endpoint == "http://e/chat"


@pytest.mark.parametrize(
    ("started", "state", "age", "published", "after"),
    [
        (False, "PENDING", 1.0, [], None),
        (False, "RUNNING", 1.0, ["workload.job_started"], Phase.JOB),
        (True, "RUNNING", 1.0, [], None),
        (False, "SUCCEEDED", 1.0, ["workload.job_started", "workload.job_succeeded"], Phase.DONE),
        (True, "SUCCEEDED", 1.0, ["workload.job_succeeded"], Phase.DONE),
        (True, "FAILED", 1.0, ["workload.job_failed"], Phase.FAILED),
        (True, "STOPPED", 1.0, ["workload.job_failed"], Phase.FAILED),
        (True, "ABSENT", 1.0, [], None),
        (True, "ABSENT", JOB_LOST_S + 1, ["workload.job_failed"], Phase.FAILED),
    ],
)
def test_follow_job(started: bool, state: str, age: float, published: list[str], after: Phase | None) -> None:
    before = record(spec=TUNING, generation=2, deployed_generation=2, phase=Phase.JOB, job="j",
                    job_started=started, since=100.0)  # fmt: skip
    step = follow_job(before, state, "oom", now=100.0 + age)
    assert [e.kind for e in step.publish] == published
    assert (step.record.phase if step.record is not None else None) == after
    if step.record is not None:
        assert step.record.job_started == (state != "ABSENT" or started)
    if state == "ABSENT" and published:
        (lost,) = step.publish
        assert isinstance(lost, ev.JobFailed) and lost.reason == "JobLost"


def test_the_workspaces_annotations_travel_with_its_spec_to_what_is_deployed() -> None:
    """The serving API key Secret (``kaiten.sh/api-key-secret``) and KAITO's ``kaito.sh/*`` annotations
    steer what is deployed: the plan carries them, the record keeps them with the spec, and the
    Workspace the backends render from has them (they were dropped once, and the key never applied)."""
    annotated = msgspec.structs.replace(plan(1), annotations={"kaiten.sh/api-key-secret": "chat-key"})
    after, deploys = absorb(None, [annotated, nodes(1)], {})
    assert deploys and after.annotations == {"kaiten.sh/api-key-secret": "chat-key"}
    workspace = after.workspace()
    assert workspace.metadata.annotations == {"kaiten.sh/api-key-secret": "chat-key"}
    assert (workspace.metadata.name, workspace.metadata.generation, workspace.api_version) == (
        "w", 1, "kaito.sh/v1beta1"
    )  # fmt: skip
