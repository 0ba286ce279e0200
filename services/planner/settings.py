"""Planner settings (environment ``KAITEN_*``)."""

from __future__ import annotations

from shared.planning.planner import PlanOptions
from shared.planning.sizing import DEFAULT_CONTEXT
from shared.settings import ServiceSettings


class PlannerSettings(ServiceSettings):
    # The installation's provider (aks | nodeclaim | byo | local): "local" plans only the local
    # machine, "byo" only existing nodes. The provisioner is configured with the same value.
    provider: str = "local"
    cloud: str = "azure"  # the SKUs an omitted instanceType may choose from (azure | aws)
    catalog_files: tuple[str, ...] = ()  # operator overrides (a mounted ConfigMap), applied in order
    max_nodes: int = 16  # most nodes one Workspace may get
    auto_max_nodes: int = 4  # most nodes an automatically chosen instance type may need
    context_tokens: int = DEFAULT_CONTEXT  # the context every plan must hold
    batch: int = 64  # observed events of one Workspace taken together (only the newest is planned)

    def plan_options(self) -> PlanOptions:
        return PlanOptions(
            cloud=self.cloud,
            provider=self.provider,
            max_nodes=self.max_nodes,
            auto_max_nodes=self.auto_max_nodes,
            context=self.context_tokens,
        )
