"""OpenTelemetry tracing across NATS: trace context travels in message headers.

Publisher and consumer middleware follow the OpenTelemetry messaging conventions
(``messaging.system=nats``, ``messaging.destination.name``, ``messaging.message.id``).

:func:`configure` (called once by the service lifecycle) sets up the SDK from the standard ``OTEL_*``
variables: spans are exported over OTLP when ``OTEL_EXPORTER_OTLP_ENDPOINT`` or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is set — HTTP/protobuf by default, gRPC with
``OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL=grpc`` — and not at all otherwise (or with
``OTEL_TRACES_EXPORTER=none`` / ``OTEL_SDK_DISABLED=true``). ``OTEL_SERVICE_NAME`` and
``OTEL_RESOURCE_ATTRIBUTES`` are honoured; the service name defaults to ``kaiten-<service>``. Every
kube and ARM request (both clients are aiohttp's) is a client span, by OpenTelemetry's aiohttp
instrumentation.

Work that a reconcile loop finishes later (nodes ready, a deployment running) continues the trace of
the event that started it: the handler keeps :func:`carrier` in its KV record and the pass resumes it
with :func:`resumed`, so one trace runs from ``kubectl apply`` to ``InferenceReady``.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING

from opentelemetry import context, propagate, trace
from opentelemetry.trace import INVALID_SPAN, Span, SpanKind

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter

tracer = trace.get_tracer("kaiten")
FLUSH_S = 3.0  # the longest a stopping service waits for its last spans to leave
_recording = False  # a TracerProvider is installed (configure): spans are made, not only passed on
log = logging.getLogger(__name__)


def configure(service: str) -> Callable[[], None] | None:
    """Install a TracerProvider exporting over OTLP/HTTP if the environment asks for one; returns its
    shutdown (which flushes what is batched), or None when tracing stays off."""
    env = os.environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    if env.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() in ("none", ""):
        return None
    if not _endpoint_given(env):
        return None
    protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
    protocol = protocol or "http/protobuf"
    if protocol not in ("http/protobuf", "grpc"):
        raise SystemExit(
            f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol}: Kaiten exports traces over http/protobuf (the "
            "collector's port 4318) or grpc (4317)"
        )
    from opentelemetry.instrumentation.aiohttp_client import AioHttpClientInstrumentor
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    attributes = {} if env.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: f"kaiten-{service}"}
    # shut down by the lifecycle, bounded (below): not again at exit, where an absent collector would
    # hold the process through the exporter's retries
    provider = TracerProvider(resource=Resource.create(attributes), shutdown_on_exit=False)
    provider.add_span_processor(BatchSpanProcessor(_exporter(protocol)))  # endpoint, headers: OTEL_*
    trace.set_tracer_provider(provider)
    global _recording
    _recording = True
    AioHttpClientInstrumentor().instrument(  # before any client session exists
        tracer_provider=provider,
        request_hook=lambda span, params: span.update_name(f"{params.method} {route(params.url.path)}"),
    )
    log.info("traces exported over OTLP (%s) as %s", protocol, provider.resource.attributes.get(SERVICE_NAME))

    def shutdown() -> None:
        """Flush what is batched, for at most ``FLUSH_S``: a collector that is down must not hold a
        stopping service past its grace (the exporter retries for up to 10 s per batch)."""
        AioHttpClientInstrumentor().uninstrument()
        flushing = threading.Thread(target=provider.shutdown, name="otel-shutdown", daemon=True)
        flushing.start()
        flushing.join(FLUSH_S)
        if flushing.is_alive():
            log.warning("traces not all exported within %.0fs (is the collector up?); dropping them", FLUSH_S)

    return shutdown


def route(path: str) -> str:
    """The resource a kube or ARM request is about, without names (a span name has few values):
    ``/apis/kaito.sh/v1beta1/namespaces/ns/workspaces/w/status`` → ``workspaces/status``,
    ``/subscriptions/s/resourceGroups/g/…/managedClusters/c/agentPools/p`` → ``agentPools``."""
    parts = [part for part in path.split("/") if part]
    if "oauth2" in parts:  # a sign-in (Microsoft Entra): /<tenant>/oauth2/v2.0/token
        return "/".join(parts[parts.index("oauth2") :])
    if parts[:1] == ["subscriptions"]:  # ARM: collection/name pairs; the collection is what counts
        return parts[-1] if len(parts) % 2 else parts[-2]
    if parts[:1] == ["api"]:
        parts = parts[2:]  # api/v1
    elif parts[:1] == ["apis"]:
        parts = parts[3:]  # apis/<group>/<version>
    if parts[:1] == ["namespaces"] and len(parts) > 2:
        parts = parts[2:]
    if not parts:
        return path
    return f"{parts[0]}/{parts[2]}" if len(parts) > 2 else parts[0]


def _exporter(protocol: str) -> SpanExporter:
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as Grpc

        return Grpc()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as Http

    return Http()


def _endpoint_given(env: Mapping[str, str]) -> bool:
    """Whether the environment says where traces go (without that, tracing is off)."""
    return bool(env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT"))


def forwarded_env(service: str) -> dict[str, str]:
    """The ``OTEL_*`` variables of this process, for a process it starts (a tuning job) to export its
    spans to the same place under its own name; empty when tracing is off here."""
    env = {key: value for key, value in os.environ.items() if key.startswith("OTEL_")}
    if not _endpoint_given(env):
        return {}
    return {**env, "OTEL_SERVICE_NAME": f"kaiten-{service}"}


def carrier() -> dict[str, str]:
    """The current trace context as headers (``traceparent``), to keep with work that goes on later."""
    return inject_headers({})


@contextmanager
def resumed(headers: Mapping[str, str] | None) -> Iterator[None]:
    """Continue the trace in ``headers`` (from :func:`carrier`): spans started inside (a publish, say)
    join it. No span of its own, so a reconcile pass that does nothing leaves nothing behind."""
    token = context.attach(propagate.extract(dict(headers or {})))
    try:
        yield
    finally:
        context.detach(token)


@contextmanager
def span(name: str, **attributes: str | int) -> Iterator[Span]:
    """A span of this service's own work (a kube or cloud call, a deployment) under the current one."""
    with tracer.start_as_current_span(name, attributes=attributes) as current:
        yield current


