"""Pure rendering for the ``kuberay`` backend: a Workspace, its Plan and its serving / tuning config →
the Kubernetes objects that run it on KubeRay (``ray.io/v1``).

- inference → a ``RayService`` whose Ray head (and, on multi-node plans, worker group) sits on the
  planned nodes: nodeSelector / node affinity from the Workspace's labelSelector, the
  ``sku=gpu:NoSchedule`` toleration, ``nvidia.com/gpu`` = GPUs per node, a memory-backed /dev/shm and
  a model-cache volume; ``serveConfigV2`` runs ``services.serving.app:build`` with the serving config.
  Plus a ``Service`` named after the Workspace, port 80 → Serve's HTTP port, so
  ``curl http://<workspace>/chat`` works as the seed documents show.
- tuning → a ``RayJob`` that runs ``python -m services.tuning --config …`` on a Ray head on the planned
  node, with its config in a ``ConfigMap`` and the push Secret mounted as a volume (never copied).

Every object carries ``kaito.sh/workspace`` labels and a controller ownerReference to the Workspace.
KubeRay refuses RayService / RayJob names longer than 47 characters or that are not DNS-1035 labels;
:func:`object_name` maps any Workspace name onto one, stably.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import importlib.metadata
import ipaddress
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import yaml

from services.workload.render import RenderError, adapter_path, serve_application
from shared.api.workspace import PresetOptions, Workspace
from shared.events import WorkspaceRef
from shared.planning.model import Plan

WORKSPACE_LABEL = "kaito.sh/workspace"
NAMESPACE_LABEL = "kaito.sh/workspacenamespace"
GENERATION_ANNOTATION = "kaito.sh/generation"
MANAGED_BY = {"app.kubernetes.io/managed-by": "kaiten"}
GPU_TOLERATION = {"key": "sku", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"}
MAX_RAY_NAME = 47  # KubeRay: 53 (the longest service suffix) - 6 (the generated cluster suffix)
SERVE_PORT = 8000
REPLICA_METRICS_PORT = 8001  # each serving replica's own /metrics (a scrape through Serve's proxy sees one)
# An API key for /chat and /v1/* (services.serving.api): the Workspace names a Secret of its namespace in
# this annotation; the key is read from the Secret's API_KEY_SECRET_KEY and reaches the replicas as an env.
API_KEY_ANNOTATION = "kaiten.sh/api-key-secret"
API_KEY_ENV = "KAITEN_API_KEY"  # services.serving.auth reads it (a test checks the two agree)
API_KEY_SECRET_KEY = "api-key"  # noqa: S105 (the name of a key in the Secret, not a secret)
# KAITO's "kaito.sh/enablelb": "True" (exactly) makes the Workspace's Service a LoadBalancer, and the
# Serve port then takes traffic from outside the namespace too (network_policy).
ENABLE_LB_ANNOTATION = "kaito.sh/enablelb"
CACHE_PATH = "/var/cache/kaiten"
CONFIG_PATH = "/etc/kaiten/tuning"
PUSH_SECRET_PATH = "/var/run/kaiten/push"  # noqa: S105  (a mount path, not a secret)
PULL_SECRETS_PATH = "/var/run/kaiten/pull"
WORK_PATH = "/var/lib/kaiten/tuning"
INPUT_PATH = "/mnt/data"  # a tuning Workspace's input volume or data image (KAITO's DefaultDataVolumePath)
OUTPUT_PATH = "/mnt/output"  # its output volume (KAITO's DefaultOutputVolumePath)
_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


@functools.cache  # reading package metadata took 2 ms, on every render (a profile at 1000 Workspaces)
def ray_version() -> str:
    """The Ray this project pins: the image must carry the same (KubeRay checks features by it)."""
    try:
        return importlib.metadata.version("ray")
    except importlib.metadata.PackageNotFoundError:
        return "2.52.0"


def object_name(workspace: str, suffix: str = "", limit: int = MAX_RAY_NAME) -> str:
    """A DNS-1035 name of at most ``limit`` characters for ``workspace`` (+ ``suffix``): the name itself
    when it fits, else a readable prefix and a hash of the whole (stable across restarts)."""
    name = f"{workspace}{suffix}"
    if _DNS1035.match(name) and len(name) <= limit:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    cleaned = re.sub(r"[^a-z0-9-]+", "-", workspace.lower()).strip("-")
    if not cleaned or not cleaned[0].isalpha():
        cleaned = f"w-{cleaned}".rstrip("-")
    head = cleaned[: max(1, limit - len(suffix) - len(digest) - 1)].rstrip("-")
    return f"{head}-{digest}{suffix}"


def label_value(value: str) -> str:
    """Label values are at most 63 characters; longer names get a hashed tail."""
    if len(value) <= 63:
        return value
    return f"{value[:54].rstrip('-_.')}-{hashlib.sha256(value.encode()).hexdigest()[:8]}"


def labels(ref: WorkspaceRef) -> dict[str, str]:
    return {WORKSPACE_LABEL: label_value(ref.name), NAMESPACE_LABEL: ref.namespace, **MANAGED_BY}


def owner_reference(ref: WorkspaceRef, api_version: str) -> dict[str, Any]:
    return {
        "apiVersion": api_version,
        "kind": "Workspace",
        "name": ref.name,
        "uid": ref.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(ref: WorkspaceRef, api_version: str, name: str, generation: int) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": ref.namespace,
        "labels": labels(ref),
        "annotations": {GENERATION_ANNOTATION: str(generation)},
        "ownerReferences": [owner_reference(ref, api_version)],
    }


# -- pods ------------------------------------------------------------------------------------------


def _placement(workspace: Workspace, gpus: int) -> dict[str, Any]:
    """nodeSelector, affinity and tolerations that put a pod on the Workspace's planned nodes."""
    selector = workspace.resource.label_selector
    spec: dict[str, Any] = {}
    if selector.match_labels:
        spec["nodeSelector"] = dict(selector.match_labels)
    if selector.match_expressions:
        terms = [
            {"key": e.key, "operator": e.operator, **({"values": list(e.values)} if e.values else {})}
            for e in selector.match_expressions
        ]
        spec["affinity"] = {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [{"matchExpressions": terms}]
                }
            }
        }
    if gpus:
        spec["tolerations"] = [dict(GPU_TOLERATION)]
    return spec


