"""Nothing of ours listens on, or talks to, anything but loopback."""

from __future__ import annotations

import asyncio
import re
import subprocess

import pytest
from nats.aio.client import Client

from kaiten.local.controlplane import ControlPlane
from kaiten.local.nats_server import NatsServer
from tests.conftest import Kubectl, Services

pytestmark = [pytest.mark.controlplane, pytest.mark.nats]
LOOPBACK = re.compile(r"^(127\.\d+\.\d+\.\d+|\[::1\]|\[::ffff:127\.\d+\.\d+\.\d+\]):\d+$")


def sockets(pids: set[int], *, listening: bool) -> list[tuple[str, str, int]]:
    """(local, peer, pid) of TCP sockets owned by ``pids`` (from ``ss``)."""
    out = subprocess.run(
        ["ss", "-Htnp", *(["-l"] if listening else [])], capture_output=True, text=True, check=True
    ).stdout
    found = []
    for line in out.splitlines():
        cols = line.split()
        for pid in map(int, re.findall(r"pid=(\d+)", line)):
            if pid in pids:
                found.append((cols[3], cols[4], pid))
    return found


async def test_every_listener_and_connection_is_on_loopback(
    controlplane: ControlPlane,
    nats_server: NatsServer,
    nc: Client,
    services: Services,
    kubectl: Kubectl,
    namespace: str,
) -> None:
    watcher = services.start("services.watcher")
    for _ in range(300):
        if watcher.log_path.exists() and "watcher ready" in watcher.log_path.read_text():
            break
        await asyncio.sleep(0.05)
    pids = {p.pid for p in controlplane.processes} | {nats_server.process.pid, watcher.pid}
    listeners = sockets(pids, listening=True)
    connections = sockets(pids, listening=False)
    assert {pid for _, _, pid in listeners} >= {
        nats_server.process.pid,
        *(p.pid for p in controlplane.processes),
    }
    assert connections, "expected the watcher's connections to NATS and the apiserver"
    bad = [s for s in listeners if not LOOPBACK.match(s[0])]
    bad += [s for s in connections if not (LOOPBACK.match(s[0]) and LOOPBACK.match(s[1]))]
    assert not bad, f"non-loopback sockets: {bad}"
