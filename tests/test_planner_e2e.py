"""The planner service end to end: real apiserver, NATS, kubectl, watcher and planner processes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from typing import Any

import msgspec
import pytest
import yaml
from nats.aio.client import Client

from services.planner.store import PLANS_BUCKET, StoredPlan
from shared import events as ev
from tests.conftest import SEEDS, Kubectl, Services, until
from tests.hub_server import HubServer

pytestmark = [pytest.mark.controlplane, pytest.mark.nats]


async def start(services: Services, provider: str = "aks", replicas: int = 1) -> None:
    await services.start_ready("services.watcher")
    for _ in range(replicas):
        await services.start_ready("services.planner", KAITEN_PROVIDER=provider)


def manifest(name: str, preset: str, instance_type: str | None = "Standard_NC6s_v3", **resource: Any) -> str:
    res: dict[str, Any] = {"labelSelector": {"matchLabels": {"apps": name}}, **resource}
    if instance_type:
        res["instanceType"] = instance_type
    return json.dumps(
        {
            "apiVersion": "kaito.sh/v1alpha1",
            "kind": "Workspace",
            "metadata": {"name": name},
            "resource": res,
            "inference": {"preset": {"name": preset}},
        }
    )


async def plan_events(nc: Client, namespace: str, name: str = "*") -> list[ev.AnyEvent]:
    """Every plan event stored for the namespace (or one Workspace), in order."""
    sub = await nc.jetstream().subscribe(f"kaiten.plan.*.{namespace}.{name}", ordered_consumer=True)
    found = []
    try:
        while True:
            found.append(ev.decode((await sub.next_msg(timeout=0.5)).data))
    except TimeoutError:
        pass
    finally:
        await sub.unsubscribe()
    return found


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == type_), {})


async def test_seed_manifests_are_planned_into_status(
    kubectl: Kubectl, namespace: str, nc: Client, services: Services
) -> None:
    await start(services)
    names = []
    for path in sorted(SEEDS.glob("*.yaml")):
        names.append(yaml.safe_load(path.read_text())["metadata"]["name"])
        kubectl.run("apply", "-n", namespace, "-f", str(path), check=True)
    for name in names:
        kubectl.run(
            "wait",
            "-n",
            namespace,
            "--for=jsonpath={.status.targetNodeCount}=1",
            f"workspace/{name}",
            "--timeout=20s",
            check=True,
        )
        obj = kubectl.json("get", "workspace", name, "-n", namespace)
        assert obj["status"]["plan"]["instanceType"] == "Standard_NC6s_v3"
        assert obj["status"]["plan"]["dtype"] == "float16"  # V100 has no bfloat16
        planned = condition(obj, "Planned")
        assert planned["status"] == "True" and "fits 1 × V100 16 GiB" in planned["message"], planned
    tuning = kubectl.json("get", "workspace", "workspace-tuning-phi-3", "-n", namespace)
    assert (
        tuning["status"]["plan"]["engine"] == "transformers"
        and "qlora tuning" in condition(tuning, "Planned")["message"]
    )
    wide = kubectl.run(
        "get", "workspace", "workspace-phi-3-mini", "-n", namespace, "-o", "wide", check=True
    ).stdout
    header, row = wide.splitlines()[:2]
    column = header.index("TARGET")  # columns are aligned; empty cells make split() unreliable
    assert row[column:].split()[:2] == ["1", "Standard_NC6s_v3"], wide
    events = await plan_events(nc, namespace)
    assert sorted(e.workspace.name for e in events) == sorted(names)
    assert all(isinstance(e, ev.PlanResolved) and e.plan.sku == "Standard_NC6s_v3" for e in events)
    kv = await nc.jetstream().key_value(PLANS_BUCKET)
    stored = msgspec.json.decode((await kv.get(f"{namespace}.workspace-phi-3-mini")).value, type=StoredPlan)
    assert stored.generation == 1 and stored.plan is not None and stored.plan.nodes == 1


REJECTED = [
    ("unknown", manifest("unknown", "phi3-mini"), "UnknownPreset", "phi-3-mini-4k-instruct"),
    ("old", manifest("old", "falcon-7b"), "DeprecatedPreset", "use mistral-7b instead"),
    ("nobf16", manifest("nobf16", "gemma-3-27b-instruct"), "IncompatibleGPU", "has no bfloat16"),
    (
        "huge",
        manifest("huge", "deepseek-v4-pro", "Standard_NV36ads_A10_v5"),
        "ModelTooLarge",
        "more than the limit of 16",
    ),
    (
        "nosku",
        manifest("nosku", "phi-4", "Standard_NC6s_v9"),
        "UnknownInstanceType",
        "did you mean Standard_NC6s_v3",
    ),
]


async def test_rejections_show_in_kubectl_get_and_describe(
    kubectl: Kubectl, namespace: str, nc: Client, services: Services
) -> None:
    await start(services)
    tuning = {
        "apiVersion": "kaito.sh/v1alpha1",
        "kind": "Workspace",
        "metadata": {"name": "notune"},
        "resource": {
            "instanceType": "Standard_NC24ads_A100_v4",
            "labelSelector": {"matchLabels": {"a": "b"}},
        },
        "tuning": {
            "preset": {"name": "llama-3.1-8b-instruct"},
            "method": "lora",
            "input": {"urls": ["https://example.invalid/d.parquet"]},
            "output": {"image": "registry.invalid/a:1", "imagePushSecret": "push"},
        },
    }
    cases = [*REJECTED, ("notune", json.dumps(tuning), "TuningUnsupported", "no tuning support")]
    for _, text, _, _ in cases:
        kubectl.run("apply", "-n", namespace, "-f", "-", stdin=text, check=True)
    for name, _, reason, says in cases:
        kubectl.run(
            "wait",
            "-n",
            namespace,
            "--for=condition=ResourceReady=False",
            f"workspace/{name}",
            "--timeout=20s",
            check=True,
        )
        obj = kubectl.json("get", "workspace", name, "-n", namespace)
        for type_ in ("Planned", "ResourceReady", "WorkspaceSucceeded"):
            cond = condition(obj, type_)
            assert (cond["status"], cond["reason"]) == ("False", reason), (name, cond)
        assert says in condition(obj, "ResourceReady")["message"], obj["status"]
        described = kubectl.run("describe", "workspace", name, "-n", namespace, check=True).stdout
        assert reason in described and says in " ".join(described.split()), described
        assert "targetNodeCount" not in obj["status"]
    table = kubectl.run("get", "workspace", "-n", namespace, check=True).stdout.splitlines()
    rows = {line.split()[0]: line.split() for line in table[1:]}
    for name, *_ in cases:
        # NAME INSTANCE RESOURCEREADY INFERENCEREADY WORKSPACEREADY AGE: ResourceReady, WorkspaceReady False
        assert "False" in rows[name], table
    await until(
        lambda: "UnknownPreset" in kubectl.run("get", "events", "-n", namespace).stdout, what="Warning Event"
    )
    warnings = kubectl.json("get", "events", "-n", namespace, "--field-selector", "type=Warning")["items"]
    assert {w["reason"] for w in warnings} >= {reason for _, _, reason, _ in cases}


async def test_spec_change_replans_label_change_does_not(
    kubectl: Kubectl, namespace: str, nc: Client, services: Services
) -> None:
    await start(services)
    kubectl.run(
        "apply", "-n", namespace, "-f", "-", stdin=manifest("scale", "phi-3-mini-4k-instruct"), check=True
    )
    kubectl.run(
        "wait",
        "-n",
        namespace,
        "--for=jsonpath={.status.targetNodeCount}=1",
        "workspace/scale",
        "--timeout=20s",
        check=True,
    )
    kubectl.run("label", "workspace", "scale", "-n", namespace, "team=a", check=True)
    await asyncio.sleep(1.0)
    assert len(await plan_events(nc, namespace, "scale")) == 1
    kubectl.run(
        "apply",
        "-n",
        namespace,
        "-f",
        "-",
        stdin=manifest("scale", "phi-3-mini-4k-instruct", count=3),
        check=True,
    )
    kubectl.run(
        "wait",
        "-n",
        namespace,
        "--for=jsonpath={.status.targetNodeCount}=3",
        "workspace/scale",
        "--timeout=20s",
        check=True,
    )
    events = await plan_events(nc, namespace, "scale")
    assert [e.generation for e in events] == [1, 2]
    first, second = (e.plan for e in events if isinstance(e, ev.PlanResolved))
    assert (first.nodes, first.data_parallel) == (1, 1)
    assert (second.nodes, second.data_parallel) == (3, 3)
    obj = kubectl.json("get", "workspace", "scale", "-n", namespace)
    assert obj["status"]["plan"]["observedGeneration"] == 2


async def test_inference_config_map_is_read_and_checked_as_kaito_does(
    kubectl: Kubectl, namespace: str, nc: Client, services: Services
) -> None:
    """KAITO's ``inference.config``: the ConfigMap's vLLM arguments reach the plan; a missing one is
    refused in status with KAITO's message."""
    await start(services)
    params = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "params"},
        "data": {"inference_config.yaml": "vllm:\n  cpu-offload-gb: 0\n  max-model-len: 2048\n"},
    }
    kubectl.run("apply", "-n", namespace, "-f", "-", stdin=json.dumps(params), check=True)
    for name, config in (("withparams", "params"), ("noparams", "absent")):
        doc = json.loads(manifest(name, "phi-3-mini-4k-instruct"))
        doc["inference"]["config"] = config
        kubectl.run("apply", "-n", namespace, "-f", "-", stdin=json.dumps(doc), check=True)
    kubectl.run(
        "wait", "-n", namespace, "--for=jsonpath={.status.targetNodeCount}=1", "workspace/withparams",
        "--timeout=20s", check=True,
    )  # fmt: skip
    events = await plan_events(nc, namespace, "withparams")
    (resolved,) = [e for e in events if isinstance(e, ev.PlanResolved)]
    assert resolved.plan.engine_args["cpu-offload-gb"] == 0
    assert resolved.plan.engine_args["max-model-len"] == resolved.plan.max_model_len == 2048
    assert "inference.config params" in resolved.plan.explanation
    kubectl.run(
        "wait", "-n", namespace, "--for=condition=ResourceReady=False", "workspace/noparams",
        "--timeout=20s", check=True,
    )  # fmt: skip
    cond = condition(kubectl.json("get", "workspace", "noparams", "-n", namespace), "ResourceReady")
    assert cond["reason"] == "InvalidInferenceConfig", cond
    assert f"ConfigMap 'absent' specified in 'config' not found in namespace '{namespace}'" in cond["message"]


