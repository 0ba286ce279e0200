"""Kaiten's NATS JetStream bus: connect, declare, publish, consume (see docs/events.md)."""

from shared.bus.connection import connect
from shared.bus.consuming import ConsumerRunner, ConsumerSpec
from shared.bus.publishing import Publisher
from shared.bus.streams import declare_consumer, declare_stream
from shared.errors import InvalidInput, Transient

__all__ = [
    "ConsumerRunner",
    "ConsumerSpec",
    "InvalidInput",
    "Publisher",
    "Transient",
    "connect",
    "declare_consumer",
    "declare_stream",
]
