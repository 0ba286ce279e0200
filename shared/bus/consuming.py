"""The one consumer runner: pulls, orders per Workspace, runs handlers, and owns ack/nak/term.

How it keeps its promises:
- *In order per Workspace*: messages are grouped by the subject's ``<namespace>.<name>`` tail and
  each group is chained after the previous group of the same key; different keys run concurrently
  (bounded by ``max_concurrency``).
- *Two replicas are safe*: replicas share one durable consumer (that spreads the work), and before
  handling a key a replica takes the Workspace's lease (``shared.bus.leases``, shared with the
  service's reconcile loop); a replica that finds it held naks with a short delay, so one Workspace is
  never handled by two replicas (or by a handler and a reconcile pass) at once. A handler whose lease
  cannot be refreshed is stopped and its messages redelivered. A lease lingers ``lease_linger`` after
  its group, so a busy Workspace's next group takes it back without a round trip.
- *Bursts coalesce*: messages of one key that arrive in one fetch are handed to the handler together,
  and so are those that arrive before that group has started (behind the key's previous group, or
  waiting for a free slot): they join it (one handler call, not one per fetch).
- *Bounded intake*: each message taken holds a permit of a semaphore of ``intake_depth`` fetches'
  worth (``fetch_batch`` each) until it is settled, and the pull loop waits for free permits. With room
  for two fetches, the next one is on the wire while the last one is handled. A message that cannot
  be decoded is terminated as it arrives, and its permit returns at once.
- *Long work says it is alive*: ``in_progress()`` every ``ack_wait / 3`` until acked (one heartbeat
  loop for every message in flight).
- *Ack after the side effect*: a group is acked only after the handler returns.
- *Failures by taxonomy* (``shared.errors``); a failed group of several messages is retried one
  message at a time, so a poison message is isolated and the good ones are not lost with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg

from shared import logs
from shared.bus.backoff import delay_for
from shared.bus.leases import LINGER, LeaseBusy, LeaseLost, Leases
from shared.bus.publishing import Publisher
from shared.bus.streams import declare_consumer
from shared.errors import InvalidInput, Transient
from shared.events import STREAM, AnyEvent, ConditionReported, decode
from shared.metrics import CONSUMER_IN_FLIGHT, CONSUMER_PENDING, EVENTS, HANDLER_SECONDS
from shared.tasks import cancel_and_wait
from shared.telemetry import consume_span

log = logging.getLogger(__name__)

Handler = Callable[[Sequence[AnyEvent]], Awaitable[None]]


@dataclass(frozen=True, kw_only=True)
class ConsumerSpec:
    durable: str  # one per service role, shared by its replicas
    filter_subjects: list[str]
    stream: str = STREAM
    ack_wait: float = 30.0  # s; in_progress() is sent every third of it
    max_ack_pending: int = 512
    fetch_batch: int = 64  # messages per pull; a burst of one Workspace arrives together
    intake_depth: int = 2  # fetches' worth of messages held unsettled (the next pull overlaps handling)
    max_concurrency: int = 16  # Workspaces handled at once by one replica
    max_attempts: int = 8  # deliveries before an unknown error becomes a terminal status
    max_transient_attempts: int = 32  # transient errors get longer (backoff caps at 30 s: ~15 min)
    lease_ttl: float = 30.0  # s; a crashed replica's lease on a Workspace expires after this
    lease_linger: float = LINGER  # s a lease stays parked after a group, for the key's next group
    busy_delay: float = 0.25  # s; redelivery delay when another replica holds the Workspace
    failure_condition: str = "WorkspaceSucceeded"  # condition set False when a message is given up


@dataclass(eq=False)  # hashed by identity: a set of groups at work
class _Group:
    key: str
    msgs: list[Msg]
    events: list[AnyEvent] = field(default_factory=list)
    started: bool = False  # handed to the handler: later messages of the key go to a new group


def key_of(subject: str) -> str:
    """``kaiten.<family>.<kind>.<ns>.<name>`` → ``ns/name``."""
    parts = subject.split(".")
    return f"{parts[-2]}/{parts[-1]}" if len(parts) >= 5 else subject


class ConsumerRunner:
    """Runs one durable consumer for one service role. Create, :meth:`start`, later :meth:`stop`."""

    def __init__(
        self,
        *,
        nc: Client,
        spec: ConsumerSpec,
        handler: Handler,
        publisher: Publisher,
        reporter: str,
        leases: Leases | None = None,
    ) -> None:
        self._nc = nc
        self._js = nc.jetstream()
        self._spec = spec
        self._handler = handler
        self._publisher = publisher
        self._reporter = reporter
        self._tails: dict[str, asyncio.Task[None]] = {}  # each key's last group: the next one waits on it
        self._groups: set[asyncio.Task[None]] = set()  # every group's task, running or queued
        self._waiting: dict[str, _Group] = {}  # each key's group not yet started (later messages join it)
        # One permit per message taken and not yet settled: intake waits for room, never polls.
        self._intake = asyncio.Semaphore(spec.fetch_batch * max(1, spec.intake_depth))
        self._in_flight = 0  # messages fetched and not yet settled (not the permits a pending fetch holds)
        self._slots = asyncio.Semaphore(spec.max_concurrency)
        self._stopping = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._leases = leases  # shared with the service's reconcile loop, or opened at start
        self._working: set[_Group] = set()  # fetched, not yet settled: what the heartbeat keeps alive
        # the metrics' labelled children, looked up once (labels() costs more than the count)
        self._events: dict[tuple[str, str], Any] = {}
        self._in_flight_gauge = CONSUMER_IN_FLIGHT.labels(spec.durable)
        self._pending_gauge = CONSUMER_PENDING.labels(spec.durable)
        self._handler_seconds = HANDLER_SECONDS.labels(spec.durable)
        self.handled = 0  # messages acked (for status and tests)
        self.name = f"consumer:{spec.durable}"

    async def start(self) -> None:
        spec = self._spec
        await declare_consumer(
            self._js,
            stream=spec.stream,
            durable=spec.durable,
            filter_subjects=spec.filter_subjects,
            ack_wait=spec.ack_wait,
            max_ack_pending=spec.max_ack_pending,
        )
        if self._leases is None:
            self._leases = await Leases.open(
                self._js, role=spec.durable, ttl=spec.lease_ttl, linger=spec.lease_linger
            )
        self._psub = await self._js.pull_subscribe_bind(durable=spec.durable, stream=spec.stream)
        self._loop_task = asyncio.create_task(self._pull_loop(), name=f"consumer:{spec.durable}")
        self._heartbeat_task = asyncio.create_task(self._heartbeat(), name=f"heartbeat:{spec.durable}")

    async def stop(self, grace: float = 10.0) -> None:
        """Stop intake, wait for in-flight groups up to ``grace`` s, cancel the rest (they redeliver)."""
        self._stopping.set()
        await cancel_and_wait(*(t for t in (self._loop_task, self._heartbeat_task) if t is not None))
        # every group, not only each key's last: a queued group's cancellation does not reach the running
        # one it waits behind, which would outlive ``stop`` and work on with its lease closed under it
        pending = [t for t in self._groups if not t.done()]
        if pending:
            _, still = await asyncio.wait(pending, timeout=grace)
            await cancel_and_wait(*still)
        if self._leases is not None:  # parked leases go now: another replica may take the keys
            with contextlib.suppress(TimeoutError):  # NATS gone: they expire after their TTL
                await asyncio.wait_for(self._leases.close(), timeout=5)
        with contextlib.suppress(Exception):
            await self._psub.unsubscribe()

    async def wait(self) -> None:
        """Returns when the pull loop ends (it only ends on stop, or raises if NATS closed)."""
        if self._loop_task is not None:
            await self._loop_task

    # --- intake ---------------------------------------------------------------------------------

    async def _pull_loop(self) -> None:
        spec = self._spec
        while not self._stopping.is_set():
            room = await self._take_room()
            try:
                msgs = await self._psub.fetch(room, timeout=1.0)
            except TimeoutError:
                msgs = []
            except Exception as exc:  # connection trouble: the client reconnects; wait and pull again
                self._release(room)
                if self._nc.is_closed:
                    log.error("consumer %s: NATS connection closed; stopping intake", spec.durable)
                    raise
                log.warning("consumer %s: fetch failed: %s", spec.durable, exc)
                await asyncio.sleep(0.5)
                continue
            self._release(room - len(msgs))
            self._settled(-len(msgs))
            if msgs:
                self._pending_gauge.set(msgs[-1].metadata.num_pending or 0)
            for group in await self._group(msgs):
                self._schedule(group)

    async def _take_room(self) -> int:
        """Wait for at least one free intake permit, then take every other free one (up to a batch)."""
        await self._intake.acquire()
        room = 1
        while room < self._spec.fetch_batch and not self._intake.locked():
            await self._intake.acquire()  # free: returns at once
            room += 1
        return room

    def _release(self, permits: int) -> None:
        for _ in range(permits):
            self._intake.release()

    def _settled(self, count: int) -> None:
        """``count`` messages settled (negative: received); the in-flight gauge follows."""
        self._in_flight -= count
        self._in_flight_gauge.set(self._in_flight)

    async def _group(self, msgs: list[Msg]) -> list[_Group]:
        """Decode every message first: an undecodable one is terminated (and its permit returned) here,
        so a group holds only events its handler can take."""
        groups: dict[str, _Group] = {}
        for msg in msgs:
            try:
                event = decode(msg.data)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                log.error(
                    "consumer %s: undecodable message on %s, terminated: %s",
                    self._spec.durable,
                    msg.subject,
                    exc,
                )
                with contextlib.suppress(Exception):
                    await msg.term()
                EVENTS.labels(self._spec.durable, "unknown", "undecodable").inc()
                self._release(1)
                self._settled(1)
                continue
            key = key_of(msg.subject)
            group = groups.get(key)
            if group is None:  # not setdefault: a group made per message cost a tenth of the runner
                group = groups[key] = _Group(key=key, msgs=[])
            group.msgs.append(msg)
            group.events.append(event)
        return list(groups.values())

    def _schedule(self, group: _Group) -> None:
        waiting = self._waiting.get(group.key)
        if waiting is not None and not waiting.started:  # join the group queued for this key
            waiting.msgs += group.msgs
            waiting.events += group.events
            return
        previous = self._tails.get(group.key)
        self._waiting[group.key] = group  # until it starts (behind its predecessor, or for a slot)
        task = asyncio.create_task(self._run_group(group, previous), name=f"group:{group.key}")
        self._tails[group.key] = task
        self._groups.add(task)
        task.add_done_callback(functools.partial(self._forget, group.key))

    def _forget(self, key: str, task: asyncio.Task[None]) -> None:
        self._groups.discard(task)
        if self._tails.get(key) is task:
            del self._tails[key]
        if not task.cancelled() and (exc := task.exception()):
            log.error("consumer %s: group %s crashed: %r", self._spec.durable, key, exc)

    # --- handling -------------------------------------------------------------------------------

    async def _run_group(self, group: _Group, previous: asyncio.Task[None] | None) -> None:
        self._working.add(group)
        try:
            if previous is not None and not previous.done():
                await asyncio.wait([previous])  # order within a Workspace; its outcome is its own
            async with self._slots:
                group.started = True  # what arrives for the key from now on waits for a new group
                if self._waiting.get(group.key) is group:
                    del self._waiting[group.key]
                await self._run_leased(group)
        finally:
            if self._waiting.get(group.key) is group:  # cancelled before it started
                del self._waiting[group.key]
            self._working.discard(group)
            self._release(len(group.msgs))
            self._settled(len(group.msgs))

    async def _run_leased(self, group: _Group) -> None:
        assert self._leases is not None
        started = time.monotonic()
        try:
            async with self._leases.hold(group.key, park=True):
                await self._dispatch(group)
        except LeaseBusy:
            await self._defer(group, "deferred")
            return
        except LeaseLost as exc:  # the handler was stopped: redeliver what it had not acked
            log.warning("consumer %s: %s; redelivering", self._spec.durable, exc)
            await self._defer(group, "retried")
        self._handler_seconds.observe(time.monotonic() - started)

    async def _defer(self, group: _Group, outcome: str) -> None:
        for msg, event in zip(group.msgs, group.events, strict=True):
            if msg.is_acked:  # settled before the lease was lost
                continue
            with contextlib.suppress(Exception):
                await msg.nak(delay=self._spec.busy_delay)
            self._count(event, outcome)

    def _count(self, event: AnyEvent, outcome: str) -> None:
        self._counter(event.kind, outcome).inc()

    def _counter(self, kind: str, outcome: str) -> Any:
        counter = self._events.get((kind, outcome))
        if counter is None:
            counter = self._events[kind, outcome] = EVENTS.labels(self._spec.durable, kind, outcome)
        return counter

    async def _dispatch(self, group: _Group) -> None:
        outcome = await self._attempt(group.msgs, group.events)
        if outcome is None:
            await self._ack(group.msgs, group.events)
        elif len(group.msgs) == 1:
            await self._settle(group.msgs[0], group.events[0], outcome)
        else:  # isolate the failing message: redo one at a time (handlers are idempotent)
            for msg, event in zip(group.msgs, group.events, strict=True):
                single = await self._attempt([msg], [event])
                if single is None:
                    await self._ack([msg], [event])
                else:
                    await self._settle(msg, event, single)

    async def _attempt(self, msgs: list[Msg], events: list[AnyEvent]) -> Exception | None:
        first, last = msgs[0], events[-1]
        with (
            consume_span(first.subject, first.headers, self._spec.durable),
            logs.about(last.workspace, generation=last.generation, event_id=last.event_id),
        ):
            try:
                await self._handler(events)
            except asyncio.CancelledError:
                raise  # shutdown: neither ack nor nak
            except Exception as exc:
                return exc
        return None

    async def _ack(self, msgs: list[Msg], events: list[AnyEvent]) -> None:
        kinds: dict[str, int] = {}
        for msg, event in zip(msgs, events, strict=True):
            await msg.ack()
            kinds[event.kind] = kinds.get(event.kind, 0) + 1
        for kind, count in kinds.items():  # one increment per kind, not per message
            self._counter(kind, "handled").inc(count)
        self.handled += len(msgs)

    async def _settle(self, msg: Msg, event: AnyEvent, exc: Exception) -> None:
        spec = self._spec
        attempt = msg.metadata.num_delivered or 1
        where = f"[{event.workspace.key}] {event.kind} gen {event.generation} (event {event.event_id})"
        if isinstance(exc, InvalidInput):
            log.warning("%s: invalid input, giving up: %s", where, exc)
            await self._give_up(msg, event, exc.reason, str(exc))
        elif (
            isinstance(exc, Transient | TimeoutError | ConnectionError)
            and attempt < spec.max_transient_attempts
        ):
            retry_after = exc.retry_after if isinstance(exc, Transient) else None
            delay = retry_after if retry_after is not None else delay_for(attempt, key=msg.subject)
            log.warning("%s: transient error (attempt %d), retry in %.2fs: %s", where, attempt, delay, exc)
            await msg.nak(delay=delay)
            self._count(event, "retried")
        elif attempt < spec.max_attempts:
            delay = delay_for(attempt, key=msg.subject)
            log.warning(
                "%s: failed (attempt %d/%d), retry in %.2fs: %r",
                where,
                attempt,
                spec.max_attempts,
                delay,
                exc,
            )
            await msg.nak(delay=delay)
            self._count(event, "retried")
        else:
            log.error("%s: failed %d times, giving up: %r", where, attempt, exc)
            await self._give_up(msg, event, "InternalError", f"{type(exc).__name__}: {exc}")

    async def _give_up(self, msg: Msg, event: AnyEvent, reason: str, message: str) -> None:
        report = ConditionReported(
            workspace=event.workspace,
            generation=event.generation,
            correlation_id=event.event_id,
            type=self._spec.failure_condition,
            status="False",
            reason=reason,
            message=message[:1000],
            warning=True,
            reporter=self._reporter,
        )
        try:
            await self._publisher.publish(report)
        except Exception as pub_exc:  # cannot report: leave the message for redelivery
            log.error("could not report failure for %s: %s", event.workspace.key, pub_exc)
            await msg.nak(delay=delay_for(8, key=msg.subject))
            return
        await msg.term()
        self._count(event, "failed")

    async def _heartbeat(self) -> None:
        """Every ``ack_wait / 3``: ``in_progress()`` for each message fetched and not yet settled (one
        loop for all of them, not a task per group), so long work is not redelivered meanwhile."""
        while True:
            await asyncio.sleep(self._spec.ack_wait / 3)
            for group in list(self._working):
                for msg in group.msgs:
                    if not msg.is_acked:
                        with contextlib.suppress(Exception):
                            await msg.in_progress()
