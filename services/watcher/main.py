"""Wiring of the watcher service: the watch loop and the status writer in one process."""

from __future__ import annotations

from collections.abc import Sequence

from services.watcher.seen import Seen
from services.watcher.settings import WatcherSettings
from services.watcher.status.writing import StatusWriter
from services.watcher.watching import WorkspaceWatcher, open_store
from shared import events as ev
from shared.bus.consuming import ConsumerRunner, ConsumerSpec
from shared.bus.leadership import Leadership, led, standby
from shared.kube.workspaces import Workspaces
from shared.lifecycle import Component, LoopComponent, Runtime
from shared.lifecycle import main as run_main
from shared.tasks import finish, until_first_ends

STATUS_DURABLE = "status-writer"


def status_subjects() -> list[str]:
    """Every status-bearing family, plus "deleting" (which may release the finalizer)."""
    return [
        ev.subject_filter("workspace", "deleting"),
        ev.subject_filter("plan"),
        ev.subject_filter("nodes"),
        ev.subject_filter("workload"),
        ev.subject_filter("status"),
    ]


async def build(runtime: Runtime) -> Sequence[Component]:
    settings = runtime.settings
    assert isinstance(settings, WatcherSettings) and runtime.api is not None
    workspaces = Workspaces(runtime.api)
    store = await open_store(runtime.js)
    # One replica leads: it watches, acts and writes status; the others stand by, ready to take over.
    # Everything the watcher does is work one replica does for all: a second one watching (decoding
    # every event), or acting (finalizer patches, KV reads, publishes), only did it twice.
    leadership = await Leadership.open(runtime.js, key="watcher", identity=runtime.replica)

    async def leading() -> None:
        seen = Seen()  # the watch's newest copies, read by the status writer instead of a GET per patch
        watcher = WorkspaceWatcher(
            workspaces=workspaces, publisher=runtime.publisher, store=store, settings=settings, seen=seen
        )
        writer = StatusWriter(workspaces=workspaces, cleanup_owners=settings.cleanup_owners, seen=seen)
        status = ConsumerRunner(
            nc=runtime.nc,
            spec=ConsumerSpec(
                durable=STATUS_DURABLE,
                filter_subjects=status_subjects(),
                fetch_batch=settings.status_coalesce_batch,
            ),
            handler=writer.handle,
            publisher=runtime.publisher,
            reporter="status-writer",
        )
        await status.start()
        try:
            await until_first_ends(watcher.run(), status.wait())
        finally:  # in-flight status writes get their grace, even when leadership ends in a stop
            await finish(status.stop(settings.shutdown_grace_s))

    return [
        LoopComponent("leadership", leadership.run),
        LoopComponent("watcher", lambda: led(leadership, leading, standby)),
    ]


def main() -> None:
    run_main("watcher", WatcherSettings, build)
