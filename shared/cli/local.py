"""``kaiten up``: the system on one machine, in the foreground.

What runs: a JetStream nats-server, the real etcd + kube-apiserver (built from Go modules on first
use), the Workspace CRD, a Ray head with the dashboard (loopback only, token auth), and the watcher/
status-writer, planner, provisioner (provider ``local``: this machine is the one node) and workload
(backend ``local``: Serve applications on that Ray) services, supervised (restarted with backoff if
one dies). Tuning Workspaces run as Ray jobs; adapters are pulled from their registry by the replica.
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
from shared.local.procs import ManagedProcess, StartFailed, free_port, port_open
from shared.local.ray_head import RayHead

SERVICES = ("services.watcher", "services.planner", "services.provisioner", "services.workload")
DEFAULT_SERVE_PORT = 8000


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
    nats = cp = ray = None
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
            "KAITEN_CLEANUP_OWNERS": "provisioner,workload",
        }
        subprocess.run(["kubectl", "apply", "-f", str(CRD_PATH)], env=env, check=True, capture_output=True)
        print("✓ Workspace CRD     workspaces.kaito.sh (v1alpha1, v1beta1)", flush=True)
        ray = RayHead(root / "ray", dashboard=True, pythonpath=[PROJECT]).start()
        serve_port = _serve_port()
        env |= {
            "KAITEN_RAY_DASHBOARD_URL": ray.dashboard_url,
            "KAITEN_RAY_TOKEN_PATH": str(ray.token_path),
            "KAITEN_SERVE_PORT": str(serve_port),
            "KAITEN_WORK_DIR": str(root / "workload"),
            "KAITEN_ALLOW_LOOPBACK_URLS": "true",  # local tuning data may be served from this machine
        }
        print(
            f"✓ Ray                {ray.address} (dashboard {ray.dashboard_url});"
            f" Serve on 127.0.0.1:{serve_port}",
            flush=True,
        )
        (root / "endpoints.json").write_text(
            json.dumps(
                {
                    "nats_url": nats.url,
                    "kubeconfig": str(cp.kubeconfig),
                    "ray_dashboard": ray.dashboard_url,
                    "serve_url": f"http://127.0.0.1:{serve_port}",
                    "ray_temp_dir": str(ray.temp_dir),
                }
            )
        )
        procs = [_service(module, root, env) for module in SERVICES]
        print(f"✓ services           {', '.join(m.split('.')[-1] for m in SERVICES)}", flush=True)
        print(
            f"\nup in {time.monotonic() - started:.1f}s. In another terminal:\n"
            f"  export KUBECONFIG={cp.kubeconfig}\n"
            f"  kubectl apply -f examples/local/workspace-smollm2.yaml && kubectl get workspace -o wide\n"
            f"  kubectl wait --for=condition=InferenceReady workspace/workspace-smollm2 --timeout=5m\n"
            f"  curl -s http://127.0.0.1:{serve_port}/default/workspace-smollm2/chat \\\n"
            f"       -H 'content-type: application/json'"
            f' -d \'{{"messages": [{{"role": "user", "content": "What is the capital of France?"}}]}}\'\n'
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
        if ray is not None:
            ray.stop()
        if cp is not None:
            cp.stop()
        if nats is not None:
            nats.stop()
        pid_file.unlink(missing_ok=True)
    return 0


PROJECT = Path(__file__).resolve().parents[2]  # where Ray Serve replicas import services.serving from


def _serve_port() -> int:
    """``KAITEN_SERVE_PORT``, else 8000 when it is free (a stable URL), else any free port."""
    wanted = int(os.environ.get("KAITEN_SERVE_PORT", "0") or 0)
    if wanted:
        return wanted
    return DEFAULT_SERVE_PORT if not port_open("127.0.0.1", DEFAULT_SERVE_PORT) else free_port()


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
