"""Build a kubernetes-asyncio ApiClient from a kubeconfig or the in-cluster service account."""

from __future__ import annotations

import os
from typing import Any

import aiohttp
from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException


async def api_client(kubeconfig: str | None = None) -> client.ApiClient:
    """``kubeconfig`` (or $KUBECONFIG) if given, else the in-cluster configuration."""
    path = kubeconfig or os.environ.get("KUBECONFIG")
    if path:
        api = await config.new_client_from_config(config_file=path, persist_config=False)
    else:
        config.load_incluster_config()  # type: ignore[no-untyped-call]
        api = client.ApiClient()
    return unreachable_as_api_errors(api)


def unreachable_as_api_errors(api: client.ApiClient) -> client.ApiClient:
    """An apiserver that cannot be reached (refused, reset, timed out, TLS cut) raises ``ApiException``
    with status 0, like every other apiserver failure, so the one ``except ApiException`` → ``classify``
    path everywhere the client is used turns it into a ``Transient`` error: retried with backoff for as
    long as an outage lasts, never given up as if the request itself were wrong. aiohttp's own errors
    are neither ``ConnectionError`` nor ``ApiException``."""
    request = api.rest_client.request

    async def guarded(*args: Any, **kwargs: Any) -> Any:
        try:
            return await request(*args, **kwargs)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            error = ApiException(status=0, reason=f"apiserver unreachable: {exc!r}"[:300])
            error.body = b""  # the generated client decodes the body of every ApiException it sees
            raise error from exc

    api.rest_client.request = guarded  # type: ignore[method-assign]  # one instance, on purpose
    return api
