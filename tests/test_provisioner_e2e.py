"""The provisioner end to end: real apiserver, NATS, kubectl, and watcher, planner and provisioner
processes — the local provider, and bring-your-own nodes that are not ready yet, with a SIGKILL."""

from __future__ import annotations

import json
import os
import signal

import pytest
from nats.aio.client import Client

from services.provisioner.providers.base import NodeRequest
from services.provisioner.providers.byo import choose
from services.provisioner.store import NODES_BUCKET, StoredNodes
from shared import events as ev
from shared.bus.kvstore import KvStore
from shared.planning.model import NodeInfo
from tests.conftest import REPO, Kubectl, Services, until
from tests.test_planner_e2e import add_gpu_node, condition, manifest, set_gpu_node_ready

pytestmark = [pytest.mark.controlplane, pytest.mark.nats]
FAST = {"KAITEN_RECONCILE_INTERVAL_S": "0.3"}


async def events_of(nc: Client, family: str, namespace: str, name: str) -> list[ev.AnyEvent]:
    sub = await nc.jetstream().subscribe(f"kaiten.{family}.*.{namespace}.{name}", ordered_consumer=True)
    found = []
    try:
        while True:
            found.append(ev.decode((await sub.next_msg(timeout=0.5)).data))
    except TimeoutError:
        pass
    finally:
        await sub.unsubscribe()
    return found


async def test_local_provider_end_to_end_and_cleanup(
    kubectl: Kubectl, namespace: str, nc: Client, services: Services
) -> None:
    await services.start_ready("services.watcher", KAITEN_CLEANUP_OWNERS="provisioner")
    await services.start_ready("services.planner", KAITEN_PROVIDER="local")
    await services.start_ready(
        "services.provisioner", KAITEN_PROVIDER="local", KAITEN_LOCAL_NODE_NAME="kaiten-local"
    )
    example = REPO / "examples" / "local" / "workspace-smollm2.yaml"
    kubectl.run("apply", "-n", namespace, "-f", str(example), check=True)
    kubectl.run(
        "wait",
        "-n",
        namespace,
        "--for=condition=ResourceReady",
        "workspace/workspace-smollm2",
        "--timeout=30s",
        check=True,
    )
    obj = kubectl.json("get", "workspace", "workspace-smollm2", "-n", namespace)
    assert obj["status"]["workerNodes"] == ["kaiten-local"]
    assert condition(obj, "NodesReady")["status"] == "True"
    kinds = [e.kind for e in await events_of(nc, "nodes", namespace, "workspace-smollm2")]
    assert kinds == ["nodes.requested", "nodes.ready"]

    kubectl.run("delete", "-n", namespace, "workspace/workspace-smollm2", "--timeout=30s", check=True)
    cleanup = [
        e
        for e in await events_of(nc, "status", namespace, "workspace-smollm2")
        if isinstance(e, ev.CleanupDone)
    ]
    assert [c.owner for c in cleanup] == ["provisioner"]
    store = KvStore(await nc.jetstream().key_value(NODES_BUCKET), StoredNodes)
    assert f"{namespace}.workspace-smollm2" not in await store.keys()


