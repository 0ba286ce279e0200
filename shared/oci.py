"""OCI artifacts (LoRA adapters) with oras: the registry client, docker-config-json credentials, push
and pull. The tuning job pushes adapters with it; the serving app pulls them. A secret is a docker config
json file, or a directory holding ``.dockerconfigjson`` (a mounted Secret); its content is never logged.

Two adapter layouts exist, and both are read:
- **KAITO's** (what its tuning pusher writes, and what Kaiten writes since: KAITO reads it too): an OCI
  image whose one ``tar+gzip`` layer holds ``data/adapter_config.json`` and
  ``data/adapter_model.safetensors``, and whose config lists the layer's ``diff_ids``. KAITO's puller
  (skopeo) unpacks the layers and takes ``/data``.
- **oras named files** (what Kaiten wrote before): one layer per file, titled by its name
  (``org.opencontainers.image.title``).
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import logging
import re
import shutil
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
LAYER_TGZ = "application/vnd.oci.image.layer.v1.tar+gzip"
LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
IMAGE_CONFIG = "application/vnd.oci.image.config.v1+json"
IMAGE_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFESTS = ("application/vnd.docker.distribution.manifest.v2+json",)
TITLE = "org.opencontainers.image.title"


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


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def adapter_layer(adapter_dir: Path) -> tuple[bytes, str]:
    """KAITO's adapter layer: a gzip'd tar of ``data/<file>`` for each adapter file, reproducible (no
    times, owners or modes of this machine), and the uncompressed tar's digest (the config's diff_id)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        directory = tarfile.TarInfo("data")
        directory.type, directory.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(directory)
        for name in ADAPTER_FILES:
            data = (adapter_dir / name).read_bytes()
            info = tarfile.TarInfo(f"data/{name}")
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    packed = io.BytesIO()
    with gzip.GzipFile(fileobj=packed, mode="wb", mtime=0) as gz:
        gz.write(raw.getvalue())
    return packed.getvalue(), _digest(raw.getvalue())


def push_adapter(adapter_dir: Path, image: str, secret: str | None, *, insecure: bool = False) -> str:
    """Push the adapter in KAITO's layout (the module's docstring); returns the manifest digest."""
    layer, diff_id = adapter_layer(adapter_dir)
    config = json.dumps(
        {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": [diff_id]}},
        separators=(",", ":"),
    ).encode()
    oras_client = client(image, secret, insecure)
    container = oras_client.get_container(image)
    manifest: dict[str, Any] = {"schemaVersion": 2, "mediaType": IMAGE_MANIFEST, "layers": []}
    with tempfile.TemporaryDirectory(prefix="kaiten-push-") as work:
        for data, media_type, annotations in (
            (config, IMAGE_CONFIG, {}),
            (layer, LAYER_TGZ, {TITLE: "adapter.tar.gz"}),
        ):
            path = Path(work) / _digest(data).removeprefix("sha256:")
            path.write_bytes(data)
            descriptor = {"mediaType": media_type, "digest": _digest(data), "size": len(data)}
            response = oras_client.upload_blob(str(path), container, descriptor)
            if response.status_code not in (200, 201, 202):
                raise OciError(
                    "PushFailed", f"push {image}: blob upload answered HTTP {response.status_code}"
                )
            if media_type == IMAGE_CONFIG:
                manifest["config"] = descriptor
            else:
                manifest["layers"].append({**descriptor, "annotations": annotations})
    response = oras_client.upload_manifest(manifest, container)
    if response.status_code not in (200, 201):
        raise OciError(
            "PushFailed",
            f"push {image}: manifest upload answered HTTP {response.status_code}: {response.text[:200]}",
        )
    return str(response.headers.get("Docker-Content-Digest", ""))


INDEXES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)


def _member_path(name: str) -> tuple[str, ...] | None:
    """A tar member's path as parts, or None when it could land outside the target (absolute, ``..``)."""
    path = Path(name.removeprefix("./"))
    if path.is_absolute() or ".." in path.parts:
        return None
    return path.parts


def _layers(oras_client: Any, image: str) -> tuple[Any, list[dict[str, Any]]]:
    """The image's layers (an image index resolves to its linux/amd64 image, as a puller would)."""
    container = oras_client.get_container(image)
    manifest = oras_client.get_manifest(
        container, allowed_media_type=[IMAGE_MANIFEST, *DOCKER_MANIFESTS, *INDEXES]
    )
    if manifest.get("mediaType") in INDEXES or "manifests" in manifest:
        chosen = next(
            (
                m
                for m in manifest.get("manifests", [])
                if (m.get("platform") or {}).get("os", "linux") == "linux"
                and (m.get("platform") or {}).get("architecture", "amd64") == "amd64"
            ),
            None,
        )
        if chosen is None:
            raise OciError("NoPlatform", f"{image} has no linux/amd64 image")
        container = oras_client.get_container(f"{_repository(image)}@{chosen['digest']}")
        manifest = oras_client.get_manifest(container, allowed_media_type=[IMAGE_MANIFEST, *DOCKER_MANIFESTS])
    return container, list(manifest.get("layers", []))


def _repository(image: str) -> str:
    """``registry[:port]/repo`` of a reference, without its tag or digest."""
    name = image.rsplit("@", 1)[0]
    head, _, last = name.rpartition("/")
    return f"{head}/{last.split(':', 1)[0]}" if head else last.split(":", 1)[0]


def _pull_error(image: str, exc: Exception) -> OciError:
    """oras raises ValueError / requests errors with the registry's answer: one reason for both pulls."""
    text = str(exc)
    return OciError("PullUnauthorized" if refused(text) else "PullFailed", f"pull {image}: {text[:300]}")


