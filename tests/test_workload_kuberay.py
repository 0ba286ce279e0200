"""The kuberay backend against KubeRay's own published parts: its CRDs (v1.5.1, from its Go module) in
the real apiserver, and its admission checks (``utils.ValidateRayServiceSpec`` …, built from the same
module). No KubeRay operator runs here: the tests write RayService / RayJob status through the status
subresource as KubeRay does, and check what the workload makes of it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml
from kubernetes_asyncio import client as kclient
from kubernetes_asyncio import config as kconfig
from nats.aio.client import Client

from kaiten.local import kuberay as kuberay_parts
from kaiten.local.controlplane import ControlPlane
from services.planner.planning import PlanOptions, plan
from services.serving.app import ServingConfig
from services.tuning.config import TuningJobConfig
from services.workload.backends.base import Target
from services.workload.backends.kuberay import KubeRay, rayjob_state, rayservice_state, statefulset_state
from services.workload.manifests import (
    API_KEY_ANNOTATION,
    ENABLE_LB_ANNOTATION,
    GPU_TOLERATION,
    INPUT_PATH,
    MAX_RAY_NAME,
    OUTPUT_PATH,
    PULL_SECRETS_PATH,
    PUSH_SECRET_PATH,
    RAY_GID,
    WORKSPACE_LABEL,
    AdminPeers,
    load_balanced,
    network_policy,
    object_name,
    rayjob,
    rayservice,
    service,
    tuning_configmap,
)
from services.workload.render import job_id, serving_config, tuning_config
from shared import events as ev
from shared.api.workspace import Workspace
from shared.events import WorkspaceRef
from shared.planning.catalog import load_catalogs
from shared.planning.model import Plan
from tests.conftest import SEEDS, Kubectl, Services, until
from tests.test_planner_e2e import add_gpu_node, manifest
from tests.test_provisioner_e2e import FAST, events_of

CATALOGS = load_catalogs()
IMAGE = "kaiten-ray:test"


def seed(name: str) -> tuple[Workspace, Plan]:
    workspace = Workspace.model_validate(yaml.safe_load((SEEDS / name).read_text()))
    got = plan(workspace, CATALOGS, [], PlanOptions(cloud="azure", provider="aks"))
    assert isinstance(got, Plan), got
    return workspace, got


def ref_of(workspace: Workspace, namespace: str = "default", uid: str = "0b1c2d3e-uid") -> WorkspaceRef:
    return WorkspaceRef(namespace=namespace, name=workspace.metadata.name, uid=uid)


def render(workspace: Workspace, got: Plan, ref: WorkspaceRef, generation: int = 1) -> list[dict[str, Any]]:
    """Everything the kuberay backend applies for this Workspace, as it renders it."""
    version = "kaito.sh/v1alpha1"
    if workspace.tuning is not None:
        config = tuning_config(
            workspace, got, ref, generation, sections={}, push_secret=PUSH_SECRET_PATH,
            nats_url="nats://kaiten-nats.kaiten-system:4222", work_dir="/var/lib/kaiten/tuning/job",
            allow_loopback_urls=False,
        )  # fmt: skip
        return [
            tuning_configmap(ref, version, config, generation),
            rayjob(ref, version, workspace, got, job_id(ref, generation), image=IMAGE, generation=generation),
        ]
    config = serving_config(workspace, got, lambda s: f"{PULL_SECRETS_PATH}/{s}")
    return [
        rayservice(ref, version, workspace, got, config, image=IMAGE, generation=generation),
        service(ref, version, generation),
    ]


def target_of(workspace: Workspace, got: Plan, ref: WorkspaceRef, generation: int) -> Target:
    job = job_id(ref, generation) if workspace.tuning is not None else ""
    return Target(
        ref=ref,
        api_version="kaito.sh/v1alpha1",
        generation=generation,
        workspace=workspace,
        plan=got,
        job=job,
    )


def kuberay_validate(objects: list[dict[str, Any]]) -> subprocess.CompletedProcess[str]:
    lines = "\n".join(json.dumps(o) for o in objects if o["kind"] in ("RayService", "RayJob"))
    return subprocess.run(
        [str(kuberay_parts.validator())], input=lines, capture_output=True, text=True, timeout=60, check=False
    )


def pods(obj: dict[str, Any]) -> list[dict[str, Any]]:
    cluster = obj["spec"].get("rayClusterConfig") or obj["spec"]["rayClusterSpec"]
    groups = [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]
    return [g["template"] for g in groups]


SEED_FILES = sorted(p.name for p in SEEDS.glob("*.yaml"))


def test_all_three_seeds_are_rendered() -> None:
    assert SEED_FILES == [
        "workspace-phi-3-mini-adapter.yaml", "workspace-phi-3-mini.yaml", "workspace-tuning-phi-3.yaml",
    ]  # fmt: skip


@pytest.mark.parametrize("name", SEED_FILES)
def test_seed_objects_pass_kuberays_own_validation(name: str) -> None:
    workspace, got = seed(name)
    ref = ref_of(workspace)
    objects = render(workspace, got, ref)
    result = kuberay_validate(objects)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("ok ") == 1

    for obj in objects:
        meta = obj["metadata"]
        assert meta["labels"][WORKSPACE_LABEL] == ref.name
        assert meta["ownerReferences"] == [
            {"apiVersion": "kaito.sh/v1alpha1", "kind": "Workspace", "name": ref.name, "uid": ref.uid,
             "controller": True, "blockOwnerDeletion": True}
        ]  # fmt: skip
    workload = objects[0] if objects[0]["kind"] != "ConfigMap" else objects[1]
    templates = pods(workload)
    assert len(templates) == got.nodes  # the head and the workers sit on the planned nodes, one each
    for template in templates:
        spec = template["spec"]
        assert spec["nodeSelector"] == workspace.resource.label_selector.match_labels
        assert spec["tolerations"] == [GPU_TOLERATION]
        container = spec["containers"][0]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == str(got.gpus_per_node)
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
        assert volumes[mounts["/var/cache/kaiten"]]["emptyDir"]["sizeLimit"] == f"{got.disk_gib}Gi"
        assert template["metadata"]["labels"][WORKSPACE_LABEL] == ref.name


def test_inference_seed_serves_the_plans_config_behind_a_port_80_service() -> None:
    workspace, got = seed("workspace-phi-3-mini-adapter.yaml")
    ref = ref_of(workspace)
    rs, svc = render(workspace, got, ref)
    serve = yaml.safe_load(rs["spec"]["serveConfigV2"])
    (app,) = serve["applications"]
    assert app["import_path"] == "services.serving.app:build" and app["route_prefix"] == "/"
    config = ServingConfig.model_validate(app["args"])
    assert config.engine == got.engine and config.engine_args == got.engine_args
    (adapter,) = config.adapters
    assert adapter.name == "phi-3-adapter" and adapter.image == "ACR_REPO_HERE.azurecr.io/ADAPTER_HERE:0.0.1"
    assert adapter.strength == 1.0 and adapter.path is None
    head = rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"name": "serve", "containerPort": 8000} in head["ports"]
    assert svc["metadata"]["name"] == ref.name  # `curl http://<workspace>/chat`
    assert svc["spec"]["ports"] == [{"name": "http", "port": 80, "targetPort": "serve", "protocol": "TCP"}]


def test_kaitos_enablelb_annotation_makes_a_load_balancer_open_to_serve_traffic_only() -> None:
    """KAITO: ``kaito.sh/enablelb: "True"`` (exactly) → a LoadBalancer Service. The Workspace's
    NetworkPolicy then admits the Serve port from anywhere; the dashboard stays fenced."""
    workspace, _ = seed("workspace-phi-3-mini.yaml")
    ref = ref_of(workspace)
    admin = AdminPeers(namespace="kaiten-system")
    for value, expected in (("True", True), ("true", False), ("yes", False), (None, False)):
        annotated = workspace.model_copy(deep=True)
        if value is not None:
            annotated.metadata.annotations[ENABLE_LB_ANNOTATION] = value
        assert load_balanced(annotated) is expected, value
    svc = service(ref, "kaito.sh/v1alpha1", 1, load_balancer=True)
    assert svc["spec"]["type"] == "LoadBalancer"
    assert service(ref, "kaito.sh/v1alpha1", 1)["spec"]["type"] == "ClusterIP"
    closed = network_policy(ref, "kaito.sh/v1alpha1", 1, admin)["spec"]["ingress"]
    public = network_policy(ref, "kaito.sh/v1alpha1", 1, admin, public_serve=True)["spec"]["ingress"]
    assert public[0] == {"ports": [{"port": "serve", "protocol": "TCP"}]}  # no "from": any source
    assert public[1:] == closed and all("from" in rule for rule in closed)
    assert {"port": "dashboard", "protocol": "TCP"} in closed[1]["ports"]


def test_tuning_seed_mounts_the_push_secret_and_never_copies_it() -> None:
    workspace, got = seed("workspace-tuning-phi-3.yaml")
    ref = ref_of(workspace)
    configmap, job = render(workspace, got, ref)
    config = TuningJobConfig.model_validate(yaml.safe_load(configmap["data"]["job.yaml"]))
    assert config.output.push_secret == PUSH_SECRET_PATH and config.method == "qlora"
    assert job["spec"]["entrypoint"] == "python -m services.tuning --config /etc/kaiten/tuning/job.yaml"
    assert job["spec"]["jobId"] == job_id(ref, 1)
    volumes = {v["name"]: v for v in pods(job)[0]["spec"]["volumes"]}
    assert volumes["push-secret"]["secret"]["secretName"] == "ACR_REGISTRY_SECRET_HERE"
    assert volumes["push-secret"]["secret"]["defaultMode"] == 0o400
    # the Secret's files are root's, mode 0400: Ray runs as UID 1000, GID 100, and reads them by group
    # (found on the node: "Permission denied: /var/run/kaiten/push/.dockerconfigjson")
    assert pods(job)[0]["spec"]["securityContext"] == {"fsGroup": RAY_GID}
    assert volumes["tuning-config"]["configMap"]["name"] == configmap["metadata"]["name"]
    text = json.dumps([configmap, job])
    assert text.count("ACR_REGISTRY_SECRET_HERE") == 1  # referenced once, by name, as a volume


def test_an_adapter_from_a_volume_is_mounted_where_kaito_mounts_it() -> None:
    """KAITO's adapters[].source.volumeSource: the volume is mounted read-only at /mnt/adapter/<name>
    in the Ray pods and served from there; image adapters are pulled as before."""
    base, got = seed("workspace-phi-3-mini-adapter.yaml")
    doc = base.model_dump(by_alias=True, exclude_none=True)
    doc["inference"]["adapters"].append(
        {"source": {"name": "mounted", "volumeSource": {"persistentVolumeClaim": {"claimName": "adapters"}}}}
    )
    workspace = Workspace.model_validate(doc)
    ref = ref_of(workspace)
    rs, _ = render(workspace, got, ref)
    assert kuberay_validate([rs]).returncode == 0
    (app,) = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"]
    adapters = {a.name: a for a in ServingConfig.model_validate(app["args"]).adapters}
    assert adapters["mounted"].path == "/mnt/adapter/mounted" and adapters["mounted"].image is None
    assert adapters["phi-3-adapter"].image and adapters["phi-3-adapter"].path is None
    spec = pods(rs)[0]["spec"]
    volume = next(v for v in spec["volumes"] if v.get("persistentVolumeClaim"))
    assert volume["persistentVolumeClaim"] == {"claimName": "adapters"}
    mount = {"name": volume["name"], "mountPath": "/mnt/adapter/mounted", "readOnly": True}
    assert mount in spec["containers"][0]["volumeMounts"]


def test_tuning_volumes_and_data_images_are_mounted_where_kaito_puts_them() -> None:
    """Issue 18: KAITO tunes from a volume (a PVC) or a data image and writes to a volume. The RayJob
    mounts the input volume read-only at /mnt/data and the output one at /mnt/output; a data image is
    unpacked there first by an init container (our image's ``python -m shared.oci pull-data``, with the
    input's pull Secrets). KubeRay's own validation takes both."""
    base, got = seed("workspace-tuning-phi-3.yaml")
    ref = ref_of(base)
    doc = base.model_dump(by_alias=True, exclude_none=True)
    doc["tuning"]["input"] = {"name": "d", "volumeSource": {"persistentVolumeClaim": {"claimName": "data"}}}
    # a "name" inside a volumeSource (its fields are preserved as written) cannot rename the volume
    doc["tuning"]["output"] = {
        "volumeSource": {"name": "x", "persistentVolumeClaim": {"claimName": "adapters"}}
    }
    on_volumes = Workspace.model_validate(doc)
    doc["tuning"]["input"] = {"image": "reg.example/data/pirate:1", "imagePullSecrets": ["data-pull"]}
    from_image = Workspace.model_validate(doc)
    for workspace in (on_volumes, from_image):
        job = rayjob(ref, "kaito.sh/v1beta1", workspace, got, job_id(ref, 1), image=IMAGE, generation=1)
        result = kuberay_validate([job])
        assert result.returncode == 0, result.stdout + result.stderr
        spec = pods(job)[0]["spec"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        mounts = {m["mountPath"]: m for m in spec["containers"][0]["volumeMounts"]}
        assert mounts[INPUT_PATH] == {"name": "tuning-input", "mountPath": INPUT_PATH, "readOnly": True}
        assert mounts[OUTPUT_PATH]["name"] == "tuning-output" and "readOnly" not in mounts[OUTPUT_PATH]
        assert volumes["tuning-output"]["persistentVolumeClaim"] == {"claimName": "adapters"}
        config = TuningJobConfig.model_validate(tuning_config(
            workspace, got, ref, 1, sections={}, push_secret=None, nats_url="nats://n:4222", work_dir="/w",
            allow_loopback_urls=False, input_directory=INPUT_PATH, output_directory=OUTPUT_PATH,
        ))  # fmt: skip
        assert (config.input_directory, config.output.directory, config.output.image) == (
            INPUT_PATH, OUTPUT_PATH, None
        )  # fmt: skip
    assert volumes["tuning-input"] == {"name": "tuning-input", "emptyDir": {}}  # the image's case, last
    (puller,) = spec["initContainers"]
    assert puller["image"] == IMAGE and puller["command"] == [
        "python", "-m", "shared.oci", "pull-data", "reg.example/data/pirate:1", INPUT_PATH,
        f"{PULL_SECRETS_PATH}/data-pull",
    ]  # fmt: skip
    pull_volume = next(v for v in volumes.values() if v.get("secret", {}).get("secretName") == "data-pull")
    assert {"name": pull_volume["name"], "mountPath": f"{PULL_SECRETS_PATH}/data-pull", "readOnly": True} in (
        puller["volumeMounts"]
    )


@pytest.mark.parametrize(
    "name",
    [
        "workspace-phi-3-mini",
        "9lives",
        "a.dotted.name",
        "x" * 63,
        "phi-3-mini-128k-instruct-with-a-long-suffix-2",
    ],
)
def test_any_workspace_name_maps_to_a_name_kuberay_accepts(name: str) -> None:
    workspace, got = seed("workspace-phi-3-mini.yaml")
    workspace = workspace.model_copy(
        update={"metadata": workspace.metadata.model_copy(update={"name": name})}
    )
    objects = render(workspace, got, ref_of(workspace))
    assert len(objects[0]["metadata"]["name"]) <= MAX_RAY_NAME
    result = kuberay_validate(objects)
    assert result.returncode == 0, result.stdout
    assert object_name(name) == object_name(name)  # stable
    if len(name) <= MAX_RAY_NAME and name[0].isalpha() and "." not in name:
        assert object_name(name) == name  # readable when it can be


def test_the_validator_can_fail() -> None:
    """The oracle is real: a name KubeRay refuses is refused."""
    workspace, got = seed("workspace-phi-3-mini.yaml")
    rs, _ = render(workspace, got, ref_of(workspace))
    rs["metadata"]["name"] = "x" * 48
    result = kuberay_validate([rs])
    assert result.returncode == 1 and "no more than 47 characters" in result.stdout


# -- against the apiserver with KubeRay's CRDs --------------------------------------------------------


def install_kuberay_crds(kubectl: Kubectl) -> list[Path]:
    paths = kuberay_parts.crds()
    for path in paths:  # server-side: the CRDs are too big for the last-applied annotation
        kubectl.run("apply", "--server-side", "-f", str(path), check=True, timeout=120)
    kubectl.wait_established("rayservices.ray.io", "rayjobs.ray.io", "rayclusters.ray.io")
    return paths


@pytest.fixture(scope="session")
def kuberay_crds(kubectl: Kubectl) -> list[Path]:
    return install_kuberay_crds(kubectl)


@pytest.fixture
async def api(controlplane: ControlPlane) -> AsyncIterator[kclient.ApiClient]:
    configuration = kclient.Configuration()
    await kconfig.load_kube_config(
        config_file=str(controlplane.kubeconfig), client_configuration=configuration
    )
    async with kclient.ApiClient(configuration) as api_client:
        yield api_client


@pytest.fixture
def backend(api: kclient.ApiClient, kuberay_crds: list[Path]) -> KubeRay:
    return KubeRay(api, image=IMAGE, nats_url="nats://kaiten-nats.kaiten-system:4222")


def kuberay_writes(kubectl: Kubectl, namespace: str, kind: str, name: str, status: dict[str, Any]) -> None:
    """What KubeRay does: a merge-patch of the status subresource."""
    kubectl.run(
        "patch", kind, name, "-n", namespace, "--subresource=status", "--type=merge",
        "-p", json.dumps({"status": status}), check=True,
    )  # fmt: skip


@pytest.mark.controlplane
@pytest.mark.parametrize("name", SEED_FILES)
async def test_the_apiserver_accepts_every_seed_object_strictly(
    backend: KubeRay, kubectl: Kubectl, namespace: str, name: str
) -> None:
    workspace, got = seed(name)
    ref = ref_of(workspace, namespace)
    for obj in render(workspace, got, ref):
        stored = await backend.apply(obj)  # strict field validation: an unknown field fails here
        again = await backend.apply(obj)
        assert again["metadata"]["resourceVersion"] == stored["metadata"]["resourceVersion"]  # no-op
        managers = {m["manager"] for m in stored["metadata"]["managedFields"]}
        assert managers == {"kaiten"}
        assert stored["metadata"]["labels"][WORKSPACE_LABEL] == ref.name
    listed = kubectl.json(
        "get", "rayservices,rayjobs,services,configmaps", "-n", namespace, "-l", WORKSPACE_LABEL
    )
    assert len(listed["items"]) == 2


@pytest.mark.controlplane
async def test_a_field_kuberay_does_not_know_is_an_error_not_pruned(backend: KubeRay, namespace: str) -> None:
    from shared.errors import InvalidInput

    workspace, got = seed("workspace-phi-3-mini.yaml")
    rs, _ = render(workspace, got, ref_of(workspace, namespace))
    rs["spec"]["serveConfigV3"] = "applications: []"
    with pytest.raises(InvalidInput, match="serveConfigV3"):
        await backend.apply(rs)


def ready_status(
    generation: int, cluster: str, app: str, state: str = "RUNNING", **extra: Any
) -> dict[str, Any]:
    return {
        "observedGeneration": generation,
        "conditions": [
            {"type": "Ready", "status": "True" if state == "RUNNING" else "False",
             "reason": "NonZeroServeEndpoints", "message": "", "lastTransitionTime": "2026-11-21T10:00:00Z"},
            {"type": "UpgradeInProgress", "status": "False", "reason": "NoPendingCluster",
             "message": "", "lastTransitionTime": "2026-11-21T10:00:00Z"},
        ],
        "activeServiceStatus": {
            "rayClusterName": cluster,
            "applicationStatuses": {app: {"status": state, "message": extra.get("message", "")}},
        },
    }  # fmt: skip


@pytest.mark.controlplane
async def test_rayservice_readiness_follows_what_kuberay_writes(
    backend: KubeRay, kubectl: Kubectl, namespace: str
) -> None:
    workspace, got = seed("workspace-phi-3-mini.yaml")
    ref = ref_of(workspace, namespace)
    config = serving_config(workspace, got)
    target = target_of(workspace, got, ref, 1)
    await backend.deploy(target, dict(config))
    name, app = object_name(ref.name), f"{namespace}--{ref.name}"
    assert await backend.status(target) == ("pending", "KubeRay has not observed the latest spec")

    kuberay_writes(kubectl, namespace, "rayservice", name, {
        "observedGeneration": 1,
        "conditions": [{"type": "Ready", "status": "False", "reason": "Initializing", "message": "",
                        "lastTransitionTime": "2026-11-21T10:00:00Z"}],
        "activeServiceStatus": {"applicationStatuses": {app: {"status": "DEPLOYING"}}},
    })  # fmt: skip
    assert await backend.status(target) == ("pending", f"{app} DEPLOYING")

    kuberay_writes(kubectl, namespace, "rayservice", name, ready_status(1, "ws-abc12", app))
    assert await backend.status(target) == ("ready", "")
    svc = kubectl.json("get", "service", ref.name, "-n", namespace)
    assert svc["spec"]["selector"]["ray.io/cluster"] == "ws-abc12"  # routes to the active cluster
    assert backend.endpoint(target) == f"http://{ref.name}.{namespace}.svc"

    # a spec change (generation 2) rolls: not ready until KubeRay has observed it and it runs again
    target2 = target_of(workspace, got, ref, 2)
    await backend.deploy(target2, {**config, "max_queue": 32})
    assert (await backend.status(target2))[0] == "pending"
    stored = kubectl.json("get", "rayservice", name, "-n", namespace)
    assert stored["metadata"]["generation"] == 2
    assert "max_queue: 32" in stored["spec"]["serveConfigV2"]
    upgrading = ready_status(2, "ws-abc12", app)
    upgrading["conditions"][1].update(status="True", reason="BothActivePendingClustersExist")
    upgrading["pendingServiceStatus"] = {"rayClusterName": "ws-def34"}
    kuberay_writes(kubectl, namespace, "rayservice", name, upgrading)
    assert await backend.status(target2) == ("pending", "upgrade in progress (new Ray cluster)")
    kuberay_writes(
        kubectl,
        namespace,
        "rayservice",
        name,
        {**ready_status(2, "ws-def34", app), "pendingServiceStatus": None},
    )
    assert await backend.status(target2) == ("ready", "")
    svc = kubectl.json("get", "service", ref.name, "-n", namespace)
    assert svc["spec"]["selector"]["ray.io/cluster"] == "ws-def34"

    failed = ready_status(2, "ws-def34", app, "DEPLOY_FAILED", message="CUDA out of memory")
    kuberay_writes(kubectl, namespace, "rayservice", name, failed)
    state, message = await backend.status(target2)
    assert state == "failed" and "DEPLOY_FAILED" in message and "CUDA out of memory" in message

    assert await backend.remove(target2)  # no finalizers here (no KubeRay): gone at once
    left = kubectl.json("get", "rayservices,services", "-n", namespace, "-l", WORKSPACE_LABEL)
    assert left["items"] == []


def test_rayservice_state_covers_older_kuberay_and_timeouts() -> None:
    base = {"metadata": {"generation": 3, "annotations": {"kaito.sh/generation": "5"}}}
    app = {"applicationStatuses": {"a": {"status": "RUNNING"}}}
    older = {
        **base,
        "status": {"observedGeneration": 3, "serviceStatus": "Running", "activeServiceStatus": app},
    }
    assert rayservice_state(older, 5) == ("ready", "")
    assert rayservice_state(older, 6) == ("pending", "an earlier generation is applied")
    condition = {
        "type": "Ready",
        "status": "False",
        "reason": "InitializingTimeout",
        "message": "not ready in 15m",
    }
    timeout = {**base, "status": {"observedGeneration": 3, "conditions": [condition]}}
    assert rayservice_state(timeout, 5) == ("failed", "not ready in 15m")


@pytest.mark.parametrize(
    ("deployment", "job", "expected"),
    [
        ("", "", "PENDING"),
        ("Initializing", "", "PENDING"),
        ("Running", "PENDING", "RUNNING"),
        ("Running", "RUNNING", "RUNNING"),
        ("Running", "SUCCEEDED", "RUNNING"),  # KubeRay has not finished with it yet
        ("Complete", "SUCCEEDED", "SUCCEEDED"),
        ("Complete", "FAILED", "FAILED"),  # older KubeRay: Complete, whatever the job did
        ("Complete", "", "PENDING"),
        ("Failed", "", "FAILED"),
        ("ValidationFailed", "", "FAILED"),
        ("Complete", "STOPPED", "STOPPED"),
    ],
)
def test_rayjob_outcome_needs_both_fields(deployment: str, job: str, expected: str) -> None:
    state, _ = rayjob_state({"status": {"jobDeploymentStatus": deployment, "jobStatus": job}})
    assert state == expected


@pytest.mark.controlplane
async def test_a_tuning_job_on_volumes_reads_and_writes_where_they_are_mounted(
    backend: KubeRay, kubectl: Kubectl, namespace: str
) -> None:
    """The backend's submit: a volume input is the job's input directory (no URL Secret is made), an
    output volume its output directory (nothing pushed); the apiserver takes the RayJob strictly."""
    base, got = seed("workspace-tuning-phi-3.yaml")
    doc = base.model_dump(by_alias=True, exclude_none=True)
    doc["tuning"]["input"] = {"name": "d", "volumeSource": {"persistentVolumeClaim": {"claimName": "data"}}}
    doc["tuning"]["output"] = {"volumeSource": {"persistentVolumeClaim": {"claimName": "adapters"}}}
    workspace = Workspace.model_validate(doc)
    ref = ref_of(workspace, namespace)
    await backend.submit(target_of(workspace, got, ref, 1), {})
    config = kubectl.json("get", "configmap", f"{ref.name}-g1-tuning", "-n", namespace)
    job = TuningJobConfig.model_validate(yaml.safe_load(config["data"]["job.yaml"]))
    assert (job.input_directory, job.input_urls, job.input_urls_env) == (INPUT_PATH, [], None)
    assert (job.output.directory, job.output.image, job.output.push_secret) == (OUTPUT_PATH, None, None)
    secrets = kubectl.json("get", "secrets", "-n", namespace, "-l", WORKSPACE_LABEL)["items"]
    assert not [s for s in secrets if s["metadata"]["name"].endswith("-inputs")]
    rayjob_obj = kubectl.json("get", "rayjob", object_name(ref.name, "-g1"), "-n", namespace)
    head = rayjob_obj["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    assert {"name": "tuning-input", "persistentVolumeClaim": {"claimName": "data"}} in head["volumes"]


@pytest.mark.controlplane
async def test_rayjob_lifecycle_through_the_status_subresource(
    backend: KubeRay, kubectl: Kubectl, namespace: str
) -> None:
    workspace, got = seed("workspace-tuning-phi-3.yaml")
    ref = ref_of(workspace, namespace)
    target = target_of(workspace, got, ref, 1)
    await backend.submit(target, {"LoraConfig": {"r": 8}})
    name = object_name(ref.name, "-g1")
    job = kubectl.json("get", "rayjob", name, "-n", namespace)
    assert job["spec"]["jobId"] == target.job
    config = kubectl.json("get", "configmap", f"{ref.name}-g1-tuning", "-n", namespace)
    assert "r: 8" in config["data"]["job.yaml"]
    assert await backend.job_status(target) == ("PENDING", "")

    kuberay_writes(
        kubectl, namespace, "rayjob", name, {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}
    )
    assert await backend.job_status(target) == ("RUNNING", "")
    kuberay_writes(kubectl, namespace, "rayjob", name, {
        "jobDeploymentStatus": "Complete", "jobStatus": "FAILED", "reason": "AppFailed",
        "message": "Job failed: push to registry refused",
    })  # fmt: skip
    assert await backend.job_status(target) == ("FAILED", "Job failed: push to registry refused")

    # generation 2 replaces generation 1's job and config
    target2 = target_of(workspace, got, ref, 2)
    await backend.submit(target2, {})
    names = sorted(i["metadata"]["name"] for i in kubectl.json(
        "get", "rayjobs,configmaps", "-n", namespace, "-l", WORKSPACE_LABEL)["items"])  # fmt: skip
    assert names == sorted([object_name(ref.name, "-g2"), f"{ref.name}-g2-tuning"])
    kuberay_writes(kubectl, namespace, "rayjob", object_name(ref.name, "-g2"),
                   {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"})  # fmt: skip
    assert await backend.job_status(target2) == ("SUCCEEDED", "")
    assert await backend.remove(target2)
    assert kubectl.json("get", "rayjobs,configmaps", "-n", namespace, "-l", WORKSPACE_LABEL)["items"] == []


# -- the whole chain with the kuberay backend -----------------------------------------------------------


@pytest.mark.controlplane
@pytest.mark.nats
async def test_kuberay_backend_end_to_end(
    kubectl: Kubectl, namespace: str, nc: Client, services: Services, kuberay_crds: list[Path]
) -> None:
    """kubectl apply → watcher → planner → provisioner (bring-your-own GPU node) → workload (kuberay):
    the RayService lands on that node, once, from two replicas; both are SIGKILLed and a fresh one takes
    over; KubeRay's status (written here) → InferenceReady on the Workspace; deletion removes every
    object and the Workspace. The Workspace's annotations travel with it: the API key Secret it names
    reaches the head pod (they were dropped on the way once, and the key never applied)."""
    selector = f"kr-{namespace}"
    node = f"{namespace}-gpu"
    try:
        add_gpu_node(kubectl, node, selector)
        await services.start_ready("services.watcher", KAITEN_CLEANUP_OWNERS="provisioner,workload")
        await services.start_ready("services.planner", KAITEN_PROVIDER="byo")
        await services.start_ready("services.provisioner", KAITEN_PROVIDER="byo", **FAST)
        workload = {"KAITEN_BACKEND": "kuberay", "KAITEN_RAY_IMAGE": IMAGE, **FAST}
        replicas = [await services.start_ready("services.workload", **workload) for _ in range(2)]
        ws = json.loads(manifest("phi", "phi-3-mini-4k-instruct", None))
        ws["resource"]["labelSelector"]["matchLabels"] = {"apps": selector}
        ws["metadata"]["annotations"] = {API_KEY_ANNOTATION: "chat-key", ENABLE_LB_ANNOTATION: "True"}
        kubectl.run("apply", "-n", namespace, "-f", "-", stdin=json.dumps(ws), check=True)
        uid = kubectl.json("get", "workspace", "phi", "-n", namespace)["metadata"]["uid"]

        def rayservices() -> list[dict[str, Any]]:
            return list(kubectl.json("get", "rayservices", "-n", namespace)["items"])

        await until(lambda: rayservices(), timeout=60, what=f"a RayService\n{services.logs()}")
        (rs,) = rayservices()
        assert rs["metadata"]["ownerReferences"][0]["uid"] == uid
        head = rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
        assert head["nodeSelector"] == {"apps": selector} and head["containers"][0]["image"] == IMAGE
        env = {e["name"]: e for e in head["containers"][0]["env"]}
        assert env["KAITEN_API_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "chat-key", env
        app = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"][0]["name"]
        for replica in replicas:  # both killed mid-deployment; a fresh one picks up from the KV state
            os.kill(replica.pid, signal.SIGKILL)
            replica.proc.wait()  # type: ignore[union-attr]
        await services.start_ready("services.workload", **workload)
        kuberay_writes(kubectl, namespace, "rayservice", "phi", ready_status(1, "phi-x7k2p", app))
        kubectl.run(
            "wait",
            "-n",
            namespace,
            "--for=condition=InferenceReady",
            "workspace/phi",
            "--timeout=60s",
            check=True,
        )
        (ready,) = [
            e for e in await events_of(nc, "workload", namespace, "phi") if isinstance(e, ev.InferenceReady)
        ]
        assert ready.endpoint == f"http://phi.{namespace}.svc"
        svc = kubectl.json("get", "service", "phi", "-n", namespace)
        assert svc["spec"]["selector"]["ray.io/cluster"] == "phi-x7k2p"
        assert svc["spec"]["type"] == "LoadBalancer"  # KAITO's kaito.sh/enablelb: "True"
        assert len(rayservices()) == 1  # two replicas, one RayService

        kubectl.run("delete", "-n", namespace, "workspace/phi", "--timeout=60s", check=True)
        left = kubectl.json("get", "rayservices,services", "-n", namespace, "-l", WORKSPACE_LABEL)
        assert left["items"] == []
    finally:
        kubectl.run("delete", "node", node, "--wait=false")


def test_host_network_rendering_binds_every_ray_port_to_the_given_address() -> None:
    """What the local node needs (docs/cluster.md): the head on the host network, every Ray listener on
    127.0.0.1 at ports we choose (named container ports to match), usage stats off, probes of our own."""
    from services.workload.manifests import HostNetwork
    from services.workload.render import RenderError

    workspace = Workspace.model_validate(
        yaml.safe_load((SEEDS.parent / "local" / "workspace-smollm2.yaml").read_text())
    )
    got = plan(workspace, CATALOGS, [], PlanOptions(cloud="azure", provider="local"))
    assert isinstance(got, Plan)
    host = HostNetwork(gcs=7001, dashboard=7002, client=7003, agent=7004, metrics=7005, serve=7006,
                       replica_metrics=7007)  # fmt: skip
    config = serving_config(workspace, got, lambda s: f"{PULL_SECRETS_PATH}/{s}")
    obj = rayservice(ref_of(workspace), "kaito.sh/v1alpha1", workspace, got, config, image=IMAGE,
                     generation=1, host=host)  # fmt: skip
    head = obj["spec"]["rayClusterConfig"]["headGroupSpec"]
    params, pod = head["rayStartParams"], head["template"]["spec"]
    assert pod["hostNetwork"] is True
    assert params["node-ip-address"] == params["dashboard-host"] == "127.0.0.1"
    assert params["disable-usage-stats"] == "true"
    ports = {p["name"]: p["containerPort"] for p in pod["containers"][0]["ports"]}
    assert ports == {"gcs-server": 7001, "dashboard": 7002, "client": 7003, "dashboard-agent": 7004,
                     "metrics": 7005, "serve": 7006, "replica-metrics": 7007}  # fmt: skip
    args = yaml.safe_load(obj["spec"]["serveConfigV2"])["applications"][0]["args"]
    assert (args["metrics_host"], args["metrics_port"]) == ("127.0.0.1", 7007)  # each replica's own /metrics
    assert head["template"]["metadata"]["annotations"]["prometheus.io/port"] == "7007"
    assert [params[k] for k in ("port", "dashboard-port", "ray-client-server-port",
                                "dashboard-agent-listen-port", "metrics-export-port")] == [
        "7001", "7002", "7003", "7004", "7005"]  # fmt: skip
    container = pod["containers"][0]
    assert container["readinessProbe"]["httpGet"] == {"path": "/api/gcs_healthz", "port": 7002}
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0" and env["RAY_USAGE_STATS_ENABLED"] == "0"
    assert yaml.safe_load(obj["spec"]["serveConfigV2"])["http_options"] == {"host": "127.0.0.1", "port": 7006}
    assert kuberay_validate([obj]).returncode == 0

    two_nodes = msgspec.structs.replace(got, nodes=2)
    with pytest.raises(RenderError, match="single-node plans only"):
        rayservice(ref_of(workspace), "kaito.sh/v1alpha1", workspace, two_nodes, config, image=IMAGE,
                   generation=1, host=host)  # fmt: skip

    tuning_path = SEEDS.parent / "local" / "tuning-smollm2.yaml"
    docs = list(yaml.safe_load_all(tuning_path.read_text()))
    tuning = Workspace.model_validate(next(d for d in docs if d and d["kind"] == "Workspace"))
    tuned = plan(tuning, CATALOGS, [], PlanOptions(cloud="azure", provider="local"))
    assert isinstance(tuned, Plan)
    job = rayjob(ref_of(tuning), "kaito.sh/v1alpha1", tuning, tuned, "job-1", image=IMAGE, generation=1,
                 host=host)  # fmt: skip
    job_head = job["spec"]["rayClusterSpec"]["headGroupSpec"]
    assert job_head["template"]["spec"]["hostNetwork"] is True
    assert job_head["rayStartParams"]["node-ip-address"] == "127.0.0.1"
    assert kuberay_validate([job]).returncode == 0


def test_the_head_stops_at_sigterm_and_a_worker_drains_first() -> None:
    """Ray drains its node on SIGTERM for up to 30 s, a pod's whole grace: heads were killed at its end
    (on the node: a Workspace's delete → Ray pods gone 31 s, 2 s without). A head going is its cluster
    going; a worker evicted alone (here one of two data-parallel replicas) keeps the drain."""
    doc = yaml.safe_load((SEEDS / "workspace-phi-3-mini.yaml").read_text())
    doc["resource"]["count"] = 2
    workspace = Workspace.model_validate(doc)
    got = plan(workspace, CATALOGS, [], PlanOptions(cloud="azure", provider="aks"))
    assert isinstance(got, Plan) and got.nodes == 2 and got.data_parallel == 2, got
    obj = render(workspace, got, ref_of(workspace))[0]
    head, worker = ({e["name"]: e.get("value") for e in p["spec"]["containers"][0]["env"]} for p in pods(obj))
    assert head["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] == "0"
    assert "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S" not in worker
    assert kuberay_validate([obj]).returncode == 0


def test_the_model_token_and_the_api_key_reach_the_pods_by_secret_reference_only() -> None:
    """KAITO's key for the model access token (HF_TOKEN, optional as in KAITO), and the serving API key
    from the Secret a Workspace names in kaiten.sh/api-key-secret: references, never values."""
    workspace, got = seed("workspace-phi-3-mini.yaml")
    doc = workspace.model_dump(by_alias=True, exclude_none=True)
    doc["metadata"]["annotations"] = {API_KEY_ANNOTATION: "chat-key"}
    doc["inference"]["preset"]["presetOptions"] = {"modelAccessSecret": "hf-token"}
    workspace = Workspace.model_validate(doc)
    obj = render(workspace, got, ref_of(workspace))[0]
    env = obj["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
    by_name = {e["name"]: e for e in env}
    assert by_name["HF_TOKEN"] == {
        "name": "HF_TOKEN",
        "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "HF_TOKEN", "optional": True}},
    }
    assert by_name["KAITEN_API_KEY"] == {
        "name": "KAITEN_API_KEY",
        "valueFrom": {"secretKeyRef": {"name": "chat-key", "key": "api-key", "optional": False}},
    }
    assert kuberay_validate([obj]).returncode == 0


def test_a_tuning_job_gets_its_own_nats_user_by_secret_reference() -> None:
    """In a cluster the job publishes as the chart's tuning user: the user and its inbox in the config,
    the password in a Secret of the Workspace's namespace, reaching the pods by secretKeyRef only."""
    from services.tuning.job import NATS_PASSWORD_ENV
    from services.workload import manifests

    assert manifests.NATS_PASSWORD_ENV == NATS_PASSWORD_ENV  # what the render sets is what the job reads
    workspace, got = seed("workspace-tuning-phi-3.yaml")
    ref = ref_of(workspace)
    config = tuning_config(
        workspace, got, ref, 1, sections={}, push_secret=PUSH_SECRET_PATH, nats_url="nats://bus:4222",
        work_dir="/w", allow_loopback_urls=False, nats_user="tuning",
    )  # fmt: skip
    parsed = TuningJobConfig.model_validate(config)
    assert (parsed.nats_user, parsed.nats_inbox_prefix, parsed.declare_stream) == (
        "tuning",
        "_INBOX_tuning",
        False,
    )
    secret = manifests.nats_secret(ref, "kaito.sh/v1alpha1", 1, "pw-123")
    assert secret["stringData"] == {"password": "pw-123"} and secret["metadata"]["ownerReferences"]
    job = rayjob(ref, "kaito.sh/v1alpha1", workspace, got, "job-1", image=IMAGE, generation=1,
                 nats_secret=secret["metadata"]["name"])  # fmt: skip
    for pod in pods(job):
        env = {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}
        assert env[NATS_PASSWORD_ENV]["valueFrom"]["secretKeyRef"] == {
            "name": secret["metadata"]["name"], "key": "password", "optional": False,
        }  # fmt: skip
    assert "pw-123" not in json.dumps([config, job])
    assert kuberay_validate([job]).returncode == 0


def test_a_tuning_jobs_input_urls_reach_it_from_a_secret_never_its_configmap(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Issue 16 (9): a dataset URL may carry a credential (a SAS token, user:pass@). In a cluster the
    URLs go into a Secret owned by the Workspace and reach the job by secretKeyRef; its ConfigMap (which
    any reader of the namespace may read) names only the variable."""
    from services.workload import manifests

    workspace, got = seed("workspace-tuning-phi-3.yaml")
    doc = workspace.model_dump(by_alias=True, exclude_none=True)
    sas = "https://data.example.com/c/train.jsonl?sv=2024&sig=SECRETSIG"
    doc["tuning"]["input"] = {"urls": [sas, "https://u:p4ss@data.example.com/more.jsonl"]}
    workspace = Workspace.model_validate(doc)
    ref = ref_of(workspace)
    config = tuning_config(
        workspace, got, ref, 1, sections={}, push_secret=None, nats_url="nats://bus:4222",
        work_dir="/w", allow_loopback_urls=False, urls_env=manifests.INPUT_URLS_ENV,
    )  # fmt: skip
    configmap = manifests.tuning_configmap(ref, "kaito.sh/v1alpha1", config, 1)
    secret = manifests.inputs_secret(ref, "kaito.sh/v1alpha1", 1, list(workspace.tuning.input.urls))
    job = rayjob(ref, "kaito.sh/v1alpha1", workspace, got, "job-1", image=IMAGE, generation=1,
                 inputs_secret=secret["metadata"]["name"])  # fmt: skip
    assert "SECRETSIG" not in json.dumps([configmap, job]) and "p4ss" not in json.dumps([configmap, job])
    assert secret["metadata"]["ownerReferences"][0]["kind"] == "Workspace"
    for pod in pods(job):
        env = {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}
        assert env[manifests.INPUT_URLS_ENV]["valueFrom"]["secretKeyRef"] == {
            "name": secret["metadata"]["name"], "key": "urls", "optional": False,
        }  # fmt: skip
    assert kuberay_validate([job]).returncode == 0

    # what the job reads: the ConfigMap's file, and the variable the Secret fills
    parsed = TuningJobConfig.model_validate(yaml.safe_load(configmap["data"]["job.yaml"]))
    with pytest.raises(ValueError, match="KAITEN_TUNING_INPUT_URLS"):
        parsed.urls()
    monkeypatch.setenv(manifests.INPUT_URLS_ENV, secret["stringData"]["urls"])
    assert parsed.urls() == [sas, "https://u:p4ss@data.example.com/more.jsonl"]


async def test_a_template_workspace_runs_as_kaito_runs_it(
    kubectl: Kubectl, namespace: str, nc: Client, services: Services, kuberay_crds: list[Path]
) -> None:
    """Issue 18: ``inference.template`` (a custom model, no preset) on a bring-your-own node, as KAITO
    runs it: a StatefulSet of the user's pod template pinned to the Workspace's nodes, the Workspace's
    Service (port 80 → the template's port), InferenceReady once every pod is ready (the StatefulSet
    controller's status, written here), and deletion removes both. It was refused after the nodes
    were provisioned (UnsupportedWorkspace)."""
    selector = f"tpl-{namespace}"
    node = f"{namespace}-tpl"
    try:
        add_gpu_node(kubectl, node, selector)
        await services.start_ready("services.watcher", KAITEN_CLEANUP_OWNERS="provisioner,workload")
        await services.start_ready("services.planner", KAITEN_PROVIDER="byo")
        await services.start_ready("services.provisioner", KAITEN_PROVIDER="byo", **FAST)
        await services.start_ready(
            "services.workload", KAITEN_BACKEND="kuberay", KAITEN_RAY_IMAGE=IMAGE, **FAST
        )
        container = {
            "name": "server",
            "image": "registry.invalid/my-model:1",
            "ports": [{"containerPort": 8080}],
            "resources": {"limits": {"nvidia.com/gpu": 1}},
        }
        ws = {"apiVersion": "kaito.sh/v1beta1", "kind": "Workspace", "metadata": {"name": "custom"},
              "resource": {"labelSelector": {"matchLabels": {"apps": selector}}},
              "inference": {"template": {"metadata": {"labels": {"team": "ml"}},
                                         "spec": {"containers": [container]}}}}  # fmt: skip
        kubectl.run("apply", "-n", namespace, "-f", "-", stdin=json.dumps(ws), check=True)

        def statefulsets() -> list[dict[str, Any]]:
            return list(kubectl.json("get", "statefulsets", "-n", namespace)["items"])

        await until(lambda: statefulsets(), timeout=60, what=f"a StatefulSet\n{services.logs()}")
        (sts,) = statefulsets()
        pod = sts["spec"]["template"]
        assert sts["spec"]["replicas"] == 1 and pod["spec"]["containers"][0]["image"] == container["image"]
        assert pod["spec"]["nodeSelector"] == {"apps": selector}
        assert {"key": "sku", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"} in pod["spec"][
            "tolerations"
        ]
        assert (
            pod["metadata"]["labels"]["team"] == "ml"
            and pod["metadata"]["labels"][WORKSPACE_LABEL] == "custom"
        )
        svc = kubectl.json("get", "service", "custom", "-n", namespace)
        assert svc["spec"]["ports"][0]["port"] == 80 and svc["spec"]["ports"][0]["targetPort"] == 8080
        assert svc["spec"]["selector"][WORKSPACE_LABEL] == "custom"
        generation = sts["metadata"]["generation"]
        kuberay_writes(kubectl, namespace, "statefulset", sts["metadata"]["name"],
                       {"observedGeneration": generation, "replicas": 1, "readyReplicas": 1,
                        "updatedReplicas": 1, "availableReplicas": 1})  # fmt: skip
        kubectl.run("wait", "-n", namespace, "--for=condition=InferenceReady", "workspace/custom",
                    "--timeout=60s", check=True)  # fmt: skip
        kubectl.run("delete", "-n", namespace, "workspace/custom", "--timeout=60s", check=True)
        assert (
            kubectl.json("get", "statefulsets,services", "-n", namespace, "-l", WORKSPACE_LABEL)["items"]
            == []
        )
    finally:
        kubectl.run("delete", "node", node, "--wait=false")


def test_statefulset_readiness() -> None:
    def sts(generation: int = 2, observed: int = 2, ready: int = 2, updated: int = 2) -> dict[str, Any]:
        return {"metadata": {"generation": generation, "annotations": {"kaito.sh/generation": "3"}},
                "spec": {"replicas": 2},
                "status": {"observedGeneration": observed, "readyReplicas": ready,
                           "updatedReplicas": updated}}  # fmt: skip

    assert statefulset_state(sts(), 3) == ("ready", "")
    assert statefulset_state(sts(), 4)[0] == "pending"  # an earlier Workspace generation is applied
    assert statefulset_state(sts(observed=1), 3)[0] == "pending"
    assert statefulset_state(sts(ready=1), 3) == ("pending", "1 of 2 pod(s) ready")
    assert statefulset_state(sts(updated=1), 3)[0] == "pending"  # a rollout not done


@pytest.mark.controlplane
async def test_a_tuning_job_on_a_tls_bus_gets_its_ca_in_its_configmap(
    api: kclient.ApiClient, kuberay_crds: list[Path], kubectl: Kubectl, namespace: str
) -> None:
    """The bus's CA (public) goes where the job's config is (its ConfigMap, mounted at CONFIG_PATH), and
    the config names that file: a job in any namespace trusts the bus without the services' Secret."""
    from services.workload.manifests import CONFIG_PATH, NATS_CA_KEY

    ca = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    backend = KubeRay(api, image=IMAGE, nats_url="tls://kaiten-nats.kaiten-system:4222", nats_ca=ca)
    workspace, got = seed("workspace-tuning-phi-3.yaml")
    ref = ref_of(workspace, namespace)
    await backend.submit(target_of(workspace, got, ref, 1), {})
    configmaps = kubectl.json("get", "configmaps", "-n", namespace, "-l", "kaito.sh/workspace")["items"]
    assert [c["data"][NATS_CA_KEY] for c in configmaps] == [ca]
    config = TuningJobConfig.model_validate(yaml.safe_load(configmaps[0]["data"]["job.yaml"]))
    assert config.nats_ca_file == f"{CONFIG_PATH}/{NATS_CA_KEY}"
    job = kubectl.json("get", "rayjobs", "-n", namespace)["items"][0]
    mounts = pods(job)[0]["spec"]["containers"][0]["volumeMounts"]
    assert {"name": "tuning-config", "mountPath": CONFIG_PATH, "readOnly": True} in mounts
