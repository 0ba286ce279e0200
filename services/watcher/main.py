"""Wiring of the watcher service: the watch loop and the status writer in one process."""

from __future__ import annotations

from collections.abc import Sequence

from services.watcher.seen import Seen
from services.watcher.settings import WatcherSettings
from services.watcher.status.writing import StatusWriter
from services.watcher.watching import WorkspaceWatcher, open_store
from shared import events as ev
from shared.bus.consuming import ConsumerRunner, ConsumerSpec
from shared.bus.leadership import Leadership
from shared.kube.workspaces import Workspaces
from shared.lifecycle import Component, LoopComponent, Runtime
from shared.lifecycle import main as run_main

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
    seen = Seen()  # the watch's newest copies, read by the status writer instead of a GET per patch
    # one replica acts on what the watch shows (the others keep their copies): a second replica used to
    # double the finalizer patches, KV reads and publishes, and was slower than one on 2 cores
    leadership = await Leadership.open(runtime.js, key="watcher", identity=runtime.replica)
    watcher = WorkspaceWatcher(
        workspaces=workspaces,
        publisher=runtime.publisher,
        store=await open_store(runtime.js),
        settings=settings,
        seen=seen,
        leadership=leadership,
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
    return [LoopComponent("leadership", leadership.run), LoopComponent("watcher", watcher.run), status]


def main() -> None:
    run_main("watcher", WatcherSettings, build)
