"""A Ray head of our own (``ray start --head --block``): every listener on 127.0.0.1, token auth on,
session files in our own directory, stopped by its PID (never ``ray stop``, which kills by name).

``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` is what keeps ``--node-ip-address 127.0.0.1`` from being
rewritten to the machine's network address (see docs/decisions.md). Ray 2.60 turns token auth on for
``ray start``; we generate the token into the state dir and give drivers the same file, so nothing is
written to ``~/.ray``. A driver joins with :func:`connect`. Ray reads the loopback switch when it is
first imported, so a driver process must set ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` before anything
imports ``ray`` (:func:`connect` refuses to go on otherwise, rather than dial the network address).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from kaiten.local.procs import (
    ManagedProcess,
    StartFailed,
    descendants,
    free_ports,
    kill_pids,
    port_open,
    running,
    wait_until,
)

READY_LINE = "Ray runtime started"
# Ray's own shutdown gives each of its ~8 processes 1 s after SIGTERM: 10 s bounds it with room to spare.
STOP_GRACE_S = 10.0


def ray_binary() -> Path:
    beside = Path(sys.executable).parent / "ray"
    if beside.exists():
        return beside
    raise StartFailed(
        "ray not found beside this python: install the 'serving' extra (pip install -e '.[serving]')"
    )


@dataclass
class RayHead:
    """``with RayHead(dir) as head: head.address``; fresh ports (outside Ray's worker range) each start."""

    state_dir: Path
    num_cpus: int = 2
    dashboard: bool = False  # the Serve REST API lives on the dashboard; ~0.3 GB more
    startup_timeout: float = 90.0
    pythonpath: list[Path] = field(default_factory=list)  # where replicas import the app from
    port: int = 0
    dashboard_port: int = 0
    temp_dir: Path | None = None

    def command(self) -> list[str]:
        """The ``ray start`` command line. Ports not given are chosen now, all different: Ray refuses
        to start when two of its parts are given one port."""
        given = {self.port, self.dashboard_port} - {0}
        picked = iter([p for p in free_ports(4 + len(given)) if p not in given])
        self.port = self.port or next(picked)
        self.dashboard_port = self.dashboard_port or next(picked)
        argv = [
            str(ray_binary()),
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={self.port}",
            f"--ray-client-server-port={next(picked)}",  # default 10001 is fixed: two heads would clash
            f"--dashboard-agent-listen-port={next(picked)}",  # default 52365, likewise
            f"--num-cpus={self.num_cpus}",
            f"--temp-dir={self.temp_dir}",
            "--disable-usage-stats",
        ]
        if self.dashboard:
            argv += [
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}",
            ]
        else:
            argv += ["--include-dashboard=false"]
        return argv

    def start(self) -> RayHead:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        # Ray's unix socket paths are length-limited: keep its session dir short, under /tmp.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="kr-", dir="/tmp"))
        self.token_path = self.state_dir / "ray_auth_token"
        if not self.token_path.exists():
            self.token_path.write_text(secrets.token_hex(32))
            self.token_path.chmod(0o600)
        argv = self.command()
        # On SIGTERM Ray first drains the node, waiting up to 30 s (its default) for Serve replicas to
        # move to another node; a one-node head has none, so it only waited: no drain.
        env = {**os.environ, **self.driver_env(), "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
        if self.pythonpath:
            env["PYTHONPATH"] = os.pathsep.join(
                [*map(str, self.pythonpath), *filter(None, [os.environ.get("PYTHONPATH")])]
            )
        log = self.state_dir / "ray-head.log"
        # kept before it starts: a stop signal held through the start is raised in start(), and the
        # stop that follows must find the process (a CI run's Ctrl-C left a Ray head running)
        self.process = ManagedProcess(name="ray head", argv=argv, log_path=log, env=env)
        self.process.start()
        try:
            self.process.wait_ready(
                lambda: READY_LINE in log.read_text(errors="replace") and port_open("127.0.0.1", self.port),
                timeout=self.startup_timeout,
                what=f"did not start on 127.0.0.1:{self.port}",
                interval=0.2,
            )
        except StartFailed:
            self.stop()
            raise
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard_url(self) -> str:
        if not self.dashboard:
            raise RuntimeError("this Ray head runs without the dashboard (RayHead(dashboard=True))")
        return f"http://127.0.0.1:{self.dashboard_port}"

    def driver_env(self) -> dict[str, str]:
        """What a driver (or ``ray start``) needs in its environment to join this head on loopback."""
        return {
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(self.token_path),
        }

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> bool:
        """Stop everything the head started, by PID; True when SIGTERM sufficed (no SIGKILL).

        SIGTERM to ``ray start --block`` runs Ray's own shutdown: each of its processes (GCS, raylet,
        dashboard, log monitor, ...) gets SIGTERM and one second before SIGKILL, and the workers exit
        once their raylet is gone. Ray's node drain on SIGTERM, which waited up to 30 s for Serve
        replicas to move to another node, is off (:meth:`driver_env`: a single node has no other).
        Measured on 2 cores: about 2 s with Serve and a model replica running. We poll every 0.1 s;
        if ``ray start`` is not gone after ``STOP_GRACE_S`` every remaining process below it gets
        SIGTERM too (they are all ours), and whatever is still alive ``STOP_GRACE_S`` later is killed.
        Workers start sessions of their own, so none of this relies on the process group.
        """
        proc = self.process.proc
        if proc is None or proc.poll() is not None:
            self._cleanup()
            return True
        below = descendants(proc.pid)
        proc.send_signal(signal.SIGTERM)
        graceful = wait_until(lambda: proc.poll() is not None, STOP_GRACE_S)
        if not graceful:
            for pid in running(below | descendants(proc.pid)):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
            graceful = wait_until(lambda: proc.poll() is not None, STOP_GRACE_S)
        lingering: set[int] = set()
        if graceful:  # the workers exit once their raylet is gone
            wait_until(lambda: not running(below), STOP_GRACE_S)
            lingering = running(below)
        else:
            lingering = running(below | descendants(proc.pid)) | {proc.pid}
        kill_pids(lingering)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        self._cleanup()
        return graceful and not lingering

    def _cleanup(self) -> None:
        if self.temp_dir is not None:
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> RayHead:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def connect(head: RayHead) -> None:
    """Make this process a driver of ``head``, on loopback."""
    os.environ.update(head.driver_env())
    import ray
    from ray._private import ray_constants
    from ray._raylet import AuthenticationTokenLoader, Config  # type: ignore[attr-defined]

    # Ray caches its auth settings when first used: re-read them, as ray itself does when it turns
    # token auth on for a process (authentication_token_setup._enable_token_auth).
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()

    if ray_constants.ENABLE_RAY_CLUSTER:
        raise RuntimeError(
            "ray was imported before RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 was set, so it would dial the"
            " machine's network address: set it in the environment before importing ray"
        )
    ray.init(address=head.address, _node_ip_address="127.0.0.1", log_to_driver=False, configure_logging=False)
