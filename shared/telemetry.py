"""OpenTelemetry tracing across NATS: trace context travels in message headers.

Publisher and consumer middleware follow the OpenTelemetry messaging conventions
(``messaging.system=nats``, ``messaging.destination.name``, ``messaging.message.id``).
No exporter is configured here; a deployment sets one with the standard OTEL_* variables.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from opentelemetry import context, propagate, trace
from opentelemetry.trace import Span, SpanKind

tracer = trace.get_tracer("kaiten")


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
