"""Build a kubernetes-asyncio ApiClient from a kubeconfig or the in-cluster service account."""

from __future__ import annotations

import os

from kubernetes_asyncio import client, config


async def api_client(kubeconfig: str | None = None) -> client.ApiClient:
    """``kubeconfig`` (or $KUBECONFIG) if given, else the in-cluster configuration."""
    path = kubeconfig or os.environ.get("KUBECONFIG")
    if path:
        return await config.new_client_from_config(config_file=path, persist_config=False)
    config.load_incluster_config()  # type: ignore[no-untyped-call]
    return client.ApiClient()
