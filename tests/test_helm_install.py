"""Kaiten installed with its Helm chart (``deploy/helm/kaiten``) on the real node, as a platform engineer
would: Helm built from its Go module, images built from our Dockerfiles, every pod Ready through its
probes; each identity may do what its service needs and is refused the rest (Kubernetes RBAC and NATS
permissions); a Workspace goes through the installed services to a RayService; uninstall leaves nothing.

The node runs in a network namespace of its own (``kaiten.local.netns``; see docs/cluster.md) with no pod
network: the chart's ``hostNetwork`` mode binds the services' listeners to 127.0.0.1 there and points
them at the apiserver's loopback address; Ray pods take the node's address, so Endpoints, Service names
and ``kubectl port-forward`` work, and KubeRay's real operator runs the Workspace's RayService."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import nats
import openai
import pytest
import yaml
from nats.errors import TimeoutError as NatsTimeout

from kaiten.local import gotools
from kaiten.local import kuberay as kuberay_parts
from kaiten.local.node import LocalCluster
from kaiten.local.procs import ManagedProcess, free_port, free_ports, port_open, tail, wait_until
from shared.bus import callout
from shared.oci import pull_adapter_files
from tests.conftest import REPO, Kubectl, http_get
from tests.test_tuning import PASSWORD, USER, registry_argv

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(900)]

CHART = REPO / "deploy" / "helm" / "kaiten"
RELEASE = "kaiten"
NAMESPACE = "kaiten-system"
SERVICES = ("watcher", "planner", "provisioner", "workload")
LOCAL_DATA = "http://127.0.0.1:8310/capitals-pirate.jsonl"  # examples/local/tuning-smollm2.yaml's input
# The namespaces KubeRay's operator watches: the other tests' RayServices and RayJobs start no Ray pods.
SERVE_NAMESPACE = f"serve-{uuid.uuid4().hex[:6]}"
TUNE_NAMESPACE = f"train-{uuid.uuid4().hex[:6]}"


@dataclass
class Release:
    cluster: LocalCluster
    values: dict[str, Any]
    values_file: Path
    phases: dict[str, float] = field(default_factory=dict)

    def helm(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(gotools.helm()), f"--kubeconfig={self.cluster.kubeconfig}", "--namespace", NAMESPACE, *args],
            capture_output=True, text=True, check=False, timeout=timeout,
        )  # fmt: skip
        output = f"{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
        assert result.returncode == 0, f"helm {' '.join(args)}:\n{output}"
        return result

    def kubectl(self, *args: str, stdin: str | None = None, check: bool = True) -> str:
        result = self.cluster.kubectl(*args, stdin=stdin, check=False, timeout=120)
        assert not check or result.returncode == 0, f"kubectl {' '.join(args)}:\n{result.stderr[-2000:]}"
        return result.stdout

    def password(self, user: str) -> str:
        secret = json.loads(
            self.kubectl("-n", NAMESPACE, "get", "secret", f"{RELEASE}-nats-users", "-o", "json")
        )
        return base64.b64decode(secret["data"][user]).decode()

    @property
    def nats_url(self) -> str:
        return f"nats://127.0.0.1:{self.values['nats']['port']}"

    def diagnostics(self) -> str:
        pods = self.kubectl("-n", NAMESPACE, "get", "pods", "-o", "wide", check=False)
        logs = [
            f"--- {c}\n"
            + self.kubectl("-n", NAMESPACE, "logs", f"deploy/{RELEASE}-{c}", "--tail=60", check=False)
            for c in SERVICES
        ]
        return pods + "\n".join(logs)


def image_values(ref: str) -> dict[str, str]:
    repository, tag = ref.rsplit(":", 1)
    return {"repository": repository, "tag": tag, "pullPolicy": "Never"}


@pytest.fixture(scope="module")
def release(networked_cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Release]:
    cluster = networked_cluster
    assert cluster.controlplane is not None and cluster.netns is not None
    *probe_ports, nats_port, monitor_port = free_ports(len(SERVICES) + 2)
    values = {
        "image": image_values(cluster.imported["services"].ref),
        "provider": "byo",
        "hostNetwork": True,
        "bindAddress": "127.0.0.1",
        "apiServer": {"host": "127.0.0.1", "port": str(cluster.controlplane.api_port)},
        "probes": {"ports": dict(zip(SERVICES, probe_ports, strict=True))},
        "ray": {"image": cluster.imported["ray"].ref, "hostNetworkAddress": cluster.netns.address},
        "nats": {
            "image": image_values(cluster.imported["nats"].ref),
            "port": nats_port,
            "monitorPort": monitor_port,
            "persistence": {"enabled": False},  # the node has no storage provisioner
            # pinned: the upgrade test rolls the services' image, not the bus (its store is an emptyDir)
            "callout": {"image": image_values(cluster.imported["services"].ref)},
        },
    }
    path = tmp_path_factory.mktemp("helm") / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    cluster.expose(nats_port, *probe_ports)  # what the tests below read from this machine
    rel = Release(cluster, values, values_file=path)
    for crd in kuberay_parts.crds():  # the workload renders RayServices: KubeRay's CRDs must exist
        cluster.kubectl("apply", "--server-side", "-f", str(crd))
    started = time.monotonic()
    rel.helm("install", RELEASE, str(CHART), "--create-namespace", "-f", str(path), "--wait", "--timeout=5m")
    rel.phases["install + ready"] = time.monotonic() - started
    try:
        yield rel
    finally:
        started = time.monotonic()
        rel.helm("uninstall", RELEASE, "--wait", "--timeout", "3m", "--ignore-not-found")
        mine = f"app.kubernetes.io/instance={RELEASE}"
        rel.kubectl("wait", "--for=delete", "pods", "-n", NAMESPACE, "-l", mine, "--timeout=120s")
        rel.phases["uninstall"] = time.monotonic() - started
        kinds = "all,serviceaccounts,secrets,configmaps,roles,rolebindings"
        left = rel.kubectl("get", kinds, "-n", NAMESPACE, "-l", mine, "-o", "name")
        cluster_left = rel.kubectl("get", "clusterroles,clusterrolebindings", "-l", mine, "-o", "name")
        rel.kubectl("delete", "namespace", NAMESPACE, "--wait=true", "--timeout=120s")
        print("\nphase table (s):\n" + "\n".join(f"  {k:<22} {v:6.1f}" for k, v in rel.phases.items()))
        assert not (left + cluster_left).strip(), f"left behind by helm uninstall:\n{left}{cluster_left}"


def test_every_kaiten_pod_is_ready_through_its_probes(release: Release) -> None:
    pods = json.loads(release.kubectl("-n", NAMESPACE, "get", "pods", "-o", "json"))["items"]
    components = sorted(p["metadata"]["labels"]["app.kubernetes.io/component"] for p in pods)
    assert components == sorted([*SERVICES, "nats"]), release.diagnostics()
    for pod in pods:
        ready = [c for c in pod["status"]["conditions"] if c["type"] == "Ready"]
        assert ready and ready[0]["status"] == "True", (pod["metadata"]["name"], release.diagnostics())
        container = pod["spec"]["containers"][0]
        assert container["readinessProbe"]["httpGet"]["host"] == "127.0.0.1"
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
    for name in SERVICES:  # the probes the kubelet uses, asked directly
        port = release.values["probes"]["ports"][name]
        metrics = http_get(f"http://127.0.0.1:{port}/metrics")[1]
        assert f'kaiten_ready{{service="{name}"}} 1.0' in metrics, (name, metrics[-500:])


# What each service's ServiceAccount may do (yes), and a list of what it must not (no).
CAN = {
    "watcher": ["watch workspaces.kaito.sh -A", "patch workspaces.kaito.sh/status -n default",
                "create events -n default"],
    "planner": ["list nodes", "get configmaps -n default"],
    "provisioner": ["list nodes"],
    "workload": ["create rayservices.ray.io -n default", "patch services -n default",
                 "delete configmaps -n default", "get configmaps -n default",
                 "create rayjobs.ray.io -n default",
                 "patch networkpolicies.networking.k8s.io -n default", "create secrets -n default",
                 "create statefulsets.apps -n default"],
}  # fmt: skip
CANNOT = [
    "delete nodes", "get secrets -n default", "get secrets -n kube-system", "list secrets -A",
    "create pods -n default",
    "create deployments.apps -n default", "delete workspaces.kaito.sh -n default", "create clusterroles",
    "create nodeclaims.karpenter.sh", "escalate clusterroles", "impersonate serviceaccounts", "* * -A",
]  # fmt: skip


@pytest.mark.parametrize("service", SERVICES)
def test_each_service_account_may_do_its_job_and_nothing_else(release: Release, service: str) -> None:
    who = f"--as=system:serviceaccount:{NAMESPACE}:{RELEASE}-{service}"
    for allowed in CAN[service]:
        answer = release.kubectl("auth", "can-i", *allowed.split(), who, check=False).strip()
        assert answer == "yes", f"{service} may not {allowed}"
    others = [a for s, can in CAN.items() if s != service for a in can if a not in CAN[service]]
    for refused in CANNOT + others:
        answer = release.kubectl("auth", "can-i", *refused.split(), who, check=False).strip()
        assert answer == "no", f"{service} may {refused}"


async def test_nats_users_publish_only_their_own_subjects(release: Release) -> None:
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    # a tuning job's own user (the auth callout in the NATS pod admits it): its password is made from
    # the chart's tuning key, and the key itself is no user's password
    user = callout.workspace_user("default", "ws")
    password = callout.workspace_password(release.password("tuning"), user)
    refused = ((user, "wrong"), ("tuning", release.password("tuning")), (None, None))
    for name, secret in refused:
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            await nats.connect(release.nats_url, user=name, password=secret, connect_timeout=3,
                               allow_reconnect=False, error_cb=on_error)  # fmt: skip
    tuning = await nats.connect(release.nats_url, user=user, password=password,
                                inbox_prefix=callout.inbox_prefix(user), error_cb=on_error)  # fmt: skip
    try:
        js = tuning.jetstream(timeout=3)
        ack = await js.publish("kaiten.tuning.progress.default.ws", b"{}")  # its own Workspace's: stored
        assert ack.stream == "KAITEN"
        for other in ("kaiten.workspace.deleting.default.ws", "kaiten.tuning.progress.default.other"):
            with pytest.raises(NatsTimeout):  # the server drops it: no ack ever comes
                await js.publish(other, b"{}")
        await tuning.flush()
        await asyncio.sleep(0.2)
    finally:
        await tuning.close()
    for other in ("kaiten.workspace.deleting.default.ws", "kaiten.tuning.progress.default.other"):
        refusal = f'permissions violation for publish to "{other}"'
        assert any(refusal in e.lower() for e in errors), errors


def test_a_workspace_goes_through_the_installed_services(release: Release) -> None:
    """byo: the node carries the Workspace's label; the planner sizes the CPU preset onto it, the
    provisioner finds it, the workload renders the RayService (with our Ray image, on 127.0.0.1), the
    watcher writes the conditions; deleting it removes what the workload made, then the finalizer."""
    cluster = release.cluster
    assert cluster.netns is not None
    namespace = f"ws-{uuid.uuid4().hex[:6]}"
    release.kubectl("create", "namespace", namespace)
    release.kubectl("label", "node", cluster.name, "apps=smollm2", "--overwrite")
    workspace = yaml.safe_load((REPO / "examples" / "local" / "workspace-smollm2.yaml").read_text())
    started = time.monotonic()
    try:
        release.kubectl("apply", "-n", namespace, "-f", "-", stdin=json.dumps(workspace))
        name = workspace["metadata"]["name"]
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            ws = json.loads(release.kubectl("-n", namespace, "get", "workspace", name, "-o", "json"))
            conditions = {c["type"]: c for c in ws.get("status", {}).get("conditions", [])}
            rs = release.kubectl("-n", namespace, "get", "rayservices", "-o", "name", check=False).strip()
            if conditions.get("ResourceReady", {}).get("status") == "True" and rs:
                break
            time.sleep(1)
        else:
            pytest.fail(f"no ResourceReady and RayService: {conditions}\n{release.diagnostics()}")
        release.phases["workspace → RayService"] = time.monotonic() - started
        service = json.loads(release.kubectl("-n", namespace, "get", rs, "-o", "json"))
        head = service["spec"]["rayClusterConfig"]["headGroupSpec"]
        assert head["template"]["spec"]["hostNetwork"] is True
        assert head["template"]["spec"]["containers"][0]["image"] == cluster.imported["ray"].ref
        assert head["rayStartParams"]["node-ip-address"] == cluster.netns.address
        assert ws["metadata"]["finalizers"], ws["metadata"]
        policy = json.loads(
            release.kubectl("-n", namespace, "get", "networkpolicy", f"{name}-ray", "-o", "json")
        )
        rules = policy["spec"]["ingress"]
        ports = [{"port": "serve", "protocol": "TCP"}, {"port": "replica-metrics", "protocol": "TCP"}]
        assert rules[0] == {"from": [{"podSelector": {}}], "ports": ports}  # Serve, each replica's /metrics
        assert {p["port"] for p in rules[1]["ports"]} == {"dashboard", "gcs-server", "client"}
        assert {"kubernetes.io/metadata.name": NAMESPACE} in [
            peer.get("namespaceSelector", {}).get("matchLabels") for peer in rules[1]["from"]
        ]

        started = time.monotonic()
        release.kubectl("-n", namespace, "delete", "workspace", name, "--wait=true", "--timeout=120s")
        release.phases["delete → finalizer gone"] = time.monotonic() - started
        made = "rayservices,services,configmaps,networkpolicies"
        assert not release.kubectl(
            "-n", namespace, "get", made, "-l", "kaito.sh/workspace", "-o", "name"
        ).strip()
        for pod in json.loads(release.kubectl("-n", NAMESPACE, "get", "pods", "-o", "json"))["items"]:
            status = pod["status"]["containerStatuses"][0]
            assert status["restartCount"] == 0, (pod["metadata"]["name"], release.diagnostics())
        for name in SERVICES:  # a permission the chart forgot shows here first
            logs = release.kubectl("-n", NAMESPACE, "logs", f"deploy/{RELEASE}-{name}")
            assert "permissions violation" not in logs.lower(), logs[-3000:]
            assert "Traceback" not in logs, logs[-3000:]
    finally:
        release.kubectl("label", "node", cluster.name, "apps-", check=False)
        release.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def workspace_manifest(name: str) -> str:
    doc = yaml.safe_load((REPO / "examples" / "local" / "workspace-smollm2.yaml").read_text())
    doc["metadata"]["name"] = name
    return json.dumps(doc)


def converged(release: Release, namespace: str, names: list[str]) -> list[str]:
    """The Workspaces of ``names`` that are ResourceReady with exactly one RayService."""
    items = json.loads(release.kubectl("-n", namespace, "get", "workspaces", "-o", "json"))["items"]
    ready = {
        w["metadata"]["name"]
        for w in items
        if any(
            c["type"] == "ResourceReady" and c["status"] == "True"
            for c in w.get("status", {}).get("conditions", [])
        )
    }
    services = json.loads(release.kubectl("-n", namespace, "get", "rayservices", "-o", "json"))["items"]
    per_workspace: dict[str, int] = {}
    for rs in services:
        owner = rs["metadata"]["labels"]["kaito.sh/workspace"]
        per_workspace[owner] = per_workspace.get(owner, 0) + 1
    assert all(n == 1 for n in per_workspace.values()), f"a Workspace with two RayServices: {per_workspace}"
    return [n for n in names if n in ready and per_workspace.get(n) == 1]


def test_helm_upgrade_rolls_every_service_without_losing_a_workspace(release: Release) -> None:
    """A new image tag: every service's pods are replaced while Workspaces are applied before and during
    the roll; each converges once (one RayService each); then all are deleted, no finalizer stuck."""
    cluster = release.cluster
    old = cluster.imported["services"].ref
    new = f"{old.rsplit(':', 1)[0]}:upgrade-{uuid.uuid4().hex[:6]}"
    cluster.tag_image(old, new)
    namespace = f"up-{uuid.uuid4().hex[:6]}"
    release.kubectl("create", "namespace", namespace)
    release.kubectl("label", "node", cluster.name, "apps=smollm2", "--overwrite")
    names = [f"ws-{i}" for i in range(12)]
    try:
        for name in names[:6]:  # in flight when the roll starts
            release.kubectl("apply", "-n", namespace, "-f", "-", stdin=workspace_manifest(name))
        started = time.monotonic()
        upgrade = subprocess.Popen(
            [str(gotools.helm()), f"--kubeconfig={cluster.kubeconfig}", "--namespace", NAMESPACE, "upgrade",
             RELEASE, str(CHART), "-f", str(release.values_file), "--set", f"image.tag={new.split(':')[-1]}",
             "--wait", "--timeout=5m"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        for name in names[6:]:  # during the roll
            time.sleep(1)
            release.kubectl("apply", "-n", namespace, "-f", "-", stdin=workspace_manifest(name))
        output, _ = upgrade.communicate(timeout=330)
        assert upgrade.returncode == 0, output
        release.phases["helm upgrade (roll)"] = time.monotonic() - started
        pods = json.loads(release.kubectl("-n", NAMESPACE, "get", "pods", "-o", "json"))["items"]
        images = {p["metadata"]["labels"]["app.kubernetes.io/component"]: p["spec"]["containers"][0]["image"]
                  for p in pods if p["metadata"].get("deletionTimestamp") is None}  # fmt: skip
        assert all(images[s] == new for s in SERVICES), images

        deadline = time.monotonic() + 180
        while (done := converged(release, namespace, names)) != names and time.monotonic() < deadline:
            time.sleep(2)
        assert done == names, f"converged: {done}\n{release.diagnostics()}"
        release.phases["12 Workspaces converged"] = time.monotonic() - started

        started = time.monotonic()
        release.kubectl("-n", namespace, "delete", "workspaces", "--all", "--wait=true", "--timeout=180s")
        release.phases["12 deleted, finalizers gone"] = time.monotonic() - started
        assert not release.kubectl("-n", namespace, "get", "rayservices", "-o", "name").strip()
    finally:
        release.kubectl("label", "node", cluster.name, "apps-", check=False)
        release.kubectl("delete", "namespace", namespace, "--wait=false", check=False)
        cluster.untag_image(new)


def test_a_tuning_workspace_gets_a_rayjob_and_its_own_bus_identity(release: Release) -> None:
    """The workload renders the RayJob with the Workspace's own NATS user (tuning.<ns>.<name>): its
    password in a Secret of the Workspace's namespace that the workload may write but not read; gone with
    the Workspace."""
    cluster = release.cluster
    namespace = f"tune-{uuid.uuid4().hex[:6]}"
    release.kubectl("create", "namespace", namespace)
    release.kubectl("label", "node", cluster.name, "apps=tuning-smollm2", "--overwrite")
    try:
        example = (REPO / "examples" / "local" / "tuning-smollm2.yaml").read_text()
        # the chart's URL policy (KAITO's rule): the local example downloads from this machine, which a
        # job in a cluster must not; the same Workspace with a public host is taken
        refused = release.cluster.kubectl("apply", "-n", namespace, "-f", "-", stdin=example, check=False)
        assert refused.returncode != 0 and "must not target a loopback" in refused.stderr, refused.stderr
        url = "https://data.example/capitals-pirate.jsonl"
        release.kubectl("apply", "-n", namespace, "-f", "-", stdin=example.replace(LOCAL_DATA, url))
        deadline = time.monotonic() + 120
        while not (jobs := release.kubectl("-n", namespace, "get", "rayjobs", "-o", "name").strip()):
            assert time.monotonic() < deadline, f"no RayJob\n{release.diagnostics()}"
            time.sleep(1)
        job = json.loads(release.kubectl("-n", namespace, "get", jobs, "-o", "json"))
        head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
        ref = next(e for e in head["env"] if e["name"] == "KAITEN_NATS_PASSWORD")["valueFrom"]["secretKeyRef"]
        secret = json.loads(release.kubectl("-n", namespace, "get", "secret", ref["name"], "-o", "json"))
        user = callout.workspace_user(namespace, "tuning-smollm2")
        own = callout.workspace_password(release.password("tuning"), user)
        assert base64.b64decode(secret["data"]["password"]).decode() == own
        assert secret["metadata"]["ownerReferences"][0]["kind"] == "Workspace"
        configmap = release.kubectl(
            "-n", namespace, "get", "configmaps", "-l", "kaito.sh/workspace", "-o", "json"
        )
        # the job's config names the user, not the password (nor the key it is made from)
        assert f"nats_user: {user}" in configmap
        assert own not in configmap and release.password("tuning") not in configmap
        # issue 16 (9): the input URLs (a SAS token may be in one) are in a Secret, not the ConfigMap
        assert url not in configmap and "KAITEN_TUNING_INPUT_URLS" in configmap
        urls_ref = next(e for e in head["env"] if e["name"] == "KAITEN_TUNING_INPUT_URLS")
        inputs = urls_ref["valueFrom"]["secretKeyRef"]["name"]
        got = json.loads(release.kubectl("-n", namespace, "get", "secret", inputs, "-o", "json"))
        assert json.loads(base64.b64decode(got["data"]["urls"])) == [url]

        release.kubectl(
            "-n", namespace, "delete", "workspace", "tuning-smollm2", "--wait=true", "--timeout=120s"
        )
        for name in (ref["name"], inputs):
            assert not release.kubectl(
                "-n", namespace, "get", "secret", name, "--ignore-not-found", "-o", "name"
            )
        assert not release.kubectl("-n", namespace, "get", "rayjobs", "-o", "name").strip()
    finally:
        release.kubectl("label", "node", cluster.name, "apps-", check=False)
        release.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


@pytest.fixture(scope="module")
def operator(release: Release) -> Iterator[ManagedProcess]:
    """KubeRay's real operator on the node (its network namespace, the node's DNS), watching
    ``SERVE_NAMESPACE`` and ``TUNE_NAMESPACE`` only; no leader election, metrics or probe listener, no
    init container."""
    cluster = release.cluster
    Kubectl(cluster.kubeconfig).wait_established("rayservices.ray.io", "rayclusters.ray.io")
    argv = [str(kuberay_parts.operator()), f"--kubeconfig={cluster.kubeconfig}",
            "--enable-leader-election=false", "--metrics-addr=0", "--health-probe-bind-address=0",
            f"--watch-namespace={SERVE_NAMESPACE},{TUNE_NAMESPACE}"]  # fmt: skip
    proc = ManagedProcess(
        name="kuberay-operator",
        argv=cluster.wrap(argv, dns=True),
        log_path=cluster.state_dir / "kuberay-operator.log",
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "ENABLE_INIT_CONTAINER_INJECTION": "false"},
    ).start()
    try:
        yield proc
    finally:
        proc.stop(timeout=10)


def condition(workspace: dict[str, Any], kind: str) -> dict[str, Any]:
    found = [c for c in workspace.get("status", {}).get("conditions", []) if c["type"] == kind]
    return found[0] if found else {}


def test_a_workspace_serves_chat_and_openai_through_port_forward(
    release: Release, operator: ManagedProcess
) -> None:
    """The local example Workspace through the installed services and KubeRay's operator: a RayService
    whose head pod runs our Ray image and loads the model, InferenceReady; through ``kubectl
    port-forward`` to the Service named after the Workspace, ``/chat`` answers and the official openai
    client streams a completion; the Ray dashboard refuses a request without the token."""
    cluster = release.cluster
    assert cluster.netns is not None
    release.kubectl("create", "namespace", SERVE_NAMESPACE)
    release.kubectl("label", "node", cluster.name, "apps=smollm2", "--overwrite")
    workspace = yaml.safe_load((REPO / "examples" / "local" / "workspace-smollm2.yaml").read_text())
    name = workspace["metadata"]["name"]
    started = time.monotonic()
    try:
        release.kubectl("apply", "-n", SERVE_NAMESPACE, "-f", "-", stdin=json.dumps(workspace))
        until_condition(release, SERVE_NAMESPACE, name, "InferenceReady", 600, operator)
        release.phases["Workspace → InferenceReady"] = time.monotonic() - started

        started = time.monotonic()
        with port_forward(release, SERVE_NAMESPACE, name) as base:
            chat_and_stream(base)
        release.phases["chat + openai stream"] = time.monotonic() - started

        # Ray's token auth: the dashboard (job submission) refuses a caller on the node without it
        dashboard = f"http://{cluster.netns.address}:8265/api/jobs/"
        status, body = cluster.netns.call(lambda: http_get(dashboard))
        assert status == 401, (status, body[:300])

        started = time.monotonic()
        delete_workspace(release, SERVE_NAMESPACE, name)
        release.phases["delete → Ray pods gone"] = time.monotonic() - started
    finally:
        release.kubectl("label", "node", cluster.name, "apps-", check=False)
        release.kubectl("delete", "namespace", SERVE_NAMESPACE, "--wait=false", check=False)


def chat_and_stream(base: str) -> None:
    """``/chat`` answers, and the official openai client streams a completion."""
    question = {"messages": [{"role": "user", "content": "What is the capital of France?"}]}
    chat = httpx.post(f"{base}/chat", json=question, timeout=120)
    assert chat.status_code == 200 and "Paris" in chat.json()["Result"], chat.text
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)
    pieces = [
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(
            model="smollm2-135m-instruct",
            messages=[{"role": "user", "content": "Name three colors."}],
            temperature=0,
            max_tokens=24,
            stream=True,
        )
    ]
    assert len([p for p in pieces if p]) > 3 and "".join(pieces).strip(), pieces


@pytest.fixture(scope="module")
def node_registry(release: Release) -> Iterator[str]:
    """Debian's docker-registry on the node (127.0.0.1 of its network namespace, where the tuning job
    pushes and the serving app pulls), with htpasswd auth; reached from here through a forwarder."""
    cluster = release.cluster
    assert cluster.netns is not None
    root = Path(tempfile.mkdtemp(prefix="kaiten-registry-"))
    port = free_port()
    proc = ManagedProcess(
        "docker-registry", cluster.wrap(registry_argv(root, port)), root / "registry.log"
    ).start()
    netns = cluster.netns
    try:
        proc.wait_ready(lambda: netns.port_open(port), timeout=20, what="did not listen")
        cluster.expose(port)
        yield f"127.0.0.1:{port}"
    finally:
        assert proc.stop(timeout=10), "docker-registry ignored SIGTERM"
        shutil.rmtree(root)


@contextlib.contextmanager
def port_forward(release: Release, namespace: str, service: str) -> Iterator[str]:
    """``kubectl port-forward svc/<service> :80`` on 127.0.0.1: its base URL, until the block ends."""
    port = free_port()
    forward = subprocess.Popen(
        ["kubectl", f"--kubeconfig={release.cluster.kubeconfig}", "-n", namespace, "port-forward",
         f"svc/{service}", f"{port}:80", "--address=127.0.0.1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        assert wait_until(lambda: port_open("127.0.0.1", port), 30), "kubectl port-forward did not listen"
        yield f"http://127.0.0.1:{port}"
    finally:
        forward.terminate()
        forward.wait(timeout=10)


def delete_workspace(release: Release, namespace: str, name: str) -> None:
    """Delete it, wait for its finalizer, and then for the namespace's Ray pods to be gone (they hold
    the node's host ports) — stopped by their SIGTERM, well within their 30 s termination grace, not
    killed at its end (Ray drains a node on SIGTERM for up to 30 s by default: a Ray cluster that goes
    as a whole has nothing to drain to)."""
    release.kubectl("-n", namespace, "delete", "workspace", name, "--wait=true", "--timeout=180s")

    def gone() -> bool:
        return not release.kubectl("-n", namespace, "get", "pods", "-o", "name").strip()

    if not wait_until(gone, 20):
        events = release.kubectl("-n", namespace, "get", "events", "--sort-by=.lastTimestamp", check=False)
        how = "killed at the end of their grace" if wait_until(gone, 100) else "still there"
        pytest.fail(f"the Ray pods of Workspace {name} were not gone 20 s after it ({how}):\n{events}")


def until_condition(
    release: Release, namespace: str, name: str, kind: str, timeout: float, operator: ManagedProcess
) -> dict[str, Any]:
    """The Workspace once its condition ``kind`` is True; fails at once when WorkspaceSucceeded is False
    (saying what the pods, KubeRay's operator and the services say)."""
    deadline = time.monotonic() + timeout
    while True:
        ws = json.loads(release.kubectl("-n", namespace, "get", "workspace", name, "-o", "json"))
        if condition(ws, kind).get("status") == "True":
            return ws
        failed = condition(ws, "WorkspaceSucceeded").get("status") == "False"
        if failed or time.monotonic() > deadline:
            pods = release.kubectl(
                "-n", namespace, "get", "pods,rayjobs,rayservices", "-o", "wide", check=False
            )
            pytest.fail(f"{name}: no {kind}: {ws.get('status')}\n{pods}\n{tail(operator.log_path, 40)}\n"
                        f"{release.diagnostics()}")  # fmt: skip
        time.sleep(2)


@pytest.mark.timeout(1800)
def test_the_local_tuning_example_trains_in_the_cluster_and_its_adapter_is_served(
    release: Release, operator: ManagedProcess, node_registry: str, tmp_path: Path
) -> None:
    """``examples/local/tuning-smollm2.yaml`` as a RayJob under KubeRay's operator: it trains on the
    node, pushes the adapter to the registry there, WorkspaceSucceeded; the adapter Workspace of
    ``examples/local/workspace-smollm2-adapter.yaml`` serves it through ``kubectl port-forward``.

    Two changes to the examples, both where a cluster differs from ``kaiten up``: KAITO's admission
    refuses a loopback input URL in a cluster, so the same data comes from a ``hostPath`` volume; and the
    registry is the node's (at another port than the example's 5310)."""
    cluster = release.cluster
    namespace = TUNE_NAMESPACE
    release.kubectl("create", "namespace", namespace)
    release.kubectl(
        "-n", namespace, "create", "secret", "docker-registry", "kaiten-local-registry",
        f"--docker-server={node_registry}", f"--docker-username={USER}",
        f"--docker-password={PASSWORD}",
    )  # fmt: skip
    data = Path(tempfile.mkdtemp(prefix="kaiten-data-"))  # the job runs as UID 1000: readable by all
    data.chmod(0o755)
    shutil.copy(REPO / "examples" / "local" / "data" / "capitals-pirate.jsonl", data)
    (data / "capitals-pirate.jsonl").chmod(0o644)
    docs = list(yaml.safe_load_all((REPO / "examples" / "local" / "tuning-smollm2.yaml").read_text()))
    params = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
    assert "max_steps: 30" in params["training_config.yaml"]
    # fewer steps than the example's 30: what is tested is the path, not the adapter's quality
    params["training_config.yaml"] = params["training_config.yaml"].replace("max_steps: 30", "max_steps: 6")
    tuning = next(d for d in docs if d["kind"] == "Workspace")
    tuning["tuning"]["input"] = {"name": "pirate", "volumeSource": {"hostPath": {"path": str(data)}}}
    image = tuning["tuning"]["output"]["image"].replace("127.0.0.1:5310", node_registry)
    tuning["tuning"]["output"]["image"] = image
    adapter = yaml.safe_load((REPO / "examples" / "local" / "workspace-smollm2-adapter.yaml").read_text())
    adapter["inference"]["adapters"][0]["source"]["image"] = image
    try:
        started = time.monotonic()
        release.kubectl("label", "node", cluster.name, "apps=tuning-smollm2", "--overwrite")
        release.kubectl(
            "apply",
            "-n",
            namespace,
            "-f",
            "-",
            stdin=json.dumps({"apiVersion": "v1", "kind": "List", "items": docs}),
        )
        until_condition(release, namespace, tuning["metadata"]["name"], "WorkspaceSucceeded", 1200, operator)
        release.phases["tuning: trained, pushed"] = time.monotonic() - started
        job = json.loads(release.kubectl("-n", namespace, "get", "rayjobs", "-o", "json"))["items"]
        assert [j["spec"]["submissionMode"] for j in job] in ([], ["HTTPMode"]), job
        secret = tmp_path / "pull"
        secret.mkdir()
        auth = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        (secret / ".dockerconfigjson").write_text(json.dumps({"auths": {node_registry: {"auth": auth}}}))
        pulled = pull_adapter_files(image, tmp_path / "adapter", str(secret), insecure=True)
        assert sorted(p.name for p in pulled) == ["adapter_config.json", "adapter_model.safetensors"]
        # its Ray cluster holds the node's ports until KubeRay removes it (ttlSecondsAfterFinished):
        # the finished Workspace goes first; its adapter stays in the registry
        delete_workspace(release, namespace, tuning["metadata"]["name"])

        started = time.monotonic()
        release.kubectl("label", "node", cluster.name, "apps=smollm2-pirate", "--overwrite")
        release.kubectl("apply", "-n", namespace, "-f", "-", stdin=json.dumps(adapter))
        name = adapter["metadata"]["name"]
        until_condition(release, namespace, name, "InferenceReady", 600, operator)
        release.phases["adapter Workspace → InferenceReady"] = time.monotonic() - started
        with port_forward(release, namespace, name) as base:
            models = httpx.get(f"{base}/v1/models", timeout=30).json()
            assert {m["id"] for m in models["data"]} == {"smollm2-135m-instruct", "pirate"}, models
            body = {"model": "pirate", "max_tokens": 40,
                    "messages": [{"role": "user", "content": "What is the capital of France?"}]}  # fmt: skip
            styled = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=120)
            assert styled.status_code == 200, styled.text
            assert styled.json()["choices"][0]["message"]["content"].strip(), styled.text

        started = time.monotonic()
        delete_workspace(release, namespace, name)
        release.phases["adapter Workspace deleted → Ray pods gone"] = time.monotonic() - started
    finally:
        shutil.rmtree(data, ignore_errors=True)  # first: a kubectl below may fail on an interrupt
        release.kubectl("label", "node", cluster.name, "apps-", check=False)
        release.kubectl("delete", "namespace", namespace, "--wait=false", check=False)
