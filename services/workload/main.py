"""Wiring of the workload service: the backend, one durable consumer, and the reconcile loop."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from pathlib import Path

from services.workload.backends.base import Backend
from services.workload.backends.kuberay import KubeRay
from services.workload.backends.local import LocalBackend, LocalRay
from services.workload.handling import Workloads
from services.workload.manifests import AdminPeers, HostNetwork
from services.workload.settings import WorkloadSettings
from shared import events as ev
from shared.bus.consuming import ConsumerRunner, ConsumerSpec
from shared.bus.leadership import Leadership, led, standby
from shared.bus.leases import LINGER, Leases
from shared.lifecycle import Component, LoopComponent, Runtime
from shared.lifecycle import main as run_main

DURABLE = "workload"
log = logging.getLogger(__name__)


async def build(runtime: Runtime) -> Sequence[Component]:
    settings = runtime.settings
    assert isinstance(settings, WorkloadSettings)
    backend: Backend
    if settings.backend == "kuberay":
        if runtime.api is None:
            raise SystemExit("the kuberay backend needs the Kubernetes API (KUBECONFIG or in-cluster)")
        host = HostNetwork(settings.ray_host_network) if settings.ray_host_network else None
        admin = None
        if settings.network_policy:
            admin = AdminPeers(
                operator_labels=settings.operator_labels(), namespace=settings.control_namespace
            )
        backend = KubeRay(
            runtime.api,
            image=settings.ray_image,
            nats_url=settings.nats_url,
            host=host,
            admin=admin,
            tuning_key=settings.tuning_nats_password.get_secret_value()
            if settings.tuning_nats_password
            else None,
            nats_ca=await asyncio.to_thread(Path(settings.nats_ca_file).read_text)
            if settings.nats_ca_file
            else None,
        )
        log.info("backend kuberay: image %s%s", settings.ray_image, f", host network {host}" if host else "")
    elif settings.backend == "local":
        if not settings.ray_dashboard_url:
            raise SystemExit("the local backend needs KAITEN_RAY_DASHBOARD_URL (kaiten up sets it)")
        ray = LocalRay(settings.ray_dashboard_url, settings.ray_token_path, settings.serve_port)
        work = Path(settings.work_dir or Path.home() / ".local" / "state" / "kaiten" / "workload")
        backend = LocalBackend(
            ray,
            api=runtime.api,
            work_dir=work,
            nats_url=settings.nats_url,
            allow_loopback_urls=settings.allow_loopback_urls,
        )
        log.info("backend local: Ray dashboard %s, Serve on %s", settings.ray_dashboard_url, ray.serve_url)
    else:
        raise SystemExit(
            f"KAITEN_BACKEND={settings.backend!r}: choose kuberay (a cluster) or local (kaiten up)"
        )
    leases = await Leases.open(runtime.js, role=DURABLE, linger=LINGER)  # events and passes share them
    workloads = await Workloads.open(
        runtime.js,
        backend=backend,
        publisher=runtime.publisher,
        leases=leases,
        api=runtime.api,
        interval=settings.reconcile_interval_s,
        timeout=settings.deploy_timeout_s,
    )
    consumer = ConsumerRunner(
        nc=runtime.nc,
        spec=ConsumerSpec(
            durable=DURABLE,
            filter_subjects=[
                ev.subject_filter("workspace", "deleting"),
                ev.subject_filter("plan", "resolved"),
                ev.subject_filter("nodes", "ready"),
            ],
            failure_condition="WorkspaceSucceeded",
        ),
        handler=workloads.handle,
        publisher=runtime.publisher,
        reporter="workload",
        leases=leases,
    )
    # The reconcile passes go over every Workspace: one replica (the leader) makes them, the others
    # share the events only (two replicas' passes did the same KV reads and lease attempts twice).
    leadership = await Leadership.open(runtime.js, key="workload", identity=runtime.replica)
    return [
        LoopComponent("leadership", leadership.run),
        consumer,
        LoopComponent("workload:reconcile", lambda: led(leadership, workloads.run, standby)),
    ]


def main() -> None:
    run_main("workload", WorkloadSettings, build)
