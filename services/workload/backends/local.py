"""``local``: the local Ray cluster of ``kaiten up``, through Ray's own REST APIs on the dashboard
(token auth): Serve applications (``/api/serve/applications/``, declarative: a PUT carries every
application, so ours is merged into what is deployed) and Ray Jobs (``/api/jobs/``, with the
Workspace-derived submission id as idempotency key)."""

from __future__ import annotations

import asyncio
import base64
import logging
import shutil
import sys
from pathlib import Path
from typing import Any, cast

import httpx
import yaml
from kubernetes_asyncio import client as kclient
from kubernetes_asyncio.client.exceptions import ApiException

from services.workload.backends.base import JobState, State, Target
from services.workload.render import (
    RenderError,
    app_name,
    local_adapter_paths,
    local_paths,
    route_prefix,
    serve_application,
    tuning_config,
)
from shared import logs, telemetry
from shared.errors import Transient
from shared.kube.errors import classify

log = logging.getLogger(__name__)


class LocalRay:
    def __init__(self, dashboard_url: str, token_path: str, serve_port: int) -> None:
        token = Path(token_path).read_text().strip() if token_path else ""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.AsyncClient(base_url=dashboard_url, headers=headers, timeout=30)
        self._serve_port = serve_port
        self._lock = asyncio.Lock()  # one read-merge-write of the Serve config at a time

    @property
    def serve_url(self) -> str:
        return f"http://127.0.0.1:{self._serve_port}"

    async def close(self) -> None:
        await self._http.aclose()

    async def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One dashboard request; connection trouble, 429 and 5xx are :class:`Transient`."""
        try:
            response = await self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise Transient(f"Ray dashboard {method} {path}: {exc!r}") from exc
        if response.status_code >= 500 or response.status_code == 429:
            raise Transient(
                f"Ray dashboard {method} {path}: HTTP {response.status_code}: {response.text[:200]}"
            )
        return response

    async def _applications(self) -> dict[str, Any]:
        response = await self.request("GET", "/api/serve/applications/")
        response.raise_for_status()
        apps: dict[str, Any] = response.json().get("applications") or {}
        return apps

    async def _put(self, applications: list[dict[str, Any]]) -> None:
        body = {"http_options": {"host": "127.0.0.1", "port": self._serve_port}, "applications": applications}
        response = await self.request("PUT", "/api/serve/applications/", json=body)
        if response.status_code >= 400:
            raise Transient(f"Serve rejected the config: HTTP {response.status_code}: {response.text[:300]}")

    async def deploy(self, app: dict[str, Any]) -> None:
        async with self._lock:
            current = await self._applications()
            others = [
                a["deployed_app_config"]
                for name, a in current.items()
                if name != app["name"] and a.get("deployed_app_config")
            ]
            ours = current.get(app["name"], {}).get("deployed_app_config")
            if ours == app:
                return  # already what we want: a redelivery or a restart
            await self._put([*others, app])
            log.info("deployed Serve application %s at %s", app["name"], app["route_prefix"])

    async def status(self, name: str) -> tuple[State, str]:
        app = (await self._applications()).get(name)
        if app is None:
            return "absent", ""
        state = app.get("status", "")
        if state == "RUNNING":
            return "ready", ""
        if state in ("DEPLOY_FAILED", "UNHEALTHY"):
            return "failed", str(app.get("message") or state)[:1000]
        return "pending", state

    async def delete(self, name: str) -> bool:
        async with self._lock:
            current = await self._applications()
            if name not in current:
                return True
            others = [
                a["deployed_app_config"]
                for n, a in current.items()
                if n != name and a.get("deployed_app_config")
            ]
            await self._put(others)
            return name not in await self._applications()


class LocalJobs:
    """Ray Jobs over the dashboard's REST API (the same token)."""

    def __init__(self, ray: LocalRay) -> None:
        self._ray = ray

    async def submit(self, submission_id: str, entrypoint: str, env: dict[str, str] | None = None) -> None:
        body: dict[str, Any] = {
            "entrypoint": entrypoint,
            "submission_id": submission_id,
            "metadata": {"kaiten": "tuning"},
        }
        if env:
            body["runtime_env"] = {"env_vars": env}
        response = await self._ray.request("POST", "/api/jobs/", json=body)
        if response.status_code == 200 or "already exists" in response.text:
            return  # a redelivery, restart or second replica: the id is the idempotency key
        raise Transient(
            f"Ray refused job {submission_id}: HTTP {response.status_code}: {response.text[:300]}"
        )

    async def status(self, submission_id: str) -> tuple[JobState, str]:
        """(PENDING | RUNNING | SUCCEEDED | FAILED | STOPPED | ABSENT, message)."""
        response = await self._ray.request("GET", f"/api/jobs/{submission_id}")
        if response.status_code == 404:
            return "ABSENT", ""
        response.raise_for_status()
        doc = response.json()
        return cast(JobState, str(doc.get("status", "PENDING"))), str(doc.get("message") or "")

    async def stop(self, submission_id: str) -> bool:
        """Stop the job if it runs; True once it is not running."""
        state, _ = await self.status(submission_id)
        if state in ("ABSENT", "SUCCEEDED", "FAILED", "STOPPED"):
            return True
        await self._ray.request("POST", f"/api/jobs/{submission_id}/stop")
        state, _ = await self.status(submission_id)
        return state in ("SUCCEEDED", "FAILED", "STOPPED")


