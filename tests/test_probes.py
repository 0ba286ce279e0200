"""Every service's ``/healthz``, ``/readyz`` and ``/metrics`` (shared.probes), on a real service process
against a real NATS server and apiserver; and a stuck event loop reported by the probe thread."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

from kaiten.local.nats_server import NatsServer
from kaiten.local.procs import free_port
from shared.probes import Probes, Readiness
from tests.conftest import Services, http_get, until


def get(url: str) -> tuple[int, str]:
    return http_get(url, timeout=2)


@pytest.mark.controlplane
@pytest.mark.nats
async def test_readyz_follows_nats_and_metrics_count_events(
    services: Services, nats_server: NatsServer
) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    services.start("services.planner", KAITEN_PROBE_PORT=str(port))
    await until(lambda: get(f"{base}/readyz")[0] == 200, timeout=30, what=f"planner ready\n{services.logs()}")
    assert get(f"{base}/healthz") == (200, "ok\n")
    status, metrics = get(f"{base}/metrics")
    assert status == 200
    assert 'kaiten_ready{service="planner"} 1.0' in metrics
    assert "kaiten_loop_lag_seconds" in metrics and "kaiten_events_total" in metrics

    nats_server.stop()  # the bus goes away: the planner is alive, but not ready
    await until(lambda: get(f"{base}/readyz")[0] == 503, timeout=10, what="readyz 503 without NATS")
    status, body = get(f"{base}/readyz")
    assert "NATS not connected" in body, body
    assert get(f"{base}/healthz")[0] == 200  # not a reason to restart it: it reconnects
    assert 'kaiten_ready{service="planner"} 0.0' in get(f"{base}/metrics")[1]

    nats_server.start()  # same port and store
    await until(lambda: get(f"{base}/readyz")[0] == 200, timeout=30, what=f"ready again\n{services.logs()}")
    assert get(f"{base}/nope")[0] == 404


def test_a_stuck_event_loop_fails_healthz_and_readyz() -> None:
    """The loop beats through Probes.beat(); here no loop beats, as when one is blocked: the probe
    thread still answers, and says so."""
    probes = Probes("test", port=0, stuck_after_s=0.5).start()
    base = f"http://127.0.0.1:{probes.port}"
    try:
        probes.beat(0.0, Readiness(()))
        assert get(f"{base}/healthz") == (200, "ok\n")
        assert get(f"{base}/readyz") == (200, "ready\n")
        time.sleep(0.8)
        status, body = get(f"{base}/healthz")
        assert status == 503 and "event loop stuck" in body, body
        assert get(f"{base}/readyz")[0] == 503
        probes.beat(0.8, Readiness(("NATS not connected",)))
        assert get(f"{base}/healthz")[0] == 200
        assert get(f"{base}/readyz") == (503, "not ready: NATS not connected\n")
    finally:
        probes.stop()
    assert get(f"{base}/healthz")[0] == 0  # the port is closed after stop()


@pytest.mark.controlplane
@pytest.mark.nats
async def test_a_service_picks_its_probe_port_and_writes_it(services: Services, tmp_path: Path) -> None:
    """What ``kaiten up`` does: port 0 and a port file, so no other process can take a port chosen in
    advance (CI once saw Ray's gRPC answer on a port picked for a service's probes)."""
    port_file = tmp_path / "planner.probe-port"
    services.start("services.planner", KAITEN_PROBE_PORT="0", KAITEN_PROBE_PORT_FILE=str(port_file))
    await until(port_file.exists, timeout=30, what=f"the port file\n{services.logs()}")
    port = int(port_file.read_text())
    await until(lambda: get(f"http://127.0.0.1:{port}/readyz")[0] == 200, timeout=30, what="ready")


def test_the_supervisor_judges_a_port_that_speaks_no_http_as_not_ready() -> None:
    """A port answered by something else (binary, not HTTP) is "not ready", not a crash of the
    supervisor (http.client.BadStatusLine is no OSError)."""
    from kaiten.cli.stack import _answers_200

    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def answer() -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(1024)
            conn.sendall(b"\x00\x00\x12\x04\x00\x00\x00\x00\x00garbage\r\n\r\n")

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    try:
        assert _answers_200(f"http://127.0.0.1:{port}/readyz") is False
    finally:
        thread.join(5)
        server.close()
