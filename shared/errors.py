"""The error taxonomy: what a handler raises decides ack/nak/term (only the consumer runner, in
:mod:`shared.bus.consuming`, touches messages). Kube and ARM helpers raise the same classes.

- :class:`Transient` (or a handler's ``asyncio.TimeoutError``/``ConnectionError``): ``nak(delay)`` with
  backoff, honouring ``retry_after``.
- :class:`InvalidInput`: the message can never succeed: status condition + Kubernetes Event, ``term()``.
- anything else: backoff until ``max_attempts`` deliveries, then status + ``term()``.
- ``asyncio.CancelledError`` (shutdown): neither ack nor nak; the server redelivers after ``ack_wait``.
"""

from __future__ import annotations


class Transient(Exception):
    """Worth retrying later (apiserver 5xx/409, throttling, a busy peer)."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class InvalidInput(Exception):
    """Will never succeed as sent; ``reason`` is a CamelCase condition reason."""

    def __init__(self, message: str, *, reason: str = "InvalidInput") -> None:
        super().__init__(message)
        self.reason = reason
