"""Leader election on the bus (shared.bus.leadership) against a real NATS server."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import nats
import pytest
import pytest_asyncio
from nats.aio.client import Client

from kaiten.local.nats_server import NatsServer
from shared.bus.leadership import Leadership, led
from shared.lifecycle import LoopComponent

pytestmark = pytest.mark.nats
TTL, POLL = 1.5, 0.1


@pytest_asyncio.fixture
async def other(nats_server: NatsServer) -> AsyncIterator[Client]:
    """A second connection: a replica that can die without a word (its connection closed under it)."""
    client = await nats.connect(nats_server.url, connect_timeout=2, max_reconnect_attempts=0)
    try:
        yield client
    finally:
        await client.close()


async def open_as(client: Client, identity: str) -> Leadership:
    return await Leadership.open(client.jetstream(), key="watcher", identity=identity, ttl=TTL, poll=POLL)


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def became(leadership: Leadership, leading: bool, within: float) -> float:
    """Seconds until ``leadership.leading`` is ``leading``; fails after ``within``."""
    started = time.monotonic()
    async with asyncio.timeout(within):
        await leadership.changed(not leading)
    return time.monotonic() - started


async def test_one_leads_and_a_stopping_leader_hands_over_at_once(nc: Client, other: Client) -> None:
    a = await open_as(other, "a")
    b = await open_as(nc, "b")
    assert a.leading and not b.leading
    runs = [asyncio.create_task(a.run()), asyncio.create_task(b.run())]
    await asyncio.sleep(TTL * 1.5)  # past the entry's TTL: the leader's refreshes keep it
    assert a.leading and not b.leading
    await stop(runs[0])  # SIGTERM: the entry is deleted on the way out
    assert not a.leading
    took = await became(b, True, within=TTL)
    assert took < TTL / 2, f"the follower waited {took:.2f}s: the entry was not handed back"
    await stop(runs[1])


async def test_a_crashed_leader_is_replaced_after_the_ttl(nc: Client, other: Client) -> None:
    a = await open_as(other, "a")
    b = await open_as(nc, "b")
    runs = [asyncio.create_task(a.run()), asyncio.create_task(b.run())]
    await other.close()  # the leader's process is gone: no refresh, no hand-back
    took = await became(b, True, within=TTL * 3)
    assert took > TTL / 3, f"took over after {took:.2f}s: before the crashed leader's entry expired"
    await became(a, False, within=TTL)  # its own refresh failed: it does not think it leads either
    for run in runs:
        await stop(run)


async def test_a_restart_under_the_same_identity_leads_at_once(nc: Client, other: Client) -> None:
    crashed = await open_as(other, "pod-0")
    assert crashed.leading
    await other.close()  # killed: its entry stays until the TTL
    again = await open_as(nc, "pod-0")  # the container restarted in the same pod
    stranger = await open_as(nc, "pod-1")
    assert again.leading and not stranger.leading


async def test_a_stalled_leader_finds_itself_replaced_and_follows(nc: Client, other: Client) -> None:
    a = await open_as(other, "a")
    b = await open_as(nc, "b")
    b_run = asyncio.create_task(b.run())
    await became(b, True, within=TTL * 3)  # a never refreshed (stalled): its entry expired, b took it
    assert a.leading  # a has not noticed yet
    a_run = asyncio.create_task(a.run())
    await became(a, False, within=TTL)  # its first refresh is refused
    await asyncio.sleep(TTL / 2)
    assert b.leading and not a.leading
    for run in (a_run, b_run):
        await stop(run)


async def test_led_runs_the_leaders_work_only_while_leading(nc: Client, other: Client) -> None:
    a = await open_as(other, "a")
    b = await open_as(nc, "b")
    done: list[str] = []

    def worker(what: str):  # type: ignore[no-untyped-def]
        async def work() -> None:
            done.append(f"{what} started")
            try:
                await asyncio.Event().wait()
            finally:
                done.append(f"{what} stopped")

        return work

    runs = [asyncio.create_task(a.run()), asyncio.create_task(b.run())]
    b_led = asyncio.create_task(led(b, worker("lead"), worker("follow")))
    await asyncio.sleep(0.2)
    assert done == ["follow started"]
    await stop(runs[0])  # a steps down: b's follower work stops before its leader's work starts
    await became(b, True, within=TTL)
    await asyncio.sleep(0.1)
    assert done == ["follow started", "follow stopped", "lead started"]
    await stop(b_led)
    assert done[-1] == "lead stopped"
    await stop(runs[1])


async def test_led_ends_with_what_the_work_raised(nc: Client) -> None:
    a = await open_as(nc, "a")

    async def failing() -> None:
        raise RuntimeError("the watch loop died")

    with pytest.raises(RuntimeError, match="the watch loop died"):
        await led(a, failing, failing)


async def test_a_stopped_leader_leaves_no_work_running_even_work_that_ignored_a_cancel(nc: Client) -> None:
    """The watcher's component runs ``led``, which runs the watch loop: stopping it cancels ``led``,
    which cancels the loop. A loop that ignores its first cancel (Python 3.11's wait_for in nats-py can
    drop one) is cancelled again, and ``led`` — itself re-cancelled meanwhile — still waits for it: no
    leader's work runs on, publishing, after its service stopped (the review of this change found it)."""
    a = await open_as(nc, "a")
    ended: list[float] = []

    async def deaf_once() -> None:
        try:
            with contextlib.suppress(asyncio.CancelledError):  # the dropped cancel
                await asyncio.sleep(3600)
            await asyncio.sleep(3600)
        finally:
            ended.append(time.monotonic())

    component = LoopComponent("watcher", lambda: led(a, deaf_once, deaf_once))
    await component.start()
    await asyncio.sleep(0.05)
    await component.stop(1.0)
    assert ended, "the leader's work was still running after its component stopped"
