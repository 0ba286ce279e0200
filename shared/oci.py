"""OCI artifacts (LoRA adapters) with oras: the registry client, docker-config-json credentials and
pull. The tuning job pushes adapters with it; the serving app pulls them. A secret is a docker config
json file, or a directory holding ``.dockerconfigjson`` (a mounted Secret); its content is never logged."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


class OciError(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def registry_of(image: str) -> str:
    first = image.split("/", 1)[0]
    if "/" not in image or not ("." in first or ":" in first or first == "localhost"):
        raise OciError("InvalidImage", f"{image!r}: name a registry host, e.g. myacr.azurecr.io/adapter:1")
    return first


def is_local(image: str) -> bool:
    """A registry on this machine speaks plain http (the local runs and the tests)."""
    return registry_of(image).startswith(("127.", "localhost", "[::1]"))


def credentials(secret: str | None, registry: str, *, what: str = "push secret") -> tuple[str, str] | None:
    """(user, password) for ``registry`` from a docker config json file, if it has them."""
    if not secret:
        return None
    path = Path(secret)
    if path.is_dir():  # a mounted Secret volume: the key is .dockerconfigjson
        path = path / ".dockerconfigjson"
    reason = "InvalidPushSecret" if what == "push secret" else "InvalidPullSecret"
    try:
        auths = json.loads(path.read_text()).get("auths", {})
    except (OSError, ValueError) as exc:
        raise OciError(reason, f"{what} {path.parent.name}: not a docker config json ({exc})") from exc
    entry = auths.get(registry) or auths.get(f"https://{registry}") or auths.get(f"http://{registry}")
    if entry is None:
        raise OciError(reason, f"the {what} has no credentials for {registry}")
    if "auth" in entry:
        user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
        return user, password
    return str(entry.get("username", "")), str(entry.get("password", ""))


def client(image: str, secret: str | None, insecure: bool, *, what: str = "push secret"):  # type: ignore[no-untyped-def]
    import oras.client

    registry = registry_of(image)
    oras_client = oras.client.OrasClient(hostname=registry, insecure=insecure, auth_backend="basic")
    creds = credentials(secret, registry, what=what)
    if creds is not None:
        oras_client.auth.set_basic_auth(*creds)  # not login(): that writes ~/.docker/config.json
    return oras_client


def pull(image: str, outdir: Path, secret: str | None, *, insecure: bool = False) -> list[Path]:
    oras_client = client(image, secret, insecure, what="pull secret")
    outdir.mkdir(parents=True, exist_ok=True)
    return [Path(p) for p in oras_client.pull(target=image, outdir=str(outdir))]


def pull_adapter(image: str, cache: Path, secrets: Sequence[str] = ()) -> Path:
    """The adapter at ``image`` as a local directory under ``cache`` (pulled once per image reference;
    the first secret with credentials for the registry is used). Errors are :class:`OciError`."""
    registry = registry_of(image)
    target = cache / hashlib.sha256(image.encode()).hexdigest()[:16]
    if all((target / f).is_file() for f in ADAPTER_FILES):
        return target
    secret = None
    for candidate in secrets:
        try:
            if credentials(candidate, registry, what="pull secret") is not None:
                secret = candidate
                break
        except OciError:
            continue
    partial = target.with_suffix(".partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        pull(image, partial, secret, insecure=is_local(image))
    except OciError:
        raise
    except Exception as exc:  # oras raises ValueError / requests errors with the registry's answer
        text = str(exc)
        denied = any(w in text.lower() for w in ("401", "unauthorized", "denied", "403"))
        raise OciError("PullUnauthorized" if denied else "PullFailed", f"pull {image}: {text[:300]}") from exc
    missing = [f for f in ADAPTER_FILES if not (partial / f).is_file()]
    if missing:
        raise OciError("NotAnAdapter", f"{image} has no {', '.join(missing)}")
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    log.info("pulled adapter %s", image)
    return target
