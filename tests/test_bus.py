"""The bus against a real nats-server: dedupe, ordering, concurrency, taxonomy, replicas."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Sequence

import msgspec
import nats
import pytest
from nats.aio.client import Client
from prometheus_client import REGISTRY

from kaiten.local.nats_server import NatsServer
from shared import events as ev
from shared.api.workspace import WorkspaceSpec
from shared.bus.consuming import ConsumerRunner, ConsumerSpec
from shared.bus.leases import LOCK_BUCKET, LeaseBusy, LeaseLost, Leases
from shared.bus.publishing import Publisher
from shared.bus.reconciling import reconcile_forever
from shared.bus.streams import declare_consumer, declare_stream
from shared.errors import InvalidInput, Transient
from shared.planning.model import Plan
from tests.conftest import PLAN_FIELDS, REPO

pytestmark = pytest.mark.nats


def ref(name: str, ns: str = "default") -> ev.WorkspaceRef:
    return ev.WorkspaceRef(namespace=ns, name=name, uid=f"uid-{ns}-{name}")


def cond(name: str, n: int, *, generation: int = 1) -> ev.ConditionReported:
    return ev.ConditionReported(
        workspace=ref(name), generation=generation, type=f"Step{n}", status="True", reason="Test"
    )


async def wait_for(predicate, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


def runner(nc: Client, handler, durable: str = "test", **spec_kw) -> ConsumerRunner:  # type: ignore[no-untyped-def]
    spec = ConsumerSpec(durable=durable, filter_subjects=[ev.subject_filter("status")], **spec_kw)
    return ConsumerRunner(
        nc=nc, spec=spec, handler=handler, publisher=Publisher(nc.jetstream()), reporter="test"
    )


async def stream_count(nc: Client, subject: str) -> int:
    info = await nc.jetstream().stream_info(ev.STREAM, subjects_filter=subject)
    return sum((info.state.subjects or {}).values())


async def test_declare_is_idempotent(nc: Client) -> None:
    js = nc.jetstream()
    await declare_stream(js)
    await declare_stream(js)
    for _ in range(2):
        await declare_consumer(
            js,
            stream=ev.STREAM,
            durable="d",
            filter_subjects=["kaiten.plan.>"],
            ack_wait=5,
            max_ack_pending=10,
        )
    info = await js.consumer_info(ev.STREAM, "d")
    assert info.config.filter_subjects == ["kaiten.plan.>"] or info.config.filter_subject == "kaiten.plan.>"


async def test_publish_dedupes_by_msg_id_and_carries_trace_context(nc: Client) -> None:
    pub = Publisher(nc.jetstream())
    event = cond("a", 1)
    first = await pub.publish(event)
    again = await pub.publish(msgspec.structs.replace(event, event_id="other"))  # same fact, new id
    assert not first.duplicate and again.duplicate
    assert await stream_count(nc, "kaiten.status.>") == 1
    msg = await nc.jetstream().get_msg(ev.STREAM, first.seq)
    assert msg.headers is not None and msg.headers["Nats-Msg-Id"] == ev.dedupe_id(event)
    assert ev.decode(msg.data) == event


async def test_a_service_with_tracing_off_carries_the_trace_on(nc: Client) -> None:
    """No TracerProvider in this process (tracing off, as in a service without ``OTEL_*``): the
    consumer makes no span, but what a handler publishes carries the trace it received."""
    js = nc.jetstream()
    caller = "0af7651916cd43dd8448eb211c80319c"
    await js.publish(
        "kaiten.status.condition.default.traced", ev.encode(cond("traced", 1)),
        headers={"traceparent": f"00-{caller}-b7ad6b7169203331-01"},
    )  # fmt: skip
    pub = Publisher(js)
    sent: list[int] = []

    async def handler(events: Sequence[ev.AnyEvent]) -> None:
        if events[-1].workspace.name == "traced":
            sent.append((await pub.publish(ev.NodesRequested(workspace=ref("onward"), generation=1,
                                                                provider="p", count=1))).seq)  # fmt: skip

    run = runner(nc, handler, durable="traced")
    await run.start()
    try:
        await wait_for(lambda: sent)
    finally:
        await run.stop()
    onward = await js.get_msg(ev.STREAM, sent[0])
    assert onward.headers is not None and onward.headers["traceparent"].split("-")[1] == caller, (
        onward.headers
    )


SPEC = {
    "resource": {"instanceType": "Standard_NC24ads_A100_v4", "count": 2, "preferredNodes": ["n1"],
                 "labelSelector": {"matchLabels": {"apps": "llama"},
                                   "matchExpressions": [{"key": "zone", "operator": "Exists"}]}},
    "inference": {"preset": {"name": "llama-3.1-8b-instruct"}},
}  # fmt: skip


async def test_events_round_trip_and_subjects() -> None:
    observed = ev.WorkspaceObserved(
        workspace=ref("w", "ns1"),
        generation=3,
        api_version="kaito.sh/v1alpha1",
        spec=WorkspaceSpec.model_validate(SPEC),
    )
    assert ev.subject_for(observed) == "kaiten.workspace.observed.ns1.w"
    assert ev.decode(ev.encode(observed)) == observed
    assert ev.dedupe_id(observed) == "uid-ns1-w:3:workspace.observed"
    with pytest.raises(AttributeError):
        observed.generation = 4  # type: ignore[misc]
    with pytest.raises(msgspec.ValidationError):
        ev.decode(b'{"kind": "workspace.observed", "generation": "x"}')


def test_the_events_json_schema_is_generated_from_the_structs() -> None:
    assert (REPO / "docs/events.schema.json").read_text() == ev.render_json_schema(), (
        "run: python -m shared.events docs/events.schema.json"
    )


def test_the_spec_and_the_plan_travel_typed_and_as_the_user_wrote_the_spec() -> None:
    """Issue 17: events carry the spec (the watcher's model of it, validated where the object is read)
    and the ``Plan`` typed, not as dicts; ``plan.resolved`` carries the spec it planned for, so its
    consumers need no other event. On the wire the spec is what the user wrote (camelCase, unset fields
    left out); a field a newer CRD adds is ignored, not an error."""
    plan = msgspec.convert(PLAN_FIELDS, Plan)
    wire = {
        "kind": "plan.resolved", "schema": 2, "event_id": "e1", "generation": 2, "occurred_at": 1.0,
        "workspace": {"namespace": "ns", "name": "w", "uid": "u"},
        "plan": PLAN_FIELDS, "explanation": "fits", "api_version": "kaito.sh/v1beta1",
        "spec": {**SPEC, "resource": {**SPEC["resource"], "fromANewerCrd": {"profile": "x"}}},
    }  # fmt: skip
    event = ev.decode(msgspec.json.encode(wire))
    assert isinstance(event, ev.PlanResolved) and event.plan == plan and event.spec is not None
    assert event.plan.pipeline_parallel == 2 and event.spec.resource.preferred_nodes == ["n1"]
    assert event.spec.resource.label_selector.match_labels == {"apps": "llama"}
    assert event.spec.resource.label_selector.match_expressions[0].operator == "Exists"
    assert event.spec.inference is not None and event.spec.inference.preset is not None
    assert event.spec.inference.preset.name == "llama-3.1-8b-instruct"
    again = msgspec.json.decode(ev.encode(event))
    assert again["plan"] == PLAN_FIELDS and again["spec"] == SPEC  # as written, less the unknown field
    with pytest.raises(msgspec.ValidationError):  # a plan missing its fields is refused at decode
        ev.decode(msgspec.json.encode({**wire, "plan": {"sku": "x"}}))
    with pytest.raises(msgspec.ValidationError, match="labelSelector"):  # and a spec that is not one
        ev.decode(msgspec.json.encode({**wire, "spec": {"resource": {"count": 1}}}))


def test_a_schema_1_plan_still_decodes_and_says_it_carries_no_spec() -> None:
    """Events already in the stream when the services are upgraded: a schema-1 ``plan.resolved`` (the
    resource section, no spec) decodes, with ``spec`` None; its consumers refuse it with a reason
    (``PlanTooOld``, tests/test_provisioner_deciding.py) instead of deploying half a Workspace."""
    written_before = {
        "kind": "plan.resolved", "schema": 1, "event_id": "e1", "generation": 2, "occurred_at": 1.0,
        "workspace": {"namespace": "ns", "name": "w", "uid": "u"},
        "plan": PLAN_FIELDS, "explanation": "fits", "resource": SPEC["resource"],
    }  # fmt: skip
    event = ev.decode(msgspec.json.encode(written_before))
    assert isinstance(event, ev.PlanResolved) and event.schema == 1 and event.spec is None
    assert ev.SCHEMA_VERSION == 2


async def test_one_workspace_in_order_different_workspaces_concurrently(nc: Client) -> None:
    seen: dict[str, list[int]] = defaultdict(list)
    active: set[str] = set()
    overlap = {"same_key": 0, "max_parallel": 0}

    async def handler(events: Sequence[ev.AnyEvent]) -> None:
        key = events[0].workspace.key
        if key in active:
            overlap["same_key"] += 1
        active.add(key)
        overlap["max_parallel"] = max(overlap["max_parallel"], len(active))
        await asyncio.sleep(0.05)
        seen[key] += [int(e.type.removeprefix("Step")) for e in events if isinstance(e, ev.ConditionReported)]
        active.discard(key)

    pub = Publisher(nc.jetstream())
    for n in range(20):
        for name in ("a", "b", "c", "d"):
            await pub.publish(cond(name, n))
    run = runner(nc, handler, fetch_batch=8)
    await run.start()
    try:
        await wait_for(lambda: sum(len(v) for v in seen.values()) == 80)
    finally:
        await run.stop()
    assert all(seen[k] == list(range(20)) for k in seen), seen
    assert overlap["same_key"] == 0
    assert overlap["max_parallel"] >= 2


async def test_what_arrives_while_a_workspace_is_busy_is_handed_over_together(nc: Client) -> None:
    """Issue 20: messages of one Workspace fetched while its previous group is still at work join the
    group queued behind it, over several fetches: the handler gets them in one call, in order (before,
    one call per fetch)."""
    calls: list[list[int]] = []
    release = asyncio.Event()

    async def handler(events: Sequence[ev.AnyEvent]) -> None:
        steps = [e.type for e in events if isinstance(e, ev.ConditionReported)]
        calls.append([int(step.removeprefix("Step")) for step in steps])
        if len(calls) == 1:
            await release.wait()

    def in_flight() -> float:
        return REGISTRY.get_sample_value("kaiten_consumer_in_flight", {"consumer": "coalesce"}) or 0

    pub = Publisher(nc.jetstream())
    run = runner(nc, handler, durable="coalesce", fetch_batch=16)
    await run.start()
    try:
        await pub.publish(cond("a", 0))
        await wait_for(lambda: len(calls) == 1)
        for n in range(1, 6):
            await pub.publish(cond("a", n))
        await wait_for(lambda: in_flight() == 6)  # fetched: one group queued behind the running one
        for n in range(6, 8):
            await pub.publish(cond("a", n))
        await wait_for(lambda: in_flight() == 8)  # a later fetch
        release.set()
        await wait_for(lambda: run.handled == 8)
    finally:
        await run.stop()
    assert calls == [[0], [1, 2, 3, 4, 5, 6, 7]], calls


async def test_stop_stops_a_running_group_that_a_queued_one_waits_behind(nc: Client) -> None:
    """A Workspace's running group with another of its groups queued behind it: ``stop`` must not
    return while the running one still works (its lease is closed under it, and it could still act
    after the service says it stopped). It used to wait for and cancel only each key's last group."""
    started, finished = asyncio.Event(), asyncio.Event()

    async def handler(events: Sequence[ev.AnyEvent]) -> None:
        if not started.is_set():
            started.set()
            try:
                await asyncio.sleep(3600)
            finally:
                finished.set()

    def in_flight() -> float:
        return REGISTRY.get_sample_value("kaiten_consumer_in_flight", {"consumer": "stopping"}) or 0

    pub = Publisher(nc.jetstream())
    run = runner(nc, handler, durable="stopping")
    await run.start()
    await pub.publish(cond("a", 0))
    await asyncio.wait_for(started.wait(), 10)
    await pub.publish(cond("a", 1))
    await wait_for(lambda: in_flight() == 2)  # fetched: queued behind the running group
    await run.stop(grace=0.2)
    assert finished.is_set(), "stop returned while a group was still running"


async def test_transient_error_is_retried_then_succeeds(nc: Client) -> None:
    calls: list[float] = []

    async def handler(events: Sequence[ev.AnyEvent]) -> None:
        calls.append(time.monotonic())
        if len(calls) < 3:
            raise Transient("apiserver busy", retry_after=0.1)

    await Publisher(nc.jetstream()).publish(cond("a", 1))
    run = runner(nc, handler)
    await run.start()
    try:
        await wait_for(lambda: run.handled == 1)
    finally:
        await run.stop()
    assert len(calls) == 3


async def test_invalid_input_is_terminated_with_a_status_event(nc: Client) -> None:
    async def handler(events: Sequence[ev.AnyEvent]) -> None:
        raise InvalidInput("preset nope is unknown", reason="UnknownPreset")

    pub = Publisher(nc.jetstream())
    await pub.publish(ev.PlanRejected(workspace=ref("bad"), generation=1, reason="R", message="m"))
    spec = ConsumerSpec(durable="planner-like", filter_subjects=[ev.subject_filter("plan")])
    run = ConsumerRunner(nc=nc, spec=spec, handler=handler, publisher=pub, reporter="planner")
    sub = await nc.jetstream().subscribe("kaiten.status.condition.default.bad", ordered_consumer=True)
    await run.start()
    try:
        report = ev.decode((await sub.next_msg(timeout=10)).data)
        assert isinstance(report, ev.ConditionReported)
        assert (report.status, report.reason, report.warning) == ("False", "UnknownPreset", True)
        assert "preset nope is unknown" in report.message
        for _ in range(100):  # term() is fire-and-forget: wait until the server has it
            await nc.flush()
            info = await nc.jetstream().consumer_info(ev.STREAM, "planner-like")
            if info.num_ack_pending == 0:
                break
            await asyncio.sleep(0.05)
        assert info.num_ack_pending == 0 and info.num_redelivered == 0
    finally:
        await run.stop()


async def test_unknown_error_gives_up_after_max_attempts(nc: Client) -> None:
    calls = 0

    async def handler(events: Sequence[ev.AnyEvent]) -> None:
        nonlocal calls
        calls += 1
        raise RuntimeError("bug")

    pub = Publisher(nc.jetstream())
    await pub.publish(ev.PlanRejected(workspace=ref("w"), generation=1, reason="R", message="m"))
    spec = ConsumerSpec(durable="p", filter_subjects=[ev.subject_filter("plan")], max_attempts=3)
    run = ConsumerRunner(nc=nc, spec=spec, handler=handler, publisher=pub, reporter="planner")
    sub = await nc.jetstream().subscribe("kaiten.status.condition.default.w", ordered_consumer=True)
    await run.start()
    try:
        report = ev.decode((await sub.next_msg(timeout=15)).data)
        assert isinstance(report, ev.ConditionReported) and report.reason == "InternalError"
        assert "RuntimeError: bug" in report.message
    finally:
        await run.stop()
    assert calls == 3


async def test_poison_message_in_a_burst_does_not_take_the_others_down(nc: Client) -> None:
    handled: list[int] = []

    async def handler(events: Sequence[ev.AnyEvent]) -> None:
        for e in events:
            assert isinstance(e, ev.ConditionReported)
            if e.type == "Step2":
                raise InvalidInput("bad step")
        handled.extend(int(e.type.removeprefix("Step")) for e in events)  # type: ignore[union-attr]

    pub = Publisher(nc.jetstream())
    for n in range(5):
        await pub.publish(cond("a", n))
    run = runner(nc, handler)
    await run.start()
    try:
        await wait_for(lambda: sorted(handled) == [0, 1, 3, 4])
    finally:
        await run.stop()


async def test_long_handler_stays_alive_with_in_progress(nc: Client) -> None:
    calls = 0

    async def handler(events: Sequence[ev.AnyEvent]) -> None:
        nonlocal calls
        calls += 1
        await asyncio.sleep(3.5)  # longer than ack_wait: only in_progress() prevents a redelivery

    await Publisher(nc.jetstream()).publish(cond("slow", 1))
    run = runner(nc, handler, ack_wait=1.5)
    await run.start()
    try:
        await wait_for(lambda: run.handled == 1)
    finally:
        await run.stop()
    assert calls == 1


async def test_two_replicas_share_work_and_never_handle_one_workspace_at_once(nc: Client) -> None:
    active: set[str] = set()
    collisions = 0
    per_replica = [0, 0]
    seen: dict[str, list[int]] = defaultdict(list)

    def make(index: int):  # type: ignore[no-untyped-def]
        async def handler(events: Sequence[ev.AnyEvent]) -> None:
            nonlocal collisions
            key = events[0].workspace.key
            if key in active:
                collisions += 1
            active.add(key)
            await asyncio.sleep(0.02)
            per_replica[index] += len(events)
            seen[key] += [int(e.type.removeprefix("Step")) for e in events]  # type: ignore[union-attr]
            active.discard(key)

        return handler

    pub = Publisher(nc.jetstream())
    names = [f"w{i}" for i in range(8)]
    replicas = [runner(nc, make(i), durable="shared", fetch_batch=4) for i in range(2)]
    for r in replicas:  # both pulling before the first message: one started later could find none left
        await r.start()
    try:
        for n in range(10):
            for name in names:
                await pub.publish(cond(name, n))
        await wait_for(lambda: sum(per_replica) >= 80, timeout=30)
        await asyncio.sleep(0.5)
    finally:
        for r in replicas:
            await r.stop()
    assert sum(per_replica) == 80, per_replica  # each message handled exactly once
    assert collisions == 0
    assert min(per_replica) > 0, per_replica  # the work is spread
    assert all(sorted(v) == list(range(10)) for v in seen.values())


async def test_a_flood_of_undecodable_messages_does_not_stop_intake(nc: Client) -> None:
    """Garbage on a service's subjects is terminated, and the consumer goes on pulling: a real event that
    follows 200 of them (more than three fetches' worth) is handled. Each undecodable message used to
    leak an intake slot, so after one fetch of them the service stopped consuming, alive but idle."""
    handled: list[ev.AnyEvent] = []

    async def handler(events: Sequence[ev.AnyEvent]) -> None:
        handled.extend(events)

    js = nc.jetstream()
    for n in range(200):
        await js.publish(f"kaiten.status.condition.default.w{n % 7}", b"\xff not an event %d" % n)
    await Publisher(js).publish(cond("real", 1))
    run = runner(nc, handler, fetch_batch=64)
    await run.start()
    try:
        await wait_for(lambda: len(handled) == 1, timeout=15)
    finally:
        await run.stop()
    assert isinstance(handled[0], ev.ConditionReported) and handled[0].workspace.name == "real"
    await nc.flush()
    info = await js.consumer_info(ev.STREAM, "test")
    assert info.num_ack_pending == 0 and info.num_pending == 0, info


async def test_a_lease_is_exclusive_and_a_lost_lease_stops_the_work_under_it(nc: Client) -> None:
    """Issue 16 (6): a Workspace's lease has one holder; when it cannot be refreshed (it expired while
    the holder stalled, and another took it) the work under it is cancelled with ``LeaseLost`` — and
    the new holder's lease is left alone. A shutdown's cancel stays a cancel."""
    js = nc.jetstream()
    a = await Leases.open(js, role="lease-test", ttl=1.5)
    b = await Leases.open(js, role="lease-test", ttl=1.5)
    async with a.hold("ns/x"):
        with pytest.raises(LeaseBusy):
            async with b.hold("ns/x"):
                pass
    async with b.hold("ns/x"):  # released on exit: free again
        pass

    progress: list[str] = []

    async def work() -> None:
        async with a.hold("ns/y"):
            progress.append("started")
            await asyncio.sleep(30)
            progress.append("carried on without the lease")

    task = asyncio.create_task(work())
    await wait_for(lambda: progress == ["started"])
    kv = await js.key_value(LOCK_BUCKET)
    await kv.delete("lease-test.ns.y")  # what expiry does while the holder is frozen ...
    taken = await b.acquire("ns/y")  # ... and another replica takes it
    started = time.monotonic()
    with pytest.raises(LeaseLost):
        await task
    assert time.monotonic() - started < 1.5 and progress == ["started"]
    with pytest.raises(LeaseBusy):  # b's lease was not released by a's exit
        await a.acquire("ns/y")
    await b.release("ns/y", taken)

    async def shutdown() -> None:
        async with a.hold("ns/z"):
            await asyncio.sleep(30)

    task = asyncio.create_task(shutdown())
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    async with b.hold("ns/z"):  # and a cancelled holder releases
        pass


async def test_a_lingering_lease_is_taken_back_without_a_round_trip_and_freed_after(nc: Client) -> None:
    """Issue 20: a lease parked after use is taken back by this process with no KV create (the entry's
    revision does not move); meanwhile it is busy for another replica, and for other work here; it is
    deleted ``linger`` after its last use, or at once by ``close()``."""
    js = nc.jetstream()
    a = await Leases.open(js, role="linger", ttl=3.0, linger=0.6)
    b = await Leases.open(js, role="linger", ttl=3.0)
    kv = await js.key_value(LOCK_BUCKET)
    async with a.hold("ns/x", park=True):
        pass
    parked = (await kv.get("linger.ns.x")).revision
    with pytest.raises(LeaseBusy):  # another replica: busy while parked
        async with b.hold("ns/x"):
            pass
    inside: list[str] = []
    async with a.hold("ns/x", park=True):  # taken back: the same entry, no create
        assert (await kv.get("linger.ns.x")).revision == parked
        with pytest.raises(LeaseBusy):  # other work in this process (a reconcile pass) waits its turn
            async with a.hold("ns/x"):
                inside.append("twice")
    assert inside == []
    await asyncio.sleep(1.0)  # > linger since the last use: deleted
    async with b.hold("ns/x"):
        pass
    async with a.hold("ns/y", park=True):  # parked after an event ...
        pass
    async with a.hold("ns/y"):  # ... a reconcile pass takes it back, and lets it go: passes never park
        pass  # (one that did, more often than the linger, kept the Workspace from the other replica)
    async with b.hold("ns/y"):
        pass
    async with a.hold("ns/z", park=True):
        pass
    await a.close()  # a stopping service frees what it parked, without waiting for the linger
    async with b.hold("ns/z"):
        pass


async def test_a_handler_that_loses_its_lease_is_stopped_and_its_event_redelivered(nc: Client) -> None:
    calls: list[str] = []

    async def handler(events: Sequence[ev.AnyEvent]) -> None:
        calls.append("call")
        if len(calls) == 1:
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                calls.append("cancelled")
                raise

    js = nc.jetstream()
    leases = await Leases.open(js, role="lost", ttl=1.5)
    spec = ConsumerSpec(durable="lost", filter_subjects=[ev.subject_filter("status")], busy_delay=0.1)
    run = ConsumerRunner(
        nc=nc, spec=spec, handler=handler, publisher=Publisher(js), reporter="test", leases=leases
    )
    await Publisher(js).publish(cond("lw", 1))
    await run.start()
    try:
        await wait_for(lambda: calls == ["call"])
        kv = await js.key_value(LOCK_BUCKET)
        await kv.delete("lost.default.lw")
        await wait_for(lambda: run.handled == 1, timeout=10)
    finally:
        await run.stop()
    assert calls == ["call", "cancelled", "call"]


async def test_a_reconcile_loop_rides_out_a_nats_outage(
    nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Found by the chaos suite (NATS restarted mid-burst): a KV call of a reconcile pass timed out and
    was logged with a traceback as a failure, and listing the keys outside the per-key guard would have
    ended the loop. Bus trouble is a warning, and once NATS is back the passes go on."""
    nc = await nats.connect(nats_server.url, reconnect_time_wait=0.2, max_reconnect_attempts=-1)
    kv = await nc.jetstream().create_key_value(bucket="loop_test")
    await kv.put("a", b"1")
    passes: list[str] = []

    async def keys() -> list[str]:
        return list(await kv.keys())

    async def one(key: str) -> None:
        await kv.get(key)
        passes.append(key)

    def troubles() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.name == "shared.bus.reconciling"]

    loop = asyncio.create_task(reconcile_forever("test reconcile", keys, one, interval=0.1))
    try:
        await wait_for(lambda: len(passes) >= 2)
        nats_server.stop()
        await wait_for(lambda: troubles(), timeout=15)
        nats_server.start()  # same port, same store
        resumed = len(passes)
        await wait_for(lambda: len(passes) > resumed + 2, timeout=15)
    finally:
        loop.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop
        await nc.close()
    assert all(r.levelname == "WARNING" and r.exc_info is None for r in troubles()), troubles()


async def test_a_kv_store_is_typed_and_compare_and_set(nc: Client) -> None:
    """Issue 17 (3): the one KV mechanism of the services with state: records of a Struct type (a spec
    inside travels typed too), a write with ``last`` only lands on the revision it read."""
    from nats.js.errors import KeyWrongLastSequenceError

    from services.workload.deciding import Record
    from shared.bus.kvstore import KvStore, key_of

    store = await KvStore.open(nc.jetstream(), "kaiten_test_kvstore", Record)
    key = key_of(ref("w", "ns"))
    assert key == "ns.w" and await store.entry(key) == (None, 0)
    first = Record(uid="u", namespace="ns", name="w", spec=WorkspaceSpec.model_validate(SPEC), generation=2)
    revision = await store.put(key, first)
    assert await store.entry(key) == (first, revision)
    newer = await store.put(key, msgspec.structs.replace(first, message="newer"), last=revision)
    with pytest.raises(KeyWrongLastSequenceError):  # a pass that read the first revision loses
        await store.put(key, msgspec.structs.replace(first, message="stale"), last=revision)
    got = await store.get(key)
    assert got is not None and got.message == "newer" and got.spec == first.spec
    assert (await store.entry(key))[1] == newer and await store.keys() == [key]
    await store.purge(key)
    await store.purge(key)  # twice: nothing to purge is not an error
    assert await store.get(key) is None and await store.keys() == []


async def test_key_locks_serialise_one_key_and_are_forgotten_when_idle() -> None:
    """Issue 17 (3): a key's lock lives while someone holds or waits for it; other keys never wait."""
    from shared.bus.kvstore import KeyLocks

    locks = KeyLocks()
    inside: list[str] = []
    overlaps: list[str] = []
    most = 0

    async def work(key: str, tag: str) -> None:
        nonlocal most
        async with locks(key):
            if any(t.startswith(key) for t in inside):
                overlaps.append(tag)
            inside.append(f"{key}:{tag}")
            most = max(most, len(inside))
            await asyncio.sleep(0.02)
            inside.remove(f"{key}:{tag}")

    await asyncio.gather(*(work(k, str(i)) for i in range(5) for k in ("a", "b")))
    assert overlaps == [] and len(locks) == 0
    assert most == 2  # the two keys side by side
    with contextlib.suppress(RuntimeError):
        async with locks("c"):
            raise RuntimeError("a body that fails still lets go")
    assert len(locks) == 0
