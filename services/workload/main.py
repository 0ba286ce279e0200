"""Wiring of the workload service: the backend, one durable consumer, and the reconcile loop."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from services.workload.backends.local import LocalRay
from services.workload.handling import Workloads
from services.workload.settings import WorkloadSettings
from shared import events as ev
from shared.bus.consuming import ConsumerRunner, ConsumerSpec
from shared.lifecycle import Component, LoopComponent, Runtime
from shared.lifecycle import main as run_main

DURABLE = "workload"
log = logging.getLogger("kaiten.workload")


async def build(runtime: Runtime) -> Sequence[Component]:
    settings = runtime.settings
    assert isinstance(settings, WorkloadSettings)
    if settings.backend != "local":
        raise SystemExit(f"KAITEN_BACKEND={settings.backend!r}: only 'local' is available (kuberay: issue 7)")
    if not settings.ray_dashboard_url:
        raise SystemExit("the local backend needs KAITEN_RAY_DASHBOARD_URL (kaiten up sets it)")
    ray = LocalRay(settings.ray_dashboard_url, settings.ray_token_path, settings.serve_port)
    workloads = await Workloads.open(
        runtime.js,
        ray=ray,
        publisher=runtime.publisher,
        api=runtime.api,
        nats_url=settings.nats_url,
        work_dir=settings.work_dir,
        allow_loopback_urls=settings.allow_loopback_urls,
        interval=settings.reconcile_interval_s,
        timeout=settings.deploy_timeout_s,
    )
    log.info("backend local: Ray dashboard %s, Serve on %s", settings.ray_dashboard_url, ray.serve_url)
    consumer = ConsumerRunner(
        nc=runtime.nc,
        spec=ConsumerSpec(
            durable=DURABLE,
            filter_subjects=[
                ev.subject_filter("workspace", "observed"),
                ev.subject_filter("workspace", "deleting"),
                ev.subject_filter("plan", "resolved"),
                ev.subject_filter("nodes", "ready"),
            ],
            failure_condition="WorkspaceSucceeded",
        ),
        handler=workloads.handle,
        publisher=runtime.publisher,
        reporter="workload",
    )
    return [consumer, LoopComponent("workload:reconcile", workloads.run)]


def main() -> None:
    run_main("workload", WorkloadSettings.from_env(), build)
