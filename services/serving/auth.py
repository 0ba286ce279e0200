"""An optional API key for the serving HTTP app's model routes (``/chat``, ``/v1/*``).

The key reaches a replica as the environment variable ``KAITEN_API_KEY`` (the workload renders it from
the Secret a Workspace names in its ``kaiten.sh/api-key-secret`` annotation). Clients send it as
``Authorization: Bearer <key>`` (what the OpenAI client does with ``api_key=``) or ``X-API-Key``.
``/health`` and ``/metrics`` stay open: probes and scrapers carry no key.
"""

from __future__ import annotations

import hmac
import os

API_KEY_ENV = "KAITEN_API_KEY"
OPEN_PATHS = frozenset({"/health", "/metrics"})


def configured_key(explicit: str | None) -> str | None:
    """The app's key if one was given, else the replica's environment's (empty means none)."""
    return explicit if explicit is not None else (os.environ.get(API_KEY_ENV) or None)


def presented_key(authorization: str | None, x_api_key: str | None) -> str | None:
    if authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    return x_api_key or None


def allowed(path: str, expected: str | None, presented: str | None) -> bool:
    if expected is None or path in OPEN_PATHS:
        return True
    return presented is not None and hmac.compare_digest(presented.encode(), expected.encode())
