"""``kaiten events``: follow status events from the stream (an ordered, ephemeral consumer)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
from typing import Any, TextIO

import msgspec
from nats.js.api import ConsumerConfig, DeliverPolicy

from shared import events as ev
from shared.bus.connection import connect

ENVELOPE = {"schema", "event_id", "workspace", "generation", "correlation_id", "occurred_at"}
QUIET_KINDS = {"workspace.observed", "tuning.progress"}  # shown only with --all-events


def describe(event: ev.AnyEvent) -> str:
    """One human line: when, which Workspace, what happened."""
    when = dt.datetime.fromtimestamp(event.occurred_at, dt.UTC).strftime("%H:%M:%S")
    head = f"{when}  {event.workspace.key:<32} gen {event.generation:<3} {event.kind:<26}"
    match event:
        case ev.ConditionReported():
            detail = f"{event.type}={event.status} ({event.reason}) {event.message}"
        case ev.WorkspaceObserved():
            detail = f"{event.api_version} {', '.join(sorted(event.spec))}"
        case _:
            fields = {
                k: v
                for k, v in msgspec.structs.asdict(event).items()
                if k not in ENVELOPE and v not in ("", None)
            }
            detail = " ".join(f"{k}={v}" for k, v in fields.items() if not isinstance(v, dict))
    return f"{head} {detail}".rstrip()


def as_json(event: ev.AnyEvent) -> str:
    data: dict[str, Any] = msgspec.to_builtins(event)
    data["kind"] = event.kind
    return json.dumps(data, sort_keys=True)


async def follow(
    *,
    nats_url: str,
    namespace: str | None,
    name: str | None,
    since: dt.datetime | None,
    as_json: bool,
    count: int | None,
    stop_after: float | None,
    everything: bool,
    out: TextIO,
) -> int:
    nc = await connect(nats_url, name="kaiten-events", connect_timeout=5, max_reconnect_attempts=5)
    js = nc.jetstream()
    subject = ev.subject_filter("*", "*", namespace or "*", name or "*")
    kwargs: dict[str, Any] = {"ordered_consumer": True}
    if since is not None:
        kwargs["deliver_policy"] = DeliverPolicy.BY_START_TIME
        kwargs["config"] = _start_time_config(since)
    else:
        kwargs["deliver_policy"] = DeliverPolicy.NEW
    sub = await js.subscribe(subject, **kwargs)
    shown = 0
    try:
        async with asyncio.timeout(stop_after):
            async for msg in sub.messages:
                try:
                    event = ev.decode(msg.data)
                except (msgspec.DecodeError, msgspec.ValidationError):
                    continue  # a newer schema we do not know: skip rather than crash the viewer
                if not everything and event.kind in QUIET_KINDS:
                    continue
                print(_render(event, as_json), file=out, flush=True)
                shown += 1
                if count is not None and shown >= count:
                    break
    except TimeoutError:
        pass
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
        await nc.close()
    return 0 if count is None or shown >= count else 1


def _render(event: ev.AnyEvent, json_lines: bool) -> str:
    return as_json(event) if json_lines else describe(event)


def _start_time_config(since: dt.datetime) -> ConsumerConfig:
    return ConsumerConfig(opt_start_time=since.astimezone(dt.UTC))
