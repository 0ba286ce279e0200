"""Publish events with ``Nats-Msg-Id`` dedupe and trace context in headers."""

from __future__ import annotations

import asyncio
import logging

from nats.errors import MaxPayloadError
from nats.js import JetStreamContext
from nats.js.api import PubAck

from shared.bus.backoff import delay_for
from shared.errors import InvalidInput, Transient
from shared.events import Event, dedupe_id, encode, subject_for
from shared.telemetry import inject_headers, publish_span

log = logging.getLogger(__name__)


class Publisher:
    """Publishes :class:`shared.events.Event`s to the stream; retries are safe thanks to the msg id."""

    def __init__(self, js: JetStreamContext, *, timeout: float = 5.0, attempts: int = 4) -> None:
        self._js = js
        self._timeout = timeout
        self._attempts = attempts

    async def publish(self, event: Event) -> PubAck:
        subject = subject_for(event)
        msg_id = dedupe_id(event)
        payload = encode(event)
        with publish_span(subject, msg_id):
            headers = inject_headers({"Nats-Msg-Id": msg_id, "Kaiten-Event-Id": event.event_id})
            for attempt in range(1, self._attempts + 1):
                try:
                    ack = await self._js.publish(subject, payload, timeout=self._timeout, headers=headers)
                except MaxPayloadError as exc:  # it never fits: say so about this event, do not retry
                    raise InvalidInput(
                        f"{event.kind} for {event.workspace.key} is {len(payload)} bytes, more than the bus "
                        f"accepts in one message ({exc}); make the Workspace's spec smaller",
                        reason="SpecTooLarge",
                    ) from exc
                except (TimeoutError, ConnectionError) as exc:
                    if attempt == self._attempts:
                        raise Transient(f"publish {subject} failed after {attempt} attempts: {exc}") from exc
                    wait = delay_for(attempt, base=0.2, cap=2.0, key=msg_id)
                    log.warning(
                        "publish %s attempt %d failed (%s); retrying in %.2fs", subject, attempt, exc, wait
                    )
                    await asyncio.sleep(wait)
                    continue
                if ack.duplicate:
                    log.debug("publish %s: duplicate of %s, stored once", subject, msg_id)
                return ack
        raise AssertionError("unreachable")