async def test_any_hugging_face_id_is_planned_from_the_hub_as_kaito_does(
    kubectl: Kubectl, namespace: str, nc: Client, services: Services
) -> None:
    """KAITO ≥ 0.9 takes any ``org/model`` as a preset. The planner sizes it from the hub (here one on
    127.0.0.1 holding real config.json files); a gated model and an unknown one say why in status."""
    with HubServer() as hub:
        await services.start_ready("services.watcher")
        await services.start_ready("services.planner", KAITEN_PROVIDER="aks", KAITEN_HUB_URL=hub.url)
        for name, preset in (
            ("qwen", "Qwen/Qwen3-0.6B"),
            ("gated", "gated/llama-private"),
            ("nope", "no/such"),
        ):
            text = manifest(name, preset, "Standard_NC4as_T4_v3")
            kubectl.run("apply", "-n", namespace, "-f", "-", stdin=text, check=True)
        kubectl.run(
            "wait", "-n", namespace, "--for=jsonpath={.status.targetNodeCount}=1", "workspace/qwen",
            "--timeout=20s", check=True,
        )  # fmt: skip
        (resolved,) = [e for e in await plan_events(nc, namespace, "qwen") if isinstance(e, ev.PlanResolved)]
        assert (resolved.plan.model, resolved.plan.max_model_len) == ("Qwen/Qwen3-0.6B", 40960)
        assert any(hub.url in note for note in resolved.plan.notes), resolved.plan.notes
        for name, reason in (("gated", "HubAuthRequired"), ("nope", "UnknownPreset")):
            kubectl.run(
                "wait", "-n", namespace, "--for=condition=ResourceReady=False", f"workspace/{name}",
                "--timeout=20s", check=True,
            )  # fmt: skip
            cond = condition(kubectl.json("get", "workspace", name, "-n", namespace), "ResourceReady")
            assert cond["reason"] == reason, cond


