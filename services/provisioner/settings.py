"""Provisioner settings (environment ``KAITEN_*``)."""

from __future__ import annotations

from pydantic import Field

from shared.settings import Provider, ServiceSettings


class ProvisionerSettings(ServiceSettings):
    provider: Provider = Field(
        "local", description="aks | nodeclaim | byo | local: the same value the planner is given."
    )
    local_node_name: str = Field(
        "", description="The local provider's node name. Empty: this machine's hostname."
    )
    reconcile_interval_s: float = Field(5.0, description="Seconds between checks of pending requests.")
    provision_timeout_s: float = Field(
        1800.0, description="Seconds after which a request still pending fails (AKS pools take ~10 min)."
    )
    byo_wait_s: float = Field(
        600.0, description="Bring-your-own: seconds to wait for enough matching Ready nodes."
    )
    nodeclass_group: str = Field(
        "karpenter.azure.com",
        description="nodeclaim: the API group of the node class every NodeClaim refers to (AKS node "
        "auto-provisioning's default).",
    )
    nodeclass_kind: str = Field("AKSNodeClass", description="nodeclaim: the node class's kind.")
    nodeclass_name: str = Field("default", description="nodeclaim: the node class's name.")
    # Credentials are never settings: azure-identity reads them itself (workload identity in a
    # cluster; AZURE_CLIENT_ID/AZURE_TENANT_ID/... elsewhere).
    azure_subscription_id: str = Field("", description="aks: the subscription of the cluster.")
    azure_resource_group: str = Field("", description="aks: the cluster's resource group.")
    azure_cluster_name: str = Field("", description="aks: the cluster whose agent pools Kaiten manages.")
    azure_arm_endpoint: str = Field(
        "https://management.azure.com", description="aks: Azure Resource Manager (sovereign clouds differ)."
    )
    azure_polling_interval_s: float = Field(
        10.0, description="aks: seconds between polls of a long-running operation (the SDK's default: 30)."
    )
    azure_ca_bundle: str = Field(
        "", description="aks: a CA file to trust for ARM and sign-in (private clouds, tests)."
    )