async def test_byo_waits_for_its_nodes_across_a_sigkill(
    kubectl: Kubectl, namespace: str, nc: Client, services: Services
) -> None:
    """Planned on two Ready nodes; one goes NotReady before the provisioner runs. It says what it waits
    for, is SIGKILLed, restarts, and reports the nodes ready once the node recovers — one request,
    one ready, nothing twice."""
    selector = f"byo-{namespace}"
    names = [f"{namespace}-gpu-b", f"{namespace}-gpu-a"]

    def set_ready(name: str, ready: bool) -> None:
        set_gpu_node_ready(kubectl, name, selector, ready)

    try:
        for name in names:
            add_gpu_node(kubectl, name, selector)
        await services.start_ready("services.watcher", KAITEN_CLEANUP_OWNERS="provisioner")
        await services.start_ready("services.planner", KAITEN_PROVIDER="byo")
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
        set_ready(names[1], False)

        first = await services.start_ready("services.provisioner", KAITEN_PROVIDER="byo", **FAST)

        def waiting() -> bool:
            obj = kubectl.json("get", "workspace", "mine", "-n", namespace)
            cond = condition(obj, "NodesReady")
            return cond.get("reason") == "WaitingForNodes" and f"{names[1]}: not Ready" in cond.get(
                "message", ""
            )

        await until(waiting, timeout=20, what=f"NodesReady=False WaitingForNodes\n{services.logs()}")
        os.kill(first.pid, signal.SIGKILL)
        first.proc.wait()  # type: ignore[union-attr]
        await services.start_ready("services.provisioner", KAITEN_PROVIDER="byo", **FAST)
        set_ready(names[1], True)
        kubectl.run(
            "wait",
            "-n",
            namespace,
            "--for=condition=ResourceReady",
            "workspace/mine",
            "--timeout=30s",
            check=True,
        )
        obj = kubectl.json("get", "workspace", "mine", "-n", namespace)
        assert obj["status"]["workerNodes"] == names  # preferred first
        kinds = [e.kind for e in await events_of(nc, "nodes", namespace, "mine")]
        assert kinds == ["nodes.requested", "nodes.ready"], kinds
        kubectl.run("delete", "-n", namespace, "workspace/mine", "--timeout=30s", check=True)
        assert kubectl.run("get", "node", *names).returncode == 0  # the user's nodes are never deleted
    finally:
        kubectl.run("delete", "node", *names, "--ignore-not-found")


def test_byo_says_why_nodes_do_not_count() -> None:
    ref = ev.WorkspaceRef(namespace="ns", name="w", uid="u")
    request = NodeRequest(
        workspace=ref, generation=1, instance_type="byo", count=2, gpus_per_node=2, preferred_nodes=("c",)
    )
    nodes = [
        NodeInfo(name="a", ready=True, gpus=2),
        NodeInfo(name="b", ready=False, gpus=2),
        NodeInfo(name="c", ready=True, gpus=1),
        NodeInfo(name="d", ready=True, gpus=4),
    ]
    progress = choose(nodes, request)
    assert progress.state == "ready" and progress.nodes == ("a", "d")
    short = choose(nodes[:3], request)
    assert short.state == "pending" and short.reason == "WaitingForNodes"
    assert short.message == (
        "1 of 2 node(s) matching the labelSelector are usable; 3 match"
        " (c: 1 GPU(s), needs 2; b: not Ready (or unschedulable))"
    )


async def test_a_crash_between_publishing_and_storing_loses_no_event(
    kubectl: Kubectl, namespace: str, nc: Client, services: Services
) -> None:
    """Issue 16 (2): the provisioner dies (a failpoint: exit 137, as SIGKILL) between its two writes for
    a settled request — the NodesReady event and the record saying it is settled. Restarted, it still
    makes the Workspace ResourceReady, and NodesReady is stored once."""
    selector = f"crash-{namespace}"
    node = f"{namespace}-gpu-c"
    try:
        add_gpu_node(kubectl, node, selector)
        await services.start_ready("services.watcher", KAITEN_CLEANUP_OWNERS="provisioner")
        await services.start_ready("services.planner", KAITEN_PROVIDER="byo")
        ws = json.loads(manifest("crash", "phi-3-mini-4k-instruct", None))
        ws["resource"]["labelSelector"]["matchLabels"] = {"apps": selector}
        kubectl.run("apply", "-n", namespace, "-f", "-", stdin=json.dumps(ws), check=True)
        first = services.start(
            "services.provisioner", KAITEN_PROVIDER="byo", KAITEN_FAILPOINT="provisioner.settled", **FAST
        )
        assert first.proc is not None and first.proc.wait(timeout=60) == 137, services.logs()
        await services.start_ready("services.provisioner", KAITEN_PROVIDER="byo", **FAST)
        waited = kubectl.run("wait", "-n", namespace, "--for=condition=ResourceReady", "workspace/crash",
                             "--timeout=30s")  # fmt: skip
        assert waited.returncode == 0, f"{waited.stderr}\n{services.logs()}"
        ready = [e for e in await events_of(nc, "nodes", namespace, "crash") if isinstance(e, ev.NodesReady)]
        assert len(ready) == 1, ready  # published twice (before and after the crash), stored once
    finally:
        kubectl.run("delete", "node", node, "--wait=false")
