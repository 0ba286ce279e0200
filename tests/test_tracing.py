"""Traces leave the services (issue 19): a real OTLP/HTTP receiver in the test decodes what the
OpenTelemetry SDK's exporter sends (``opentelemetry-proto``), and one Workspace's trace runs from the
watcher's observation through the planner, the provisioner (its nodes become ready in a later
reconcile pass) and the workload (the RayService deploy, and ``InferenceReady`` from its reconcile
pass) — one trace id, one root, every other span's parent in the trace. After the run every service's
``/metrics`` shows the events it handled."""

from __future__ import annotations

import asyncio
import gzip
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2_grpc import (
    TraceServiceServicer,
    add_TraceServiceServicer_to_server,
)
from prometheus_client.parser import text_string_to_metric_families

from services.provisioner.providers.base import WORKSPACE_NAMESPACE_LABEL
from shared import telemetry
from tests.conftest import Kubectl, Services, http_get, until
from tests.test_planner_e2e import manifest
from tests.test_provisioner_e2e import FAST
from tests.test_provisioner_nodeclaim import CRD as NODECLAIM_CRD
from tests.test_provisioner_nodeclaim import claims, launch
from tests.test_workload_kuberay import IMAGE, kuberay_crds, kuberay_writes, ready_status  # noqa: F401

pytestmark = [pytest.mark.controlplane, pytest.mark.nats]


@dataclass(frozen=True)
class Span:
    service: str
    trace: str
    id: str
    parent: str
    name: str


