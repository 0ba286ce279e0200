"""The real single-node cluster (``kaiten.local.node``): kubelet + containerd + runc, images built from
``deploy/images/*.Dockerfile``, pods on 127.0.0.1, and a clean stop."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from kaiten.local import images
from kaiten.local.node import LocalCluster
from tests.test_loopback_only import LOOPBACK, sockets

# The first cluster test pays for the node's start: ~15 s, and once per machine the import of the Ray
# image (~6 GB) into containerd, a few minutes.
pytestmark = [pytest.mark.cluster, pytest.mark.timeout(900)]


@pytest.fixture
def cluster(local_cluster: LocalCluster) -> LocalCluster:
    return local_cluster


def test_the_node_by_hand_says_its_usage_and_starts_nothing_without_a_directory(tmp_path: Path) -> None:
    """``python -m kaiten.local.node --help`` started a whole node in a directory named ``--help``."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    for argv, code in ((["--help"], 0), ([], 2), (["--network"], 2)):
        proc = subprocess.Popen([sys.executable, "-m", "kaiten.local.node", *argv], cwd=tmp_path, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
        try:
            said, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:  # it started a node: SIGTERM stops it cleanly, SIGKILL would not
            proc.terminate()
            said, _ = proc.communicate(timeout=180)
            pytest.fail(f"{argv} started a node:\n{said[-2000:]}")
        assert proc.returncode == code and "usage: python -m kaiten.local.node" in said, said
        assert not list(tmp_path.iterdir()), f"{argv}: {list(tmp_path.iterdir())}"


def rss_mib(pids: set[int]) -> float:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def wait_for(cluster: LocalCluster, *args: str, timeout: int = 120) -> None:
    cluster.kubectl("wait", *args, f"--timeout={timeout}s", timeout=timeout + 10)


def test_the_node_is_ready_with_this_machines_capacity_and_no_gpu(cluster: LocalCluster) -> None:
    node = json.loads(cluster.kubectl("get", "node", cluster.name, "-o", "json").stdout)
    capacity = node["status"]["capacity"]
    assert int(capacity["cpu"]) == os.cpu_count()
    mem_kib = int(next(line for line in Path("/proc/meminfo").read_text().splitlines()
                       if line.startswith("MemTotal:")).split()[1])  # fmt: skip
    assert abs(int(capacity["memory"].removesuffix("Ki")) - mem_kib) < mem_kib * 0.05
    assert "nvidia.com/gpu" not in capacity
    assert {a["address"] for a in node["status"]["addresses"]} == {"127.0.0.1", cluster.name}
    ready = [c for c in node["status"]["conditions"] if c["type"] == "Ready"]
    assert ready and ready[0]["status"] == "True"
    print(f"idle RSS of the node: {rss_mib(cluster.pids()):.0f} MiB over {len(cluster.pids())} processes")


JOB = """
apiVersion: batch/v1
kind: Job
metadata: {{name: {name}}}
spec:
  backoffLimit: 0
  template:
    spec:
      hostNetwork: true
      restartPolicy: Never
      containers:
      - name: planner
        image: {image}
        imagePullPolicy: Never
        args: ["services.planner", "--help"]
"""


def test_a_job_of_the_services_image_runs_to_completion(cluster: LocalCluster) -> None:
    image = cluster.imported["services"]
    name = f"planner-help-{uuid.uuid4().hex[:6]}"
    subprocess.run(
        ["kubectl", f"--kubeconfig={cluster.kubeconfig}", "apply", "-f", "-"],
        input=JOB.format(name=name, image=image.ref), text=True, check=True, capture_output=True,
    )  # fmt: skip
    wait_for(cluster, "--for=condition=Complete", f"job/{name}")
    logs = cluster.kubectl("logs", f"job/{name}").stdout
    assert "usage" in logs.lower() and "planner" in logs, logs

    # what ran is the image built from deploy/images/services.Dockerfile and the files at hand
    pod = json.loads(cluster.kubectl("get", "pods", "-l", f"job-name={name}", "-o", "json").stdout)["items"][
        0
    ]
    status = pod["status"]["containerStatuses"][0]
    assert image.digest == images.source_digest("services")
    assert status["image"] == image.ref
    assert status["imageID"].endswith(images.image_id(image.ref).removeprefix("sha256:"))


DEPLOYMENT = """
apiVersion: apps/v1
kind: Deployment
metadata: {{name: {name}}}
spec:
  replicas: 1
  selector: {{matchLabels: {{app: {name}}}}}
  template:
    metadata: {{labels: {{app: {name}}}}}
    spec:
      hostNetwork: true
      containers:
      - name: web
        image: {image}
        imagePullPolicy: Never
        command: ["python", "-m", "http.server", "--bind", "127.0.0.1", "{port}"]
        readinessProbe:
          tcpSocket: {{host: 127.0.0.1, port: {port}}}
          periodSeconds: 1
"""


def test_a_deployment_serves_on_loopback_with_logs_exec_and_a_token(cluster: LocalCluster) -> None:
    from kaiten.local.procs import free_port

    port, name = free_port(), f"web-{uuid.uuid4().hex[:6]}"
    subprocess.run(
        ["kubectl", f"--kubeconfig={cluster.kubeconfig}", "apply", "-f", "-"],
        input=DEPLOYMENT.format(name=name, image=cluster.imported["services"].ref, port=port),
        text=True, check=True, capture_output=True,
    )  # fmt: skip
    wait_for(cluster, "--for=condition=Available", f"deployment/{name}")
    import httpx

    assert httpx.get(f"http://127.0.0.1:{port}/", timeout=10).status_code == 200
    # the kubelet's volumes reach the container: a ServiceAccount token, projected by the kubelet
    token = cluster.kubectl("exec", f"deploy/{name}", "--", "cat",
                            "/var/run/secrets/kubernetes.io/serviceaccount/token").stdout  # fmt: skip
    assert token.count(".") == 2, token[:40]
    assert "GET / " in cluster.kubectl("logs", f"deploy/{name}").stdout

    listeners = sockets(cluster.pids(), listening=True)
    assert any(local.endswith(f":{port}") for local, _, _ in listeners)
    bad = [s for s in listeners if not LOOPBACK.match(s[0])]
    bad += [s for s in sockets(cluster.pids(), listening=False)
            if not (LOOPBACK.match(s[0]) and LOOPBACK.match(s[1]))]  # fmt: skip
    assert not bad, f"non-loopback sockets: {bad}"
    cluster.kubectl("delete", "deployment", name, "--wait=true", timeout=90)


def test_a_second_node_on_the_machine_is_refused_and_touches_nothing(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    from kaiten.local.procs import StartFailed

    with pytest.raises(StartFailed, match="another local node runs on this machine"):
        LocalCluster(tmp_path / "second").start()
    assert not (tmp_path / "second" / "controlplane").exists()
    assert cluster.kubectl("get", "node", cluster.name).returncode == 0
