"""Pure watcher and status-writer logic, by table."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest

from services.watcher.deciding import Action, Published, decide
from services.watcher.seen import Seen
from services.watcher.status.conditions import (
    ConditionUpdate,
    finalizer_removable,
    fold,
    merge_conditions,
    workspace_state,
)
from services.watcher.status.writing import status_patch
from services.watcher.watching import next_event
from shared import events as ev
from shared.api.crd import FINALIZER
from shared.planning.model import Plan
from tests.conftest import PLAN_FIELDS

REF = ev.WorkspaceRef(namespace="ns", name="w", uid="u1")


def obj(
    generation: int = 1, finalizers: tuple[str, ...] = (FINALIZER,), deleting: bool = False
) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": "w",
        "namespace": "ns",
        "uid": "u1",
        "generation": generation,
        "finalizers": list(finalizers),
        "resourceVersion": "7",
    }
    if deleting:
        meta["deletionTimestamp"] = "2026-11-21T00:00:00Z"
    return {"metadata": meta}


@pytest.mark.parametrize(
    ("o", "published", "expected"),
    [
        (obj(finalizers=()), Published(), [Action.ADD_FINALIZER]),
        (obj(finalizers=("other",)), Published(), [Action.ADD_FINALIZER]),
        (obj(), Published(), [Action.PUBLISH_OBSERVED]),
        (obj(generation=2), Published(generation=1), [Action.PUBLISH_OBSERVED]),
        (obj(generation=2), Published(generation=2), []),  # label/status-only change: same generation
        (obj(generation=1), Published(generation=2), []),  # a stale view (older than what we published)
        (obj(deleting=True), Published(generation=1), [Action.PUBLISH_DELETING]),
        (obj(deleting=True), Published(generation=1, deleting=True), []),
        (obj(deleting=True, finalizers=()), Published(), []),  # not ours to clean up
    ],
)
def test_decide(o: dict[str, Any], published: Published, expected: list[Action]) -> None:
    assert decide(o, published) == expected


def test_merge_keeps_transition_time_when_status_unchanged() -> None:
    first = merge_conditions([], [ConditionUpdate("InferenceReady", "False", "Pending", "", 1)], "t1")
    second = merge_conditions(
        first, [ConditionUpdate("InferenceReady", "False", "StillPending", "m", 1)], "t2"
    )
    third = merge_conditions(second, [ConditionUpdate("InferenceReady", "True", "Ready", "", 1)], "t3")
    assert second[0]["lastTransitionTime"] == "t1" and second[0]["reason"] == "StillPending"
    assert third[0]["lastTransitionTime"] == "t3" and third[0]["status"] == "True"


def test_merge_never_lets_an_older_generation_overwrite_a_newer_one() -> None:
    current = merge_conditions([], [ConditionUpdate("ResourceReady", "True", "Ready", "", 3)], "t1")
    after = merge_conditions(current, [ConditionUpdate("ResourceReady", "False", "Old", "", 2)], "t2")
    assert after == current


def test_fold_coalesces_a_burst_in_order() -> None:
    events: list[ev.AnyEvent] = [
        ev.NodesRequested(workspace=REF, generation=1, provider="local", count=1, instance_type="local"),
        ev.NodesReady(workspace=REF, generation=1, provider="local", nodes=("n1",)),
        ev.InferenceReady(workspace=REF, generation=1, endpoint="http://127.0.0.1:8000"),
    ]
    change = fold(events)
    merged = {c["type"]: c for c in merge_conditions([], change.conditions, "t")}
    assert merged["ResourceReady"]["status"] == "True"
    assert merged["NodesReady"]["status"] == "True"
    assert merged["WorkspaceSucceeded"]["status"] == "True"
    assert change.worker_nodes == ("n1",)


def test_failures_become_false_conditions_and_warnings() -> None:
    change = fold(
        [ev.PlanRejected(workspace=REF, generation=2, reason="UnknownPreset", message="no such preset")]
    )
    assert {(c.type, c.status, c.reason) for c in change.conditions} >= {
        ("ResourceReady", "False", "UnknownPreset"),
        ("WorkspaceSucceeded", "False", "UnknownPreset"),
    }
    assert change.warnings and change.warnings[0].reason == "UnknownPreset"


def test_status_patch_is_none_when_nothing_changes() -> None:
    change = fold([ev.ConditionReported(workspace=REF, generation=1, type="X", status="True", reason="R")])
    o = obj()
    patch = status_patch(o, change, "t")
    assert patch is not None and patch["metadata"]["resourceVersion"] == "7"
    o["status"] = patch["status"]
    assert status_patch(o, change, "t2") is None


def test_plan_sets_target_node_count_and_summary_never_from_an_older_generation() -> None:
    plan = msgspec.convert(PLAN_FIELDS, Plan)
    o = obj()
    patch = status_patch(o, fold([ev.PlanResolved(workspace=REF, generation=2, plan=plan)]), "t")
    assert patch is not None
    assert patch["status"]["targetNodeCount"] == 2
    assert patch["status"]["plan"] == {
        "instanceType": "Standard_NC24ads_A100_v4",
        "nodes": 2,
        "gpusPerNode": 1,
        "engine": "vllm",
        "dtype": "bfloat16",
        "maxModelLen": 32768,
        "parallelism": "TP1 PP2 DP1",
        "observedGeneration": 2,
    }
    o["status"] = patch["status"]
    older = fold([ev.PlanResolved(workspace=REF, generation=1, plan=msgspec.structs.replace(plan, nodes=5))])
    assert "targetNodeCount" not in (status_patch(o, older, "t2") or {"status": {}})["status"]


def test_finalizer_waits_for_every_owner() -> None:
    assert finalizer_removable([], [])
    assert not finalizer_removable(["provisioner"], ["provisioner", "workload"])
    assert finalizer_removable(["workload", "provisioner"], ["provisioner", "workload"])


def test_a_late_redelivery_does_not_turn_a_condition_back() -> None:
    """Issue 16, found by the chaos suite: a watcher is SIGKILLed holding "NodesReady=False, still
    launching"; the restarted one applies the newer NodesReady=True first, and the old message comes
    back ``ack_wait`` later. It must not make the Workspace not-ready again — not on its own, and not
    when it arrives in one batch after the newer one."""
    requested = ev.NodesRequested(
        workspace=REF, generation=1, provider="nodeclaim", count=1, occurred_at=100.0
    )
    launching = ev.ConditionReported(
        workspace=REF, generation=1, type="NodesReady", status="False", reason="WaitingForNodeClaims",
        message="launching", occurred_at=101.0,
    )  # fmt: skip
    ready = ev.NodesReady(workspace=REF, generation=1, provider="nodeclaim", nodes=("n1",), occurred_at=102.0)
    o = obj()

    def apply(*events: ev.AnyEvent) -> dict[str, str]:
        patch = status_patch(o, fold(events), "t")
        if patch is not None:
            status = o.setdefault("status", {})
            times = {
                **status.get("conditionEventTimes", {}),
                **patch["status"].pop("conditionEventTimes", {}),
            }
            status.update(patch["status"], conditionEventTimes=times)
        return {c["type"]: c["status"] for c in o["status"]["conditions"]}

    assert apply(requested)["ResourceReady"] == "False"
    assert apply(ready) == {"NodesReady": "True", "ResourceReady": "True"}
    assert apply(launching) == {"NodesReady": "True", "ResourceReady": "True"}  # late: dropped
    assert apply(requested) == {"NodesReady": "True", "ResourceReady": "True"}
    assert status_patch(o, fold([launching, requested]), "t") is None  # nothing to write at all
    assert apply(ready, launching)["NodesReady"] == "True"  # stale within one batch, too
    newer = ev.ConditionReported(
        workspace=REF, generation=1, type="NodesReady", status="False", reason="NodeLost",
        message="n1 is gone", occurred_at=103.0,
    )  # fmt: skip
    assert apply(newer)["NodesReady"] == "False"  # a newer event still speaks


def _conds(**status: str) -> list[dict[str, Any]]:
    return [{"type": type_, "status": value} for type_, value in status.items()]


@pytest.mark.parametrize(
    ("conditions", "tuning", "previous", "expected"),
    [
        (_conds(Planned="True"), False, None, "Pending"),
        (_conds(ResourceReady="True", InferenceReady="False"), False, "Pending", "Pending"),
        (_conds(ResourceReady="True", InferenceReady="True"), False, "Pending", "Ready"),
        (_conds(ResourceReady="True", InferenceReady="False"), False, "Ready", "NotReady"),
        (_conds(ResourceReady="False", InferenceReady="True"), False, "NotReady", "NotReady"),
        (
            _conds(ResourceReady="False", WorkspaceSucceeded="False"),
            False,
            None,
            "Pending",
        ),  # no Failed (KAITO)
        (_conds(ResourceReady="True"), True, None, "Pending"),
        (_conds(JobStarted="True", WorkspaceSucceeded="Unknown"), True, "Pending", "Running"),
        (_conds(JobStarted="True", WorkspaceSucceeded="True"), True, "Running", "Succeeded"),
        (_conds(JobStarted="True", WorkspaceSucceeded="False"), True, "Running", "Failed"),
    ],
)
def test_state_follows_kaitos_rules(
    conditions: list[dict[str, Any]], tuning: bool, previous: str | None, expected: str
) -> None:
    assert workspace_state(conditions, tuning=tuning, previous=previous) == expected


def test_status_patch_writes_the_state_with_the_conditions_it_follows_from() -> None:
    o = obj()
    ready = fold(
        [
            ev.NodesReady(workspace=REF, generation=1, provider="local", nodes=("n1",)),
            ev.InferenceReady(workspace=REF, generation=1, endpoint="http://127.0.0.1:8000"),
        ]
    )
    patch = status_patch(o, ready, "t")
    assert patch is not None and patch["status"]["state"] == "Ready"
    o["status"] = patch["status"]
    down = fold([ev.InferenceFailed(workspace=REF, generation=1, reason="Crashed", message="replica died")])
    patch = status_patch(o, down, "t2")
    assert patch is not None and patch["status"]["state"] == "NotReady"


def test_the_watcher_reads_the_spec_typed_once_and_refuses_one_it_cannot_read() -> None:
    """Issue 17: the spec is validated where the object is read; what cannot be read (a CRD newer than
    this watcher's model) is refused on the Workspace with the field, not passed on as a dict."""
    from services.watcher.watching import typed_spec
    from shared.errors import InvalidInput

    good = {**obj(), "resource": {"labelSelector": {"matchLabels": {"a": "b"}}, "count": 2},
            "inference": {"preset": {"name": "phi-4"}}, "status": {"state": "Ready"}}  # fmt: skip
    spec = typed_spec(good)
    assert spec.resource.count == 2 and spec.inference is not None and spec.inference.preset is not None
    assert spec.as_json() == {"resource": good["resource"], "inference": good["inference"]}
    with pytest.raises(InvalidInput, match=r"resource\.count") as caught:
        typed_spec({**good, "resource": {**good["resource"], "count": "two"}})
    assert caught.value.reason == "InvalidSpec"


def _copy(name: str, uid: str, rv: str) -> dict[str, Any]:
    return {"metadata": {"namespace": "ns", "name": name, "uid": uid, "resourceVersion": rv}}


def test_seen_keeps_the_newest_copy_of_each_uid() -> None:
    seen = Seen()
    seen.saw(_copy("a", "u1", "10"))
    seen.saw(_copy("a", "u1", "9"))  # a watch event older than the writer's own patch response
    assert seen.get("ns", "a", "u1") == _copy("a", "u1", "10")
    assert seen.get("ns", "a", "u0") is None  # another object of that name: read it from the apiserver
    seen.saw(_copy("a", "u2", "12"))  # deleted and created again: a later revision
    assert seen.get("ns", "a", "u2") == _copy("a", "u2", "12")
    seen.saw(_copy("a", "u1", "11"))  # a late response about the old one: the new one stays
    assert seen.get("ns", "a", "u2") is not None
    seen.gone(_copy("a", "u1", "11"))  # the old one's DELETED event, late: the new one stays too
    assert seen.get("ns", "a", "u2") is not None
    seen.saw(_copy("b", "u3", "5"))
    seen.relisted([_copy("b", "u3", "4")])  # a relist: "a" is gone; b's newer copy is kept
    assert seen.get("ns", "a", "u2") is None
    assert seen.get("ns", "b", "u3") == _copy("b", "u3", "5")


async def test_a_stop_that_lands_as_a_watch_event_arrives_is_not_lost() -> None:
    """A CI run: the watcher ignored SIGTERM until it was killed. On Python 3.11 ``asyncio.wait_for``
    returns the inner result when a cancellation and that result land together, and the cancel is
    lost: the watch loop read on, and the shutdown waited for it."""
    gate: asyncio.Future[dict[str, str]] = asyncio.get_running_loop().create_future()

    async def stream() -> AsyncIterator[dict[str, str]]:
        yield await gate

    read = asyncio.create_task(next_event(stream(), 10))
    await asyncio.sleep(0)  # waiting for the event
    gate.set_result({"type": "ADDED"})
    read.cancel()
    with pytest.raises(asyncio.CancelledError):
        await read
