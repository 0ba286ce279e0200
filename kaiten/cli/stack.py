"""The local system's supervisor: what ``kaiten up`` starts in the background.

``python -m kaiten.cli.stack STATE_DIR`` holds ``STATE_DIR/lock`` for its lifetime (a second one
exits at once), starts the parts in order — NATS JetStream, etcd + kube-apiserver (plus the
Workspace CRD and the local registry's pull/push Secret), the OCI registry, the dataset file server,
a Ray head, then the watcher, planner, provisioner and workload services — and then watches them.
A part that dies is restarted in place (same address) with backoff; a service whose ``/readyz``
(:mod:`shared.probes`, on the port it writes to ``KAITEN_PROBE_PORT_FILE``) never answers 200 is
reported unhealthy. Everything is written to ``STATE_DIR/status.json`` (atomically), which
``kaiten up``/``status``/``down`` read. SIGTERM stops the parts in reverse order.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import fcntl
import http.client
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

import yaml

from kaiten.bundle import DATA_DIR
from kaiten.local.controlplane import BUILD_ESTIMATE, ControlPlane, binaries
from kaiten.local.nats_server import NatsServer
from kaiten.local.procs import ManagedProcess, StartFailed, descendants, free_port, identity, port_open
from kaiten.local.ray_head import RayHead
from shared.api.crd import render as render_crd
from shared.api.policy import render as render_policy
from shared.bus.backoff import delay_for

PROJECT = Path(__file__).resolve().parents[2]  # where Ray Serve replicas import services.serving from
SERVICES = ("watcher", "planner", "provisioner", "workload")
DEFAULT_SERVE_PORT = 8000
# Fixed, because the project's own examples (examples/local/) name them; override with the env vars.
REGISTRY_PORT = 5310
DATA_PORT = 8310
REGISTRY_SECRET = "kaiten-local-registry"  # noqa: S105 - a Secret's name; in namespace default: the push/pull Secret for the examples
REGISTRY_USER = "kaiten"
RAY_PIDS_EVERY_S = 5.0
STARTUP_S = 120.0  # a part not healthy this long after (re)starting is reported unhealthy


def env_port(name: str, default: int) -> int:
    return int(os.environ.get(name, "") or default)


@dataclass
class Part:
    """One supervised piece: how to (re)start, stop and judge it."""

    name: str
    launch: Callable[[], None]  # starts it; raises StartFailed with the reason
    halt: Callable[[], object]
    alive: Callable[[], bool]  # its processes are running
    ready: Callable[[], bool]  # it serves
    pids: Callable[[], list[int]]
    exit_code: Callable[[], int | None] = lambda: None
    endpoint: str = ""
    log: str = ""
    state: str = "pending"  # pending, starting, healthy, unhealthy, restarting, disabled, stopped
    detail: str = ""
    restarts: int = 0
    last_exit: str = ""  # why it last died, kept after it recovers
    since: float = field(default_factory=time.time)
    next_try: float = 0.0

    def set(self, state: str, detail: str = "") -> None:
        if (state, detail) != (self.state, self.detail):
            self.state, self.detail, self.since = state, detail, time.time()

    def _pids(self) -> list[int]:
        if self.state in ("disabled", "stopped", "pending"):
            return []
        try:
            return self.pids()
        except (AttributeError, AssertionError):  # not launched yet
            return []

    def view(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "state": self.state,
            "detail": self.detail,
            "since": self.since,
            "restarts": self.restarts,
            "last_exit": self.last_exit,
            "pids": (pids := self._pids()),
            "ids": {str(pid): identity(pid) for pid in pids},  # `down` kills only these very processes
            "endpoint": self.endpoint,
            "log": self.log,
        }


def exit_reason(code: int | None) -> str:
    if code is None:
        return "exited"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


class _Stop(Exception):
    pass


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise _Stop


class Stack:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.status_path = root / "status.json"
        self.parts: list[Part] = []
        self.phase = "starting"
        self.message = ""
        self.started = time.time()
        self.endpoints: dict[str, str] = {}
        self.env: dict[str, str] = {}
        self._written = ""
        self._ray_seen: tuple[float, list[int]] = (0.0, [])

    # --- status file --------------------------------------------------------------------------

    def write(self) -> None:
        data = {
            "supervisor": {
                "pid": os.getpid(),
                "started_at": self.started,
                "phase": self.phase,
                "message": self.message,
            },
            "components": [p.view() for p in self.parts],
            "endpoints": self.endpoints,
        }
        text = json.dumps(data, indent=1)
        if text == self._written:
            return
        tmp = self.status_path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(self.status_path)
        self._written = text

    def note(self, text: str) -> None:
        stamp = dt.datetime.now().strftime("%H:%M:%S")
        print(f"{stamp} {text}", flush=True)

    # --- the parts ----------------------------------------------------------------------------

    def build(self) -> None:
        root = self.root
        nats = NatsServer(root / "nats")
        self.parts.append(
            Part(
                "nats",
                launch=lambda: self._start_nats(nats),
                halt=nats.stop,
                alive=lambda: nats.process.alive(),
                ready=lambda: port_open("127.0.0.1", nats.port),
                pids=lambda: [nats.process.pid],
                exit_code=lambda: _code(nats.process),
                log=str(root / "nats" / "nats-server.log"),
            )
        )
        cp = ControlPlane(root / "controlplane")
        self.parts.append(
            Part(
                "kube-apiserver",
                launch=lambda: self._start_controlplane(cp),
                halt=cp.stop,
                alive=lambda: bool(cp.processes) and all(p.alive() for p in cp.processes),
                ready=lambda: port_open("127.0.0.1", cp.api_port),
                pids=lambda: [p.pid for p in cp.processes],
                exit_code=lambda: next((_code(p) for p in cp.processes if not p.alive()), None),
                log=str(root / "controlplane" / "kube-apiserver.log"),
            )
        )
        self.parts.append(self._registry())
        data_port = env_port("KAITEN_DATA_PORT", DATA_PORT)
        files = ManagedProcess(
            "files",
            [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "--directory", str(DATA_DIR),
             str(data_port)],
            root / "files.log",
        )  # fmt: skip
        self.parts.append(self._process_part("files", files, data_port, f"http://127.0.0.1:{data_port}"))
        ray = RayHead(root / "ray", dashboard=True, pythonpath=[PROJECT])
        self.parts.append(
            Part(
                "ray",
                launch=lambda: self._start_ray(ray),
                halt=ray.stop,
                alive=lambda: ray.process.alive(),
                ready=lambda: port_open("127.0.0.1", ray.dashboard_port),
                pids=lambda: self._ray_pids(ray),
                exit_code=lambda: _code(ray.process),
                log=str(root / "ray" / "ray-head.log"),
            )
        )
        for name in SERVICES:
            self.parts.append(self._service(name))

    def _process_part(self, name: str, proc: ManagedProcess, port: int, endpoint: str) -> Part:
        def launch() -> None:
            if port_open("127.0.0.1", port):
                raise StartFailed(f"127.0.0.1:{port} is already in use by another program")
            proc.start()

        return Part(
            name,
            launch=launch,
            halt=proc.stop,
            alive=proc.alive,
            ready=lambda: port_open("127.0.0.1", port),
            pids=lambda: [proc.pid] if proc.proc else [],
            exit_code=lambda: _code(proc),
            endpoint=endpoint,
            log=str(proc.log_path),
        )

    def _registry(self) -> Part:
        port = env_port("KAITEN_REGISTRY_PORT", REGISTRY_PORT)
        binary = shutil.which("docker-registry")
        root = self.root / "registry"
        proc = ManagedProcess("registry", [binary or "docker-registry", "serve", str(root / "config.yml")],
                              root / "registry.log")  # fmt: skip
        part = self._process_part("registry", proc, port, f"127.0.0.1:{port}")
        if binary is None:
            part.set(
                "disabled",
                "docker-registry is not installed (`make tools`, or apt-get install docker-registry); "
                "the tuning examples need it",
            )
            return part
        root.mkdir(parents=True, exist_ok=True)
        password_file = root / "password"
        if not password_file.exists():
            password_file.write_text(secrets.token_urlsafe(24))
            password_file.chmod(0o600)
        password = password_file.read_text().strip()
        import bcrypt  # the registry reads bcrypt htpasswd only

        (root / "htpasswd").write_text(
            f"{REGISTRY_USER}:{bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=8)).decode()}\n"
        )
        config = {
            "version": 0.1,
            "log": {"level": "warn"},
            "storage": {"filesystem": {"rootdirectory": str(root / "data")}, "delete": {"enabled": True}},
            "http": {"addr": f"127.0.0.1:{port}", "secret": secrets.token_hex(16)},
            "auth": {"htpasswd": {"realm": "kaiten", "path": str(root / "htpasswd")}},
        }
        (root / "config.yml").write_text(yaml.safe_dump(config))
        (root / "config.yml").chmod(0o600)
        return part

    def _service(self, name: str) -> Part:
        proc = ManagedProcess(
            name, [sys.executable, "-m", f"services.{name}"], self.root / f"{name}.log", cwd=PROJECT
        )
        # The service binds any free port for its probes and writes it here: a port chosen for it in
        # advance could be taken by another process (Ray opens many) before it starts.
        port_file = self.root / f"{name}.probe-port"

        def launch() -> None:
            port_file.unlink(missing_ok=True)
            proc.env = {**self.env, "KAITEN_PROBE_PORT": "0", "KAITEN_PROBE_PORT_FILE": str(port_file)}
            proc.start()

        def ready() -> bool:  # the same /readyz a kubelet probes in a cluster
            try:
                port = int(port_file.read_text())
            except (OSError, ValueError):
                return False
            part.endpoint = f"http://127.0.0.1:{port}"
            return _answers_200(f"{part.endpoint}/readyz")

        part = Part(
            name,
            launch=launch,
            halt=proc.stop,
            alive=proc.alive,
            ready=ready,
            pids=lambda: [proc.pid] if proc.proc else [],
            exit_code=lambda: _code(proc),
            log=str(proc.log_path),
        )
        return part

    def _ray_pids(self, ray: RayHead) -> list[int]:
        """The head and every process below it (workers, Serve replicas), for ``down`` to reap.

        ``ps`` is asked at most every few seconds, not on every supervision pass.
        """
        if not ray.process.alive():
            return []
        now = time.monotonic()
        if now - self._ray_seen[0] > RAY_PIDS_EVERY_S or self._ray_seen[1][:1] != [ray.pid]:
            self._ray_seen = (now, [ray.pid, *sorted(descendants(ray.pid))])
        return self._ray_seen[1]

    def _start_nats(self, nats: NatsServer) -> None:
        nats.start()
        self.env["KAITEN_NATS_URL"] = self.endpoints["nats_url"] = nats.url
        self.part("nats").endpoint = nats.url

    def _start_controlplane(self, cp: ControlPlane) -> None:
        part = self.part("kube-apiserver")
        if not all(path.exists() for path in binaries().values()):
            part.set(
                "starting",
                f"building etcd + kube-apiserver from Go modules (first run only; {BUILD_ESTIMATE})",
            )
            self.write()
        cp.start()
        part.endpoint = cp.server
        self.env["KUBECONFIG"] = self.endpoints["kubeconfig"] = str(cp.kubeconfig)
        crd = self.root / "kaito.sh_workspaces.yaml"  # the CRD from the models: no file to find
        crd.write_text(render_crd())
        policy = self.root / "workspaces.kaito.sh-policy.yaml"  # KAITO's annotation checks
        policy.write_text(render_policy())
        self._kubectl("apply", "--server-side", "--force-conflicts", "-f", str(crd), "-f", str(policy))
        if self.part("registry").state != "disabled":
            self._apply_registry_secret()

    def _apply_registry_secret(self) -> None:
        port = env_port("KAITEN_REGISTRY_PORT", REGISTRY_PORT)
        password = (self.root / "registry" / "password").read_text().strip()
        auth = base64.b64encode(f"{REGISTRY_USER}:{password}".encode()).decode()
        config = json.dumps({"auths": {f"127.0.0.1:{port}": {"auth": auth}}})
        secret = {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "kubernetes.io/dockerconfigjson",
            "metadata": {"name": REGISTRY_SECRET, "namespace": "default",
                         "labels": {"app.kubernetes.io/managed-by": "kaiten-up"}},
            "data": {".dockerconfigjson": base64.b64encode(config.encode()).decode()},
        }  # fmt: skip
        self._kubectl("apply", "-f", "-", stdin=json.dumps(secret))  # stdin: never on a command line

    def _kubectl(self, *args: str, stdin: str | None = None) -> None:
        env = {**os.environ, "KUBECONFIG": self.env["KUBECONFIG"]}
        result = subprocess.run(
            ["kubectl", *args], input=stdin, env=env, capture_output=True, text=True, check=False, timeout=60
        )
        if result.returncode != 0:
            raise StartFailed(f"kubectl {args[0]} failed: {result.stderr.strip()[-2000:]}")

    def _start_ray(self, ray: RayHead) -> None:
        ray.start()
        serve_port = self.endpoints.get("serve_url", "").rsplit(":", 1)[-1]
        port = int(serve_port) if serve_port.isdigit() else _serve_port()
        self.part("ray").endpoint = ray.dashboard_url
        self.endpoints |= {
            "ray_dashboard": ray.dashboard_url,
            "serve_url": f"http://127.0.0.1:{port}",
            "ray_temp_dir": str(ray.temp_dir),
        }
        self.env |= {
            "KAITEN_RAY_DASHBOARD_URL": ray.dashboard_url,
            "KAITEN_RAY_TOKEN_PATH": str(ray.token_path),
            "KAITEN_SERVE_PORT": str(port),
        }
        (self.root / "endpoints.json").write_text(json.dumps(self.endpoints))

    def part(self, name: str) -> Part:
        return next(p for p in self.parts if p.name == name)

    # --- running ------------------------------------------------------------------------------

    def start(self) -> None:
        self.env = {
            **os.environ,
            "KAITEN_PROVIDER": os.environ.get("KAITEN_PROVIDER", "local"),
            # the finalizer waits for these owners of external state to report cleanup
            "KAITEN_CLEANUP_OWNERS": "provisioner,workload",
            "KAITEN_WORK_DIR": str(self.root / "workload"),
            "KAITEN_ALLOW_LOOPBACK_URLS": "true",  # the tuning examples' dataset is served from here
            # one replica of each service, restarted under the same identity: it leads again at once
            # (shared.bus.leadership), not after its killed predecessor's entry expires
            "KAITEN_REPLICA_ID": os.environ.get("KAITEN_REPLICA_ID", "local"),
        }
        for part in self.parts:
            if part.state == "disabled":
                continue
            part.set("starting", part.detail if part.state == "starting" else "")
            self.write()
            try:
                part.launch()
            except StartFailed as exc:
                part.set("unhealthy", _first_line(str(exc)))
                self.phase, self.message = "failed", f"{part.name} did not start: {exc}"
                self.write()
                raise
            if part.ready():  # most launches wait until they serve; services answer /readyz a bit later
                part.set("healthy")
                self.write()
            self.note(f"started {part.name} {part.endpoint}".rstrip())
        deadline = time.monotonic() + STARTUP_S
        while time.monotonic() < deadline:
            self.check()
            if all(p.state in ("healthy", "disabled") for p in self.parts):
                break
            time.sleep(0.2)
        waiting = [p.name for p in self.parts if p.state not in ("healthy", "disabled")]
        if waiting:
            self.phase = "degraded"
            self.message = f"not healthy after {STARTUP_S:.0f}s: {', '.join(waiting)}"
        else:
            self.phase, self.message = "up", f"up in {time.time() - self.started:.1f}s"
        self.note(self.message)
        self.write()

    def check(self) -> None:
        """One supervision pass: judge each part, restart what died (with backoff)."""
        now = time.time()
        for part in self.parts:
            if part.state in ("disabled", "stopped", "pending"):
                continue
            if part.state == "restarting":
                if now >= part.next_try:
                    self._restart(part)
                continue
            if not part.alive():
                reason = exit_reason(part.exit_code())
                with contextlib.suppress(Exception):
                    part.halt()  # the rest of it (etcd without its apiserver, Ray's workers)
                part.restarts += 1
                wait = delay_for(part.restarts, base=1.0, cap=30.0)
                part.next_try = now + wait
                stamp = dt.datetime.now().strftime("%H:%M:%S")
                part.last_exit = f"{reason} at {stamp}"
                part.set("restarting", f"{part.last_exit}; restart #{part.restarts} in {wait:.0f}s")
                self.note(f"{part.name} {reason}; restart #{part.restarts} in {wait:.0f}s (log: {part.log})")
                continue
            if part.ready():
                if part.state != "healthy":
                    part.set("healthy")
            elif part.state == "healthy":
                part.set("unhealthy", "running but not answering")
            elif now - part.since > STARTUP_S and part.state == "starting":
                part.set("unhealthy", f"not ready after {STARTUP_S:.0f}s (log: {part.log})")
        if self.phase in ("up", "degraded"):
            bad = [p for p in self.parts if p.state not in ("healthy", "disabled")]
            self.phase = "degraded" if bad else "up"
            self.message = "; ".join(f"{p.name}: {p.state}" for p in bad)
        self.write()

    def _restart(self, part: Part) -> None:
        part.set("starting", f"restart #{part.restarts}")
        self.write()
        try:
            part.launch()
        except StartFailed as exc:
            with contextlib.suppress(Exception):
                part.halt()
            part.restarts += 1
            wait = delay_for(part.restarts, base=1.0, cap=30.0)
            part.next_try = time.time() + wait
            part.set("restarting", f"{_first_line(str(exc))}; restart #{part.restarts} in {wait:.0f}s")
            self.note(f"{part.name} did not restart: {exc}")

    def stop(self) -> None:
        if self.phase != "failed":
            self.phase, self.message = "stopping", ""
        self.write()
        for part in reversed(self.parts):
            if part.state in ("disabled", "pending", "stopped"):
                continue
            with contextlib.suppress(Exception):
                part.halt()
            part.set("stopped")
            self.note(f"stopped {part.name}")
            self.write()
        if self.phase != "failed":
            self.phase = "stopped"
        self.write()


def _answers_200(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=0.5) as response:  # noqa: S310 (a loopback http URL)
            return bool(response.status == 200)
    except (OSError, ValueError, http.client.HTTPException):  # refused, timed out, 503, or not HTTP at all
        return False


def _code(proc: ManagedProcess) -> int | None:
    return proc.proc.poll() if proc.proc else None


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else text


def _serve_port() -> int:
    """``KAITEN_SERVE_PORT``, else 8000 when it is free (a stable URL), else any free port."""
    wanted = env_port("KAITEN_SERVE_PORT", 0)
    if wanted:
        return wanted
    return DEFAULT_SERVE_PORT if not port_open("127.0.0.1", DEFAULT_SERVE_PORT) else free_port()


def lock(root: Path) -> TextIO | None:
    """The state dir's lock, held for the supervisor's life; None when another supervisor holds it."""
    root.mkdir(parents=True, exist_ok=True)
    handle = (root / "lock").open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle


def run(root: Path) -> int:
    held = lock(root)
    if held is None:
        print(f"another kaiten supervisor holds {root / 'lock'}", file=sys.stderr)
        return 3
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _raise_stop)
    stack = Stack(root)
    code = 0
    try:
        stack.build()
        stack.write()
        stack.start()
        while True:
            time.sleep(0.5)
            stack.check()
    except _Stop:
        stack.note("stopping (SIGTERM)")
    except StartFailed as exc:
        stack.note(f"start failed: {exc}")
        code = 1
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):  # a second signal must not cut the orderly stop short
            signal.signal(sig, signal.SIG_IGN)
        stack.stop()
        held.close()
    return code


if __name__ == "__main__":
    sys.exit(run(Path(sys.argv[1])))
