"""Provisioner settings (environment ``KAITEN_*``)."""

from __future__ import annotations

from shared.settings import ServiceSettings


class ProvisionerSettings(ServiceSettings):
    provider: str = "local"  # aks | nodeclaim | byo | local: the same value the planner is given
    local_node_name: str = ""  # the local provider's node name; empty: this machine's hostname
    reconcile_interval_s: float = 5.0  # how often pending requests are checked again
    provision_timeout_s: float = 1800.0  # a request still pending after this fails (AKS pools: ~10 min)
    byo_wait_s: float = 600.0  # bring-your-own: how long to wait for enough matching Ready nodes
    # nodeclaim: the node class every NodeClaim refers to (AKS node auto-provisioning's default here)
    nodeclass_group: str = "karpenter.azure.com"
    nodeclass_kind: str = "AKSNodeClass"
    nodeclass_name: str = "default"
    # aks: the cluster whose agent pools Kaiten manages. Credentials are never settings: azure-identity
    # reads them itself (workload identity in a cluster; AZURE_CLIENT_ID/AZURE_TENANT_ID/... elsewhere).
    azure_subscription_id: str = ""
    azure_resource_group: str = ""
    azure_cluster_name: str = ""
    azure_arm_endpoint: str = "https://management.azure.com"
    azure_polling_interval_s: float = 10.0  # long-running operation polls (the SDK's default is 30 s)
    azure_ca_bundle: str = ""  # a CA file to trust for ARM and sign-in (private clouds, tests)
