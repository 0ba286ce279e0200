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
CONSUMER_PENDING = Gauge(
    "kaiten_consumer_pending",
    "Messages in the stream a durable consumer has yet to receive (its lag), as of its last fetch.",
    ["consumer"],
)
CONSUMER_IN_FLIGHT = Gauge(
    "kaiten_consumer_in_flight", "Messages a consumer has received and not yet settled.", ["consumer"]
)
RECONCILE_PASSES = Counter(
    "kaiten_reconcile_passes_total",
    "Reconcile passes over one key, by loop and outcome: done, retry (bus trouble, a lost lease, a"
    " transient error: the next pass tries again), error (unexpected; logged with its traceback).",
    ["loop", "outcome"],
)
RECONCILE_KEYS = Gauge(
    "kaiten_reconcile_keys", "Keys a reconcile loop found to go over in its last pass.", ["loop"]
)
PROVIDER_CALLS = Counter(
    "kaiten_provider_calls_total",
    "Calls to the node provider, by operation (ensure, release) and outcome: ready, pending, failed"
    " (a permanent error, in status), retry (transient: throttled, unreachable).",
    ["provider", "operation", "outcome"],
)
PROVIDER_ERRORS = Counter(
    "kaiten_provider_errors_total",
    "Errors the cloud answered, by HTTP status and the cloud's error code (AKS: ARM's error.code).",
    ["provider", "status", "code"],
)
WORKSPACES = Gauge(
    "kaiten_workspaces",
    "Workspaces the watcher sees, by status.state (KAITO's: Pending, Ready, NotReady, Running, Succeeded,"
    " Failed; None before the first status).",
    ["state"],
)
LEADING = Gauge(
    "kaiten_leading",
    "1 while this replica leads the work one replica does for all (the watcher's watch loop), else 0.",
    ["role"],
)
