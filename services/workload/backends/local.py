"""``local``: the local Ray cluster of ``kaiten up``, through Ray's own REST APIs on the dashboard
(token auth): Serve applications (``/api/serve/applications/``, declarative: a PUT carries every
application, so ours is merged into what is deployed) and Ray Jobs (``/api/jobs/``, with the
Workspace-derived submission id as idempotency key)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any, Literal

import httpx

from shared.bus.errors import Transient

log = logging.getLogger("kaiten.workload.local")
State = Literal["pending", "ready", "failed", "absent"]


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

    async def submit(self, submission_id: str, entrypoint: str) -> None:
        body = {"entrypoint": entrypoint, "submission_id": submission_id, "metadata": {"kaiten": "tuning"}}
        response = await self._ray.request("POST", "/api/jobs/", json=body)
        if response.status_code == 200 or "already exists" in response.text:
            return  # a redelivery, restart or second replica: the id is the idempotency key
        raise Transient(
            f"Ray refused job {submission_id}: HTTP {response.status_code}: {response.text[:300]}"
        )

    async def status(self, submission_id: str) -> tuple[str, str]:
        """(PENDING | RUNNING | SUCCEEDED | FAILED | STOPPED | ABSENT, message)."""
        response = await self._ray.request("GET", f"/api/jobs/{submission_id}")
        if response.status_code == 404:
            return "ABSENT", ""
        response.raise_for_status()
        doc = response.json()
        return str(doc.get("status", "")), str(doc.get("message") or "")

    async def stop(self, submission_id: str) -> bool:
        """Stop the job if it runs; True once it is not running."""
        state, _ = await self.status(submission_id)
        if state in ("ABSENT", "SUCCEEDED", "FAILED", "STOPPED"):
            return True
        await self._ray.request("POST", f"/api/jobs/{submission_id}/stop")
        state, _ = await self.status(submission_id)
        return state in ("SUCCEEDED", "FAILED", "STOPPED")
