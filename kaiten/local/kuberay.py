"""KubeRay's own published parts for the tests: its CRDs (``ray.io_rayservices.yaml`` …) as shipped in
the ``github.com/ray-project/kuberay/ray-operator`` Go module, and a small validator built from that
module (``deploy/kuberay``) that runs KubeRay's admission checks (``utils.ValidateRayServiceSpec`` …)
on what the workload renders. Both come through the Go module proxy, pinned by ``deploy/kuberay/go.sum``,
and are cached like the control plane binaries."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from kaiten.local.controlplane import cache_root, repo_root
from kaiten.local.gotools import go_install
from kaiten.local.procs import StartFailed

KUBERAY_VERSION = "v1.5.1"
MODULE = "github.com/ray-project/kuberay/ray-operator"
CRD_FILES = ("ray.io_rayclusters.yaml", "ray.io_rayjobs.yaml", "ray.io_rayservices.yaml")


def _go_env() -> dict[str, str]:
    # GOSUMDB=off: the checksum database may be unreachable; deploy/kuberay/go.sum pins every module hash.
    return {**os.environ, "CGO_ENABLED": "0", "GOFLAGS": "-mod=mod", "GOSUMDB": "off"}


def _module() -> Path:
    return repo_root() / "deploy" / "kuberay"


def _go(*args: str) -> str:
    if shutil.which("go") is None:
        raise StartFailed("KubeRay's CRDs and validator come from Go modules: put Go on PATH")
    result = subprocess.run(
        ["go", *args], cwd=_module(), env=_go_env(), capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise StartFailed(f"go {' '.join(args)} failed:\n{result.stderr[-4000:]}")
    return result.stdout


def crds() -> list[Path]:
    """KubeRay's CRD files (downloaded into the Go module cache the first time)."""
    info = json.loads(_go("mod", "download", "-json", f"{MODULE}@{KUBERAY_VERSION}"))
    bases = Path(info["Dir"]) / "config" / "crd" / "bases"
    paths = [bases / name for name in CRD_FILES]
    if missing := [p.name for p in paths if not p.is_file()]:
        raise StartFailed(f"KubeRay {KUBERAY_VERSION} module has no {missing} under {bases}")
    return paths


def validator() -> Path:
    """The ``kuberay-validate`` binary (built once, then cached)."""
    binary = _cache() / "kuberay-validate"
    if binary.exists():
        return binary
    print(f"building kuberay-validate from KubeRay {KUBERAY_VERSION} (first run only; ~2 min) ...",
          file=sys.stderr, flush=True)  # fmt: skip
    started = time.monotonic()
    binary.parent.mkdir(parents=True, exist_ok=True)
    tmp = binary.with_suffix(".tmp")
    _go("build", "-trimpath", "-ldflags=-s -w", "-o", str(tmp), ".")
    tmp.rename(binary)
    print(f"built kuberay-validate in {time.monotonic() - started:.0f}s", file=sys.stderr, flush=True)
    return binary


def operator() -> Path:
    """KubeRay's real operator (``ray-operator``), built once with ``go install …@version``."""
    return go_install(MODULE, KUBERAY_VERSION, "kuberay", estimate="~3 min")


def _cache() -> Path:
    path = cache_root() / "kuberay" / KUBERAY_VERSION
    path.mkdir(parents=True, exist_ok=True)
    return path


def ensure(*, with_operator: bool = False) -> None:
    crds()
    validator()
    if with_operator:
        operator()


if __name__ == "__main__":  # python -m kaiten.local.kuberay [--operator]
    ensure(with_operator="--operator" in sys.argv[1:])
