"""A local server that speaks the Azure Resource Manager agent-pool protocol (and Entra ID's token
endpoint) over https on 127.0.0.1, so the real Azure SDK and credential classes can be tested.

It plays the cloud: a PUT starts an operation (``Azure-AsyncOperation`` header, ``provisioningState``
Creating/Updating → Succeeded after a few polls), a DELETE likewise; when a pool succeeds, its nodes
are registered in the real test apiserver (Ready, GPU capacity, the pool's labels and taints), and
removed when it shrinks or goes. Faults are injected per request (429 with Retry-After, 500, quota),
and every request is recorded (method, path, query, JSON body, whether it carried a bearer token).
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import re
import ssl
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

POOL = re.compile(
    r"^/subscriptions/(?P<sub>[^/]+)/resourceGroups/(?P<rg>[^/]+)/providers/Microsoft\.ContainerService"
    r"/managedClusters/(?P<cluster>[^/]+)/agentPools(?:/(?P<pool>[^/]+))?$"
)
TOKEN = re.compile(r"^/(?P<tenant>[^/]+)/oauth2/v2\.0/token$")
OPERATION = re.compile(r"^/operations/(?P<op>[^/]+)$")
GPUS = {"Standard_NC6s_v3": 1, "Standard_NC12s_v3": 2, "Standard_NC24s_v3": 4, "Standard_NC24ads_A100_v4": 1}


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 (and localhost) and its key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kaiten-test-arm")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "arm-cert.pem", directory / "arm-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


@dataclass
class Fault:
    method: str
    path_part: str
    status: int
    body: dict[str, Any]
    headers: dict[str, str]
    times: int
    body_part: str = ""  # only requests whose body contains this (a VM size, say)


@dataclass
class Operation:
    pool: str
    kind: str  # create | update | delete
    done_at: float  # like the cloud, an operation finishes in its own time, polled or not
    finished: bool = False


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, list[str]]
    body: Any
    authorized: bool
    at: float  # time.monotonic()
    status: int = 0


@dataclass
class ArmServer:
    directory: Path
    nodes: Callable[[str, dict[str, Any] | None, int], None]  # (pool, pool doc or None, count) → registers
    duration: float = 1.0  # seconds a create/update/delete takes
    pools: dict[str, dict[str, Any]] = field(default_factory=dict)
    operations: dict[str, Operation] = field(default_factory=dict)
    faults: list[Fault] = field(default_factory=list)
    requests: list[Recorded] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> ArmServer:
        self.cert, key = self_signed(self.directory)
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                return

            def _handle(self) -> None:
                server.serve(self)

            do_GET = do_PUT = do_DELETE = do_POST = _handle

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert, key)
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        return self

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def fail(
        self,
        method: str,
        path_part: str,
        status: int,
        code: str = "",
        message: str = "",
        *,
        times: int = 1,
        headers: dict[str, str] | None = None,
        body_part: str = "",
    ) -> None:
        body = {"error": {"code": code or f"Http{status}", "message": message or f"injected {status}"}}
        self.faults.append(Fault(method, path_part, status, body, headers or {}, times, body_part))

    def pool_requests(self, method: str, pool: str = "") -> list[Recorded]:
        """Requests on one agent pool (or any), by method."""
        found = []
        for r in self.requests:
            m = POOL.match(r.path)
            if r.method == method and m is not None and m["pool"] and (not pool or m["pool"] == pool):
                found.append(r)
        return found

    # -- the protocol ---------------------------------------------------------------------------------

    def serve(self, h: BaseHTTPRequestHandler) -> None:
        url = urlsplit(h.path)
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length) if length else b""
        try:
            body: Any = json.loads(raw) if raw and "json" in (h.headers.get("Content-Type") or "") else None
        except ValueError:
            body = None
        authorized = (h.headers.get("Authorization") or "").startswith("Bearer ")
        with self.lock:
            record = Recorded(h.command, url.path, parse_qs(url.query), body, authorized, time.monotonic())
            self.requests.append(record)
            self._advance()
            status, doc, headers = self._route(h.command, url.path, parse_qs(url.query), raw, authorized)
            record.status = status
        payload = json.dumps(doc).encode() if doc is not None else b""
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(payload)))
        h.send_header("x-ms-request-id", str(uuid.uuid4()))
        for k, v in headers.items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(payload)

    def _route(
        self, method: str, path: str, query: dict[str, list[str]], raw: bytes, authorized: bool
    ) -> tuple[int, Any, dict[str, str]]:
        if method == "POST" and TOKEN.match(path):
            form = parse_qs(raw.decode())
            if form.get("client_secret") != ["test-secret-do-not-log"]:
                return 401, {"error": "invalid_client", "error_description": "bad secret"}, {}
            return (
                200,
                {"access_token": "arm-token-" + uuid.uuid4().hex, "expires_in": 3600, "token_type": "Bearer"},
                {},
            )
        if not authorized:
            return 401, {"error": {"code": "AuthenticationFailed", "message": "no bearer token"}}, {}
        for fault in self.faults:
            if (
                fault.times > 0
                and fault.method == method
                and fault.path_part in path
                and fault.body_part.encode() in raw
            ):
                fault.times -= 1
                return fault.status, fault.body, fault.headers
        if m := OPERATION.match(path):
            return self._operation(m["op"])
        m = POOL.match(path)
        if m is None:
            return 404, {"error": {"code": "NotFound", "message": path}}, {}
        name = m["pool"]
        if name is None:
            return 200, {"value": [self._doc(p) for p in self.pools.values()]}, {}
        if method == "GET":
            pool = self.pools.get(name)
            if pool is None:
                return 404, {"error": {"code": "NotFound", "message": f"agent pool {name} not found"}}, {}
            return 200, self._doc(pool), {}
        if method == "PUT":
            doc = json.loads(raw)
            props = doc.get("properties") or {}
            existing = self.pools.get(name)
            pool = {
                "name": name,
                "id": path,
                "properties": {**props, "provisioningState": "Updating" if existing else "Creating"},
            }
            self.pools[name] = pool
            return self._start(name, "update" if existing else "create", 200 if existing else 201, pool)
        if method == "DELETE":
            if name not in self.pools:
                return 204, None, {}
            self.pools[name]["properties"]["provisioningState"] = "Deleting"
            return self._start(name, "delete", 202, None)
        return 405, None, {}

    def _start(self, pool: str, kind: str, status: int, doc: Any) -> tuple[int, Any, dict[str, str]]:
        op = uuid.uuid4().hex
        self.operations[op] = Operation(pool=pool, kind=kind, done_at=time.monotonic() + self.duration)
        headers = {"Azure-AsyncOperation": f"{self.url}/operations/{op}", "Retry-After": "0"}
        if kind == "delete":
            headers["Location"] = f"{self.url}/operations/{op}"
        return status, self._doc(doc) if doc else None, headers

    def _operation(self, op_id: str) -> tuple[int, Any, dict[str, str]]:
        op = self.operations.get(op_id)
        if op is None:
            return 404, {"error": {"code": "NotFound", "message": "operation"}}, {}
        if not op.finished:
            return 200, {"id": op_id, "status": "InProgress"}, {"Retry-After": "0"}
        return 200, {"id": op_id, "status": "Succeeded"}, {}

    def _advance(self) -> None:
        """Finish the operations whose time has come: the pool's state, and its Nodes in the cluster."""
        now = time.monotonic()
        for op in self.operations.values():
            if op.finished or now < op.done_at:
                continue
            op.finished = True
            pool = self.pools.get(op.pool)
            if op.kind == "delete":
                self.pools.pop(op.pool, None)
                self.nodes(op.pool, None, 0)
            elif pool is not None and pool["properties"]["provisioningState"] != "Deleting":
                pool["properties"]["provisioningState"] = "Succeeded"
                self.nodes(op.pool, pool, int(pool["properties"].get("count", 0)))

    def tick(self) -> None:
        """Let time pass without a request (the cloud works while nobody asks)."""
        with self.lock:
            self._advance()

    @staticmethod
    def _doc(pool: dict[str, Any]) -> dict[str, Any]:
        return {
            "type": "Microsoft.ContainerService/managedClusters/agentPools",
            **json.loads(json.dumps(pool)),
        }
