"""Wiring of the planner service: one durable consumer of observed/deleting events."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from services.planner.handling import Planner
from services.planner.hub import Hub
from services.planner.settings import PlannerSettings
from services.planner.store import open_store
from shared import events as ev
from shared.bus.consuming import ConsumerRunner, ConsumerSpec
from shared.lifecycle import Component, Runtime
from shared.lifecycle import main as run_main
from shared.planning.catalog import load_catalogs

DURABLE = "planner"
log = logging.getLogger(__name__)


async def build(runtime: Runtime) -> Sequence[Component]:
    settings = runtime.settings
    assert isinstance(settings, PlannerSettings)
    catalogs = load_catalogs(settings.catalog_files)  # a bad operator file fails start-up, loudly
    log.info(
        "catalogs: %d presets, %d instance types (%s); provider %s, cloud %s",
        len(catalogs.presets),
        len(catalogs.skus),
        ", ".join(catalogs.sources),
        settings.provider,
        settings.cloud,
    )
    planner = Planner(
        catalogs=catalogs,
        options=settings.plan_options(),
        store=await open_store(runtime.js),
        publisher=runtime.publisher,
        api=runtime.api,
        hub=Hub(settings.hub_url, timeout=settings.hub_timeout_s) if settings.hub_url else None,
    )
    consumer = ConsumerRunner(
        nc=runtime.nc,
        spec=ConsumerSpec(
            durable=DURABLE,
            filter_subjects=[
                ev.subject_filter("workspace", "observed"),
                ev.subject_filter("workspace", "deleting"),
            ],
            fetch_batch=settings.batch,
        ),
        handler=planner.handle,
        publisher=runtime.publisher,
        reporter="planner",
    )
    return [consumer]


def main() -> None:
    run_main("planner", PlannerSettings, build)
