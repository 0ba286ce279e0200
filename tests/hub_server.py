"""A Hugging Face hub on 127.0.0.1 for the planner: the two requests KAITO's preset generator (and
Kaiten's planner) make, answered from ``tests/data/hub/<org>/<repo>/`` (real ``config.json`` files and
their repos' file lists).

- ``GET /api/models/<org>/<repo>/tree/main?recursive=true`` → ``tree.json``
- ``GET /<org>/<repo>/resolve/main/config.json`` → ``config.json``

Repos under ``gated/`` answer 401, under ``broken/`` 500; any other unknown repo 404. Every request is
recorded (path), so a test can count them.
"""

from __future__ import annotations

import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data" / "hub"
TREE = re.compile(r"^/api/models/([^/]+/[^/]+)/tree/main$")
RESOLVE = re.compile(r"^/([^/]+/[^/]+)/resolve/main/(.+)$")


class HubServer:
    def __init__(self) -> None:
        self.requests: list[str] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # the http.server API
                path = self.path.split("?", 1)[0]
                owner.requests.append(path)
                tree, resolve = TREE.match(path), RESOLVE.match(path)
                repo = (tree or resolve).group(1) if (tree or resolve) else ""
                if repo.startswith("gated/"):
                    return self._send(401, b'{"error": "Access to model is restricted"}')
                if repo.startswith("broken/"):
                    return self._send(500, b'{"error": "internal"}')
                file = DATA / repo / ("tree.json" if tree else resolve.group(2) if resolve else "")
                if not repo or not file.is_file():
                    return self._send(404, b'{"error": "Repository not found"}')
                return self._send(200, file.read_bytes())

            def _send(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
        assert not self._thread.is_alive()
