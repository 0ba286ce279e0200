"""``kaiten up`` as a newcomer runs it: comes up, is usable with kubectl, refuses a second start, and
leaves no process behind when stopped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from shared.local.procs import free_port
from tests.conftest import REPO, SEEDS, Kubectl

pytestmark = [pytest.mark.controlplane, pytest.mark.nats]
KAITEN = Path(sys.executable).parent / "kaiten"


def ours(state: Path) -> list[str]:
    """Processes whose command line names our state dir (read-only: we never kill by name)."""
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if str(state) in line and "ps -eo" not in line]


def test_up_then_kubectl_then_stop(tmp_path: Path) -> None:
    state = tmp_path / "state"
    env = {**os.environ, "KAITEN_STATE_DIR": str(state), "KAITEN_SERVE_PORT": str(free_port())}
    endpoints: dict[str, str] = {"ray_temp_dir": "/nonexistent-until-up-writes-it"}
    up = subprocess.Popen(
        [str(KAITEN), "up"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        lines: list[str] = []
        deadline = time.monotonic() + 90
        assert up.stdout is not None
        while time.monotonic() < deadline:
            line = up.stdout.readline()
            lines.append(line)
            if line.startswith("up in") or not line:
                break
        text = "".join(lines)
        assert "✓ kube-apiserver" in text and "✓ Ray" in text, text
        assert "✓ services           watcher, planner, provisioner, workload" in text, text
        endpoints = json.loads((state / "endpoints.json").read_text())
        kubeconfig = state / "controlplane" / "kubeconfig"
        assert f"export KUBECONFIG={kubeconfig}" in "".join([*lines, up.stdout.readline()])
        kubectl = Kubectl(kubeconfig)
        kubectl.run("apply", "-f", str(REPO / "examples" / "local" / "workspace-smollm2.yaml"), check=True)
        kubectl.run("apply", "-f", str(SEEDS / "workspace-phi-3-mini.yaml"), check=True)
        # the planner runs with the local provider: the CPU model fits this machine, a V100 cannot be had
        kubectl.run(
            "wait", "--for=condition=Planned=True", "workspace/workspace-smollm2", "--timeout=60s", check=True
        )
        kubectl.run(
            "wait",
            "--for=condition=Planned=False",
            "workspace/workspace-phi-3-mini",
            "--timeout=60s",
            check=True,
        )
        kubectl.run(
            "wait",
            "--for=condition=ResourceReady",
            "workspace/workspace-smollm2",
            "--timeout=60s",
            check=True,
        )
        smol = kubectl.json("get", "workspace", "workspace-smollm2")
        assert smol["status"]["plan"]["instanceType"] == "local" and smol["status"]["targetNodeCount"] == 1
        assert len(smol["status"]["workerNodes"]) == 1  # this machine
        # the main job: served on the local Ray, and it answers
        kubectl.run(
            "wait",
            "--for=condition=InferenceReady",
            "workspace/workspace-smollm2",
            "--timeout=300s",
            check=True,
        )
        answer = httpx.post(
            f"{endpoints['serve_url']}/default/workspace-smollm2/chat",
            json={"messages": [{"role": "user", "content": "What is the capital of France?"}]},
            timeout=120,
        )
        assert answer.status_code == 200 and "Paris" in answer.json()["Result"], answer.text
        kubectl.run("delete", "workspace/workspace-smollm2", "--timeout=60s", check=True)  # cleanup reported
        again = subprocess.run([str(KAITEN), "up"], env=env, capture_output=True, text=True, timeout=30)
        assert again.returncode == 1 and "already running" in again.stderr
    finally:
        up.send_signal(signal.SIGINT)
        up.wait(timeout=90)  # Ray with Serve takes up to ~25 s to stop
    assert up.returncode == 0
    assert ours(state) == []
    assert ours(Path(endpoints["ray_temp_dir"])) == []  # Ray's processes too
