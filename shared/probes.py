"""Every service's ``/healthz``, ``/readyz`` and ``/metrics``, on one port (``KAITEN_PROBE_PORT``).

The endpoints are served from a thread, not from the service's event loop, so a stuck loop is
*reported* rather than merely unanswered: the loop beats every second (:meth:`Probes.beat`), and the
thread compares the last beat with ``stuck_after_s``.

- ``/healthz`` — the process is alive and its loop is not stuck. 503 means "restart me".
- ``/readyz`` — the service does its job: connected to NATS, the apiserver answered recently, and
  every component runs. 503 means "do not count on me yet"; the body names what is missing.
- ``/metrics`` — Prometheus text format (prometheus_client's registry).

Readiness is computed on the loop (it owns the clients) and published to the thread as an immutable
snapshot; the thread only reads it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest

from shared.metrics import LOOP_LAG, READY

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Readiness:
    missing: tuple[str, ...] = ("starting",)

    @property
    def ready(self) -> bool:
        return not self.missing


@dataclass
class Probes:
    """The probe server of one service process. ``port=0`` picks a free port (see :attr:`port`)."""

    service: str
    host: str = "127.0.0.1"
    port: int = 0
    stuck_after_s: float = 30.0
    registry: CollectorRegistry = REGISTRY
    clock: Callable[[], float] = time.monotonic
    _readiness: Readiness = field(default_factory=Readiness)
    _last_beat: float = field(default=0.0)
    _server: ThreadingHTTPServer | None = None

    def start(self) -> Probes:
        self._last_beat = self.clock()
        probes = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/healthz":
                    status, body, kind = probes.health()
                elif path == "/readyz":
                    status, body, kind = probes.readiness()
                elif path == "/metrics":
                    status, body, kind = 200, generate_latest(probes.registry), CONTENT_TYPE_LATEST
                else:
                    status, body, kind = 404, b"not found: /healthz, /readyz, /metrics\n", "text/plain"
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                return  # probes every few seconds would drown the service's own log

        self._server = ThreadingHTTPServer((self.host, self.port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, name=f"probes:{self.port}", daemon=True).start()
        log.info("probes on http://%s:%d (/healthz /readyz /metrics)", self.host, self.port)
        return self

    def write_port(self, path: Path) -> None:
        """The bound port, for a supervisor that let the service pick it (atomically: never half)."""
        tmp = path.with_name(f"{path.name}.tmp")
        tmp.write_text(str(self.port))
        tmp.replace(path)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        READY.labels(self.service).set(0)

    def beat(self, lag: float, readiness: Readiness) -> None:
        """Called by the loop once a second: it is alive, this late, and this ready."""
        self._last_beat = self.clock()
        self._readiness = readiness
        LOOP_LAG.labels(self.service).set(lag)
        READY.labels(self.service).set(1 if readiness.ready else 0)

    def _stuck_for(self) -> float | None:
        silent = self.clock() - self._last_beat
        return silent if silent > self.stuck_after_s else None

    def health(self) -> tuple[int, bytes, str]:
        stuck = self._stuck_for()
        if stuck is not None:
            return 503, f"event loop stuck: no beat for {stuck:.0f}s\n".encode(), "text/plain"
        return 200, b"ok\n", "text/plain"

    def readiness(self) -> tuple[int, bytes, str]:
        stuck = self._stuck_for()
        if stuck is not None:
            return 503, f"not ready: event loop stuck for {stuck:.0f}s\n".encode(), "text/plain"
        current = self._readiness
        if not current.ready:
            return 503, f"not ready: {', '.join(current.missing)}\n".encode(), "text/plain"
        return 200, b"ready\n", "text/plain"
