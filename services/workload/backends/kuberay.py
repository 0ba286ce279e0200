"""``kuberay``: the workload as KubeRay objects in the cluster (rendered by
:mod:`services.workload.manifests`), applied with server-side apply (field manager ``kaiten``, forced:
kaiten owns these objects), their readiness read from the status KubeRay writes.

- RayService is ready when KubeRay has observed its current generation, its ``Ready`` condition is
  true, no upgrade is in progress and every application is RUNNING; an application in DEPLOY_FAILED or
  UNHEALTHY, or an ``InitializingTimeout``, is a failure with KubeRay's message. Older KubeRay without
  conditions: ``serviceStatus: Running``.
- RayJob succeeded when ``jobDeploymentStatus`` is Complete **and** ``jobStatus`` is SUCCEEDED (older
  KubeRay marks a failed job Complete too).
- The Workspace's Service follows KubeRay's active Ray cluster (``status.activeServiceStatus``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Collection
from typing import Any

from kubernetes_asyncio import client as kclient
from kubernetes_asyncio.client.exceptions import ApiException

from services.workload.backends.base import JobState, State, Target
from services.workload.manifests import (
    CONFIG_PATH,
    GENERATION_ANNOTATION,
    INPUT_PATH,
    INPUT_URLS_ENV,
    NAMESPACE_LABEL,
    NATS_CA_KEY,
    OUTPUT_PATH,
    PULL_SECRETS_PATH,
    PUSH_SECRET_PATH,
    WORK_PATH,
    WORKSPACE_LABEL,
    AdminPeers,
    HostNetwork,
    inputs_secret,
    inputs_secret_name,
    label_value,
    load_balanced,
    nats_secret,
    nats_secret_name,
    network_policy,
    object_name,
    rayjob,
    rayservice,
    service,
    template_port,
    template_service,
    template_statefulset,
    tuning_configmap,
    tuning_names,
)
from services.workload.render import tuning_config
from shared import logs, telemetry
from shared.bus.callout import workspace_password, workspace_user
from shared.errors import InvalidInput
from shared.kube.errors import api_message, classify

log = logging.getLogger(__name__)
APPLY = "application/apply-patch+yaml"
FIELD_MANAGER = "kaiten"
GROUP, VERSION = "ray.io", "v1"
PLURALS = {"RayService": "rayservices", "RayJob": "rayjobs"}
ALL_KINDS = frozenset({*PLURALS, "Service", "ConfigMap", "StatefulSet", "NetworkPolicy"})


class KubeRay:
    name = "kuberay"

    def __init__(
        self,
        api: kclient.ApiClient,
        *,
        image: str,
        nats_url: str,
        host: HostNetwork | None = None,
        admin: AdminPeers | None = None,
        tuning_key: str | None = None,
        nats_ca: str | None = None,
    ) -> None:
        self._api = api
        self._host = host
        self._admin = admin  # None: no NetworkPolicy (a cluster whose network enforces none)
        self._net = kclient.NetworkingV1Api(api)
        self._apps = kclient.AppsV1Api(api)
        # what each tuning job's own bus password is made from (shared.bus.callout); None: no reports
        self._tuning_key = tuning_key
        self._custom = kclient.CustomObjectsApi(api)
        self._core = kclient.CoreV1Api(api)
        self._image = image
        self._nats_url = nats_url
        self._nats_ca = nats_ca  # a TLS bus's CA (PEM), given to tuning jobs in their ConfigMap

    # -- objects --------------------------------------------------------------------------------------

    async def apply(self, obj: dict[str, Any], *, quiet: bool = False) -> dict[str, Any]:
        """Server-side apply of one object we own; returns what the apiserver stored (``quiet``: {},
        for a Secret, whose stored data must not linger in memory or logs)."""
        meta, kind = obj["metadata"], obj["kind"]
        common: dict[str, Any] = {
            "field_manager": FIELD_MANAGER,
            "force": True,  # kaiten owns these objects
            "field_validation": "Strict",  # an unknown field is an error, not silently pruned
            "_content_type": APPLY,
        }
        # _preload_content=False: the generated client maps only HTTP 200 (an apply that creates answers
        # 201, which it returns as None), and its typed models drop fields they do not know
        try:
            if kind in PLURALS:
                response = await self._custom.patch_namespaced_custom_object(
                    GROUP, VERSION, meta["namespace"], PLURALS[kind], meta["name"], obj,
                    _preload_content=False, **common,
                )  # fmt: skip
            elif kind in ("Service", "ConfigMap", "NetworkPolicy", "Secret", "StatefulSet"):
                patch = {
                    "Service": self._core.patch_namespaced_service,
                    "ConfigMap": self._core.patch_namespaced_config_map,
                    "Secret": self._core.patch_namespaced_secret,
                    "NetworkPolicy": self._net.patch_namespaced_network_policy,
                    "StatefulSet": self._apps.patch_namespaced_stateful_set,
                }[kind]
                response = await patch(meta["name"], meta["namespace"], obj, _preload_content=False, **common)
            else:
                raise ValueError(f"kaiten does not apply {kind}")
            data = await response.read()
            if not 200 <= response.status <= 299:  # unread responses are not checked by the client
                error = ApiException(status=response.status, reason=response.reason)
                error.body, error.headers = data.decode(errors="replace"), response.headers
                raise error
            return {} if quiet else dict(json.loads(data))
        except ApiException as exc:
            what = f"apply {kind} {meta['namespace']}/{meta['name']}"
            if exc.status == 500 and "failed to create typed patch object" in str(exc.body):
                # the apiserver answers 500 when an apply does not fit the schema: it never will
                raise InvalidInput(f"{what}: {api_message(exc, 600)}", reason="InvalidWorkload") from exc
            raise classify(exc, what) from exc

    async def _get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            if kind in PLURALS:
                obj = await self._custom.get_namespaced_custom_object(
                    GROUP, VERSION, namespace, PLURALS[kind], name
                )
                return dict(obj)
            if kind == "StatefulSet":
                sts = await self._apps.read_namespaced_stateful_set(name, namespace)
                return dict(self._api.sanitize_for_serialization(sts))
            svc = await self._core.read_namespaced_service(name, namespace)
            return dict(self._api.sanitize_for_serialization(svc))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise classify(exc, f"read {kind} {namespace}/{name}") from exc

    def _selector(self, target: Target) -> str:
        return f"{WORKSPACE_LABEL}={label_value(target.ref.name)},{NAMESPACE_LABEL}={target.ref.namespace}"

    async def _ours(self, target: Target, kinds: Collection[str] = ALL_KINDS) -> list[tuple[str, str]]:
        """(kind, name) of every object of this Workspace (of ``kinds``) that still exists. Each kind is a
        LIST by label, which the apiserver answers by scanning the namespace: only the kinds asked for."""
        ns, selector = target.ref.namespace, self._selector(target)
        found: list[tuple[str, str]] = []
        try:
            for kind, plural in PLURALS.items():
                if kind in kinds:
                    items = await self._custom.list_namespaced_custom_object(
                        GROUP, VERSION, ns, plural, label_selector=selector
                    )
                    found += [(kind, i["metadata"]["name"]) for i in items.get("items", [])]
            if "Service" in kinds:
                services = await self._core.list_namespaced_service(ns, label_selector=selector)
                found += [("Service", s.metadata.name) for s in services.items]
            if "ConfigMap" in kinds:
                maps = await self._core.list_namespaced_config_map(ns, label_selector=selector)
                found += [("ConfigMap", m.metadata.name) for m in maps.items]
            if "StatefulSet" in kinds:
                sets = await self._apps.list_namespaced_stateful_set(ns, label_selector=selector)
                found += [("StatefulSet", m.metadata.name) for m in sets.items]
            if self._admin is not None and "NetworkPolicy" in kinds:
                policies = await self._net.list_namespaced_network_policy(ns, label_selector=selector)
                found += [("NetworkPolicy", n.metadata.name) for n in policies.items]
        except ApiException as exc:
            raise classify(exc, f"[{target.ref.key}] list workload objects") from exc
        return found

    async def _delete(self, kind: str, namespace: str, name: str) -> None:
        # Background: the object goes now, what KubeRay made from it (RayClusters, pods) after it
        body = kclient.V1DeleteOptions(propagation_policy="Background")
        try:
            if kind in PLURALS:
                await self._custom.delete_namespaced_custom_object(
                    GROUP, VERSION, namespace, PLURALS[kind], name, body=body
                )
            elif kind == "Service":
                await self._core.delete_namespaced_service(name, namespace, body=body)
            elif kind == "NetworkPolicy":
                await self._net.delete_namespaced_network_policy(name, namespace, body=body)
            elif kind == "Secret":
                await self._core.delete_namespaced_secret(name, namespace, body=body)
            elif kind == "StatefulSet":
                await self._apps.delete_namespaced_stateful_set(name, namespace, body=body)
            else:
                await self._core.delete_namespaced_config_map(name, namespace, body=body)
        except ApiException as exc:
            if exc.status != 404:
                raise classify(exc, f"delete {kind} {namespace}/{name}") from exc

    async def _fence(self, target: Target) -> None:
        """The Workspace's NetworkPolicy, before its Ray pods exist."""
        if self._admin is not None:
            public = target.workspace is not None and load_balanced(target.workspace)
            await self.apply(
                network_policy(
                    target.ref, target.api_version, target.generation, self._admin, public_serve=public
                )
            )

    # -- inference ------------------------------------------------------------------------------------

    async def deploy(self, target: Target, config: dict[str, Any]) -> None:
        assert target.workspace is not None and target.plan is not None
        for adapter in config.get("adapters", []):  # Secret names → where their volumes are mounted
            adapter["pull_secrets"] = [f"{PULL_SECRETS_PATH}/{s}" for s in adapter.get("pull_secrets", [])]
        ref, version, generation = target.ref, target.api_version, target.generation
        rs = rayservice(
            ref,
            version,
            target.workspace,
            target.plan,
            config,
            image=self._image,
            generation=generation,
            host=self._host,
            env=telemetry.forwarded_env("serving"),
        )
        current = await self._get("Service", ref.namespace, object_name(ref.name, limit=63))
        cluster = (current or {}).get("spec", {}).get("selector", {}).get("ray.io/cluster")
        await self._fence(target)
        await self.apply(rs)
        await self.apply(
            service(ref, version, generation, cluster, load_balancer=load_balanced(target.workspace))
        )
        logs.of(log, ref).info("gen %d: RayService %s applied", generation, rs["metadata"]["name"])

    async def deploy_template(self, target: Target) -> None:
        """KAITO's template inference: a StatefulSet of the template on the planned nodes, and the
        Workspace's Service (port 80 → the template's port)."""
        assert target.workspace is not None and target.plan is not None
        ref, version, generation = target.ref, target.api_version, target.generation
        sts = template_statefulset(ref, version, target.workspace, target.plan, generation)
        # no NetworkPolicy: it fences Ray's dashboard, and would close the template's own port
        await self.apply(sts)
        port = template_port(target.workspace)
        lb = load_balanced(target.workspace)
        await self.apply(template_service(ref, version, generation, port, load_balancer=lb))
        logs.of(log, ref).info("gen %d: StatefulSet %s applied", generation, sts["metadata"]["name"])

    async def status(self, target: Target) -> tuple[State, str]:
        ref = target.ref
        if target.template:
            sts = await self._get("StatefulSet", ref.namespace, object_name(ref.name))
            return ("absent", "") if sts is None else statefulset_state(sts, target.generation)
        obj = await self._get("RayService", ref.namespace, object_name(ref.name))
        if obj is None:
            return "absent", ""
        state, message = rayservice_state(obj, target.generation)
        cluster = obj.get("status", {}).get("activeServiceStatus", {}).get("rayClusterName")
        if cluster:  # keep the Workspace's Service on the cluster KubeRay routes to
            svc = await self._get("Service", ref.namespace, object_name(ref.name, limit=63))
            if svc is None or svc.get("spec", {}).get("selector", {}).get("ray.io/cluster") != cluster:
                # kaito.sh/enablelb, from the spec when this pass has it, else the type deploy gave it
                lb = (
                    load_balanced(target.workspace)
                    if target.workspace is not None
                    else (svc or {}).get("spec", {}).get("type") == "LoadBalancer"
                )
                routed = service(ref, target.api_version, target.generation, cluster, load_balancer=lb)
                await self.apply(routed)
                logs.of(log, ref).info("Service now routes to Ray cluster %s", cluster)
        return state, message

    def endpoint(self, target: Target) -> str:
        return f"http://{object_name(target.ref.name, limit=63)}.{target.ref.namespace}.svc"

    # -- tuning ---------------------------------------------------------------------------------------

    async def submit(self, target: Target, sections: dict[str, Any]) -> None:
        assert (
            target.workspace is not None and target.plan is not None and target.workspace.tuning is not None
        )
        ref, version, generation = target.ref, target.api_version, target.generation
        tuning = target.workspace.tuning
        urls = list(tuning.input.urls)
        # the job's own user on the bus (its password made from the tuning key); no key: no reports
        user = workspace_user(ref.namespace, ref.name) if self._tuning_key else None
        config = tuning_config(
            target.workspace,
            target.plan,
            ref,
            generation,
            sections=sections,
            push_secret=PUSH_SECRET_PATH if tuning.output.image_push_secret else None,
            nats_url=self._nats_url,
            work_dir=f"{WORK_PATH}/job",
            allow_loopback_urls=False,
            nats_user=user,
            urls_env=INPUT_URLS_ENV if urls else None,
            trace=telemetry.carrier(),
            # a volume or a data image: mounted there (manifests.tuning_data)
            input_directory=None if urls else INPUT_PATH,
            output_directory=OUTPUT_PATH if tuning.output.volume_source is not None else None,
            nats_ca_file=f"{CONFIG_PATH}/{NATS_CA_KEY}" if self._nats_ca else None,
        )
        secret = None
        if self._tuning_key and user:
            secret = nats_secret(ref, version, generation, workspace_password(self._tuning_key, user))
        inputs = inputs_secret(ref, version, generation, urls) if urls else None
        job = rayjob(
            ref,
            version,
            target.workspace,
            target.plan,
            target.job,
            image=self._image,
            generation=generation,
            host=self._host,
            nats_secret=secret["metadata"]["name"] if secret else None,
            inputs_secret=inputs["metadata"]["name"] if inputs else None,
            env=telemetry.forwarded_env("tuning"),  # its spans go where ours go
        )
        await self._fence(target)
        if secret is not None:
            await self.apply(secret, quiet=True)
        if inputs is not None:
            await self.apply(inputs, quiet=True)
        await self.apply(tuning_configmap(ref, version, config, generation, nats_ca=self._nats_ca))
        await self.apply(job)
        current = set(tuning_names(ref, generation))
        for kind, name in await self._ours(target):  # an earlier generation's job: replaced
            if kind in ("RayJob", "ConfigMap") and name not in current:
                await self._delete(kind, ref.namespace, name)
                logs.of(log, ref).info("%s %s of an earlier generation deleted", kind, name)
        logs.of(log, ref).info("gen %d: RayJob %s applied", generation, job["metadata"]["name"])

    async def job_status(self, target: Target) -> tuple[JobState, str]:
        name, _ = tuning_names(target.ref, target.generation)
        obj = await self._get("RayJob", target.ref.namespace, name)
        if obj is None:
            return "ABSENT", ""
        return rayjob_state(obj)

    # -- removal --------------------------------------------------------------------------------------

    async def remove(self, target: Target) -> bool:
        found = await self._ours(target)
        for kind, name in found:
            await self._delete(kind, target.ref.namespace, name)
        # Secrets by name: the workload may not list them (both are owned by the Workspace as well)
        if self._tuning_key is not None:
            await self._delete("Secret", target.ref.namespace, nats_secret_name(target.ref))
        await self._delete("Secret", target.ref.namespace, inputs_secret_name(target.ref))
        # gone? only the kinds just deleted (nothing new is made for a Workspace being deleted)
        return not found or not await self._ours(target, {kind for kind, _ in found})

    async def close(self) -> None:
        return None