def _volumes(plan: Plan, extra: list[dict[str, Any]]) -> list[dict[str, Any]]:
    shm = {"medium": "Memory"}
    return [
        {"name": "dshm", "emptyDir": shm},
        {"name": "model-cache", "emptyDir": {"sizeLimit": f"{max(plan.disk_gib, 1)}Gi"}},
        *extra,
    ]


def _mounts(extra: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {"name": "dshm", "mountPath": "/dev/shm"},  # noqa: S108  (the pod's own memory-backed volume)
        {"name": "model-cache", "mountPath": CACHE_PATH},
        *extra,
    ]


def _preset_options(workspace: Workspace) -> PresetOptions | None:
    spec = workspace.inference or workspace.tuning
    return spec.preset.preset_options if spec is not None and spec.preset is not None else None


def _env(workspace: Workspace) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": "KAITEN_CACHE_DIR", "value": CACHE_PATH},
        {"name": "HF_HOME", "value": f"{CACHE_PATH}/hf"},
    ]
    options = _preset_options(workspace)
    if options is not None and options.model_access_secret:  # a private model: the token by reference
        # KAITO's key, and optional as in KAITO: a public model needs no token
        env.append(secret_env("HF_TOKEN", options.model_access_secret, "HF_TOKEN", optional=True))
    if secret := workspace.metadata.annotations.get(API_KEY_ANNOTATION):
        env.append(secret_env(API_KEY_ENV, secret, API_KEY_SECRET_KEY))
    return env


def secret_env(name: str, secret: str, key: str, *, optional: bool = False) -> dict[str, Any]:
    """An environment variable read from a Secret's key by the kubelet: a reference, never the value."""
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key, "optional": optional}}}


def _pull_secrets(workspace: Workspace) -> list[dict[str, str]]:
    options = _preset_options(workspace)
    names = list(options.image_pull_secrets) if options is not None else []
    return [{"name": n} for n in dict.fromkeys(names)]