def gpu_node(name: str, selector: str, ready: bool = True) -> tuple[str, str]:
    node = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {
                "apps": selector,
                "nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB",
                "nvidia.com/gpu.memory": "81920",
            },
        },
    }
    status = {
        "status": {
            "capacity": {"nvidia.com/gpu": "1", "cpu": "24", "memory": "220Gi", "pods": "110"},
            "allocatable": {"nvidia.com/gpu": "1", "cpu": "24", "memory": "216Gi", "pods": "110"},
            "conditions": [{"type": "Ready", "status": "True" if ready else "False", "reason": "Test"}],
        }
    }
    return json.dumps(node), json.dumps(status)


def set_gpu_node_ready(kubectl: Kubectl, name: str, selector: str, ready: bool) -> None:
    """Write the node's status (capacity, Ready) as its kubelet would."""
    _, status = gpu_node(name, selector, ready=ready)
    kubectl.run("patch", "node", name, "--subresource=status", "--type=merge", "-p", status, check=True)


def add_gpu_node(kubectl: Kubectl, name: str, selector: str, ready: bool = True) -> None:
    """A one-A100 node matching ``apps=<selector>``, registered and given its status."""
    node, _ = gpu_node(name, selector, ready=ready)
    kubectl.run("apply", "-f", "-", stdin=node, check=True)
    set_gpu_node_ready(kubectl, name, selector, ready)