def refused(answer: str) -> bool:
    """Whether a registry's answer (an oras / requests error's text) refuses the credentials. Judged
    without the URLs in it: a registry's port or path may hold "401" (CI: port 40153)."""
    words = re.sub(r"\S+://\S+", "", answer).lower()
    return bool(re.search(r"\b(401|403)\b|unauthorized|denied|forbidden", words))


def _choose_secret(secrets: Sequence[str], registry: str) -> str | None:
    """The first Secret with credentials for ``registry`` (one without, or unreadable, is passed over)."""
    for secret in secrets:
        try:
            if credentials(secret, registry, what="pull secret") is not None:
                return secret
        except OciError:
            continue
    return None


def _each_layer(oras_client: Any, container: Any, layers: list[dict[str, Any]]) -> Any:
    """Each layer (except files oras titles) as an open tar (any compression), downloaded outside
    the target directory."""
    with tempfile.TemporaryDirectory(prefix="kaiten-layer-") as work:
        for layer in layers:
            blob = Path(work) / "layer"
            oras_client.download_blob(container, layer["digest"], str(blob))
            with tarfile.open(blob, mode="r:*") as tar:
                yield layer, tar
            blob.unlink()


def _copy_member(tar: tarfile.TarFile, member: tarfile.TarInfo, target: Path) -> None:
    source = tar.extractfile(member)
    assert source is not None
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("wb") as out:
        shutil.copyfileobj(source, out)


def pull_adapter_files(image: str, outdir: Path, secret: str | None, *, insecure: bool = False) -> list[Path]:
    """The adapter files of ``image``, in either layout, into ``outdir``; the files written. A layer
    oras titled with an adapter file's name is that file; any other layer is read as a tar (OCI or
    Docker media types) holding them under ``data/`` or at its root."""
    oras_client = client(image, secret, insecure, what="pull secret")
    container, layers = _layers(oras_client, image)
    outdir.mkdir(parents=True, exist_ok=True)
    titled = [la for la in layers if (la.get("annotations") or {}).get(TITLE, "") in ADAPTER_FILES]
    for layer in titled:  # oras named files
        oras_client.download_blob(container, layer["digest"], str(outdir / layer["annotations"][TITLE]))
    wanted = {("data", f): f for f in ADAPTER_FILES} | {(f,): f for f in ADAPTER_FILES}
    for _, tar in _each_layer(oras_client, container, [la for la in layers if la not in titled]):
        for member in tar.getmembers():
            parts = _member_path(member.name)
            if member.isfile() and parts in wanted:
                _copy_member(tar, member, outdir / wanted[parts])
    return sorted(outdir / name for name in ADAPTER_FILES if (outdir / name).is_file())


def pull_data(image: str, dest: Path, secrets: Sequence[str] = ()) -> list[Path]:
    """KAITO's tuning data image: every layer unpacked, the files under ``data/`` copied to ``dest`` (as
    KAITO's puller relocates ``/data``). Regular files only, streamed; no member lands outside ``dest``."""
    secret = _choose_secret(secrets, registry_of(image))
    written: list[Path] = []
    try:
        oras_client = client(image, secret, is_local(image), what="pull secret")
        container, layers = _layers(oras_client, image)
        dest.mkdir(parents=True, exist_ok=True)
        for _, tar in _each_layer(oras_client, container, layers):
            for member in tar.getmembers():
                parts = _member_path(member.name)
                if member.isfile() and parts is not None and len(parts) >= 2 and parts[0] == "data":
                    target = dest.joinpath(*parts[1:])
                    _copy_member(tar, member, target)
                    written.append(target)
    except OciError:
        raise
    except Exception as exc:
        raise _pull_error(image, exc) from exc
    if not written:
        raise OciError("NoData", f"{image} has no files under /data (KAITO's data image layout)")
    log.info("pulled %d data file(s) from %s", len(written), image)
    return sorted(set(written))


def pull_adapter(image: str, cache: Path, secrets: Sequence[str] = ()) -> Path:
    """The adapter at ``image`` as a local directory under ``cache`` (pulled once per image reference;
    the first secret with credentials for the registry is used). Errors are :class:`OciError`."""
    registry = registry_of(image)
    target = cache / hashlib.sha256(image.encode()).hexdigest()[:16]
    if all((target / f).is_file() for f in ADAPTER_FILES):
        return target
    secret = _choose_secret(secrets, registry)
    partial = target.with_suffix(".partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        pull_adapter_files(image, partial, secret, insecure=is_local(image))
    except OciError:
        raise
    except Exception as exc:
        raise _pull_error(image, exc) from exc
    missing = [f for f in ADAPTER_FILES if not (partial / f).is_file()]
    if missing:
        raise OciError("NotAnAdapter", f"{image} has no {', '.join(missing)}")
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    log.info("pulled adapter %s", image)
    return target


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m shared.oci pull-data IMAGE DEST [SECRET…]``: a tuning Workspace's data image into
    ``DEST`` (the init container the kuberay backend renders for ``tuning.input.image``)."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m shared.oci")
    sub = parser.add_subparsers(dest="command", required=True)
    data = sub.add_parser("pull-data", help="unpack a data image's /data into a directory")
    data.add_argument("image")
    data.add_argument("dest", type=Path)
    data.add_argument("secrets", nargs="*", help="mounted docker-config-json Secrets to try")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        pull_data(args.image, args.dest, args.secrets)
    except OciError as exc:
        print(f"{exc.reason}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
