"""The whole local chain, end to end: kubectl apply of the local example → watcher → planner →
provisioner (local) → workload (local backend) → the serving application RUNNING on a real Ray
cluster (its own head, with the dashboard, loopback only) → /chat answers; deleting the Workspace
removes the application and releases the finalizer."""

from __future__ import annotations

import asyncio
import json
import secrets
from pathlib import Path

import httpx
import pytest
import yaml
from nats.aio.client import Client

from kaiten.local.procs import free_port
from kaiten.local.ray_head import RayHead
from services.tuning.push import push
from shared import events as ev
from tests.conftest import REPO, Kubectl, Services, start_local_chain, until
from tests.test_planner_e2e import condition
from tests.test_provisioner_e2e import events_of
from tests.test_tracing import Receiver, receiver  # noqa: F401  (a fixture)
from tests.test_tuning import PASSWORD, USER, push_secret, registry  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.controlplane, pytest.mark.nats, pytest.mark.slow]


@pytest.mark.timeout(240)  # measured 57 s (cold model cache)
async def test_local_example_is_served_and_answers(
    kubectl: Kubectl,
    namespace: str,
    nc: Client,
    services: Services,
    ray_dashboard: RayHead,
    receiver: Receiver,  # noqa: F811
) -> None:
    serve_port = free_port()
    otel = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100"}
    await start_local_chain(services, ray_dashboard, serve_port, **otel)
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
    caller = secrets.token_hex(16)  # a client's trace: the replica's request span continues it
    answer = httpx.post(
        f"{ready.endpoint}/chat",
        json={"messages": [{"role": "user", "content": "What is the capital of France?"}]},
        headers={"traceparent": f"00-{caller}-{secrets.token_hex(8)}-01"},
        timeout=120,
    )
    assert answer.status_code == 200 and "Paris" in answer.json()["Result"], answer.text
    await until(
        lambda: [s for s in receiver.trace_of(caller) if s.service == "kaiten-serving" and "/chat" in s.name],
        timeout=30,
        what=f"the replica's span in the caller's trace: {sorted({(s.service, s.name) for s in receiver.spans})}",  # noqa: E501
    )
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


@pytest.mark.timeout(300)  # measured 80 s (cold, busy machine)
async def test_an_adapter_from_the_registry_rolls_into_the_running_workspace(
    kubectl: Kubectl,
    namespace: str,
    nc: Client,
    services: Services,
    ray_dashboard: RayHead,
    adapter_dir: Path,
    registry: str,  # noqa: F811
    push_secret: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    """A spec change (adapters added) rolls the Serve application to generation 2: the replica pulls
    the adapter image with the Workspace's pull secret (copied 0600 for it alone) and serves it, and a
    second adapter comes from a volume (KAITO's volumeSource; a hostPath on this machine). /chat
    answers with the two together (KAITO's rule)."""
    image = f"{registry}/adapters/capitals:1"
    await asyncio.to_thread(push, adapter_dir, image, str(push_secret), insecure=True)
    kubectl.run(
        "create", "secret", "docker-registry", "pull-cred", "-n", namespace, f"--docker-server={registry}",
        f"--docker-username={USER}", f"--docker-password={PASSWORD}", check=True,
    )  # fmt: skip
    work = tmp_path / "workload"
    await start_local_chain(services, ray_dashboard, free_port(), KAITEN_WORK_DIR=str(work))
    workspace = yaml.safe_load((REPO / "examples" / "local" / "workspace-smollm2.yaml").read_text())
    name = workspace["metadata"]["name"]
    kubectl.run("apply", "-n", namespace, "-f", "-", stdin=json.dumps(workspace), check=True)
    ready_cond = "--for=condition=InferenceReady"
    kubectl.run("wait", "-n", namespace, ready_cond, f"workspace/{name}", "--timeout=240s", check=True)

    workspace["inference"]["adapters"] = [
        {
            "source": {"name": "capitals", "image": image, "imagePullSecrets": ["pull-cred"]},
            "strength": "0.5",
        },
        {"source": {"name": "mounted", "volumeSource": {"hostPath": {"path": str(adapter_dir)}}}},
    ]
    kubectl.run("apply", "-n", namespace, "-f", "-", stdin=json.dumps(workspace), check=True)

    async def ready_at(generation: int) -> ev.InferenceReady | None:
        found = [
            e for e in await events_of(nc, "workload", namespace, name)
            if isinstance(e, ev.InferenceReady) and e.generation == generation
        ]  # fmt: skip
        return found[0] if found else None

    deadline = asyncio.get_running_loop().time() + 240
    while (ready := await ready_at(2)) is None:
        assert asyncio.get_running_loop().time() < deadline, f"generation 2 never ready\n{services.logs()}"
        await asyncio.sleep(1)
    models = httpx.get(f"{ready.endpoint}/v1/models", timeout=30).json()
    assert sorted(m["id"] for m in models["data"]) == ["capitals", "mounted", "smollm2-135m-instruct"]
    body = {"model": "capitals", "prompt": "The capital of France is", "max_tokens": 8}
    answer = httpx.post(f"{ready.endpoint}/v1/completions", json=body, timeout=120)
    assert answer.status_code == 200 and answer.json()["model"] == "capitals", answer.text
    chat = httpx.post(
        f"{ready.endpoint}/chat", json={"prompt": "Hi", "generate_kwargs": {"max_new_tokens": 4}}, timeout=120
    )
    assert chat.status_code == 200 and chat.json()["Result"], chat.text  # both adapters, summed
    (secret,) = (work / f"{namespace}.{name}" / "pull").glob("*/.dockerconfigjson")
    assert secret.stat().st_mode & 0o777 == 0o600
    obj = kubectl.json("get", "workspace", name, "-n", namespace)
    assert condition(obj, "InferenceReady")["observedGeneration"] == 2

    kubectl.run("delete", "-n", namespace, f"workspace/{name}", "--timeout=60s", check=True)
    assert not (work / f"{namespace}.{name}").exists()  # the secret copy goes with the workload


async def test_the_local_backend_refuses_a_template_with_a_reason(tmp_path: Path) -> None:
    """``kaiten up`` runs no pods: a template Workspace gets UnsupportedWorkspace with why, nothing else."""
    from services.workload.backends.base import Target
    from services.workload.backends.local import LocalBackend, LocalRay
    from services.workload.render import RenderError

    backend = LocalBackend(LocalRay("http://127.0.0.1:9", "", 8000), api=None, work_dir=tmp_path,
                           nats_url="nats://127.0.0.1:4222", allow_loopback_urls=False)  # fmt: skip
    target = Target(ref=ev.WorkspaceRef(namespace="ns", name="w", uid="u"), api_version="", generation=1,
                    template=True)  # fmt: skip
    with pytest.raises(RenderError) as caught:
        await backend.deploy_template(target)
    assert caught.value.reason == "UnsupportedWorkspace" and "kuberay" in str(caught.value)
    assert list(tmp_path.iterdir()) == []
