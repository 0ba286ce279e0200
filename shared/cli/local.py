"""``kaiten up``: the system on one machine, in the foreground.

What runs today: a JetStream nats-server, the real etcd + kube-apiserver (built from Go modules on
first use), the Workspace CRD, the watcher/status-writer, the planner and the provisioner (provider
``local``: this machine is the one node), supervised (restarted with backoff if one dies). The
workload, serving and tuning services arrive with their issues; until then ``up`` says so instead of
pretending.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

from shared.api.crd import CRD_PATH
from shared.bus.backoff import delay_for
from shared.local.controlplane import ControlPlane
from shared.local.nats_server import NatsServer
from shared.local.procs import ManagedProcess, StartFailed

SERVICES = ("services.watcher", "services.planner", "services.provisioner")
NOT_YET = {
    "workload": "issue 7",
    "serving SmolLM2 on Ray Serve (built; deployed by the workload)": "issue 7",
    "tuning jobs (built; run by the workload)": "issue 7",
    "sample Workspace": "issue 8",
}


def state_dir() -> Path:
    base = os.environ.get("KAITEN_STATE_DIR") or str(Path.home() / ".local" / "state" / "kaiten")
    return Path(base)


def _already_running(pid_file: Path) -> int | None:
    try:
        pid = int(pid_file.read_text())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


class _Stop(Exception):
    pass


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise _Stop


def up(root: Path) -> int:
    root.mkdir(parents=True, exist_ok=True)
    pid_file = root / "up.pid"
    if (pid := _already_running(pid_file)) is not None:
        print(
            f"kaiten up is already running (pid {pid}, state in {root}); stop it with Ctrl-C there "
            f"or `kill {pid}`",
            file=sys.stderr,
        )
        return 1
    pid_file.write_text(str(os.getpid()))
    for sig in (signal.SIGTERM, signal.SIGINT):  # SIGINT too: a background job may inherit it ignored
        signal.signal(sig, _raise_stop)
    started = time.monotonic()
    nats = cp = None
    procs: list[ManagedProcess] = []
    try:
        nats = NatsServer(root / "nats").start()
        print(f"✓ NATS JetStream     {nats.url}", flush=True)
        cp = ControlPlane(root / "controlplane").start()
        print(f"✓ kube-apiserver     {cp.server}", flush=True)
        env = {
            **os.environ,
            "KUBECONFIG": str(cp.kubeconfig),
            "KAITEN_NATS_URL": nats.url,
            "KAITEN_PROVIDER": os.environ.get("KAITEN_PROVIDER", "local"),
            # the finalizer waits for these owners of external state to report cleanup
            "KAITEN_CLEANUP_OWNERS": "provisioner",
        }
        subprocess.run(["kubectl", "apply", "-f", str(CRD_PATH)], env=env, check=True, capture_output=True)
        print("✓ Workspace CRD     workspaces.kaito.sh (v1alpha1, v1beta1)", flush=True)
        (root / "endpoints.json").write_text(
            json.dumps({"nats_url": nats.url, "kubeconfig": str(cp.kubeconfig)})
        )
        procs = [_service(module, root, env) for module in SERVICES]
        print(f"✓ services           {', '.join(m.split('.')[-1] for m in SERVICES)}", flush=True)
        for part, issue in NOT_YET.items():
            print(f"· not yet            {part} ({issue})", flush=True)
        print(
            f"\nup in {time.monotonic() - started:.1f}s. In another terminal:\n"
            f"  export KUBECONFIG={cp.kubeconfig}\n"
            f"  kubectl apply -f examples/local/workspace-smollm2.yaml && kubectl get workspace -o wide\n"
            f"  kaiten plan -f examples/seed/workspace-phi-3-mini.yaml   # what a GPU cluster would get\n"
            f"  kaiten events\n"
            f"Logs: {root}/*.log. Ctrl-C stops everything.",
            flush=True,
        )
        _supervise(procs, root, env)
    except (KeyboardInterrupt, _Stop):
        print("\nstopping ...", flush=True)
    except StartFailed as exc:
        print(f"kaiten up failed: {exc}", file=sys.stderr)
        return 1
    finally:
        for proc in procs:
            proc.stop()
        if cp is not None:
            cp.stop()
        if nats is not None:
            nats.stop()
        pid_file.unlink(missing_ok=True)
    return 0


def _service(module: str, root: Path, env: dict[str, str]) -> ManagedProcess:
    return ManagedProcess(
        name=module,
        argv=[sys.executable, "-m", module],
        log_path=root / f"{module.split('.')[-1]}.log",
        env=env,
    ).start()


def _supervise(procs: list[ManagedProcess], root: Path, env: dict[str, str]) -> None:
    """Restart a crashed service with backoff, saying so; runs until Ctrl-C/SIGTERM."""
    restarts = dict.fromkeys(range(len(procs)), 0)
    while True:
        time.sleep(0.5)
        for index, proc in enumerate(procs):
            if proc.alive():
                continue
            restarts[index] += 1
            wait = delay_for(restarts[index], base=1.0, cap=30.0)
            print(
                f"! {proc.name} exited ({proc.proc.returncode if proc.proc else '?'}); restart "
                f"#{restarts[index]} in {wait:.0f}s — see {proc.log_path}",
                flush=True,
            )
            time.sleep(wait)
            procs[index] = _service(proc.name, root, env)
