"""The main job, as a newcomer runs it (issue 8's acceptance): ``kaiten up`` from a clean state → the
sample answers on ``/chat`` and the OpenAI API → the local tuning example trains on the bundled data
and pushes to the local registry → the adapter example serves it → delete → ``kaiten down`` leaves no
process behind; ``kaiten up`` again on the kept state, then ``kaiten down --purge``. On the way: a
second ``up`` is refused, a SIGKILLed service is restarted and shown in ``kaiten status``, and nothing
of ours listens anywhere but loopback. Each phase is timed and the table printed."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from kaiten.local.procs import descendants, free_port, running
from shared.oci import pull_adapter_files
from tests.conftest import REPO, Kubectl
from tests.test_loopback_only import LOOPBACK, sockets
from tests.test_planner_e2e import condition

pytestmark = [pytest.mark.controlplane, pytest.mark.nats, pytest.mark.slow]
KAITEN = Path(sys.executable).parent / "kaiten"
EXAMPLES = REPO / "examples" / "local"
QUESTION = "What is the capital of France?"


def ours(marker: Path) -> list[str]:
    """Processes whose command line or environment names ``marker`` (read-only: we never kill by name).

    The environment too: Ray's processes name only their own temp dir on the command line, so a Ray
    head the stack lost (a CI run left one running) is found by the ``KAITEN_STATE_DIR`` it inherited."""
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True, check=True).stdout
    found = []
    for line in out.splitlines()[1:]:
        pid = line.split()[0]
        with contextlib.suppress(OSError):  # gone meanwhile
            if "ps -eo" not in line and (
                str(marker) in line or str(marker).encode() in Path(f"/proc/{pid}/environ").read_bytes()
            ):
                found.append(line)
    return found


class Phases:
    def __init__(self) -> None:
        self.rows: list[tuple[str, float]] = []

    def time(self, name: str) -> Phase:
        return Phase(self, name)

    def table(self) -> str:
        width = max(len(n) for n, _ in self.rows)
        lines = [f"{'phase':<{width}}  seconds", f"{'-' * width}  -------"]
        lines += [f"{name:<{width}}  {seconds:7.1f}" for name, seconds in self.rows]
        lines.append(f"{'total':<{width}}  {sum(s for _, s in self.rows):7.1f}")
        return "\n".join(lines)


class Phase:
    def __init__(self, phases: Phases, name: str) -> None:
        self.phases, self.name = phases, name

    def __enter__(self) -> None:
        self.started = time.monotonic()

    def __exit__(self, *exc: object) -> None:
        self.phases.rows.append((self.name, time.monotonic() - self.started))


@pytest.fixture
def state(tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "state"
    yield root
    if (root / "lock").exists():  # a failed test must not leave the system running
        subprocess.run([str(KAITEN), "down"], env={**os.environ, "KAITEN_STATE_DIR": str(root)}, timeout=240)


def kaiten(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(KAITEN), *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


def status_of(state: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((state / "status.json").read_text())
    return data


def component(state: Path, name: str) -> dict[str, Any]:
    return next(c for c in status_of(state)["components"] if c["name"] == name)


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.mark.timeout(900)  # the whole main job with tuning: 245 s measured cold; each step has a limit
def test_kaiten_up_end_to_end(state: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    serve_port = free_port()
    env = {**os.environ, "KAITEN_STATE_DIR": str(state), "KAITEN_SERVE_PORT": str(serve_port)}
    phases = Phases()

    with phases.time("kaiten up → sample WorkspaceSucceeded"):
        up = kaiten(env, "up", timeout=900)
    assert up.returncode == 0, up.stdout + up.stderr
    base = f"http://127.0.0.1:{serve_port}/default/workspace-smollm2"
    for expected in (
        "✓ kube-apiserver", "✓ registry", "✓ ray", "✓ workload",
        f"export KUBECONFIG={state / 'controlplane' / 'kubeconfig'}",
        "workload.inference_ready", "✓ workspace-smollm2 ready",
        f"curl -s {base}/chat -H 'content-type: application/json'",
    ):  # fmt: skip
        assert expected in up.stdout, (expected, up.stdout)
    kubectl = Kubectl(state / "controlplane" / "kubeconfig")
    sample = kubectl.json("get", "workspace", "workspace-smollm2")
    assert condition(sample, "WorkspaceSucceeded")["status"] == "True", sample["status"]

    with phases.time("chat: kaiten chat, /chat, /v1/chat/completions"):
        said = kaiten(env, "chat", QUESTION)
        assert said.returncode == 0 and "Paris" in said.stdout, said.stdout + said.stderr
        body = {"messages": [{"role": "user", "content": QUESTION}]}
        answer = httpx.post(f"{base}/chat", json=body, timeout=120)
        assert answer.status_code == 200 and "Paris" in answer.json()["Result"], answer.text
        openai = httpx.post(
            f"{base}/v1/chat/completions",
            json={"model": "smollm2-135m-instruct", "temperature": 0, **body},
            timeout=120,
        )
        assert "Paris" in openai.json()["choices"][0]["message"]["content"], openai.text

    with phases.time("status, second up refused, loopback only"):
        shown = kaiten(env, "status")
        assert shown.returncode == 0, shown.stdout
        assert all(c["state"] == "healthy" for c in status_of(state)["components"]), shown.stdout
        again = kaiten(env, "up")
        assert again.returncode == 1 and "already running" in again.stderr, again.stderr
        pids = {pid for c in status_of(state)["components"] for pid in c["pids"]}
        pids |= {d for pid in pids for d in descendants(pid)}
        listeners = sockets(pids, listening=True)
        assert len({pid for _, _, pid in listeners}) >= 6, listeners  # NATS, etcd, apiserver, registry, ...
        assert not [s for s in listeners if not LOOPBACK.match(s[0])], listeners

    with phases.time("a SIGKILLed service restarts"):
        planner = component(state, "planner")
        os.kill(planner["pids"][0], signal.SIGKILL)
        wait_for(lambda: component(state, "planner")["restarts"] == 1, 10, "the restart to be counted")
        wait_for(lambda: component(state, "planner")["state"] == "healthy", 60, "planner to be healthy again")
        shown = kaiten(env, "status")
        assert shown.returncode == 0, shown.stdout
        row = next(line for line in shown.stdout.splitlines() if line.startswith("planner"))
        assert "killed by SIGKILL" in row and row.split()[3] == "1", row
        # infrastructure too: NATS comes back on the same address with its JetStream store, and the
        # services reconnect (the tuning below runs through it)
        nats = component(state, "nats")
        os.kill(nats["pids"][0], signal.SIGKILL)
        wait_for(lambda: component(state, "nats")["restarts"] == 1, 10, "the NATS restart to be counted")
        wait_for(lambda: component(state, "nats")["state"] == "healthy", 60, "NATS to be healthy again")
        assert component(state, "nats")["endpoint"] == nats["endpoint"]

    with phases.time("tuning example → WorkspaceSucceeded"):
        kubectl.run("apply", "-f", str(EXAMPLES / "tuning-smollm2.yaml"), check=True)
        kubectl.run(
            "wait",
            "--for=condition=WorkspaceSucceeded",
            "workspace/tuning-smollm2",
            "--timeout=900s",
            timeout=910,
        )
    tuned = kubectl.json("get", "workspace", "tuning-smollm2")
    assert condition(tuned, "WorkspaceSucceeded")["status"] == "True", tuned["status"]
    docs = yaml.safe_load_all((EXAMPLES / "tuning-smollm2.yaml").read_text())
    output = next(d for d in docs if d["kind"] == "Workspace")["tuning"]["output"]["image"]
    secret = kubectl.json("get", "secret", "kaiten-local-registry")
    (tmp_path / "pull").mkdir()
    (tmp_path / "pull" / ".dockerconfigjson").write_bytes(
        base64.b64decode(secret["data"][".dockerconfigjson"])
    )
    pulled = pull_adapter_files(output, tmp_path / "adapter", str(tmp_path / "pull"), insecure=True)
    assert sorted(p.name for p in pulled) == ["adapter_config.json", "adapter_model.safetensors"]

    pirate = f"http://127.0.0.1:{serve_port}/default/workspace-smollm2-pirate"
    with phases.time("adapter example → InferenceReady"):
        kubectl.run("apply", "-f", str(EXAMPLES / "workspace-smollm2-adapter.yaml"), check=True)
        kubectl.run(
            "wait",
            "--for=condition=InferenceReady",
            "workspace/workspace-smollm2-pirate",
            "--timeout=600s",
            timeout=610,
        )
    models = httpx.get(f"{pirate}/v1/models", timeout=30).json()
    assert {m["id"] for m in models["data"]} == {"smollm2-135m-instruct", "pirate"}, models
    styled = httpx.post(
        f"{pirate}/v1/chat/completions", json={"model": "pirate", **body, "max_tokens": 40}, timeout=120
    )
    assert styled.status_code == 200 and styled.json()["choices"][0]["message"]["content"].strip(), (
        styled.text
    )

    endpoints = json.loads((state / "endpoints.json").read_text())
    work = state / "workload"
    with phases.time("kubectl delete all three → cleaned up"):
        for example in ("workspace-smollm2-adapter.yaml", "tuning-smollm2.yaml", "workspace-smollm2.yaml"):
            kubectl.run("delete", "-f", str(EXAMPLES / example), "--timeout=180s", check=True, timeout=190)
        assert kubectl.json("get", "workspaces", "-A")["items"] == []  # finalizers released
        token = (state / "ray" / "ray_auth_token").read_text().strip()
        apps = httpx.get(
            f"{endpoints['ray_dashboard']}/api/serve/applications/",
            headers={"Authorization": f"Bearer {token}"},
            timeout=30,
        ).json()["applications"]
        assert apps == {}, apps
        assert not list(work.glob("default.*")), list(work.iterdir())  # job configs, secret copies

    with phases.time("kaiten down"):
        stopped = kaiten(env, "down", timeout=240)
    assert stopped.returncode == 0 and "✓ stopped" in stopped.stdout, stopped.stdout
    assert not running(pids), running(pids)
    assert ours(state) == [] and ours(Path(endpoints["ray_temp_dir"])) == []
    assert kaiten(env, "status").returncode == 3

    with phases.time("kaiten up --no-sample on the kept state, down --purge"):
        again = kaiten(env, "up", "--no-sample", timeout=300)
        assert again.returncode == 0, again.stdout + again.stderr
        kept = pull_adapter_files(
            output, tmp_path / "again", str(tmp_path / "pull"), insecure=True
        )  # the registry kept it
        assert sorted(p.name for p in kept) == ["adapter_config.json", "adapter_model.safetensors"]
        assert kubectl.json("get", "workspaces", "-A")["items"] == []
        purged = kaiten(env, "down", "--purge", timeout=240)
        assert purged.returncode == 0 and not state.exists(), purged.stdout
    assert ours(state) == []

    with capsys.disabled():
        print(f"\n\nkaiten up end to end ({os.cpu_count()} cores):\n{phases.table()}\n")


@pytest.mark.timeout(240)  # measured 59 s
def test_a_killed_supervisor_is_noticed_and_the_next_up_cleans_up(state: Path) -> None:
    env = {**os.environ, "KAITEN_STATE_DIR": str(state), "KAITEN_SERVE_PORT": str(free_port())}
    first = kaiten(env, "up", "--no-sample", timeout=300)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "Kaiten is up" in first.stdout and "kaiten chat" not in first.stdout  # no sample applied
    old = status_of(state)
    orphans = {pid for c in old["components"] for pid in c["pids"]}
    os.kill(old["supervisor"]["pid"], signal.SIGKILL)  # its parts live on, in sessions of their own
    wait_for(lambda: kaiten(env, "status").returncode == 3, 10, "status to say not running")
    assert running(orphans)
    second = kaiten(env, "up", "--no-sample", timeout=300)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "killing processes a previous kaiten left running" in second.stdout, second.stdout
    assert not running(orphans)
    assert not Path(old["endpoints"]["ray_temp_dir"]).exists()
    assert all(c["state"] == "healthy" for c in status_of(state)["components"])
    stopped = kaiten(env, "down", "--purge", timeout=240)
    assert stopped.returncode == 0 and not state.exists(), stopped.stdout
    assert ours(state) == []


def test_ctrl_c_during_up_stops_what_it_started(state: Path) -> None:
    env = {**os.environ, "KAITEN_STATE_DIR": str(state), "KAITEN_SERVE_PORT": str(free_port())}
    up = subprocess.Popen(
        [str(KAITEN), "up"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
        # as in a terminal: a runner that started us in the background may have SIGINT ignored, and an
        # ignored SIGINT is inherited (Python then never raises KeyboardInterrupt)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    assert up.stdout is not None
    seen = [up.stdout.readline() for _ in range(3)]  # the banner, then the first parts as they serve
    assert seen[1].startswith("✓ nats"), seen
    up.send_signal(signal.SIGINT)
    out, _ = up.communicate(timeout=200)
    assert up.returncode == 130 and "interrupted: stopping what was started" in out, out
    assert kaiten(env, "status").returncode == 3
    assert ours(state) == []


def test_down_kills_only_recorded_processes_that_are_still_the_same_process(tmp_path: Path) -> None:
    """Issue 16 (8): after a reboot a recorded PID may belong to someone else. ``reap`` compares each
    PID's start (boot id + start time) with what was recorded, and spares a process that is not it."""
    import io

    from kaiten.cli.local import reap
    from kaiten.local.procs import identity

    ours_now = subprocess.Popen(["sleep", "60"])
    stranger = subprocess.Popen(["sleep", "60"])  # a "reused" PID: recorded with another start
    try:
        recorded = {
            "components": [
                {"name": "a", "pids": [ours_now.pid], "ids": {str(ours_now.pid): identity(ours_now.pid)}},
                {"name": "b", "pids": [stranger.pid], "ids": {str(stranger.pid): "another-boot:12345"}},
            ]
        }
        out = io.StringIO()
        reap(recorded, out)
        assert ours_now.wait(timeout=10) == -signal.SIGKILL
        assert stranger.poll() is None, "a process that is not ours was killed"
        assert "not ours any more" in out.getvalue(), out.getvalue()
    finally:
        for proc in (ours_now, stranger):
            proc.kill()
            proc.wait(timeout=10)