class LocalBackend:
    """The ``local`` backend: Serve applications and Ray jobs on the local Ray cluster. Secrets the
    workloads need (adapter pull secrets, the tuning push secret) are copied from the apiserver into
    files (mode 0600, in a 0700 directory) under the work dir, which deletion removes."""

    name = "local"

    def __init__(
        self,
        ray: LocalRay,
        *,
        api: kclient.ApiClient | None,
        work_dir: Path,
        nats_url: str,
        allow_loopback_urls: bool,
    ) -> None:
        self._ray = ray
        self._jobs = LocalJobs(ray)
        self._core = kclient.CoreV1Api(api) if api is not None else None
        self._work = work_dir
        self._nats_url = nats_url
        self._allow_loopback = allow_loopback_urls

    def _dir(self, target: Target) -> Path:
        return self._work / f"{target.ref.namespace}.{target.ref.name}"

    async def deploy(self, target: Target, config: dict[str, Any]) -> None:
        assert target.workspace is not None
        local_adapter_paths(target.workspace, config)  # volume adapters: hostPath directories
        secrets = self._dir(target) / "pull"
        for adapter in config.get("adapters", []):
            adapter["pull_secrets"] = [
                await self._secret_file(target, name, secrets / name, "InvalidPullSecret")
                for name in adapter.get("pull_secrets", [])
            ]
        await self._ray.deploy(serve_application(target.ref, config, telemetry.forwarded_env("serving")))
        logs.of(log, target.ref).info("gen %d: %s deploying", target.generation, app_name(target.ref))

    async def deploy_template(self, target: Target) -> None:
        raise RenderError(
            "UnsupportedWorkspace",
            "inference.template runs the template's pods on the Workspace's nodes: that needs a cluster "
            "(the kuberay backend); kaiten up serves presets",
        )

    async def status(self, target: Target) -> tuple[State, str]:
        return await self._ray.status(app_name(target.ref))

    def endpoint(self, target: Target) -> str:
        return self._ray.serve_url + route_prefix(target.ref)

    async def submit(self, target: Target, sections: dict[str, Any]) -> None:
        """The job's config (and the push secret, as a 0600 file) on disk, then a Ray job whose
        submission id is derived from the Workspace and generation."""
        assert target.workspace is not None and target.plan is not None
        tuning = target.workspace.tuning
        assert tuning is not None
        work = self._dir(target) / f"g{target.generation}"
        await asyncio.to_thread(work.mkdir, parents=True, exist_ok=True)
        push = (
            await self._secret_file(
                target, tuning.output.image_push_secret, work / "push", "InvalidPushSecret"
            )
            if tuning.output.image_push_secret
            else None
        )
        input_directory, output_directory = local_paths(target.workspace)  # hostPath volumes
        config = tuning_config(
            target.workspace,
            target.plan,
            target.ref,
            target.generation,
            sections=sections,
            push_secret=push,
            nats_url=self._nats_url,
            work_dir=str(work / "job"),
            allow_loopback_urls=self._allow_loopback,
            trace=telemetry.carrier(),
            input_directory=input_directory,
            output_directory=output_directory,
        )
        path = work / "job.yaml"
        await asyncio.to_thread(path.write_text, yaml.safe_dump(config))
        await self._jobs.submit(
            target.job,
            f"{sys.executable} -m services.tuning --config {path}",
            env=telemetry.forwarded_env("tuning"),  # its spans go where ours go
        )

    async def job_status(self, target: Target) -> tuple[JobState, str]:
        return await self._jobs.status(target.job)

    async def remove(self, target: Target) -> bool:
        if target.job and not await self._jobs.stop(target.job):
            return False
        if not await self._ray.delete(app_name(target.ref)):
            return False
        await asyncio.to_thread(shutil.rmtree, self._dir(target), True)  # job configs, secret copies
        return True

    async def close(self) -> None:
        await self._ray.close()

    async def _secret_file(self, target: Target, name: str, directory: Path, reason: str) -> str:
        """The docker config json of Secret ``name``, written for this workload alone (mode 0600)."""
        ref = target.ref
        if self._core is None:
            raise RenderError(reason, f"no Kubernetes API to read Secret {name}")
        try:
            secret = await self._core.read_namespaced_secret(name, ref.namespace)
        except ApiException as exc:
            if exc.status == 404:
                raise RenderError(reason, f"Secret {name} not found in {ref.namespace}") from exc
            raise classify(exc, f"[{ref.key}] read Secret {name}") from exc
        encoded = (secret.data or {}).get(".dockerconfigjson")
        if not encoded:
            raise RenderError(reason, f"Secret {name} has no .dockerconfigjson")

        def write() -> None:
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            target_file = directory / ".dockerconfigjson"
            target_file.write_bytes(base64.b64decode(encoded))
            target_file.chmod(0o600)

        await asyncio.to_thread(write)
        return str(directory)