class Receiver(ThreadingHTTPServer):
    """An OTLP/HTTP trace receiver: ``POST /v1/traces`` with an ``ExportTraceServiceRequest``."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.spans: list[Span] = []
        self.lock = threading.Lock()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def trace_of(self, trace: str) -> list[Span]:
        with self.lock:
            return [s for s in self.spans if s.trace == trace]


def spans_of(request: ExportTraceServiceRequest) -> list[Span]:
    got = []
    for resource_spans in request.resource_spans:
        attrs = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
        for scope in resource_spans.scope_spans:
            got += [
                Span(attrs["service.name"], s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex(), s.name)
                for s in scope.spans
            ]
    return got


class GrpcReceiver(TraceServiceServicer):
    """An OTLP/gRPC trace receiver: the collector's ``TraceService/Export`` on a loopback port."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.server = grpc.server(ThreadPoolExecutor(max_workers=2))
        add_TraceServiceServicer_to_server(self, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")

    def Export(self, request: ExportTraceServiceRequest, context: object) -> ExportTraceServiceResponse:
        self.spans += spans_of(request)
        return ExportTraceServiceResponse()


class _Handler(BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        got = spans_of(ExportTraceServiceRequest.FromString(body))
        with self.server.lock:
            self.server.spans += got
        reply = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def tree(spans: list[Span]) -> str:
    """The span tree, indented, for the failure message and the note."""
    children: dict[str, list[Span]] = {}
    for s in spans:
        children.setdefault(s.parent, []).append(s)
    lines: list[str] = []

    def walk(parent: str, depth: int) -> None:
        for s in children.get(parent, []):
            lines.append(f"{'  ' * depth}{s.service}: {s.name}")
            walk(s.id, depth + 1)

    walk("", 0)
    return "\n".join(lines)


def sample(metrics: str, name: str, **labels: str) -> float:
    """One sample's value in a ``/metrics`` text (prometheus_client's parser); 0 when absent."""
    for family in text_string_to_metric_families(metrics):
        for found in family.samples:
            if found.name == name and all(found.labels.get(k) == v for k, v in labels.items()):
                return float(found.value)
    return 0.0


def handled(metrics: str, consumer: str) -> float:
    """The sum of ``kaiten_events_total{consumer=…,outcome="handled"}`` over every kind."""
    return sum(
        float(found.value)
        for family in text_string_to_metric_families(metrics)
        for found in family.samples
        if found.name == "kaiten_events_total"
        and found.labels.get("consumer") == consumer
        and found.labels.get("outcome") == "handled"
    )


@pytest.mark.timeout(180)
@pytest.mark.usefixtures("kuberay_crds")
async def test_one_trace_from_apply_to_inference_ready(
    kubectl: Kubectl, namespace: str, services: Services, receiver: Receiver, tmp_path: Path
) -> None:
    otel = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100",
            "KAITEN_LOG_FORMAT": "json"}  # fmt: skip

    def probes(name: str) -> dict[str, str]:
        return {"KAITEN_PROBE_PORT": "0", "KAITEN_PROBE_PORT_FILE": str(tmp_path / f"{name}.port")}

    kubectl.run("apply", "-f", str(NODECLAIM_CRD), check=True)
    kubectl.wait_established("nodeclaims.karpenter.sh")
    nodes: list[str] = []
    try:
        await services.start_ready("services.watcher", **otel, **probes("watcher"))
        await services.start_ready(
            "services.planner", KAITEN_PROVIDER="nodeclaim", **otel, **probes("planner")
        )
        await services.start_ready("services.provisioner", KAITEN_PROVIDER="nodeclaim", **FAST, **otel,
                                   **probes("provisioner"))  # fmt: skip
        await services.start_ready("services.workload", KAITEN_BACKEND="kuberay", KAITEN_RAY_IMAGE=IMAGE,
                                   **FAST, **otel, **probes("workload"))  # fmt: skip
        ws = manifest("traced", "phi-3-mini-4k-instruct", "Standard_NC12s_v3")
        kubectl.run("apply", "-n", namespace, "-f", "-", stdin=ws, check=True)

        def mine() -> list[dict[str, Any]]:
            return [
                c
                for c in claims(kubectl)
                if c["metadata"]["labels"].get(WORKSPACE_NAMESPACE_LABEL) == namespace
            ]

        await until(lambda: mine(), timeout=30, what=f"the NodeClaim\n{services.logs()}")
        nodes += [launch(kubectl, c) for c in mine()]  # Karpenter: NodesReady comes from a later pass
        await until(
            lambda: kubectl.run("get", "rayservice", "traced", "-n", namespace).returncode == 0,
            timeout=60,
            what=f"the RayService\n{services.logs()}",
        )
        app = "traced"
        kuberay_writes(kubectl, namespace, "rayservice", "traced", ready_status(1, "traced-x1", app))
        kubectl.run("wait", "-n", namespace, "--for=condition=InferenceReady", "workspace/traced",
                    "--timeout=60s", check=True)  # fmt: skip

        def ready_span() -> Span | None:
            name = f"kaiten.workload.inference_ready.{namespace}.traced publish"
            with receiver.lock:
                return next((s for s in receiver.spans if s.name == name), None)

        await until(lambda: ready_span() is not None, timeout=30, what="the InferenceReady publish span")
        found = ready_span()
        assert found is not None
        # Each service exports its spans on its own schedule: the status writer's span for the
        # InferenceReady event may come after the workload's publish (a CI run asserted in between).
        # (the assertion below shows the tree of what came, if something never does)
        deadline = time.monotonic() + 30
        while missing(receiver.trace_of(found.trace), namespace) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    finally:
        if nodes:
            kubectl.run("delete", "node", *nodes, "--wait=false")
    spans = receiver.trace_of(found.trace)
    shown = tree(spans)
    print(f"\ntrace {found.trace}:\n{shown}")
    ids = {s.id for s in spans}
    roots = [s for s in spans if not s.parent]
    assert [(r.service, r.name) for r in roots] == [("kaiten-watcher", "workspace observe")], shown
    assert all(s.parent in ids for s in spans if s.parent), f"a parent outside the trace\n{shown}"
    # every service's /metrics counts what it handled (the watcher's consumer is its status writer)
    scraped: dict[str, str] = {}
    for service, consumer in [("watcher", "status-writer"), ("planner", "planner"),
                              ("provisioner", "provisioner"), ("workload", "workload")]:  # fmt: skip
        port = (tmp_path / f"{service}.port").read_text().strip()
        status, metrics = http_get(f"http://127.0.0.1:{port}/metrics")
        assert status == 200 and handled(metrics, consumer) > 0, f"{service}:\n{metrics[:3000]}"
        print(f"{service} /metrics:", *(line for line in metrics.splitlines() if line.startswith("kaiten_")
                                         and "_bucket" not in line), sep="\n  ")  # fmt: skip
        assert f'kaiten_consumer_pending{{consumer="{consumer}"}} 0.0' in metrics, metrics  # caught up
        scraped[service] = metrics
    assert 'kaiten_workspaces{state="Ready"} 1.0' in scraped["watcher"]
    assert (
        'kaiten_provider_calls_total{operation="ensure",outcome="ready",provider="nodeclaim"} 1.0'
        in (scraped["provisioner"])
    )
    for service in ("provisioner", "workload"):  # the passes that saw the nodes and the RayService ready
        assert sample(scraped[service], "kaiten_reconcile_passes_total", loop="reconcile", outcome="done") > 0
    # JSON logs: every line an object; the lines about the Workspace name it and join its trace
    uid = kubectl.json("get", "workspace", "traced", "-n", namespace)["metadata"]["uid"]
    for proc in services.procs:
        records = [json.loads(line) for line in proc.log_path.read_text().splitlines() if line.strip()]
        about = [r for r in records if r.get("uid") == uid]
        assert about, f"{proc.name}: no line about the Workspace\n{records[-20:]}"
        for record in about:
            assert (record["namespace"], record["name"], record["generation"]) == (namespace, "traced", 1)
            assert {"time", "level", "logger", "message", "service", "replica"} <= set(record), record
        assert any(r.get("trace_id") == found.trace for r in about), f"{proc.name}: {about}"
        if proc.name.startswith(("planner", "provisioner", "workload")):  # consumers: the event handled
            assert any(r.get("event_id") for r in about), f"{proc.name}: {about}"
        print(f"{proc.name}:", json.dumps(about[0]))
    assert not missing(spans, namespace), f"{missing(spans, namespace)} missing from\n{shown}"


EXPECTED = [
    ("kaiten-watcher", "kaiten.workspace.observed publish"),
    ("kaiten-planner", "kaiten.workspace.observed process"),
    ("kaiten-planner", "kaiten.plan.resolved publish"),
    ("kaiten-provisioner", "kaiten.plan.resolved process"),
    ("kaiten-provisioner", "nodeclaim ensure"),
    ("kaiten-provisioner", "POST nodeclaims"),  # a kube call is a client span
    ("kaiten-provisioner", "kaiten.nodes.ready publish"),  # from a reconcile pass: the trace goes on
    ("kaiten-workload", "kaiten.nodes.ready process"),
    ("kaiten-workload", "ray deploy"),
    ("kaiten-workload", "kaiten.workload.inference_ready publish"),  # the workload's reconcile pass
    ("kaiten-watcher", "kaiten.workload.inference_ready process"),  # the status writer
    ("kaiten-watcher", "PATCH workspaces/status"),  # … and its status patch
]


def missing(spans: list[Span], namespace: str) -> list[tuple[str, str]]:
    """The (service, span name) pairs of one Workspace's trace not among ``spans``."""
    names = {(s.service, s.name.replace(f".{namespace}.traced", "")) for s in spans}
    return [expected for expected in EXPECTED if expected not in names]


@pytest.mark.parametrize(
    ("path", "name"),
    [
        ("/apis/kaito.sh/v1beta1/namespaces/ns/workspaces/w/status", "workspaces/status"),
        ("/apis/kaito.sh/v1beta1/workspaces", "workspaces"),
        ("/apis/karpenter.sh/v1/nodeclaims/c1", "nodeclaims"),
        ("/api/v1/namespaces/ns/events", "events"),
        ("/api/v1/namespaces/ns", "namespaces"),
        ("/version", "version"),
        ("/tenant-kaiten/oauth2/v2.0/token", "oauth2/v2.0/token"),
        ("/subscriptions/s/resourceGroups/g/providers/Microsoft.ContainerService/managedClusters/c/agentPools/p",
         "agentPools"),
        ("/subscriptions/s/resourceGroups/g/providers/Microsoft.ContainerService/managedClusters/c/agentPools",
         "agentPools"),
    ],
)  # fmt: skip
def test_kube_and_arm_spans_are_named_by_resource_not_by_object(path: str, name: str) -> None:
    assert telemetry.route(path) == name


def test_tracing_is_off_unless_the_environment_says_where(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    assert telemetry.configure("planner") is None
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    assert telemetry.configure("planner") is None
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")
    with pytest.raises(SystemExit, match=r"http/protobuf .* or grpc"):
        telemetry.configure("planner")


@pytest.mark.timeout(120)
async def test_traces_leave_over_grpc_too_with_a_span_per_kube_call(
    kubectl: Kubectl, namespace: str, services: Services
) -> None:
    receiver = GrpcReceiver()
    receiver.server.start()
    try:
        await services.start_ready(
            "services.watcher",
            OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{receiver.port}",
            OTEL_EXPORTER_OTLP_PROTOCOL="grpc",
            OTEL_BSP_SCHEDULE_DELAY="100",
        )
        ws = manifest("grpc", "phi-3-mini-4k-instruct", "Standard_NC12s_v3")
        kubectl.run("apply", "-n", namespace, "-f", "-", stdin=ws, check=True)

        def names() -> set[tuple[str, str]]:
            return {(s.service, s.name) for s in list(receiver.spans)}

        expected = {
            ("kaiten-watcher", "workspace observe"),  # the root of the Workspace's trace
            ("kaiten-watcher", "GET workspaces"),  # the apiserver list, as an aiohttp client span
            ("kaiten-watcher", "PATCH workspaces"),  # the finalizer
        }
        await until(lambda: expected <= names(), timeout=30, what=f"{expected} over gRPC: {names()}")
    finally:
        receiver.server.stop(grace=None).wait(10)
