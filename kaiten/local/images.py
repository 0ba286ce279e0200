"""Container images for the local node, built offline from ``deploy/images/*.Dockerfile``.

No image can be pulled here (there is no registry of base images), so each image is built the way a
user would build it, with a daemonless builder instead of a Docker engine:

- ``python:3.11-slim-bookworm``, the name our Dockerfiles' ``FROM`` uses, is made from Debian's own
  packages (``mmdebstrap``: python3, python3-venv, ca-certificates, from the host's apt sources) and
  committed under that name. Elsewhere the official image of that name is pulled instead; both carry
  ``python3`` with ``venv``, which is all our Dockerfiles rely on.
- ``pause`` (containerd's sandbox image): the static program in ``deploy/images/pause``, ``FROM scratch``.
- ``services``: ``deploy/images/services.Dockerfile``, with ``buildah bud`` exactly as ``docker build``.

Every image is tagged ``localhost/kaiten/<name>:<digest>``: the digest is the SHA-256 of its Dockerfile and
of every file its ``COPY`` lines take from the repository, so an image whose tag exists is current and is
not rebuilt, and a test can tell that what a pod runs was built from the files at hand. Builds keep their
storage under ``$KAITEN_CACHE_DIR/images``; :func:`ensure` returns a docker-archive tarball per image,
which the node's containerd imports (``kaiten.local.node``).

Build steps run on the host network (``RUN pip install`` reaches the package index as the host does);
the host's CA bundle is mounted for the build only, never copied into an image.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from kaiten.local.controlplane import cache_root, repo_root
from kaiten.local.procs import StartFailed

BASE_IMAGE = "docker.io/library/python:3.11-slim-bookworm"
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates")
REGISTRY = "localhost/kaiten"
DIGEST_LABEL = "dev.kaiten.source-digest"
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
APT_SOURCES = (Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list"))
_SKIP = re.compile(r"(^|/)(__pycache__|\.mypy_cache|\.pytest_cache|\.ruff_cache)(/|$)|\.pyc$")
TOOLS = {"buildah": "buildah", "mmdebstrap": "mmdebstrap", "go": "golang (https://go.dev/dl)"}


@dataclass(frozen=True)
class Image:
    name: str  # deploy/images/<name>.Dockerfile
    ref: str  # localhost/kaiten/<name>:<digest>
    archive: Path  # docker-archive tarball for `ctr images import`
    digest: str


def images_dir() -> Path:
    return cache_root() / "images"


def dockerfile(name: str) -> Path:
    return repo_root() / "deploy" / "images" / f"{name}.Dockerfile"


# -- what an image is built from -------------------------------------------------------------------


def copied_paths(name: str) -> list[str]:
    """The sources of every ``COPY`` in the Dockerfile (relative to its build context)."""
    sources: list[str] = []
    for line in _instructions(dockerfile(name).read_text()):
        words = line.split()
        if words and words[0].upper() in {"COPY", "ADD"}:
            args = [w for w in words[1:] if not w.startswith("--")]
            sources += args[:-1]
    return sources


def _instructions(text: str) -> list[str]:
    """Dockerfile lines with continuations joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", text)
    lines = (line.strip() for line in joined.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def source_digest(name: str, context: Path | None = None) -> str:
    """SHA-256 over the Dockerfile and every file that its COPY lines take from ``context``."""
    context = context or repo_root()
    h = hashlib.sha256()
    h.update(dockerfile(name).read_bytes())
    for source in copied_paths(name):
        root = context / source
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        for path in files:
            rel = path.relative_to(context).as_posix()
            if _SKIP.search(rel):
                continue
            h.update(rel.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


# -- building --------------------------------------------------------------------------------------


def _need(*tools: str) -> None:
    if missing := [t for t in tools if shutil.which(t) is None]:
        names = " ".join(TOOLS.get(t, t) for t in missing)
        raise StartFailed(f"building the node's images needs {', '.join(missing)}: apt-get install {names}")


def buildah(*args: str, capture: bool = False) -> str:
    storage = images_dir() / "storage"
    argv = [
        "buildah",
        "--root", str(storage / "root"),
        "--runroot", str(storage / "run"),
        "--storage-driver", "overlay",
        *args,
    ]  # fmt: skip
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if result.returncode != 0:  # bud --quiet says why on stdout
        why = (result.stderr.strip() or result.stdout.strip())[-4000:]
        raise StartFailed(f"buildah {args[0]} failed ({result.returncode}):\n{why}")
    return result.stdout if capture else ""


def exists(ref: str) -> bool:
    out = buildah("images", "--json", capture=True)
    return any(ref in (image.get("names") or []) for image in json.loads(out or "[]"))


def image_id(ref: str) -> str:
    """The image's config digest (``sha256:…``), as the kubelet reports it in a pod's ``imageID``."""
    info = json.loads(buildah("inspect", "--type", "image", ref, capture=True))
    return f"sha256:{info['FromImageID']}"


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def build_base() -> None:
    """``python:3.11-slim-bookworm`` from Debian's packages (mmdebstrap), unless it is there already."""
    if exists(BASE_IMAGE):
        return
    _need("mmdebstrap")
    sources = next((p for p in APT_SOURCES if p.is_file()), None)
    if sources is None:
        raise StartFailed(f"no apt sources found at {' or '.join(map(str, APT_SOURCES))} for mmdebstrap")
    _progress(f"making {BASE_IMAGE} from Debian packages with mmdebstrap (first run only; ~1 min) ...")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(dir=images_dir()) as tmp:
        rootfs = Path(tmp) / "rootfs.tar"
        result = subprocess.run(
            ["mmdebstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}",
             "--dpkgopt=path-exclude=/usr/share/doc/*", "--dpkgopt=path-exclude=/usr/share/man/*",
             "bookworm", str(rootfs), str(sources)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if result.returncode != 0:
            raise StartFailed(f"mmdebstrap failed:\n{result.stderr[-4000:]}")
        container = buildah("from", "scratch", capture=True).strip()
        try:
            buildah("add", container, str(rootfs), "/")
            buildah("config", "--cmd", "python3", "--env", "LANG=C.UTF-8", container)
            buildah("commit", "--quiet", container, BASE_IMAGE)
        finally:
            buildah("rm", container)
    _progress(f"made {BASE_IMAGE} in {time.monotonic() - started:.0f}s")


def build_pause(context: Path) -> None:
    """The pause program, static, into ``context``."""
    _need("go")
    env = {**os.environ, "CGO_ENABLED": "0", "GOFLAGS": "-mod=mod"}
    result = subprocess.run(
        ["go", "build", "-trimpath", "-ldflags=-s -w", "-o", str(context / "pause"), "."],
        cwd=repo_root() / "deploy" / "images" / "pause",
        env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if result.returncode != 0:
        raise StartFailed(f"go build (pause) failed:\n{result.stderr[-4000:]}")


def _revision() -> str:
    result = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=repo_root(), capture_output=True, text=True, check=False
    )
    return result.stdout.strip() or "unknown"


def ensure(name: str) -> Image:
    """Build ``deploy/images/<name>.Dockerfile`` unless an image of the same sources exists; export it."""
    _need("buildah")
    images_dir().mkdir(parents=True, exist_ok=True)
    digest = source_digest(name) if name != "pause" else _pause_digest()
    ref = f"{REGISTRY}/{name}:{digest[:16]}"
    archive = images_dir() / "archives" / f"{name}-{digest[:16]}.tar"
    if not exists(ref):
        _build(name, ref, digest)
        _forget_older(name, keep=ref)
    if not archive.exists():
        archive.parent.mkdir(parents=True, exist_ok=True)
        _drop_archives(name)  # the Ray image's is ~7 GB: keep the newest only
        tmp = archive.with_suffix(".tmp")
        tmp.unlink(missing_ok=True)
        buildah("push", "--quiet", ref, f"docker-archive:{tmp}:{ref}")
        tmp.rename(archive)
    return Image(name=name, ref=ref, archive=archive, digest=digest)


def _forget_older(name: str, keep: str) -> None:
    """After a new build ``keep`` of ``name``: remove its older builds, their archives and the build cache
    that no image builds on any more. The Ray image is ~7 GB a build; kept, three builds filled this
    machine's disk and the fourth failed (``buildah bud`` 125). The cache of the steps the new build
    shares (the dependency layer) stays: ``rmi --prune`` dropped it too, and every code change rebuilt
    the Ray image's dependencies (254-276 s instead of seconds)."""
    prefix = f"{REGISTRY}/{name}:"
    images = json.loads(buildah("images", "--json", capture=True) or "[]")
    older = [ref for image in images for ref in image.get("names") or [] if ref.startswith(prefix)]
    older = [ref for ref in older if ref != keep]
    for ref in older:
        buildah("rmi", ref)
    _drop_archives(name, keep=f"{name}-{keep.rsplit(':', 1)[1]}.tar")
    if older:
        for image_id in _unused_cache():
            try:
                buildah("rmi", image_id)
            except StartFailed as exc:  # kept: only disk is lost
                _progress(f"could not remove unused build cache {image_id[:12]}: {str(exc)[-200:]}")
        _progress(f"removed {len(older)} older build(s) of {name}: {', '.join(older)}")


def _unused_cache() -> list[str]:
    """The unnamed images (build-cache steps) whose layer no named image is built on. Read from the
    storage's own records (``overlay-images/images.json``, ``overlay-layers/layers.json``): buildah's
    listing does not say which image a cached step belongs to."""
    root = images_dir() / "storage" / "root"
    try:
        images = json.loads((root / "overlay-images" / "images.json").read_text())
        layers = json.loads((root / "overlay-layers" / "layers.json").read_text())
    except (OSError, ValueError):
        return []
    parent = {layer["id"]: layer.get("parent") for layer in layers}
    used: set[str] = set()
    for image in images:
        layer = image.get("layer") if image.get("names") else None
        while layer and layer not in used:
            used.add(layer)
            layer = parent.get(layer)

    def depth(layer: str | None) -> int:
        n = 0
        while layer:
            n, layer = n + 1, parent.get(layer)
        return n

    stale = [image for image in images if not image.get("names") and image.get("layer") not in used]
    return [image["id"] for image in sorted(stale, key=lambda i: depth(i.get("layer")), reverse=True)]


def _drop_archives(name: str, keep: str = "") -> None:
    for archive in (images_dir() / "archives").glob(f"{name}-*.tar"):
        if archive.name != keep:
            archive.unlink()


def _pause_digest() -> str:
    """pause's context is built, not copied: hash its Go sources with the Dockerfile instead."""
    h = hashlib.sha256(dockerfile("pause").read_bytes())
    for path in sorted((repo_root() / "deploy" / "images" / "pause").iterdir()):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def _build(name: str, ref: str, digest: str) -> None:
    _progress(f"building image {ref} from {dockerfile(name).relative_to(repo_root())} ...")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(dir=images_dir()) as tmp:
        if name == "pause":
            context = Path(tmp)
            build_pause(context)
        else:
            build_base()
            context = repo_root()
        args = [
            "bud", "--quiet", "--layers", "--force-rm", "--isolation", "chroot", "--network", "host",
            "--pull-never", "--file", str(dockerfile(name)), "--tag", ref,
            "--label", f"{DIGEST_LABEL}={digest}",
            "--label", f"org.opencontainers.image.revision={_revision()}",
        ]  # fmt: skip
        if HOST_CA_BUNDLE.is_file():  # the host's trust (a proxy's CA too), for this build only
            args += ["--volume", f"{HOST_CA_BUNDLE}:/etc/kaiten-build/ca.crt:ro",
                     "--build-arg", "PIP_CERT=/etc/kaiten-build/ca.crt"]  # fmt: skip
        buildah(*args, str(context))
    _progress(f"built {ref} in {time.monotonic() - started:.0f}s")


if __name__ == "__main__":
    for image_name in sys.argv[1:] or ["pause", "services", "ray", "nats"]:
        print(ensure(image_name).archive)
