"""Go programs the tests run, built once from their own published modules with ``go install
module@version`` (their go.sum pins their dependencies; nothing of them enters our Go modules) and
cached under ``~/.cache/kaiten/<name>/<version>/``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from kaiten.local.controlplane import cache_root
from kaiten.local.procs import StartFailed


def go_install(package: str, version: str, name: str, *, estimate: str) -> Path:
    """The binary of ``package@version`` (its last path element), built the first time it is asked for."""
    cache = cache_root() / name / version
    binary = cache / package.rsplit("/", 1)[-1]
    if binary.exists():
        return binary
    if shutil.which("go") is None:
        raise StartFailed(f"{package} is built from its Go module: put Go on PATH")
    print(f"building {package}@{version} from its Go module (first run only; {estimate}) ...",
          file=sys.stderr, flush=True)  # fmt: skip
    started = time.monotonic()
    cache.mkdir(parents=True, exist_ok=True)
    gobin = cache / "gobin.tmp"
    shutil.rmtree(gobin, ignore_errors=True)
    # GOSUMDB=off: the checksum database may be unreachable; the module's own go.sum pins its hashes.
    env = {**os.environ, "CGO_ENABLED": "0", "GOSUMDB": "off", "GOBIN": str(gobin), "GOFLAGS": ""}
    result = subprocess.run(
        ["go", "install", "-trimpath", "-ldflags=-s -w", f"{package}@{version}"],
        cwd=cache, env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if result.returncode != 0:
        raise StartFailed(f"go install {package}@{version} failed:\n{result.stderr[-4000:]}")
    (gobin / binary.name).rename(binary)
    shutil.rmtree(gobin, ignore_errors=True)
    print(f"built {binary.name} in {time.monotonic() - started:.0f}s", file=sys.stderr, flush=True)
    return binary


HELM_PACKAGE = "helm.sh/helm/v3/cmd/helm"
HELM_VERSION = "v3.22.0"


def helm() -> Path:
    """Helm, to install ``deploy/helm/kaiten`` on the test node as a user would."""
    return go_install(HELM_PACKAGE, HELM_VERSION, "helm", estimate="~1-2 min")


if __name__ == "__main__":  # python -m kaiten.local.gotools: build what the tests need
    print(helm())
