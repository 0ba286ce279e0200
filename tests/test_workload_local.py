"""The whole local chain, end to end: kubectl apply of the local example → watcher → planner →
provisioner (local) → workload (local backend) → the serving application RUNNING on a real Ray
cluster (its own head, with the dashboard, loopback only) → /chat answers; deleting the Workspace
removes the application and releases the finalizer."""

from __future__ import annotations

import httpx
import pytest
from nats.aio.client import Client

from shared import events as ev
from shared.local.procs import free_port
from shared.local.ray_head import RayHead
from tests.conftest import REPO, Kubectl, Services, start_local_chain
from tests.test_planner_e2e import condition
from tests.test_provisioner_e2e import events_of

pytestmark = [pytest.mark.controlplane, pytest.mark.nats, pytest.mark.slow]


async def test_local_example_is_served_and_answers(
    kubectl: Kubectl, namespace: str, nc: Client, services: Services, ray_dashboard: RayHead
) -> None:
    serve_port = free_port()
    await start_local_chain(services, ray_dashboard, serve_port)
    kubectl.run(
        "apply",
        "-n",
        namespace,
        "-f",
        str(REPO / "examples" / "local" / "workspace-smollm2.yaml"),
        check=True,
    )
    ready_cond = "--for=condition=InferenceReady"
    kubectl.run(
        "wait", "-n", namespace, ready_cond, "workspace/workspace-smollm2", "--timeout=240s", check=True
    )
    obj = kubectl.json("get", "workspace", "workspace-smollm2", "-n", namespace)
    assert condition(obj, "WorkspaceSucceeded")["status"] == "True"
    (ready,) = [
        e
        for e in await events_of(nc, "workload", namespace, "workspace-smollm2")
        if isinstance(e, ev.InferenceReady)
    ]
    assert ready.endpoint == f"http://127.0.0.1:{serve_port}/{namespace}/workspace-smollm2"
    answer = httpx.post(
        f"{ready.endpoint}/chat",
        json={"messages": [{"role": "user", "content": "What is the capital of France?"}]},
        timeout=120,
    )
    assert answer.status_code == 200 and "Paris" in answer.json()["Result"], answer.text
    models = httpx.get(f"{ready.endpoint}/v1/models", timeout=30).json()
    assert [m["id"] for m in models["data"]] == ["smollm2-135m-instruct"]

    kubectl.run("delete", "-n", namespace, "workspace/workspace-smollm2", "--timeout=60s", check=True)
    token = ray_dashboard.token_path.read_text()
    apps = httpx.get(
        f"{ray_dashboard.dashboard_url}/api/serve/applications/", headers={"Authorization": f"Bearer {token}"}
    ).json()["applications"]
    assert f"{namespace}--workspace-smollm2" not in apps
    owners = [
        e.owner
        for e in await events_of(nc, "status", namespace, "workspace-smollm2")
        if isinstance(e, ev.CleanupDone)
    ]
    assert sorted(owners) == ["provisioner", "workload"]