def inject_headers(headers: dict[str, str]) -> dict[str, str]:
    """Add ``traceparent``/``tracestate`` for the current span to ``headers``."""
    propagate.inject(headers)
    return headers


@contextmanager
def publish_span(subject: str, msg_id: str) -> Iterator[Span]:
    with tracer.start_as_current_span(
        f"{subject} publish",
        kind=SpanKind.PRODUCER,
        attributes={
            "messaging.system": "nats",
            "messaging.operation.type": "publish",
            "messaging.destination.name": subject,
            "messaging.message.id": msg_id,
        },
    ) as span:
        yield span


@contextmanager
def consume_span(subject: str, headers: dict[str, str] | None, consumer: str) -> Iterator[Span]:
    """A CONSUMER span whose parent is the publisher's span from the headers.

    With tracing off here no span is made (it would record nothing), but the publisher's context is
    still made current, so what this handler publishes carries the trace on."""
    if not _recording:
        if not headers or "traceparent" not in headers:
            yield INVALID_SPAN
            return
        token = context.attach(propagate.extract(headers))
        try:
            yield trace.get_current_span()
        finally:
            context.detach(token)
        return
    parent = propagate.extract(headers or {})
    token = context.attach(parent)
    try:
        with tracer.start_as_current_span(
            f"{subject} process",
            kind=SpanKind.CONSUMER,
            attributes={
                "messaging.system": "nats",
                "messaging.operation.type": "process",
                "messaging.destination.name": subject,
                "messaging.consumer.group.name": consumer,
            },
        ) as span:
            yield span
    finally:
        context.detach(token)
