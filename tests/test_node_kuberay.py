"""KubeRay's real operator (v1.5.1, built from its Go module) on the real node: a RayCluster rendered by
our workload code (the local example's Workspace and plan) reaches Ready, its head pod running our Ray
image from ``deploy/images/ray.Dockerfile``, with every listener on 127.0.0.1.

The RayCluster is the ``rayClusterConfig`` of the RayService the workload renders: a RayService itself
cannot be Ready on this loopback node (its readiness counts Endpoints addresses, which refuse
127.0.0.0/8). ``tests/test_helm_install.py`` serves one end to end on the node in its own network
namespace (see docs/cluster.md)."""

from __future__ import annotations

import base64
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kaiten.local import images
from kaiten.local import kuberay as kuberay_parts
from kaiten.local.node import LocalCluster
from kaiten.local.procs import ManagedProcess, free_ports
from services.planner.planning import PlanOptions, plan
from services.workload.manifests import HostNetwork, ray_version, rayservice
from services.workload.render import serving_config
from shared.api.workspace import Workspace
from shared.events import WorkspaceRef
from shared.planning.catalog import load_catalogs
from shared.planning.model import Plan
from tests.conftest import REPO, Kubectl, http_get
from tests.test_loopback_only import LOOPBACK, sockets

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(600)]  # head Ready ~30 s once the image is in


@pytest.fixture(scope="module")
def operator(
    local_cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ManagedProcess]:
    """KubeRay's operator as a process, loopback only: no metrics or probe listener, no leader election,
    no init container that would look the head up by its cluster DNS name."""
    for crd in kuberay_parts.crds():
        local_cluster.kubectl("apply", "--server-side", "-f", str(crd))
    Kubectl(local_cluster.kubeconfig).wait_established("rayclusters.ray.io")
    log_dir = tmp_path_factory.mktemp("kuberay")
    proc = ManagedProcess(
        name="kuberay-operator",
        argv=[str(kuberay_parts.operator()), f"--kubeconfig={local_cluster.kubeconfig}",
              "--enable-leader-election=false", "--metrics-addr=0", "--health-probe-bind-address=0"],
        log_path=log_dir / "operator.log",
        env={"PATH": "/usr/bin:/bin", "ENABLE_INIT_CONTAINER_INJECTION": "false"},
    ).start()  # fmt: skip
    try:
        yield proc
    finally:
        proc.stop(timeout=10)


def http_status(url: str, token: str | None = None) -> int:
    return http_get(url, {"Authorization": f"Bearer {token}"} if token else None)[0]


def local_example() -> tuple[Workspace, Plan]:
    workspace = Workspace.model_validate(
        yaml.safe_load((REPO / "examples" / "local" / "workspace-smollm2.yaml").read_text())
    )
    got = plan(workspace, load_catalogs(), [], PlanOptions(cloud="azure", provider="local"))
    assert isinstance(got, Plan) and got.gpus_per_node == 0, got
    return workspace, got


def ray_cluster(cluster: LocalCluster, namespace: str, host: HostNetwork) -> dict[str, Any]:
    workspace, got = local_example()
    ref = WorkspaceRef(namespace=namespace, name=workspace.metadata.name, uid="00000000-uid")
    config = serving_config(workspace, got, lambda s: f"/var/run/kaiten/pull/{s}")
    service = rayservice(
        ref, "kaito.sh/v1alpha1", workspace, got, config,
        image=cluster.imported["ray"].ref, generation=1, host=host,
    )  # fmt: skip
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "metadata": {"name": service["metadata"]["name"], "namespace": namespace},
        "spec": service["spec"]["rayClusterConfig"],
    }


