"""The adapter as an OCI artifact: pushed with oras to ``registry/repo:tag``, authenticated with the
docker-config-json push secret mounted into the job (basic auth; the secret's content is never logged)."""

from __future__ import annotations

import logging
from pathlib import Path

from shared.oci import ADAPTER_FILES, OciError, credentials, push_adapter, refused, registry_of

log = logging.getLogger(__name__)


PushError = OciError  # the job reports its ``reason`` (InvalidPushSecret, PushUnauthorized, …)


def check_access(image: str, secret: str | None, *, insecure: bool = False) -> None:
    """Before hours of training: can these credentials reach the registry? Registries that answer
    with a Basic challenge are checked here (a 401 → ``PushUnauthorized``); token-auth registries are
    checked by the push itself."""
    import httpx

    registry = registry_of(image)
    creds = credentials(secret, registry)
    url = f"{'http' if insecure else 'https'}://{registry}/v2/"
    try:
        response = httpx.get(url, auth=creds, timeout=15)
    except httpx.HTTPError as exc:
        raise PushError("RegistryUnreachable", f"{registry}: {exc}") from exc
    challenge = response.headers.get("www-authenticate", "").lower()
    if response.status_code == 401 and challenge.startswith("basic"):
        who = "the push secret's credentials" if creds else "no credentials (no push secret)"
        raise PushError("PushUnauthorized", f"{registry} refused {who} (HTTP 401)")


def push(adapter_dir: Path, image: str, secret: str | None, *, insecure: bool = False) -> str:
    """Push the adapter in KAITO's layout, which KAITO and Kaiten both read (``shared.oci``); returns
    the manifest digest."""
    missing = [f for f in ADAPTER_FILES if not (adapter_dir / f).is_file()]
    if missing:
        raise PushError("AdapterMissing", f"{adapter_dir}: no {', '.join(missing)}")
    try:
        digest = push_adapter(adapter_dir, image, secret, insecure=insecure)
    except PushError:
        raise
    except Exception as exc:  # oras raises ValueError / requests errors with the registry's answer
        text = str(exc)
        reason = "PushUnauthorized" if refused(text) else "PushFailed"
        raise PushError(reason, f"push to {image}: {text[:300]}") from exc
    log.info("pushed %s (%s)", image, digest or "no digest")
    return digest
