"""``python -m services.<name> --help`` lists every setting and exits; a wrong argument is refused."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO

OWN_SETTING = {
    "watcher": "KAITEN_CLEANUP_OWNERS",
    "planner": "KAITEN_CATALOG_FILES",
    "provisioner": "KAITEN_PROVIDER",
    "workload": "KAITEN_BACKEND",
}


@pytest.mark.parametrize("service", sorted(OWN_SETTING))
def test_help_lists_the_settings_and_exits(service: str) -> None:
    run = subprocess.run(
        [sys.executable, "-m", f"services.{service}", "--help"],
        capture_output=True, text=True, cwd=REPO, timeout=60, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert f"usage: python -m services.{service}" in run.stdout
    assert "KAITEN_NATS_URL" in run.stdout and OWN_SETTING[service] in run.stdout, run.stdout
    bad = subprocess.run(
        [sys.executable, "-m", f"services.{service}", "--bogus"],
        capture_output=True, text=True, cwd=REPO, timeout=60, check=False,
    )  # fmt: skip
    assert bad.returncode == 2 and "unrecognized arguments: --bogus" in bad.stderr
