"""``kaiten events``: follow status events as they are published, after replaying the stored ones
(``--since``) with JetStream's direct get — what the chart's read-only ``viewer`` NATS user may do."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol, TextIO

import httpx
import msgspec
from nats.aio.client import Client
from nats.js.api import ConsumerConfig, DeliverPolicy

from shared import events as ev
from shared.api.workspace import WorkspaceSpec
from shared.bus.connection import connect
from shared.bus.errors import BusUnavailable

ENVELOPE = {"schema", "event_id", "workspace", "generation", "correlation_id", "occurred_at"}
QUIET_KINDS = {"workspace.observed", "tuning.progress"}  # shown only with --all-events
SEEN_MAX = 4096  # event ids `kaiten events` remembers, to print one both replayed and live once


def describe(event: ev.AnyEvent) -> str:
    """One human line: when, which Workspace, what happened."""
    when = dt.datetime.fromtimestamp(event.occurred_at, dt.UTC).strftime("%H:%M:%S")
    head = f"{when}  {event.workspace.key:<32} gen {event.generation:<3} {event.kind:<26}"
    return f"{head} {detail_of(event)}".rstrip()


def detail_of(event: ev.AnyEvent) -> str:
    match event:
        case ev.ConditionReported():
            detail = f"{event.type}={event.status} ({event.reason}) {event.message}"
        case ev.WorkspaceObserved():
            detail = f"{event.api_version} {', '.join(sorted(event.spec.model_fields_set))}"
        case _:
            fields = {
                k: v
                for k, v in msgspec.structs.asdict(event).items()
                if k not in ENVELOPE and v not in ("", None)
            }
            detail = " ".join(
                f"{k}={v}" for k, v in fields.items() if not isinstance(v, dict | WorkspaceSpec)
            )
    return detail


def as_json(event: ev.AnyEvent) -> str:
    data: dict[str, Any] = msgspec.to_builtins(event, enc_hook=ev.enc_hook)
    data["kind"] = event.kind
    return json.dumps(data, sort_keys=True)


@dataclass(frozen=True)
class BusAccess:
    """How ``kaiten events`` reaches the bus: ``kaiten up``'s (no user), or a cluster's NATS as the
    chart's read-only ``viewer`` (through ``kubectl port-forward``, say)."""

    url: str
    user: str | None = None
    password: str | None = None
    ca_file: str | None = None
    credentials: str | None = None


async def follow(
    *,
    bus: BusAccess,
    namespace: str | None,
    name: str | None,
    since: dt.datetime | None,
    as_json: bool,
    count: int | None,
    stop_after: float | None,
    everything: bool,
    out: TextIO,
) -> int:
    """Print events as they are published (a plain subscription); with ``since``, first the stored
    ones from then on (JetStream's direct get: read-only, no consumer to create). An event both
    replayed and received live is printed once (its ``Nats-Msg-Id``)."""
    nc = await connect(
        bus.url,
        name="kaiten-events",
        connect_timeout=5,
        max_reconnect_attempts=5,
        user=bus.user,
        password=bus.password,
        inbox_prefix=f"_INBOX_{bus.user}" if bus.user else "_INBOX",
        ca_file=bus.ca_file,
        user_credentials=bus.credentials,
    )
    subject = ev.subject_filter("*", "*", namespace or "*", name or "*")
    live = await nc.subscribe(subject)  # first: nothing published during the replay is missed
    seen: dict[str, None] = {}  # the newest ids shown (insertion order), SEEN_MAX at most
    shown = 0

    def show(data: bytes, headers: dict[str, str] | None) -> bool:
        """Print one event (unless seen, quiet or unknown); True once ``count`` are shown."""
        nonlocal shown
        key = (headers or {}).get("Nats-Msg-Id")
        if key is not None:
            if key in seen:
                return False
            seen[key] = None
            if len(seen) > SEEN_MAX:  # only recent ids can come again (the replay's end, a retry)
                del seen[next(iter(seen))]
        try:
            event = ev.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return False  # a newer schema we do not know: skip rather than crash the viewer
        if not everything and event.kind in QUIET_KINDS:
            return False
        print(_render(event, as_json), file=out, flush=True)
        shown += 1
        return count is not None and shown >= count

    try:
        async with asyncio.timeout(stop_after):
            done = False
            if since is not None:
                async for data, headers in stored_since(nc, subject, since):
                    if done := show(data, headers):
                        break
            if not done:
                async for msg in live.messages:
                    if show(msg.data, msg.headers):
                        break
    except TimeoutError:
        pass
    finally:
        with contextlib.suppress(Exception):
            await live.unsubscribe()
        await nc.close()
    return 0 if count is None or shown >= count else 1


async def stored_since(
    nc: Client, subject: str, since: dt.datetime
) -> AsyncIterator[tuple[bytes, dict[str, str] | None]]:
    """The stream's messages on ``subject`` from ``since`` on, in order, by direct get (what a
    read-only user may do: ``$JS.API.DIRECT.GET.KAITEN``), until there are no more."""
    request: dict[str, Any] = {
        "start_time": since.astimezone(dt.UTC).isoformat().replace("+00:00", "Z"),
        "next_by_subj": subject,
    }
    while True:
        reply = await nc.request(f"$JS.API.DIRECT.GET.{ev.STREAM}", json.dumps(request).encode(), timeout=5)
        headers = reply.headers or {}
        status = headers.get("Status")
        if status == "404":
            return  # no (more) message
        if status:
            raise BusUnavailable(f"reading the stream: {status} {headers.get('Description', '')}".strip())
        yield reply.data, {k: v for k, v in headers.items() if k not in _DIRECT_GET_HEADERS}
        request = {"seq": int(headers["Nats-Sequence"]) + 1, "next_by_subj": subject}


