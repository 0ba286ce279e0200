"""A tuning Workspace on the local backend, end to end: its ConfigMap (KAITO's training_config) and
push Secret read from the apiserver, the tuning job run as a Ray job on a real Ray cluster, progress
and outcome in the Workspace's status, the adapter in the real registry; deletion cleans up."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from nats.aio.client import Client

from kaiten.local.procs import free_port
from kaiten.local.ray_head import RayHead
from shared import events as ev
from shared.oci import pull_adapter_files
from tests.conftest import Kubectl, Services, start_local_chain, until
from tests.test_planner_e2e import condition
from tests.test_provisioner_e2e import events_of
from tests.test_tracing import Receiver, receiver, tree  # noqa: F401  (a fixture)
from tests.test_tuning import PASSWORD, USER, data_dir, data_url, push_secret, registry  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.controlplane, pytest.mark.nats, pytest.mark.slow]


@pytest.mark.timeout(300)  # measured 79 s (cold, busy machine)
async def test_tuning_workspace_runs_as_a_ray_job_and_pushes(
    kubectl: Kubectl,
    namespace: str,
    nc: Client,
    services: Services,
    ray_dashboard: RayHead,
    data_url: str,  # noqa: F811
    registry: str,  # noqa: F811
    push_secret: Path,  # noqa: F811
    tmp_path: Path,
    receiver: Receiver,  # noqa: F811
) -> None:
    kubectl.run(
        "create", "secret", "docker-registry", "push-secret", "-n", namespace, f"--docker-server={registry}",
        f"--docker-username={USER}", f"--docker-password={PASSWORD}", check=True,
    )  # fmt: skip
    training = {
        "training_config": {
            "LoraConfig": {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]},
            "TrainingArguments": {"per_device_train_batch_size": 4, "max_steps": 8, "learning_rate": 1e-3},
            "DatasetConfig": {"max_seq_length": 128},
        }
    }
    configmap = {
        "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "tune-params"},
        "data": {"training_config.yaml": yaml.safe_dump(training)},
    }  # fmt: skip
    kubectl.run("apply", "-n", namespace, "-f", "-", stdin=json.dumps(configmap), check=True)
    work = tmp_path / "workload"
    otel = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100"}
    await start_local_chain(
        services, ray_dashboard, free_port(), KAITEN_ALLOW_LOOPBACK_URLS="true", KAITEN_WORK_DIR=str(work),
        **otel,
    )  # fmt: skip
    image = f"{registry}/adapters/tuned:0.1"
    workspace = {
        "apiVersion": "kaito.sh/v1alpha1", "kind": "Workspace", "metadata": {"name": "tune"},
        "resource": {"labelSelector": {"matchLabels": {"apps": "tune"}}},
        "tuning": {
            "preset": {"name": "smollm2-135m-instruct"}, "method": "lora", "config": "tune-params",
            "input": {"urls": [f"{data_url}/train-00000-of-00001.parquet"]},
            "output": {"image": image, "imagePushSecret": "push-secret"},
        },
    }  # fmt: skip
    kubectl.run("apply", "-n", namespace, "-f", "-", stdin=json.dumps(workspace), check=True)
    kubectl.run(
        "wait", "-n", namespace, "--for=condition=WorkspaceSucceeded", "workspace/tune", "--timeout=300s"
    )
    obj = kubectl.json("get", "workspace", "tune", "-n", namespace)
    assert condition(obj, "WorkspaceSucceeded")["status"] == "True", (obj.get("status"), services.logs())
    assert condition(obj, "JobStarted")["status"] == "True"
    events = await events_of(nc, "tuning", namespace, "tune")
    steps = [e.step for e in events if isinstance(e, ev.TuningProgress)]
    assert steps and steps[-1] == 8, steps
    done = [e for e in await events_of(nc, "workload", namespace, "tune") if isinstance(e, ev.JobSucceeded)]
    assert len(done) == 1 and done[0].output.startswith(f"{image}@sha256:"), (
        done
    )  # the job's own, with its digest
    pulled = pull_adapter_files(image, tmp_path / "pulled", str(push_secret), insecure=True)
    assert sorted(p.name for p in pulled) == ["adapter_config.json", "adapter_model.safetensors"]
    assert PASSWORD not in services.logs() and PASSWORD not in json.dumps(obj)

    # the job continued the workload's trace: its own spans (the workload passed OTEL_* on), and the
    # trace context its JobSucceeded event carried
    def job_spans() -> set[str]:
        with receiver.lock:
            submits = [s for s in receiver.spans if s.name == "tuning job submit"]
            return {s.name for s in receiver.spans if submits and s.trace == submits[0].trace
                    and s.service == "kaiten-tuning"}  # fmt: skip

    published = f"kaiten.workload.job_succeeded.{namespace}.tune publish"
    wanted = {"tuning job", "tuning download", "tuning train", "tuning push", published}
    await until(lambda: wanted <= job_spans(), timeout=30, what=f"the job's spans: {job_spans()}")
    submit = next(s for s in receiver.spans if s.name == "tuning job submit")
    print(f"trace {submit.trace}:\n{tree(receiver.trace_of(submit.trace))}")

    kubectl.run("delete", "-n", namespace, "workspace/tune", "--timeout=60s", check=True)
    assert not (work / f"{namespace}.tune").exists()  # the job config and the secret copy are gone


async def test_a_missing_or_refused_tuning_configmap_fails_the_workspace_with_the_reason(
    kubectl: Kubectl, namespace: str, services: Services, tmp_path: Path
) -> None:
    await services.start_ready("services.watcher", KAITEN_CLEANUP_OWNERS="provisioner,workload")
    await services.start_ready("services.planner", KAITEN_PROVIDER="local")
    await services.start_ready("services.provisioner", KAITEN_PROVIDER="local")
    # nothing listens there: a Workspace that cannot be rendered never reaches Ray
    await services.start_ready(
        "services.workload", KAITEN_RAY_DASHBOARD_URL="http://127.0.0.1:9", KAITEN_WORK_DIR=str(tmp_path)
    )
    workspace = {
        "apiVersion": "kaito.sh/v1alpha1", "kind": "Workspace", "metadata": {"name": "tune"},
        "resource": {"labelSelector": {"matchLabels": {"apps": "tune"}}},
        "tuning": {
            "preset": {"name": "smollm2-135m-instruct"}, "method": "lora", "config": "no-such-configmap",
            "input": {"urls": ["http://127.0.0.1:9/x.parquet"]},
            "output": {"image": "127.0.0.1:9/adapters/x:1", "imagePushSecret": "push-secret"},
        },
    }  # fmt: skip
    kubectl.run("apply", "-n", namespace, "-f", "-", stdin=json.dumps(workspace), check=True)
    failed = "--for=condition=WorkspaceSucceeded=False"
    kubectl.run("wait", "-n", namespace, failed, "workspace/tune", "--timeout=60s", check=True)
    cond = condition(kubectl.json("get", "workspace", "tune", "-n", namespace), "WorkspaceSucceeded")
    missing = f"ConfigMap 'no-such-configmap' specified in 'config' not found in namespace '{namespace}'"
    assert cond["reason"] == "InvalidTuningConfig" and missing in cond["message"], cond
    # KAITO's rule, on a ConfigMap that exists: lora must not quantize
    quantized = {
        "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "quantized"},
        "data": {"training_config.yaml": "training_config:\n  QuantizationConfig:\n    load_in_4bit: true\n"},
    }  # fmt: skip
    kubectl.run("apply", "-n", namespace, "-f", "-", stdin=json.dumps(quantized), check=True)
    workspace["metadata"]["name"] = "tuneq"
    workspace["tuning"]["config"] = "quantized"  # type: ignore[index]
    kubectl.run("apply", "-n", namespace, "-f", "-", stdin=json.dumps(workspace), check=True)
    kubectl.run("wait", "-n", namespace, failed, "workspace/tuneq", "--timeout=60s", check=True)
    cond = condition(kubectl.json("get", "workspace", "tuneq", "-n", namespace), "WorkspaceSucceeded")
    says = "For method 'lora', 'load_in_4bit' or 'load_in_8bit' in ConfigMap 'quantized' must not be true"
    assert cond["reason"] == "InvalidTuningConfig" and says in cond["message"], cond


@pytest.mark.timeout(300)
async def test_tuning_reads_and_writes_hostpath_volumes_on_the_local_backend(
    kubectl: Kubectl,
    namespace: str,
    services: Services,
    ray_dashboard: RayHead,
    data_dir: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Issue 18: KAITO takes tuning input from a volume and writes the adapter to one. On this machine a
    hostPath is a directory: the job reads its data there and writes the adapter there, no URL and no
    registry involved. (A cluster mounts any volumeSource, and unpacks a data image, at KAITO's paths:
    tests/test_workload_kuberay.py.)"""
    data, out = tmp_path / "data", tmp_path / "adapter"
    data.mkdir()
    shutil.copy(data_dir / "train-00000-of-00001.parquet", data)
    out.mkdir()
    training = {"training_config": {"TrainingArguments": {"max_steps": 4, "per_device_train_batch_size": 4},
                                    "DatasetConfig": {"max_seq_length": 96}}}  # fmt: skip
    configmap = {
        "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "short"},
        "data": {"training_config.yaml": yaml.safe_dump(training)},
    }  # fmt: skip
    kubectl.run("apply", "-n", namespace, "-f", "-", stdin=json.dumps(configmap), check=True)
    await start_local_chain(services, ray_dashboard, free_port(), KAITEN_WORK_DIR=str(tmp_path / "work"))
    workspace = {
        "apiVersion": "kaito.sh/v1beta1", "kind": "Workspace", "metadata": {"name": "onvolumes"},
        "resource": {"labelSelector": {"matchLabels": {"apps": "onvolumes"}}},
        "tuning": {
            "preset": {"name": "smollm2-135m-instruct"}, "method": "lora", "config": "short",
            "input": {"name": "pirate", "volumeSource": {"hostPath": {"path": str(data)}}},
            "output": {"volumeSource": {"hostPath": {"path": str(out)}}},
        },
    }  # fmt: skip
    kubectl.run("apply", "-n", namespace, "-f", "-", stdin=json.dumps(workspace), check=True)
    done = "--for=condition=WorkspaceSucceeded"
    kubectl.run("wait", "-n", namespace, done, "workspace/onvolumes", "--timeout=280s", timeout=290)
    obj = kubectl.json("get", "workspace", "onvolumes", "-n", namespace)
    assert condition(obj, "WorkspaceSucceeded")["status"] == "True", (
        obj.get("status"),
        services.logs()[-3000:],
    )
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"
