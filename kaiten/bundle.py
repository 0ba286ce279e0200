"""What ``kaiten up`` reads from disk, found the same way in a checkout and in an installed package.

``kaiten/bundled/`` holds the control plane's Go module (``controlplane/``: ``go.mod``, ``go.sum``,
``tools.go``) and the local examples (``examples/``: the sample Workspaces and the tuning data). In a
checkout they are symlinks to ``deploy/controlplane`` and ``examples/local``; a wheel carries the files
(package data, ``pyproject.toml``). The CRD needs no file: ``shared.api.crd.render`` writes it.
"""

from __future__ import annotations

from pathlib import Path

BUNDLE = Path(__file__).resolve().parent / "bundled"
CONTROLPLANE_MODULE = BUNDLE / "controlplane"  # go.mod pinning etcd and Kubernetes
EXAMPLES = (BUNDLE / "examples").resolve()  # the examples' real folder (examples/local in a checkout)
SAMPLE = EXAMPLES / "workspace-smollm2.yaml"
DATA_DIR = EXAMPLES / "data"
NEEDED = (CONTROLPLANE_MODULE / "go.mod", CONTROLPLANE_MODULE / "go.sum", SAMPLE, DATA_DIR)


def missing() -> list[Path]:
    """What an install lacks (a wheel built without its package data, a checkout without the links)."""
    return [path for path in NEEDED if not path.exists()]


def shown(path: Path) -> str:
    """A path as a user types it from here: relative to the working directory when it is below it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)
