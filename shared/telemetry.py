"""OpenTelemetry tracing across NATS: trace context travels in message headers.

Publisher and consumer middleware follow the OpenTelemetry messaging conventions
(``messaging.system=nats``, ``messaging.destination.name``, ``messaging.message.id``).

:func:`configure` (called once by the service lifecycle) sets up the SDK from the standard ``OTEL_*``
variables: spans are exported over OTLP/HTTP (protobuf) when ``OTEL_EXPORTER_OTLP_ENDPOINT`` or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is set, and not at all otherwise (or with
``OTEL_TRACES_EXPORTER=none`` / ``OTEL_SDK_DISABLED=true``). ``OTEL_SERVICE_NAME`` and
``OTEL_RESOURCE_ATTRIBUTES`` are honoured; the service name defaults to ``kaiten-<service>``.

Work that a reconcile loop finishes later (nodes ready, a deployment running) continues the trace of
the event that started it: the handler keeps :func:`carrier` in its KV record and the pass resumes it
with :func:`resumed`, so one trace runs from ``kubectl apply`` to ``InferenceReady``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

from opentelemetry import context, propagate, trace
from opentelemetry.trace import Span, SpanKind

tracer = trace.get_tracer("kaiten")
log = logging.getLogger("kaiten.telemetry")


def configure(service: str) -> Callable[[], None] | None:
    """Install a TracerProvider exporting over OTLP/HTTP if the environment asks for one; returns its
    shutdown (which flushes what is batched), or None when tracing stays off."""
    env = os.environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    if env.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() in ("none", ""):
        return None
    if not (env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")):
        return None
    protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
    if protocol and protocol != "http/protobuf":
        raise SystemExit(
            f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol}: Kaiten exports traces over http/protobuf only "
            "(point it at the collector's OTLP/HTTP port, 4318)"
        )
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    attributes = {} if env.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: f"kaiten-{service}"}
    provider = TracerProvider(resource=Resource.create(attributes))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))  # endpoint, headers: OTEL_*
    trace.set_tracer_provider(provider)
    log.info("traces exported over OTLP/HTTP as %s", provider.resource.attributes.get(SERVICE_NAME))
    return provider.shutdown


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
    """A CONSUMER span whose parent is the publisher's span from the headers."""
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