_DIRECT_GET_HEADERS = {"Nats-Stream", "Nats-Subject", "Nats-Sequence", "Nats-Time-Stamp", "Nats-Num-Pending"}


def _render(event: ev.AnyEvent, json_lines: bool) -> str:
    return as_json(event) if json_lines else describe(event)


def _start_time_config(since: dt.datetime) -> ConsumerConfig:
    return ConsumerConfig(opt_start_time=since.astimezone(dt.UTC))


# --- one Workspace, live (``kaiten up``'s sample) ---------------------------------------------------

NEXT_STEP = {
    "workspace.observed": "planning",
    "plan.resolved": "provisioning nodes",
    "nodes.requested": "provisioning nodes",
    "nodes.ready": "deploying on Ray Serve (the first time converts the model, ~30 s)",
    "workload.job_started": "tuning",
}


class View(Protocol):
    def line(self, text: str) -> None: ...

    def status(self, text: str) -> None: ...


@dataclass
class Outcome:
    ok: bool
    message: str
    endpoint: str
    seconds: float


def watch_workspace(
    *, nats_url: str, kubeconfig: str, namespace: str, name: str, since: float, timeout: float, live: View
) -> Outcome:
    """Show the Workspace's status events as they arrive until it succeeds (and answers) or fails."""
    return asyncio.run(_watch(nats_url, kubeconfig, namespace, name, since, timeout, live))


async def _watch(
    nats_url: str, kubeconfig: str, namespace: str, name: str, since: float, limit_s: float, live: View
) -> Outcome:
    started = time.monotonic()
    nc = await connect(nats_url, name="kaiten-up", connect_timeout=5, max_reconnect_attempts=5)
    js = nc.jetstream()
    sub = await js.subscribe(
        ev.subject_filter("*", "*", namespace, name),
        ordered_consumer=True,
        deliver_policy=DeliverPolicy.BY_START_TIME,
        config=_start_time_config(dt.datetime.fromtimestamp(since, dt.UTC)),
    )
    step = ["waiting for the watcher"]

    def elapsed() -> str:
        return f"{time.monotonic() - started:6.1f}s"

    async def show() -> None:
        async for msg in sub.messages:
            try:
                event = ev.decode(msg.data)
            except (msgspec.DecodeError, msgspec.ValidationError):
                continue
            if isinstance(event, ev.TuningProgress):
                step[0] = f"tuning: step {event.step}/{event.total_steps or '?'}"
                continue
            step[0] = NEXT_STEP.get(event.kind, step[0])
            if event.kind != "workspace.observed":
                live.line(f"  {elapsed()}  {event.kind:<26} {detail_of(event)}".rstrip())

    shower = asyncio.create_task(show())
    try:
        while True:
            outcome = await _check(kubeconfig, namespace, name)
            if outcome is not None:
                outcome.seconds = time.monotonic() - started
                return outcome
            if time.monotonic() - started > limit_s:
                return Outcome(False, f"not ready after {limit_s:.0f}s (last: {step[0]})", "", limit_s)
            if shower.done() and shower.exception() is not None:
                raise shower.exception()  # type: ignore[misc]
            for _ in range(4):
                live.status(f"{step[0]} ({elapsed().strip()})")
                await asyncio.sleep(0.25)
    finally:
        shower.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await shower
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
        await nc.close()


async def _check(kubeconfig: str, namespace: str, name: str) -> Outcome | None:
    """Succeeded (and, for inference, answering /health), failed, or None while neither."""
    proc = await asyncio.create_subprocess_exec(
        "kubectl", "get", "workspace", name, "-n", namespace, "-o", "json",
        env={**os.environ, "KUBECONFIG": kubeconfig},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, _ = await proc.communicate()
    if proc.returncode != 0:
        return None  # not created yet, or the apiserver is restarting
    obj = json.loads(stdout)
    conditions = {c["type"]: c for c in obj.get("status", {}).get("conditions", [])}
    done = conditions.get("WorkspaceSucceeded", {})
    if done.get("observedGeneration", 0) < obj["metadata"].get("generation", 1):
        return None
    if done.get("status") == "False":
        return Outcome(False, f"{done.get('reason')}: {done.get('message')}", "", 0.0)
    if done.get("status") != "True":
        return None
    ready = conditions.get("InferenceReady", {})
    endpoint = endpoint_of(ready.get("message", ""))
    if endpoint:  # after a restart the condition may still say True while Serve redeploys: ask it
        try:
            async with httpx.AsyncClient(timeout=5) as client:
                if (await client.get(f"{endpoint}/health")).status_code != 200:
                    return None
        except httpx.HTTPError:
            return None
    return Outcome(True, done.get("message", ""), endpoint, 0.0)


def endpoint_of(message: str) -> str:
    """The status writer's InferenceReady message is ``serving at <endpoint>``."""
    prefix = "serving at "
    return message[len(prefix) :].split()[0] if message.startswith(prefix) else ""
