"""The planner's Hugging Face hub client: a preset for a model id the catalog does not hold.

It asks what KAITO's preset generator asks (so a mirror that serves KAITO serves Kaiten): the repo's
file list, ``GET <hub>/api/models/<repo>/tree/main?recursive=true``, and its
``GET <hub>/<repo>/resolve/main/config.json``; :func:`shared.planning.hub.preset_from_hub` sizes it.
A preset is kept for ``ttl`` seconds, so a burst of Workspaces naming one model asks once; a refusal
is not kept (the next plan asks again).

The planner reads no Secrets (least privilege), so a gated or private model (401/403) is refused with
what to do instead: put it in the catalog (``KAITEN_CATALOG_FILES``). An unknown id (404) is
``UnknownPreset``. A hub that cannot be reached at all is ``HubUnreachable`` at once (an air-gapped
cluster would otherwise retry for minutes); a 5xx or a timeout is Transient, retried with backoff.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import httpx

from shared.errors import Transient
from shared.planning.catalog import Preset
from shared.planning.hub import HubModelError, preset_from_hub
from shared.planning.model import Rejection

log = logging.getLogger(__name__)
CONNECT_RETRIES = (0.5, 2.0)  # seconds before the second and third try of a refused connection


class Hub:
    def __init__(self, url: str, *, timeout: float = 20.0, ttl: float = 3600.0) -> None:
        self.url = url.rstrip("/")
        self._timeout = timeout
        self._ttl = ttl
        self._known: dict[str, tuple[float, Preset]] = {}
        self._lock = asyncio.Lock()

    async def preset(self, repo: str) -> Preset | Rejection:
        """The preset the hub describes for ``repo``, or why there is none."""
        async with self._lock:  # one fetch per repo at a time; the planner handles one event at a time
            cached = self._known.get(repo)
            if cached is not None and time.monotonic() - cached[0] < self._ttl:
                return cached[1]
            result = await self._fetch(repo)
            if isinstance(result, Preset):
                self._known[repo] = (time.monotonic(), result)
            return result

    async def _fetch(self, repo: str) -> Preset | Rejection:
        async with httpx.AsyncClient(timeout=self._timeout, follow_redirects=True) as client:
            tree = await self._get(client, f"{self.url}/api/models/{repo}/tree/main?recursive=true", repo)
            if isinstance(tree, Rejection):
                return tree
            config = await self._get(client, f"{self.url}/{repo}/resolve/main/config.json", repo)
            if isinstance(config, Rejection):
                return config
        if not isinstance(tree, list) or not isinstance(config, dict):
            return Rejection(reason="UnsupportedModel", message=f"{repo}: the hub's answer is not a model's")
        files = [
            (str(f.get("path", "")), int((f.get("lfs") or {}).get("size") or f.get("size") or 0))
            for f in tree
            if isinstance(f, dict) and f.get("type", "file") == "file"
        ]
        try:
            preset = preset_from_hub(repo, config, files)
        except HubModelError as exc:
            return Rejection(reason=exc.reason, message=str(exc))
        log.info(
            "%s sized from the hub: %.2f GiB of weights, context %d, %d KV bytes per token",
            repo,
            preset.weights / 1024**3,
            preset.context_limit,
            preset.kv_bytes_per_token,
        )
        return preset

    async def _get(self, client: httpx.AsyncClient, url: str, repo: str) -> Any | Rejection:
        for delay in (*CONNECT_RETRIES, None):  # a mirror restarting, a DNS blip: ask again first
            try:
                response = await client.get(url, headers={"accept": "application/json"})
                break
            except httpx.ConnectError as exc:
                if delay is None:
                    return Rejection(
                        reason="HubUnreachable",
                        message=f"{repo} is not in the catalog, and the hub at {self.url} cannot be "
                        f"reached to size it ({exc}); set KAITEN_HUB_URL to a mirror, or add the model to "
                        "the catalog",
                    )
                await asyncio.sleep(delay)
            except httpx.TransportError as exc:  # a timeout or a dropped connection: worth another try
                raise Transient(f"hub {self.url}: {type(exc).__name__}: {exc}") from exc
        if response.status_code in (401, 403):
            return Rejection(
                reason="HubAuthRequired",
                message=f"{repo} is gated or private on {self.url} (HTTP {response.status_code}); the "
                "planner reads no Secrets, so it cannot size it: add the model to the catalog "
                "(KAITEN_CATALOG_FILES)",
            )
        if response.status_code == 404:
            return Rejection(
                reason="UnknownPreset",
                message=f"{repo} is neither a catalog preset nor a model on {self.url}",
            )
        if response.status_code >= 500 or response.status_code == 429:
            raise Transient(f"hub {self.url}: HTTP {response.status_code} for {repo}")
        if response.status_code != 200:
            return Rejection(
                reason="UnsupportedModel", message=f"{repo}: the hub answered HTTP {response.status_code}"
            )
        try:
            return response.json()
        except json.JSONDecodeError:
            return Rejection(reason="UnsupportedModel", message=f"{repo}: the hub's {url} is not JSON")
