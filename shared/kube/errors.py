"""Map apiserver errors onto the bus error taxonomy, with scrubbed, truncated bodies."""

from __future__ import annotations

import json

from kubernetes_asyncio.client.exceptions import ApiException

from shared.errors import InvalidInput, Transient


def api_message(exc: ApiException, limit: int = 300) -> str:
    """The apiserver's ``message`` (never the raw body, which may echo a request), truncated."""
    try:
        message = str(json.loads(exc.body or "{}").get("message") or exc.reason)
    except (ValueError, AttributeError):
        message = str(exc.reason)
    return message[:limit]


def classify(exc: ApiException, what: str) -> Exception:
    """409/429/5xx, timeouts and an unreachable apiserver (status 0, ``shared.kube.client``) are
    transient; 4xx validation errors are invalid input."""
    status = exc.status or 0
    text = f"{what}: HTTP {status}: {api_message(exc)}"
    if status in (409, 429) or status >= 500 or status == 0:
        retry_after = None
        if exc.headers and exc.headers.get("Retry-After", "").isdigit():
            retry_after = float(exc.headers["Retry-After"])
        return Transient(text, retry_after=retry_after)
    if status in (400, 422):
        return InvalidInput(text, reason="Invalid")
    return Transient(text)
