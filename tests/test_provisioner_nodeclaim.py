"""The nodeclaim provider against the real apiserver with a NodeClaim CRD installed; the test plays
Karpenter (it launches "machines" by creating Nodes and setting claim status)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from typing import Any

import pytest
from nats.aio.client import Client
from nats.js.errors import KeyNotFoundError

from kaiten.local import procs
from services.provisioner.providers.nodeclaim import ID_LABEL
from services.provisioner.store import NODES_BUCKET
from shared import events as ev
from tests.conftest import REPO, Kubectl, Services, until
from tests.test_planner_e2e import condition, manifest
from tests.test_provisioner_e2e import FAST, events_of

pytestmark = [pytest.mark.controlplane, pytest.mark.nats]
CRD = REPO / "deploy" / "test-crds" / "karpenter.sh_nodeclaims.yaml"


def claims(kubectl: Kubectl, workspace_id: str | None = None) -> list[dict[str, Any]]:
    selector = f"{ID_LABEL}={workspace_id}" if workspace_id else ID_LABEL
    return list(kubectl.json("get", "nodeclaims.karpenter.sh", "-l", selector)["items"])


# The conditions Karpenter sets on a claim whose machine is up and whose node joined.
READY_CONDITIONS = [
    {"type": t, "status": "True", "reason": t} for t in ("Launched", "Registered", "Initialized", "Ready")
]


def karpenter_status(kubectl: Kubectl, claim: str, *, check: bool = True, **status: Any) -> bool:
    """What Karpenter writes: a merge-patch of the claim's status. True when the apiserver took it."""
    patched = kubectl.run(
        "patch",
        "nodeclaim.karpenter.sh",
        claim,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps({"status": status}),
        check=check,
    )
    return patched.returncode == 0


def launch(kubectl: Kubectl, claim: dict[str, Any]) -> str:
    """What Karpenter does once the machine is up: a Node with the claim's labels, the claim Ready."""
    name = f"{claim['metadata']['name']}-node"
    node = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": claim["metadata"]["labels"]},
    }
    kubectl.run("apply", "-f", "-", stdin=json.dumps(node), check=True)
    karpenter_status(kubectl, claim["metadata"]["name"], nodeName=name, conditions=READY_CONDITIONS)
    return name


async def test_nodeclaims_created_resized_and_deleted(
    kubectl: Kubectl, namespace: str, nc: Client, services: Services
) -> None:
    kubectl.run("apply", "-f", str(CRD), check=True)
    kubectl.wait_established("nodeclaims.karpenter.sh")
    await services.start_ready("services.watcher", KAITEN_CLEANUP_OWNERS="provisioner")
    await services.start_ready("services.planner", KAITEN_PROVIDER="nodeclaim")
    for _ in range(2):  # two replicas: still one claim per node
        await services.start_ready("services.provisioner", KAITEN_PROVIDER="nodeclaim", **FAST)
    ws = json.loads(manifest("nc", "phi-3-mini-4k-instruct", "Standard_NC12s_v3", count=2))
    ws["metadata"]["annotations"] = {"kaito.sh/node-image-family": "AzureLinux"}  # KAITO's; normalised
    ws["resource"]["labelSelector"]["matchExpressions"] = [
        {"key": "tier", "operator": "In", "values": ["gold"]}
    ]
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
    assert first["metadata"]["labels"]["tier"] == "gold"  # a single-value In too (KAITO's LabelSelectorAsMap)
    assert first["metadata"]["annotations"]["kaito.sh/node-image-family"] == "azurelinux"

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


async def test_a_frozen_replica_cannot_recreate_nodes_another_replica_released(
    kubectl: Kubectl, namespace: str, nc: Client, services: Services
) -> None:
    """Issue 16 (6): replica A, leading, freezes in a reconcile pass after reading a pending request and
    before asking the provider for its nodes (a failpoint: SIGSTOP, as a stalled node would). The Workspace is
    deleted meanwhile, and replica B handles that. A resumed must not create NodeClaims for a Workspace
    that is gone, nor bring its record back. Before the fix the pass ran outside the Workspace's lease,
    so B released everything, and A then created a NodeClaim nobody would ever delete."""
    kubectl.run("apply", "-f", str(CRD), check=True)
    kubectl.wait_established("nodeclaims.karpenter.sh")
    await services.start_ready("services.watcher", KAITEN_CLEANUP_OWNERS="provisioner")
    await services.start_ready("services.planner", KAITEN_PROVIDER="nodeclaim")
    b = await services.start_ready("services.provisioner", KAITEN_PROVIDER="nodeclaim", **FAST)
    ws = json.loads(manifest("frozen", "phi-3-mini-4k-instruct", "Standard_NC12s_v3", count=1))
    kubectl.run("apply", "-n", namespace, "-f", "-", stdin=json.dumps(ws), check=True)

    def mine() -> list[dict[str, Any]]:
        return [
            c
            for c in claims(kubectl)
            if c["metadata"]["labels"].get("kaito.sh/workspace") == "frozen"
            and c["metadata"]["labels"].get("kaito.sh/workspacenamespace") == namespace
        ]

    await until(lambda: len(mine()) == 1, timeout=30, what=f"B's NodeClaim\n{services.logs()}")
    stop_in_a_pass = {"KAITEN_FAILPOINT": "provisioner.ensure=stop"}
    a = await services.start_ready(
        "services.provisioner", KAITEN_PROVIDER="nodeclaim", **stop_in_a_pass, **FAST
    )
    assert a.proc is not None
    # passes are the leader's: the first replica stops, A leads, and A's first pass freezes in it
    b.stop()
    try:
        await until(
            lambda: procs.state(a.proc.pid) == "T", timeout=30, what=f"A frozen in a pass\n{services.logs()}"
        )
        # B: it handles the deletion (and leads once frozen A's leadership expires)
        await services.start_ready("services.provisioner", KAITEN_PROVIDER="nodeclaim", **FAST)
        await asyncio.sleep(2)  # A's last pull request expires: the deletion goes to B
        kubectl.run("delete", "-n", namespace, "workspace/frozen", "--wait=false", check=True)
        await asyncio.sleep(5)  # B acts on the deletion as far as it may while A is frozen
    finally:
        os.kill(a.proc.pid, signal.SIGCONT)
    await until(
        lambda: kubectl.run("get", "-n", namespace, "workspace/frozen").returncode != 0,
        timeout=60,
        what=f"the Workspace gone\n{services.logs()}",
    )
    await asyncio.sleep(3)  # ten of A's passes: time to recreate what it would
    assert mine() == [], f"a NodeClaim of a deleted Workspace exists\n{services.logs()}"
    kv = await nc.jetstream().key_value(NODES_BUCKET)
    with pytest.raises(KeyNotFoundError):
        await kv.get(f"{namespace}.frozen")