def test_a_rendered_raycluster_is_ready_under_kuberay_with_our_ray_image(
    local_cluster: LocalCluster, operator: ManagedProcess, tmp_path: Path
) -> None:
    cluster = local_cluster
    namespace = "ray-test"
    cluster.kubectl("create", "namespace", namespace)
    workspace, _ = local_example()
    labels = [f"{k}={v}" for k, v in workspace.resource.label_selector.match_labels.items()]
    cluster.kubectl("label", "node", cluster.name, "--overwrite", *labels)  # the planned node
    gcs, dashboard, client, agent, metrics, serve = free_ports(6)
    host = HostNetwork(gcs=gcs, dashboard=dashboard, client=client, agent=agent, metrics=metrics, serve=serve)
    obj = ray_cluster(cluster, namespace, host)
    name = obj["metadata"]["name"]
    subprocess.run(
        ["kubectl", f"--kubeconfig={cluster.kubeconfig}", "apply", "-f", "-"],
        input=json.dumps(obj), text=True, check=True, capture_output=True,
    )  # fmt: skip
    started = time.monotonic()
    waited = cluster.kubectl(
        "wait", "-n", namespace, "--for=jsonpath={.status.state}=ready", f"raycluster/{name}",
        "--timeout=300s", check=False, timeout=320,
    )  # fmt: skip
    if waited.returncode != 0:
        pods = cluster.kubectl("describe", "pods", "-n", namespace, check=False).stdout
        logs = cluster.kubectl("logs", "-n", namespace, "-l", f"ray.io/cluster={name}", "--tail=60",
                               check=False).stdout  # fmt: skip
        pytest.fail(f"RayCluster not ready: {waited.stderr}\n{pods[-4000:]}\n{logs}\n"
                    f"operator:\n{operator.log_path.read_text()[-3000:]}")  # fmt: skip
    print(f"\nRayCluster ready {time.monotonic() - started:.1f}s after apply")

    status = json.loads(cluster.kubectl("get", "raycluster", name, "-n", namespace, "-o", "json").stdout)
    conditions = {c["type"]: c["status"] for c in status["status"].get("conditions", [])}
    assert conditions.get("HeadPodReady") == "True" and conditions.get("RayClusterProvisioned") == "True"
    head = json.loads(
        cluster.kubectl("get", "pods", "-n", namespace, "-l", "ray.io/node-type=head", "-o", "json").stdout
    )["items"][0]
    container = head["status"]["containerStatuses"][0]
    ray_image = cluster.imported["ray"]
    assert ray_image.digest == images.source_digest("ray")
    assert container["image"] == ray_image.ref and container["ready"]
    assert container["imageID"].endswith(images.image_id(ray_image.ref).removeprefix("sha256:"))

    # our code is in the image, and Ray in the pod answers on the loopback address we gave it
    check = cluster.kubectl(
        "exec", "-n", namespace, head["metadata"]["name"], "--", "python", "-c",
        "import ray, services.serving.app; print(ray.__version__)",
        check=False, timeout=120,
    )  # fmt: skip
    assert check.returncode == 0 and check.stdout.strip() == ray_version(), check.stdout + check.stderr

    # Ray's token auth: the dashboard refuses a job listing without the token KubeRay generated
    dashboard = f"http://127.0.0.1:{host.dashboard}"
    assert http_status(f"{dashboard}/api/jobs/") == 401
    secret = json.loads(cluster.kubectl("get", "secret", name, "-n", namespace, "-o", "json").stdout)
    token = base64.b64decode(secret["data"]["auth_token"]).decode()
    assert http_status(f"{dashboard}/api/jobs/", token) == 200
    assert http_status(f"{dashboard}/api/gcs_healthz") == 200  # what the kubelet probes stays open

    listeners = sockets(cluster.pids(), listening=True)
    assert any(local == f"127.0.0.1:{host.dashboard}" for local, _, _ in listeners), listeners
    bad = [s for s in listeners if not LOOPBACK.match(s[0])]
    assert not bad, f"non-loopback listeners: {bad}"

    cluster.kubectl("delete", "raycluster", name, "-n", namespace, "--wait=true", timeout=120)
    cluster.kubectl("wait", "-n", namespace, "--for=delete", "pod", "-l", f"ray.io/cluster={name}",
                    "--timeout=120s", check=False, timeout=130)  # fmt: skip