def _condition(obj: dict[str, Any], kind: str) -> dict[str, Any]:
    for condition in obj.get("status", {}).get("conditions") or []:
        if condition.get("type") == kind:
            return dict(condition)
    return {}


def rayservice_state(obj: dict[str, Any], generation: int) -> tuple[State, str]:
    """A RayService's state for Workspace ``generation`` (see the module doc)."""
    meta, status = obj.get("metadata", {}), obj.get("status") or {}
    if meta.get("annotations", {}).get(GENERATION_ANNOTATION) != str(generation):
        return "pending", "an earlier generation is applied"
    apps: dict[str, Any] = {}
    for which in ("pendingServiceStatus", "activeServiceStatus"):
        apps.update((status.get(which) or {}).get("applicationStatuses") or {})
    for name, app in apps.items():
        if app.get("status") in ("DEPLOY_FAILED", "UNHEALTHY"):
            return "failed", f"application {name} {app['status']}: {str(app.get('message') or '')[:800]}"
    ready = _condition(obj, "Ready")
    if ready.get("reason") == "InitializingTimeout":
        return "failed", str(ready.get("message") or "the RayService did not initialize in time")[:800]
    if status.get("observedGeneration", 0) < meta.get("generation", 0):
        return "pending", "KubeRay has not observed the latest spec"
    if _condition(obj, "UpgradeInProgress").get("status") == "True":
        return "pending", "upgrade in progress (new Ray cluster)"
    is_ready = ready.get("status") == "True" if ready else status.get("serviceStatus") == "Running"
    active = (status.get("activeServiceStatus") or {}).get("applicationStatuses") or {}
    if is_ready and active and all(a.get("status") == "RUNNING" for a in active.values()):
        return "ready", ""
    states = ", ".join(f"{n} {a.get('status', '?')}" for n, a in active.items()) or "no application yet"
    return "pending", states