async def test_byo_plans_on_the_matching_nodes(
    kubectl: Kubectl, namespace: str, nc: Client, services: Services
) -> None:
    selector = f"byo-{namespace}"
    names = [f"{namespace}-gpu-b", f"{namespace}-gpu-a", f"{namespace}-gpu-down"]
    try:
        for name in names:
            add_gpu_node(kubectl, name, selector, ready=not name.endswith("down"))
        await start(services, provider="byo")
        ws = json.loads(manifest("mine", "qwen2.5-coder-32b-instruct", None))
        ws["resource"]["labelSelector"]["matchLabels"] = {"apps": selector}
        ws["resource"]["preferredNodes"] = [names[0]]
        kubectl.run("apply", "-n", namespace, "-f", "-", stdin=json.dumps(ws), check=True)
        kubectl.run(
            "wait",
            "-n",
            namespace,
            "--for=jsonpath={.status.targetNodeCount}=2",
            "workspace/mine",
            "--timeout=20s",
            check=True,
        )
        (resolved,) = await plan_events(nc, namespace, "mine")
        assert isinstance(resolved, ev.PlanResolved)
        assert resolved.plan.byo_nodes == (names[0], names[1])  # preferred first; the NotReady one never
        assert (resolved.plan.gpu, resolved.plan.pipeline_parallel, resolved.plan.cost_per_hour) == (
            "A100",
            2,
            0.0,
        )
    finally:
        kubectl.run("delete", "node", *names, "--ignore-not-found")


async def test_sigkill_mid_planning_loses_nothing_and_duplicates_nothing(
    kubectl: Kubectl, namespace: str, nc: Client, services: Services
) -> None:
    await services.start_ready("services.watcher")
    planners = [await services.start_ready("services.planner", KAITEN_PROVIDER="aks") for _ in range(2)]
    names = [f"w{i}" for i in range(10)]
    for i, name in enumerate(names):
        kubectl.run(
            "apply", "-n", namespace, "-f", "-", stdin=manifest(name, "phi-3-mini-4k-instruct"), check=True
        )
        if i == 3:
            assert planners[0].proc is not None
            os.kill(planners[0].proc.pid, signal.SIGKILL)
    await services.start_ready("services.planner", KAITEN_PROVIDER="aks")  # the replacement
    for name in names:
        kubectl.run(
            "wait",
            "-n",
            namespace,
            "--for=condition=Planned=True",
            f"workspace/{name}",
            "--timeout=30s",
            check=True,
        )
    events = await plan_events(nc, namespace)
    per_name: dict[str, int] = {}
    for event in events:
        per_name[event.workspace.name] = per_name.get(event.workspace.name, 0) + 1
    assert per_name == dict.fromkeys(names, 1), per_name
    plans = {msgspec.json.encode(e.plan) for e in events if isinstance(e, ev.PlanResolved)}
    assert len(plans) == 1  # the same spec gives the identical plan, whichever replica planned it
