"""Wiring of the provisioner: the installation's provider, one durable consumer of plans and
deletions, and the reconcile loop."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from services.provisioner.handling import Provisioner
from services.provisioner.providers.base import Provider
from services.provisioner.settings import ProvisionerSettings
from services.provisioner.store import open_store
from shared import events as ev
from shared.bus.consuming import ConsumerRunner, ConsumerSpec
from shared.bus.leadership import Leadership, led, standby
from shared.bus.leases import LINGER, Leases
from shared.lifecycle import Component, LoopComponent, Runtime
from shared.lifecycle import main as run_main

DURABLE = "provisioner"
PROVIDERS = ("aks", "nodeclaim", "byo", "local")
log = logging.getLogger(__name__)


def make_provider(settings: ProvisionerSettings, runtime: Runtime) -> Provider:
    if settings.provider == "local":
        from services.provisioner.providers.local import LocalProvider

        return LocalProvider(settings.local_node_name)
    if settings.provider == "byo":
        from services.provisioner.providers.byo import ByoProvider

        if runtime.api is None:
            raise RuntimeError("the byo provider needs the Kubernetes API")
        return ByoProvider(runtime.api)
    if settings.provider == "aks":
        from services.provisioner.providers.aks import AksProvider

        missing = [
            f"KAITEN_{n.upper()}"
            for n in ("azure_subscription_id", "azure_resource_group", "azure_cluster_name")
            if not getattr(settings, n)
        ]
        if missing or runtime.api is None:
            raise SystemExit(f"the aks provider needs {', '.join(missing) or 'the Kubernetes API'}")
        return AksProvider(
            api=runtime.api,
            subscription_id=settings.azure_subscription_id,
            resource_group=settings.azure_resource_group,
            cluster=settings.azure_cluster_name,
            arm_endpoint=settings.azure_arm_endpoint,
            polling_interval=settings.azure_polling_interval_s,
            ca_bundle=settings.azure_ca_bundle,
        )
    if settings.provider == "nodeclaim":
        from services.provisioner.providers.nodeclaim import NodeClaimProvider

        if runtime.api is None:
            raise RuntimeError("the nodeclaim provider needs the Kubernetes API")
        node_class = {
            "group": settings.nodeclass_group,
            "kind": settings.nodeclass_kind,
            "name": settings.nodeclass_name,
        }
        return NodeClaimProvider(runtime.api, node_class)
    raise SystemExit(
        f"KAITEN_PROVIDER={settings.provider!r} is not available; choose one of {', '.join(PROVIDERS)}"
    )


async def build(runtime: Runtime) -> Sequence[Component]:
    settings = runtime.settings
    assert isinstance(settings, ProvisionerSettings)
    provider = make_provider(settings, runtime)
    timeout = settings.byo_wait_s if settings.provider == "byo" else settings.provision_timeout_s
    leases = await Leases.open(runtime.js, role=DURABLE, linger=LINGER)  # events and passes share them
    provisioner = Provisioner(
        provider=provider,
        store=await open_store(runtime.js),
        publisher=runtime.publisher,
        leases=leases,
        interval=settings.reconcile_interval_s,
        timeout=timeout,
    )
    log.info(
        "provider %s; reconcile every %.0fs, timeout %.0fs",
        provider.name,
        settings.reconcile_interval_s,
        timeout,
    )
    consumer = ConsumerRunner(
        nc=runtime.nc,
        spec=ConsumerSpec(
            durable=DURABLE,
            filter_subjects=[
                ev.subject_filter("plan", "resolved"),
                ev.subject_filter("workspace", "deleting"),
            ],
            failure_condition="ResourceReady",
        ),
        handler=provisioner.handle,
        publisher=runtime.publisher,
        reporter="provisioner",
        leases=leases,
    )
    # The reconcile passes go over every Workspace: one replica (the leader) makes them, the others
    # share the events only (two replicas' passes did the same KV reads and lease attempts twice).
    leadership = await Leadership.open(runtime.js, key="provisioner", identity=runtime.replica)
    return [
        LoopComponent("leadership", leadership.run),
        consumer,
        LoopComponent("provisioner:reconcile", lambda: led(leadership, provisioner.run, standby)),
    ]


def main() -> None:
    run_main("provisioner", ProvisionerSettings, build)
