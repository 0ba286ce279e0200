"""The adapter as an OCI artifact: pushed with oras to ``registry/repo:tag``, authenticated with the
docker-config-json push secret mounted into the job (basic auth; the secret's content is never logged)."""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger("kaiten.tuning.push")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


class PushError(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def registry_of(image: str) -> str:
    first = image.split("/", 1)[0]
    if "/" not in image or not ("." in first or ":" in first or first == "localhost"):
        raise PushError("InvalidImage", f"{image!r}: name a registry host, e.g. myacr.azurecr.io/adapter:1")
    return first


def credentials(secret: str | None, registry: str) -> tuple[str, str] | None:
    """(user, password) for ``registry`` from a docker config json file, if it has them."""
    if not secret:
        return None
    path = Path(secret)
    if path.is_dir():  # a mounted Secret volume: the key is .dockerconfigjson
        path = path / ".dockerconfigjson"
    try:
        auths = json.loads(path.read_text()).get("auths", {})
    except (OSError, ValueError) as exc:
        raise PushError(
            "InvalidPushSecret", f"push secret {path.name}: not a docker config json ({exc})"
        ) from exc
    entry = auths.get(registry) or auths.get(f"https://{registry}") or auths.get(f"http://{registry}")
    if entry is None:
        raise PushError("InvalidPushSecret", f"the push secret has no credentials for {registry}")
    if "auth" in entry:
        user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
        return user, password
    return str(entry.get("username", "")), str(entry.get("password", ""))


@contextlib.contextmanager
def _cwd(path: Path) -> Iterator[None]:
    before = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def client(image: str, secret: str | None, insecure: bool):  # type: ignore[no-untyped-def]
    import oras.client

    registry = registry_of(image)
    oras_client = oras.client.OrasClient(hostname=registry, insecure=insecure, auth_backend="basic")
    creds = credentials(secret, registry)
    if creds is not None:
        oras_client.auth.set_basic_auth(*creds)  # not login(): that writes ~/.docker/config.json
    return oras_client


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
    """Push the adapter files; returns the manifest digest."""
    missing = [f for f in ADAPTER_FILES if not (adapter_dir / f).is_file()]
    if missing:
        raise PushError("AdapterMissing", f"{adapter_dir}: no {', '.join(missing)}")
    oras_client = client(image, secret, insecure)
    try:
        with _cwd(adapter_dir):  # so the layers are titled by bare file names
            response = oras_client.push(target=image, files=list(ADAPTER_FILES))
    except Exception as exc:  # oras raises ValueError / requests errors with the registry's answer
        text = str(exc)
        reason = (
            "PushUnauthorized"
            if any(w in text.lower() for w in ("401", "unauthorized", "denied"))
            else "PushFailed"
        )
        raise PushError(reason, f"push to {image}: {text[:300]}") from exc
    digest = response.headers.get("Docker-Content-Digest", "") if response is not None else ""
    log.info("pushed %s (%s)", image, digest or "no digest")
    return str(digest)


def pull(image: str, outdir: Path, secret: str | None, *, insecure: bool = False) -> list[Path]:
    oras_client = client(image, secret, insecure)
    outdir.mkdir(parents=True, exist_ok=True)
    return [Path(p) for p in oras_client.pull(target=image, outdir=str(outdir))]