def _container(
    name: str,
    image: str,
    plan: Plan,
    workspace: Workspace,
    mounts: list[dict[str, Any]],
    ports: list[dict[str, Any]] | None = None,
    env: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    gpus = plan.gpus_per_node
    container: dict[str, Any] = {
        "name": name,
        "image": image,
        "env": _env(workspace) + (env or []),
        "volumeMounts": _mounts(mounts),
        "resources": {
            "requests": {"cpu": "1", "memory": "4Gi"},
            "limits": {"nvidia.com/gpu": str(gpus)} if gpus else {},
        },
    }
    if gpus:
        container["resources"]["requests"]["nvidia.com/gpu"] = str(gpus)
    if ports:
        container["ports"] = ports
    return container


def _pod_template(
    ref: WorkspaceRef,
    workspace: Workspace,
    plan: Plan,
    container: dict[str, Any],
    volumes: list[dict[str, Any]],
    init_containers: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "containers": [container],
        "volumes": _volumes(plan, volumes),
        # Secret volumes (push and pull secrets) are root's files, mode 0400: the group lets Ray read them
        "securityContext": {"fsGroup": RAY_GID},
        **_placement(workspace, plan.gpus_per_node),
    }
    if init_containers:
        spec["initContainers"] = init_containers
    if pull := _pull_secrets(workspace):
        spec["imagePullSecrets"] = pull
    return {"metadata": {"labels": labels(ref)}, "spec": spec}


RAY_GID = 100  # the group Ray runs as: our image's (USER 1000:100) and KubeRay's rayproject images

HEAD_PORTS = [
    {"name": "gcs-server", "containerPort": 6379},
    {"name": "dashboard", "containerPort": 8265},
    {"name": "client", "containerPort": 10001},
    {"name": "serve", "containerPort": SERVE_PORT},
]


@dataclass(frozen=True)
class HostNetwork:
    """Ray pods on the node's own network, every listener on ``address``, on these ports.

    For a node without a pod network: the local test node (``kaiten.local.node``), where pods use
    ``hostNetwork`` and must bind 127.0.0.1. KubeRay's defaults would listen on every interface at fixed
    ports, and it has no setting for the node IP, so the rendering says everything: ``node-ip-address``,
    each port in ``rayStartParams`` and as a named container port, usage stats off, and probes of our
    own (HTTP to the dashboard and the agent; KubeRay's need ``wget``, which our image does not carry).
    Single-node plans only: a worker would look the head up by its Service's DNS name.
    """

    address: str = "127.0.0.1"
    gcs: int = 6379
    dashboard: int = 8265
    client: int = 10001
    agent: int = 52365
    metrics: int = 8080
    serve: int = SERVE_PORT
    replica_metrics: int = REPLICA_METRICS_PORT  # not Ray's: each serving replica's own /metrics

    @property
    def serve_host(self) -> str:
        """Where Serve listens: ``address`` when it is loopback (the test node on this machine's
        loopback); else every address of the node, since its Service reaches it at the node's address
        and ``kubectl port-forward`` at localhost (the test node in a network namespace of its own)."""
        return self.address if ipaddress.ip_address(self.address).is_loopback else "0.0.0.0"  # noqa: S104

    def ports(self) -> list[dict[str, Any]]:
        named = {"gcs-server": self.gcs, "dashboard": self.dashboard, "client": self.client,
                 "dashboard-agent": self.agent, "metrics": self.metrics, "serve": self.serve}  # fmt: skip
        return [{"name": name, "containerPort": port} for name, port in named.items()]

    def start_params(self) -> dict[str, str]:
        return {
            "node-ip-address": self.address,
            "dashboard-host": self.address,
            "port": str(self.gcs),
            "dashboard-port": str(self.dashboard),
            "ray-client-server-port": str(self.client),
            "dashboard-agent-listen-port": str(self.agent),
            "metrics-export-port": str(self.metrics),
            "disable-usage-stats": "true",
        }

    def apply(self, container: dict[str, Any], pod: dict[str, Any]) -> None:
        container["ports"] = self.ports()
        container["env"] += [
            {"name": "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "value": "0"},  # keeps the node IP as given
            {"name": "RAY_USAGE_STATS_ENABLED", "value": "0"},
        ]

        def probe(port: int, path: str, **timing: int) -> dict[str, Any]:
            return {"httpGet": {"path": path, "port": port}, "timeoutSeconds": 5, **timing}

        container["readinessProbe"] = probe(self.dashboard, "/api/gcs_healthz", periodSeconds=2)
        container["livenessProbe"] = probe(
            self.agent,
            "/api/local_raylet_healthz",
            initialDelaySeconds=30,
            periodSeconds=5,
            failureThreshold=12,
        )
        pod["spec"]["hostNetwork"] = True
        pod["spec"]["dnsPolicy"] = "ClusterFirstWithHostNet"


def _cluster(
    ref: WorkspaceRef,
    workspace: Workspace,
    plan: Plan,
    image: str,
    volumes: list[dict[str, Any]],
    mounts: list[dict[str, Any]],
    host: HostNetwork | None = None,
    env: list[dict[str, Any]] | None = None,
    init_containers: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A Ray cluster on the planned nodes: the head takes the first node (with its GPUs: a KAITO plan
    has no CPU-only node), a worker group the others."""
    # On SIGTERM Ray drains its node for up to 30 s first, as long as a pod's grace: every head pod was
    # killed at the end of it (a Workspace's delete took 31 s). The head going is the cluster going
    # (deleted, or an old one KubeRay removes after its Service moved): there is nowhere to drain to.
    # A worker keeps Ray's drain: evicted alone, its Serve replica finishes what it was answering.
    head_env = [*(env or []), {"name": "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "value": "0"}]
    head = _container("ray-head", image, plan, workspace, mounts, HEAD_PORTS, head_env)
    template = _pod_template(ref, workspace, plan, head, volumes, init_containers)
    start_params = {"dashboard-host": "0.0.0.0"}  # noqa: S104  (the pod network, in-cluster)
    workers = max(plan.nodes, 1) - 1
    if host is not None:
        if workers:
            raise RenderError("UnsupportedPlan", "Ray on the host network runs single-node plans only")
        host.apply(head, template)
        start_params = host.start_params()
    cluster: dict[str, Any] = {
        "rayVersion": ray_version(),
        "enableInTreeAutoscaling": False,
        # Ray's token auth (Ray >= 2.52): KubeRay makes a Secret named after the cluster holding a random
        # token, gives it to every Ray process as RAY_AUTH_TOKEN and uses it itself. Without the token
        # the dashboard (job submission = code execution) and the GCS refuse; health paths stay open.
        "authOptions": {"mode": "token"},
        "headGroupSpec": {"rayStartParams": start_params, "template": template},
    }
    if workers:
        worker = _container("ray-worker", image, plan, workspace, mounts, env=env)
        cluster["workerGroupSpecs"] = [
            {
                "groupName": "gpu" if plan.gpus_per_node else "cpu",
                "replicas": workers,
                "minReplicas": workers,
                "maxReplicas": workers,
                "rayStartParams": {},
                "template": _pod_template(ref, workspace, plan, worker, volumes, init_containers),
            }
        ]
    return cluster


# -- inference -------------------------------------------------------------------------------------


def pull_secret_volumes(
    names: Iterable[str], prefix: str
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Each pull Secret (docker config json) as a read-only volume, mounted at
    ``PULL_SECRETS_PATH/<name>``, where the puller reads it (``shared.oci``)."""
    unique = list(dict.fromkeys(names))
    volumes = [
        {"name": object_name(f"{prefix}-{n}", limit=63), "secret": {"secretName": n, "defaultMode": 0o400}}
        for n in unique
    ]
    mounts = [
        {"name": v["name"], "mountPath": f"{PULL_SECRETS_PATH}/{n}", "readOnly": True}
        for v, n in zip(volumes, unique, strict=True)
    ]
    return volumes, mounts


def adapter_volumes(workspace: Workspace) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Each adapter pull Secret as a read-only volume (the serving app reads it to pull the image), and
    each volume adapter mounted read-only where KAITO mounts it (``render.adapter_path``)."""
    volumes, mounts = pull_secret_volumes(
        (
            s
            for a in (workspace.inference.adapters if workspace.inference else [])
            for s in a.source.image_pull_secrets
        ),
        "pull",
    )
    for adapter in workspace.inference.adapters if workspace.inference else []:
        if adapter.source.volume_source is not None:
            name = object_name(f"adapter-{adapter.source.name}", limit=63)
            volumes.append({**adapter.source.volume_source, "name": name})
            mounts.append({"name": name, "mountPath": adapter_path(adapter.source.name), "readOnly": True})
    return volumes, mounts


def rayservice(
    ref: WorkspaceRef,
    api_version: str,
    workspace: Workspace,
    plan: Plan,
    config: dict[str, Any],
    *,
    image: str,
    generation: int,
    host: HostNetwork | None = None,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """``env``: variables for the serving replicas (where their traces go).

    Each replica also serves its own ``/metrics`` on ``REPLICA_METRICS_PORT`` of its pod (a named
    container port ``replica-metrics``, and the ``prometheus.io/*`` annotations scrapers look for)."""
    http = {"host": "0.0.0.0", "port": SERVE_PORT}  # noqa: S104  (the Service reaches it)
    metrics_host, metrics_port = "0.0.0.0", REPLICA_METRICS_PORT  # noqa: S104  (the pod's own network)
    if host is not None:
        http = {"host": host.serve_host, "port": host.serve}
        metrics_host, metrics_port = host.address, host.replica_metrics
    config = {**config, "metrics_port": metrics_port, "metrics_host": metrics_host}
    serve_config = {
        "http_options": http,
        "applications": [{**serve_application(ref, config, env), "route_prefix": "/"}],
    }
    volumes, mounts = adapter_volumes(workspace)
    cluster = _cluster(ref, workspace, plan, image, volumes, mounts, host)
    for group in [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]:
        pod = group["template"]
        pod.setdefault("metadata", {}).setdefault("annotations", {}).update(
            {
                "prometheus.io/scrape": "true",
                "prometheus.io/port": str(metrics_port),
                "prometheus.io/path": "/metrics",
            }
        )
        for container in pod["spec"]["containers"]:
            container["ports"] = [
                *container.get("ports", []),
                {"name": "replica-metrics", "containerPort": metrics_port},
            ]
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": _metadata(ref, api_version, object_name(ref.name), generation),
        "spec": {
            "serveConfigV2": yaml.safe_dump(serve_config, sort_keys=False),
            "rayClusterConfig": cluster,
        },
    }


def load_balanced(workspace: Workspace) -> bool:
    """KAITO's rule: the annotation ``kaito.sh/enablelb`` is ``"True"``."""
    return workspace.metadata.annotations.get(ENABLE_LB_ANNOTATION) == "True"


def service(
    ref: WorkspaceRef,
    api_version: str,
    generation: int,
    ray_cluster: str | None = None,
    *,
    load_balancer: bool = False,
) -> dict[str, Any]:
    """The Workspace's own Service: port 80 → Serve. Until KubeRay names the active Ray cluster it
    selects the Workspace's Ray pods whose Serve proxy is up; then that cluster's only, so traffic never
    reaches a cluster that is still being brought up during an upgrade."""
    selector = {WORKSPACE_LABEL: label_value(ref.name), "ray.io/serve": "true"}
    if ray_cluster:
        selector["ray.io/cluster"] = ray_cluster
    return _workspace_service(ref, api_version, generation, selector, "serve", load_balancer)


def _workspace_service(
    ref: WorkspaceRef,
    api_version: str,
    generation: int,
    selector: dict[str, str],
    port: int | str,
    load_balancer: bool,
) -> dict[str, Any]:
    """The Service named after the Workspace, as KAITO's: port 80 → ``port`` of the selected pods."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(ref, api_version, object_name(ref.name, limit=63), generation),
        "spec": {
            "type": "LoadBalancer" if load_balancer else "ClusterIP",
            "selector": selector,
            "ports": [{"name": "http", "port": 80, "targetPort": port, "protocol": "TCP"}],
        },
    }


# -- inference from a custom pod template (as KAITO: a StatefulSet on the planned nodes) -------------

TEMPLATE_PORT = 5000  # KAITO's inference port: the Service's target unless the template names a port


def template_statefulset(
    ref: WorkspaceRef, api_version: str, workspace: Workspace, plan: Plan, generation: int
) -> dict[str, Any]:
    """The user's pod template, run as KAITO runs it: one pod per planned node (a StatefulSet named
    after the Workspace), pinned to the Workspace's nodes (its labelSelector, the GPU taint tolerated),
    labelled as the Workspace's. Everything else in the template is the user's, as given."""
    assert workspace.inference is not None and workspace.inference.template is not None
    template = workspace.inference.template
    pod_meta = copy.deepcopy(template.metadata)
    pod_meta["labels"] = {**(pod_meta.get("labels") or {}), **labels(ref)}
    spec = copy.deepcopy(template.spec)
    placement = _placement(workspace, plan.gpus_per_node)
    spec["nodeSelector"] = {**(spec.get("nodeSelector") or {}), **placement.get("nodeSelector", {})}
    if not spec["nodeSelector"]:
        del spec["nodeSelector"]
    if "affinity" in placement:  # the Workspace decides where it runs, as in KAITO
        spec["affinity"] = placement["affinity"]
    spec["tolerations"] = [*(spec.get("tolerations") or []), *placement.get("tolerations", [])]
    if not spec["tolerations"]:
        del spec["tolerations"]
    name = object_name(ref.name, limit=63)
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": _metadata(ref, api_version, object_name(ref.name), generation),
        "spec": {
            "replicas": max(plan.nodes, 1),
            "serviceName": name,
            "selector": {"matchLabels": labels(ref)},
            "template": {"metadata": pod_meta, "spec": spec},
        },
    }


def template_port(workspace: Workspace) -> int | str:
    """Where the template's server listens: its first container's first port, else KAITO's 5000."""
    assert workspace.inference is not None and workspace.inference.template is not None
    for container in workspace.inference.template.spec.get("containers") or []:
        for port in container.get("ports") or []:
            if "containerPort" in port:
                return int(port["containerPort"])
    return TEMPLATE_PORT


def template_service(
    ref: WorkspaceRef, api_version: str, generation: int, port: int | str, *, load_balancer: bool = False
) -> dict[str, Any]:
    """The Workspace's Service for a template: port 80 → the template's server, on its pods."""
    return _workspace_service(ref, api_version, generation, labels(ref), port, load_balancer)


@dataclass(frozen=True)
class AdminPeers:
    """Who may reach a Ray cluster's dashboard, GCS and client ports besides its own pods: KubeRay's
    operator (it deploys Serve applications and submits jobs through the dashboard), and Kaiten's
    workload service in ``namespace`` (empty: none)."""

    operator_labels: tuple[tuple[str, str], ...] = (("app.kubernetes.io/name", "kuberay-operator"),)
    namespace: str = ""

    def peers(self) -> list[dict[str, Any]]:
        peers: list[dict[str, Any]] = [
            {"namespaceSelector": {}, "podSelector": {"matchLabels": dict(self.operator_labels)}}
        ]
        if self.namespace:
            peers.append(
                {
                    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": self.namespace}},
                    "podSelector": {"matchLabels": {"app.kubernetes.io/component": "workload"}},
                }
            )
        return peers


def network_policy(
    ref: WorkspaceRef, api_version: str, generation: int, admin: AdminPeers, *, public_serve: bool = False
) -> dict[str, Any]:
    """Ingress to the Workspace's Ray pods: Serve and the replicas' metrics from any pod of the
    namespace (Serve from anywhere when ``public_serve``: the Workspace asked for a load balancer);
    the dashboard (job submission is code execution), the GCS and the Ray client port only from
    ``admin``; anything between the Workspace's own Ray pods (workers and head use many ports).
    Named ports, so the same policy fits the pod network's fixed ports and the host network's chosen
    ones."""
    own = {
        "podSelector": {
            "matchLabels": {WORKSPACE_LABEL: label_value(ref.name), NAMESPACE_LABEL: ref.namespace}
        }
    }
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _metadata(ref, api_version, object_name(ref.name, "-ray", limit=253), generation),
        "spec": {
            **own,
            "policyTypes": ["Ingress"],
            "ingress": [
                *([{"ports": [{"port": "serve", "protocol": "TCP"}]}] if public_serve else []),
                {
                    "from": [{"podSelector": {}}],
                    "ports": [{"port": p, "protocol": "TCP"} for p in ("serve", "replica-metrics")],
                },
                {
                    "from": admin.peers(),
                    "ports": [{"port": p, "protocol": "TCP"} for p in ("dashboard", "gcs-server", "client")],
                },
                {"from": [own]},
            ],
        },
    }


# -- tuning ----------------------------------------------------------------------------------------


def tuning_names(ref: WorkspaceRef, generation: int) -> tuple[str, str]:
    """(RayJob name, ConfigMap name) for one generation of a tuning Workspace."""
    job = object_name(ref.name, f"-g{generation}")
    return job, object_name(ref.name, f"-g{generation}-tuning", limit=253)


NATS_CA_KEY = "nats-ca.crt"  # the bus's CA in the job's ConfigMap: mounted at CONFIG_PATH/NATS_CA_KEY


def tuning_configmap(
    ref: WorkspaceRef,
    api_version: str,
    config: dict[str, Any],
    generation: int,
    *,
    nats_ca: str | None = None,
) -> dict[str, Any]:
    """The job's config, and ``nats_ca``, a TLS bus's CA (PEM; public: a ConfigMap is its place)."""
    _, name = tuning_names(ref, generation)
    data = {"job.yaml": yaml.safe_dump(config, sort_keys=False)}
    if nats_ca:
        data[NATS_CA_KEY] = nats_ca
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(ref, api_version, name, generation),
        "data": data,
    }


def rayjob(
    ref: WorkspaceRef,
    api_version: str,
    workspace: Workspace,
    plan: Plan,
    submission_id: str,
    *,
    image: str,
    generation: int,
    host: HostNetwork | None = None,
    nats_secret: str | None = None,
    inputs_secret: str | None = None,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """``nats_secret``: a Secret whose ``password`` is the job's NATS password (see ``nats_secret``);
    ``inputs_secret``: one whose ``urls`` are the input URLs (see ``inputs_secret``); ``env``: plain
    variables for the job (where its traces go)."""
    tuning = workspace.tuning
    if tuning is None:
        raise RenderError("UnsupportedWorkspace", "not a tuning Workspace")
    name, configmap = tuning_names(ref, generation)
    volumes: list[dict[str, Any]] = [
        {"name": "tuning-config", "configMap": {"name": configmap}},
        {"name": "tuning-work", "emptyDir": {}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "tuning-config", "mountPath": CONFIG_PATH, "readOnly": True},
        {"name": "tuning-work", "mountPath": WORK_PATH},
    ]
    plain = [{"name": key, "value": value} for key, value in sorted((env or {}).items())]
    env_list = plain + ([secret_env(NATS_PASSWORD_ENV, nats_secret, NATS_SECRET_KEY)] if nats_secret else [])
    if inputs_secret:
        env_list.append(secret_env(INPUT_URLS_ENV, inputs_secret, INPUT_URLS_KEY))
    if tuning.output.image_push_secret:
        volumes.append(
            {
                "name": "push-secret",
                "secret": {"secretName": tuning.output.image_push_secret, "defaultMode": 0o400},
            }
        )
        mounts.append({"name": "push-secret", "mountPath": PUSH_SECRET_PATH, "readOnly": True})
    data_volumes, data_mounts, init = tuning_data(workspace, image)
    volumes += data_volumes
    mounts += data_mounts
    spec: dict[str, Any] = {
        "entrypoint": f"python -m services.tuning --config {CONFIG_PATH}/job.yaml",
        "jobId": submission_id,
        "shutdownAfterJobFinishes": True,
        "ttlSecondsAfterFinished": 600,
        "rayClusterSpec": _cluster(ref, workspace, plan, image, volumes, mounts, host, env_list, init),
    }
    if host is not None:
        # KubeRay's default submits from a Job pod of its own, which is not on the node's network: on a
        # node without a pod network it reaches nothing. The operator submits over HTTP instead.
        spec["submissionMode"] = "HTTPMode"
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": _metadata(ref, api_version, name, generation),
        "spec": spec,
    }


def tuning_data(
    workspace: Workspace, image: str
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """(volumes, mounts, init containers) for a tuning Workspace's input and output, as KAITO lays
    them out: an input ``volumeSource`` mounted read-only at :data:`INPUT_PATH`; a data image unpacked
    there by an init container (our image's ``python -m shared.oci pull-data``, with the input's pull
    Secrets); an output ``volumeSource`` at :data:`OUTPUT_PATH`. URL inputs and image outputs need none."""
    assert workspace.tuning is not None
    source, destination = workspace.tuning.input, workspace.tuning.output
    volumes: list[dict[str, Any]] = []
    mounts: list[dict[str, Any]] = []
    init: list[dict[str, Any]] = []
    if source.volume_source is not None:
        volumes.append({**source.volume_source, "name": "tuning-input"})
        mounts.append({"name": "tuning-input", "mountPath": INPUT_PATH, "readOnly": True})
    elif source.image:
        volumes.append({"name": "tuning-input", "emptyDir": {}})
        mounts.append({"name": "tuning-input", "mountPath": INPUT_PATH, "readOnly": True})
        secret_volumes, secret_mounts = pull_secret_volumes(source.image_pull_secrets, "data-pull")
        volumes += secret_volumes
        init.append(
            {
                "name": "data-puller",
                "image": image,
                "command": [
                    "python",
                    "-m",
                    "shared.oci",
                    "pull-data",
                    source.image,
                    INPUT_PATH,
                    *(m["mountPath"] for m in secret_mounts),
                ],
                "volumeMounts": [{"name": "tuning-input", "mountPath": INPUT_PATH}, *secret_mounts],
            }
        )
    if destination.volume_source is not None:
        volumes.append({**destination.volume_source, "name": "tuning-output"})
        mounts.append({"name": "tuning-output", "mountPath": OUTPUT_PATH})
    return volumes, mounts, init


NATS_SECRET_KEY = "password"  # noqa: S105 (the name of a key in the Secret, not a secret)
NATS_PASSWORD_ENV = "KAITEN_NATS_PASSWORD"  # noqa: S105 (a variable's name, read by services.tuning.job)


def nats_secret_name(ref: WorkspaceRef) -> str:
    return object_name(ref.name, "-nats", limit=253)


def nats_secret(ref: WorkspaceRef, api_version: str, generation: int, password: str) -> dict[str, Any]:
    """The tuning job's NATS password in the Workspace's namespace (a pod can only refer to Secrets of
    its own namespace). One per Workspace, every generation's job uses it."""
    return _secret(ref, api_version, generation, nats_secret_name(ref), {NATS_SECRET_KEY: password})


INPUT_URLS_KEY = "urls"
INPUT_URLS_ENV = "KAITEN_TUNING_INPUT_URLS"  # read by services.tuning.config (input_urls_env)


def inputs_secret_name(ref: WorkspaceRef) -> str:
    return object_name(ref.name, "-inputs", limit=253)


def inputs_secret(ref: WorkspaceRef, api_version: str, generation: int, urls: list[str]) -> dict[str, Any]:
    """The tuning job's input URLs (a JSON list), kept out of its ConfigMap: a URL may carry a
    credential (a SAS token, ``user:pass@``). One per Workspace."""
    return _secret(ref, api_version, generation, inputs_secret_name(ref), {INPUT_URLS_KEY: json.dumps(urls)})


def _secret(
    ref: WorkspaceRef, api_version: str, generation: int, name: str, data: dict[str, str]
) -> dict[str, Any]:
    """An Opaque Secret of the Workspace, owned by it (so it goes with it)."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _metadata(ref, api_version, name, generation),
        "type": "Opaque",
        "stringData": data,
    }


def canonical(obj: dict[str, Any]) -> str:
    """A stable text of an object (to compare what is applied with what would be)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))
