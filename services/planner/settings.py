"""Planner settings (environment ``KAITEN_*``)."""

from __future__ import annotations

from pydantic import Field

from services.planner.planning import PlanOptions
from services.planner.sizing import DEFAULT_CONTEXT
from shared.settings import Cloud, Provider, ServiceSettings


class PlannerSettings(ServiceSettings):
    provider: Provider = Field(
        "local",
        description="The installation's provider (aks | nodeclaim | byo | local): local plans only the "
        "local machine, byo only existing nodes. The provisioner is given the same value.",
    )
    cloud: Cloud = Field(
        "azure", description="The SKUs an omitted instanceType may choose from (azure | aws)."
    )
    catalog_files: tuple[str, ...] = Field(
        (), description="Catalog overrides (a mounted ConfigMap's files), applied in order."
    )
    max_nodes: int = Field(16, description="The most nodes one Workspace may get.")
    auto_max_nodes: int = Field(
        4, description="The most nodes an automatically chosen instance type may need."
    )
    context_tokens: int = Field(DEFAULT_CONTEXT, description="The context (tokens) every plan must hold.")
    hub_url: str = Field(
        "https://huggingface.co",
        description="The Hugging Face hub (or a mirror) the planner asks to size a model id the catalog "
        "does not hold, as KAITO does; empty: such ids are unknown presets.",
    )
    hub_timeout_s: float = Field(20.0, gt=0, description="Timeout of one request to the hub.")
    batch: int = Field(
        64, description="Observed events of one Workspace taken together (only the newest is planned)."
    )

    def plan_options(self) -> PlanOptions:
        return PlanOptions(
            cloud=self.cloud,
            provider=self.provider,
            max_nodes=self.max_nodes,
            auto_max_nodes=self.auto_max_nodes,
            context=self.context_tokens,
        )