def statefulset_state(obj: dict[str, Any], generation: int) -> tuple[State, str]:
    """A template's StatefulSet for Workspace ``generation``: ready when the controller has seen its
    spec and every replica of it is updated and ready (as KAITO reads it)."""
    meta, status = obj.get("metadata", {}), obj.get("status") or {}
    if meta.get("annotations", {}).get(GENERATION_ANNOTATION) != str(generation):
        return "pending", "an earlier generation is applied"
    if status.get("observedGeneration", 0) < meta.get("generation", 0):
        return "pending", "the StatefulSet controller has not observed the latest spec"
    want = int((obj.get("spec") or {}).get("replicas", 1))
    ready, updated = int(status.get("readyReplicas") or 0), int(status.get("updatedReplicas") or 0)
    if ready >= want and updated >= want:
        return "ready", ""
    return "pending", f"{ready} of {want} pod(s) ready"


def rayjob_state(obj: dict[str, Any]) -> tuple[JobState, str]:
    status = obj.get("status") or {}
    deployment, job = status.get("jobDeploymentStatus", ""), status.get("jobStatus", "")
    message = str(status.get("message") or status.get("reason") or "")[:800]
    if deployment == "Complete" and job == "SUCCEEDED":
        return "SUCCEEDED", ""
    if deployment in ("Failed", "ValidationFailed") or (deployment == "Complete" and job == "FAILED"):
        return "FAILED", message or f"jobDeploymentStatus {deployment}, jobStatus {job or 'unknown'}"
    if job == "STOPPED" and deployment in ("Complete", "Failed"):
        return "STOPPED", message
    if job == "RUNNING" or deployment == "Running":
        return "RUNNING", ""
    return "PENDING", message
