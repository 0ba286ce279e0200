"""The nodeclaim provider against the real apiserver with a NodeClaim CRD installed; the test plays
Karpenter (it launches "machines" by creating Nodes and setting claim status)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from nats.aio.client import Client

from services.provisioner.providers.nodeclaim import ID_LABEL
from shared import events as ev
from tests.conftest import REPO, Kubectl, Services, until
from tests.test_planner_e2e import condition, manifest
from tests.test_provisioner_e2e import FAST, events_of

pytestmark = [pytest.mark.controlplane, pytest.mark.nats]
CRD = REPO / "deploy" / "test-crds" / "karpenter.sh_nodeclaims.yaml"


def claims(kubectl: Kubectl, workspace_id: str | None = None) -> list[dict[str, Any]]:
    selector = f"{ID_LABEL}={workspace_id}" if workspace_id else ID_LABEL
    return list(kubectl.json("get", "nodeclaims.karpenter.sh", "-l", selector)["items"])


def karpenter_status(kubectl: Kubectl, claim: str, **status: Any) -> None:
    kubectl.run(
        "patch",
        "nodeclaim.karpenter.sh",
        claim,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps({"status": status}),
        check=True,
    )


def launch(kubectl: Kubectl, claim: dict[str, Any]) -> str:
    """What Karpenter does once the machine is up: a Node with the claim's labels, the claim Ready."""
    name = f"{claim['metadata']['name']}-node"
    node = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": claim["metadata"]["labels"]},
    }
    kubectl.run("apply", "-f", "-", stdin=json.dumps(node), check=True)
    conditions = [
        {"type": t, "status": "True", "reason": t} for t in ("Launched", "Registered", "Initialized", "Ready")
    ]
    karpenter_status(kubectl, claim["metadata"]["name"], nodeName=name, conditions=conditions)
    return name


async def test_nodeclaims_created_resized_and_deleted(
    kubectl: Kubectl, namespace: str, nc: Client, services: Services
) -> None:
    kubectl.run("apply", "-f", str(CRD), check=True)
    kubectl.run(
        "wait", "--for=condition=Established", "crd/nodeclaims.karpenter.sh", "--timeout=30s", check=True
    )
    await services.start_ready("services.watcher", KAITEN_CLEANUP_OWNERS="provisioner")
    await services.start_ready("services.planner", KAITEN_PROVIDER="nodeclaim")
    for _ in range(2):  # two replicas: still one claim per node
        await services.start_ready("services.provisioner", KAITEN_PROVIDER="nodeclaim", **FAST)
    ws = json.loads(manifest("nc", "phi-3-mini-4k-instruct", "Standard_NC12s_v3", count=2))
    kubectl.run("apply", "-n", namespace, "-f", "-", stdin=json.dumps(ws), check=True)
    uid = kubectl.json("get", "workspace", "nc", "-n", namespace)["metadata"]["uid"]
    created: list[dict[str, Any]] = []

    def two_claims() -> bool:
        created[:] = [
            c
            for c in claims(kubectl)
            if c["metadata"]["labels"].get("kaito.sh/workspace") == "nc"
            and c["metadata"]["labels"].get("kaito.sh/workspacenamespace") == namespace
        ]
        return len(created) == 2

    await until(two_claims, timeout=30, what=f"two NodeClaims\n{services.logs()}")
    workspace_id = created[0]["metadata"]["labels"][ID_LABEL]
    first = created[0]
    assert first["spec"]["requirements"][0] == {
        "key": "node.kubernetes.io/instance-type",
        "operator": "In",
        "values": ["Standard_NC12s_v3"],
    }
    assert first["spec"]["taints"] == [{"key": "sku", "value": "gpu", "effect": "NoSchedule"}]
    assert first["spec"]["resources"]["requests"] == {"nvidia.com/gpu": "2"}
    assert first["spec"]["nodeClassRef"] == {
        "group": "karpenter.azure.com",
        "kind": "AKSNodeClass",
        "name": "default",
    }
    assert first["metadata"]["labels"]["apps"] == "nc"  # the labelSelector's labels reach the node

    # Karpenter cannot launch one yet: the reason is in the Workspace's conditions
    stuck = created[1]["metadata"]["name"]
    karpenter_status(
        kubectl,
        stuck,
        conditions=[
            {
                "type": "Launched",
                "status": "False",
                "reason": "InsufficientCapacity",
                "message": "no capacity for Standard_NC12s_v3 in eastus",
            },
        ],
    )

    def says_why() -> bool:
        obj = kubectl.json("get", "workspace", "nc", "-n", namespace)
        return "no capacity for Standard_NC12s_v3" in condition(obj, "NodeClaimReady").get("message", "")

    await until(
        says_why, timeout=20, what=f"NodeClaimReady=False with Karpenter's message\n{services.logs()}"
    )
    nodes = sorted(launch(kubectl, c) for c in created)
    try:
        kubectl.run(
            "wait",
            "-n",
            namespace,
            "--for=condition=ResourceReady",
            "workspace/nc",
            "--timeout=30s",
            check=True,
        )
        obj = kubectl.json("get", "workspace", "nc", "-n", namespace)
        assert sorted(obj["status"]["workerNodes"]) == nodes
        assert condition(obj, "NodeClaimReady")["status"] == "True"
        assert len(claims(kubectl, workspace_id)) == 2

        # one replica fewer: the highest index goes, the other claim stays
        kubectl.run(
            "patch",
            "-n",
            namespace,
            "workspace/nc",
            "--type=merge",
            "-p",
            '{"resource": {"count": 1}}',
            check=True,
        )
        await until(lambda: len(claims(kubectl, workspace_id)) == 1, timeout=30, what="one NodeClaim left")
        assert claims(kubectl, workspace_id)[0]["metadata"]["name"].endswith("-0")
        kubectl.run(
            "wait",
            "-n",
            namespace,
            "--for=jsonpath={.status.workerNodes[1]}=",
            "workspace/nc",
            "--timeout=5s",
        )

        kubectl.run("delete", "-n", namespace, "workspace/nc", "--timeout=30s", check=True)
        assert claims(kubectl, workspace_id) == []
        requested = [
            e for e in await events_of(nc, "nodes", namespace, "nc") if isinstance(e, ev.NodesRequested)
        ]
        assert [(e.generation, e.count) for e in requested] == [(1, 2), (2, 1)]
        assert uid
    finally:
        kubectl.run("delete", "node", *nodes, "--ignore-not-found")
