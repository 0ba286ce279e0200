"""Kaiten installed as a wheel, not run from the checkout (issue 17): every runtime import is a declared
dependency of the extra that needs it, and what the package reads from disk travels with it.

The wheel is built from this tree and installed into fresh virtual environments, one per install
profile, with only the base dependencies plus that profile's extras — offline, from the package cache
that ``make setup`` filled (pins from ``requirements/dev.lock``): nothing is fetched, nothing dialled.
Each profile's entry points are imported in a clean process run from outside the repository, so
nothing is found through the working directory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kaiten.local.controlplane import ETCD_VERSION, K8S_VERSION
from tests.conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

UV = Path(sys.executable).parent / "uv"

# profile: (extras, modules that must import, modules that must not: a missing extra fails loudly)
PROFILES: dict[str, tuple[list[str], list[str], list[str]]] = {
    "base": (
        [],
        ["services.watcher.main", "services.planner.main", "services.provisioner.main",
         "services.workload.main", "kaiten.cli.main", "shared.events", "shared.api.crd",
         "shared.bus.callout"],  # the NATS pod's sidecar, from the services image
        ["services.serving.app"],
    ),
    "azure": ([ "azure"], ["services.provisioner.providers.aks"], []),
    "local": (["local"], ["kaiten.local.controlplane", "kaiten.local.nats_server", "kaiten.cli.stack"], []),
}  # fmt: skip


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # from a copy: setuptools builds in the source tree and packages whatever an older build left in
    # build/lib there (modules since moved or deleted)
    source = tmp_path_factory.mktemp("source") / "kaiten"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "__pycache__", ".*_cache", ".kaiten"))  # fmt: skip
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(out),
         str(source)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    (built,) = out.glob("kaiten-*.whl")
    return built


def install(wheel: Path, venv: Path, extras: list[str]) -> Path:
    subprocess.run(
        [str(UV), "venv", "--quiet", "--python", sys.executable, str(venv)], check=True, timeout=120
    )
    python = venv / "bin" / "python"
    target = f"{wheel}[{','.join(extras)}]" if extras else str(wheel)
    done = subprocess.run(
        [str(UV), "pip", "install", "--offline", "--python", str(python), target,
         "-c", str(REPO / "requirements" / "dev.lock")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return python


def run(python: Path, *argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run([str(python), *argv], capture_output=True, text=True, timeout=120, cwd=cwd, env=env)


@pytest.fixture(scope="module")
def venvs(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("venvs")
    return {name: install(wheel, root / name, extras) for name, (extras, _, _) in PROFILES.items()}


@pytest.mark.parametrize("profile", list(PROFILES))
def test_each_install_profile_imports_what_it_runs(
    profile: str, venvs: dict[str, Path], tmp_path: Path
) -> None:
    python = venvs[profile]
    _, imports, refused = PROFILES[profile]
    for module in imports:
        done = run(python, "-c", f"import {module}", cwd=tmp_path)
        assert done.returncode == 0, f"{profile}: import {module}:\n{done.stderr}"
    for module in refused:
        done = run(python, "-c", f"import {module}", cwd=tmp_path)
        assert done.returncode != 0 and "ModuleNotFoundError" in done.stderr, f"{profile}: {module} imported"
    where = run(python, "-c", "import shared, kaiten; print(shared.__file__, kaiten.__file__)", cwd=tmp_path)
    assert str(REPO) not in where.stdout and "site-packages" in where.stdout, where.stdout  # not the checkout


def test_the_cli_from_the_wheel_plans_and_says_what_up_needs(venvs: dict[str, Path], tmp_path: Path) -> None:
    kaiten = venvs["base"].parent / "kaiten"
    version = run(kaiten, "--version", cwd=tmp_path)
    assert version.returncode == 0 and version.stdout.startswith("kaiten "), version.stderr
    # the planner's catalogs and the CRD are package data: a dry-run plan needs no checkout
    seed = REPO / "examples" / "seed" / "workspace-phi-3-mini.yaml"
    planned = run(kaiten, "plan", "-f", str(seed), "-o", "json", cwd=tmp_path)
    assert planned.returncode == 0 and "Standard_NC6s_v3" in planned.stdout, planned.stderr
    crd = run(venvs["base"], "-c", "from shared.api.crd import render; print(render()[:200])", cwd=tmp_path)
    assert crd.returncode == 0 and "CustomResourceDefinition" in crd.stdout, crd.stderr
    # `up` needs NATS and Ray, which the base install has not got: it says which extras, at once
    up = run(kaiten, "up", "--state-dir", str(tmp_path / "state"), cwd=tmp_path)
    assert up.returncode == 2 and "pip install 'kaiten[local,serving]'" in up.stderr, up.stdout + up.stderr
    assert not (tmp_path / "state").exists()  # nothing started, nothing written


def test_what_up_reads_from_disk_travels_with_the_package(venvs: dict[str, Path], tmp_path: Path) -> None:
    """The control plane's Go module and the local examples are package data (``kaiten/bundled``): an
    installed package finds them in site-packages, and the module is the one the checkout builds."""
    python = venvs["local"]
    probe = (
        "import json; from kaiten import bundle; "
        "print(json.dumps({'missing': list(map(str, bundle.missing())), "
        "'module': str(bundle.CONTROLPLANE_MODULE), "
        "'sample': bundle.SAMPLE.read_text(), 'data': sorted(p.name for p in bundle.DATA_DIR.iterdir())}))"
    )
    done = run(python, "-c", probe, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    assert found["missing"] == [] and "site-packages" in found["module"], found
    assert found["sample"] == (REPO / "examples" / "local" / "workspace-smollm2.yaml").read_text()
    assert found["data"] == sorted(p.name for p in (REPO / "examples" / "local" / "data").iterdir())
    module = Path(found["module"])
    for name in ("go.mod", "go.sum", "tools.go"):
        assert (module / name).read_bytes() == (REPO / "deploy" / "controlplane" / name).read_bytes(), name
    # a working Go module, pinned as the checkout's: what `kaiten up` builds etcd and kube-apiserver from
    env = {**os.environ, "GOFLAGS": "-mod=mod", "GOSUMDB": "off"}
    modules = ["k8s.io/kubernetes", "go.etcd.io/etcd/server/v3"]
    listed = subprocess.run(["go", "list", "-m", *modules], cwd=module,
                            capture_output=True, text=True, timeout=120, env=env, check=False)  # fmt: skip
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.split() == [modules[0], K8S_VERSION, modules[1], ETCD_VERSION]
    # and `up` in this profile (no Ray: the serving extra is missing) still stops before starting anything
    up = run(venvs["local"].parent / "kaiten", "up", "--state-dir", str(tmp_path / "state"), cwd=tmp_path)
    assert up.returncode == 2 and "kaiten[local,serving]" in up.stderr, up.stdout + up.stderr
    assert not (tmp_path / "state").exists()
