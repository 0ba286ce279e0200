"""The Prometheus metrics every Kaiten service exports (prometheus_client's default registry),
served at ``/metrics`` by :mod:`shared.probes`. Names follow Prometheus' conventions (unit suffixes,
``_total`` for counters); ``service`` is the service's name, ``consumer`` a durable consumer's."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

EVENTS = Counter(
    "kaiten_events_total",
    "Bus events a durable consumer settled, by kind and outcome: handled, retried, deferred (another"
    " replica held the Workspace), failed (given up, reported in status), undecodable (terminated).",
    ["consumer", "kind", "outcome"],
)
HANDLER_SECONDS = Histogram(
    "kaiten_handler_seconds",
    "Time to handle one group of events for a Workspace (lease, handler, ack).",
    ["consumer"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
READY = Gauge("kaiten_ready", "1 while the service's /readyz answers 200.", ["service"])
LOOP_LAG = Gauge(
    "kaiten_loop_lag_seconds", "How late the event loop's last 1-second beat woke up.", ["service"]
)
