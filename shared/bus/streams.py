"""Idempotent declaration of the stream, durable pull consumers and KV buckets."""

from __future__ import annotations

import logging

from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BadRequestError, BucketNotFoundError, NotFoundError
from nats.js.kv import KeyValue

from shared.events import STREAM, SUBJECT_ROOT

log = logging.getLogger(__name__)

DUPLICATE_WINDOW_S = 600.0  # a retried publish within 10 min is stored once
MAX_AGE_S = 7 * 24 * 3600.0  # a week of history for `kaiten events --since` and late consumers


def stream_config(name: str = STREAM, subjects_root: str = SUBJECT_ROOT) -> StreamConfig:
    return StreamConfig(
        name=name,
        subjects=[f"{subjects_root}.>"],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        duplicate_window=DUPLICATE_WINDOW_S,
        max_age=MAX_AGE_S,
        allow_direct=True,  # `kaiten events --since` reads stored events by direct get (read-only)
    )


async def declare_stream(js: JetStreamContext, config: StreamConfig | None = None) -> None:
    """Create the stream, or update it to ``config`` if it exists (safe from any number of replicas)."""
    config = config or stream_config()
    try:
        await js.add_stream(config)
    except BadRequestError as exc:
        if exc.err_code != 10058:  # stream name already in use with a different configuration
            raise
        await js.update_stream(config)


async def declare_consumer(
    js: JetStreamContext,
    *,
    stream: str,
    durable: str,
    filter_subjects: list[str],
    ack_wait: float,
    max_ack_pending: int,
) -> None:
    """Create or update a durable pull consumer; replicas of a service share it, which spreads work."""
    config = ConsumerConfig(
        durable_name=durable,
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=ack_wait,
        max_deliver=-1,  # the runner decides when to give up (it reports status before term())
        max_ack_pending=max_ack_pending,
        filter_subjects=filter_subjects,
    )
    try:
        info = await js.consumer_info(stream, durable)
    except NotFoundError:
        await js.add_consumer(stream, config)
        return
    if sorted(info.config.filter_subjects or [info.config.filter_subject or ""]) != sorted(filter_subjects):
        log.info("updating consumer %s filter to %s", durable, filter_subjects)
    await js.add_consumer(stream, config)  # add_consumer with the same durable name updates it


async def key_value(js: JetStreamContext, bucket: str, *, ttl: float | None = None) -> KeyValue:
    """Open a KV bucket (one value per key, on disk), creating it if this is the first service up."""
    try:
        return await js.key_value(bucket)
    except BucketNotFoundError:  # creation is idempotent: a racing replica gets the same bucket
        return await js.create_key_value(
            KeyValueConfig(bucket=bucket, ttl=ttl, history=1, storage=StorageType.FILE)
        )
