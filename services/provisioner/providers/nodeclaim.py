"""``nodeclaim``: clusters with Karpenter (or AKS node auto-provisioning) — one ``karpenter.sh/v1``
NodeClaim per planned node; Karpenter launches the machine and reports the claim Ready with its node.

Claims are named ``kaiten-<workspace id>-<instance hash>-<index>``: deterministic, so a redelivered
plan, a restarted provisioner or a second replica finds the claims already there (a create answers
409), and a changed instance type yields new names while the old claims are deleted. A smaller count
deletes the highest indices. NodeClaim specs are immutable; nothing is ever patched.
"""

from __future__ import annotations

import hashlib
from typing import Any

from kubernetes_asyncio import client as kclient
from kubernetes_asyncio.client.exceptions import ApiException

from services.provisioner.providers.base import (
    GPU_TAINT,
    NodeRequest,
    Progress,
    ProviderError,
    short_id,
)
from shared.api.workspace import NODE_IMAGE_FAMILY_ANNOTATION
from shared.events import WorkspaceRef
from shared.kube.errors import classify

GROUP, VERSION, PLURAL = "karpenter.sh", "v1", "nodeclaims"
ID_LABEL = "kaiten.sh/workspace-id"  # selects every claim of one Workspace
INSTANCE_TYPE = "node.kubernetes.io/instance-type"


def claim_names(request: NodeRequest) -> list[str]:
    sku = hashlib.sha256(request.instance_type.encode()).hexdigest()[:4]
    return [f"kaiten-{short_id(request.workspace)}-{sku}-{i}" for i in range(request.count)]


def claim_body(request: NodeRequest, name: str, node_class: dict[str, str]) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "nodeClassRef": dict(node_class),
        "requirements": [
            {"key": INSTANCE_TYPE, "operator": "In", "values": [request.instance_type]},
            {"key": "kubernetes.io/os", "operator": "In", "values": ["linux"]},
        ],
    }
    if request.gpus_per_node:
        spec["resources"] = {"requests": {"nvidia.com/gpu": str(request.gpus_per_node)}}
        spec["taints"] = [dict(GPU_TAINT)]
    metadata: dict[str, Any] = {
        "name": name,
        "labels": {
            **request.node_labels,
            ID_LABEL: short_id(request.workspace),
            INSTANCE_TYPE: request.instance_type,
        },
    }
    if request.image_family:  # as KAITO puts it on its claims, for the NodeClass's provider to read
        metadata["annotations"] = {NODE_IMAGE_FAMILY_ANNOTATION: request.image_family}
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "NodeClaim", "metadata": metadata, "spec": spec}


def _condition(claim: dict[str, Any], type_: str) -> dict[str, Any]:
    conditions = (claim.get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c.get("type") == type_), {})


class NodeClaimProvider:
    name = "nodeclaim"
    condition = "NodeClaimReady"  # the finer condition this provider reports besides NodesReady

    def __init__(self, api: kclient.ApiClient, node_class: dict[str, str]) -> None:
        self._custom = kclient.CustomObjectsApi(api)
        self._node_class = node_class

    async def _claims(self, workspace: WorkspaceRef) -> list[dict[str, Any]]:
        try:
            found = await self._custom.list_cluster_custom_object(
                GROUP, VERSION, PLURAL, label_selector=f"{ID_LABEL}={short_id(workspace)}"
            )
        except ApiException as exc:
            if exc.status == 404:
                raise ProviderError(
                    "NodeClaimsUnavailable",
                    "the cluster has no karpenter.sh/v1 NodeClaim API: install Karpenter (or enable AKS node"
                    " auto-provisioning), or choose another provider",
                ) from exc
            raise classify(exc, f"[{workspace.key}] list nodeclaims") from exc
        items: list[dict[str, Any]] = found.get("items") or []
        return items

    async def _delete(self, workspace: WorkspaceRef, name: str) -> None:
        try:
            await self._custom.delete_cluster_custom_object(GROUP, VERSION, PLURAL, name)
        except ApiException as exc:
            if exc.status != 404:
                raise classify(exc, f"[{workspace.key}] delete nodeclaim {name}") from exc

    async def ensure(self, request: NodeRequest) -> Progress:
        wanted = claim_names(request)
        existing = {c["metadata"]["name"]: c for c in await self._claims(request.workspace)}
        for name in sorted(set(existing) - set(wanted)):  # resized down, or another instance type
            if not existing[name]["metadata"].get("deletionTimestamp"):
                await self._delete(request.workspace, name)
        for name in wanted:
            if name in existing:
                continue
            try:
                await self._custom.create_cluster_custom_object(
                    GROUP, VERSION, PLURAL, claim_body(request, name, self._node_class)
                )
            except ApiException as exc:
                if exc.status != 409:  # 409: made by an earlier pass or another replica
                    raise classify(exc, f"[{request.workspace.key}] create nodeclaim {name}") from exc
        ready: list[str] = []
        waiting: list[str] = []
        for name in wanted:
            claim = existing.get(name, {})
            node = (claim.get("status") or {}).get("nodeName")
            if _condition(claim, "Ready").get("status") == "True" and node:
                ready.append(node)
                continue
            stuck = next(
                (
                    c
                    for c in (claim.get("status") or {}).get("conditions") or []
                    if c.get("status") == "False" and c.get("message")
                ),
                None,
            )
            waiting.append(f"{name}: {stuck['type']}: {stuck['message']}" if stuck else f"{name}: launching")
        if not waiting:
            return Progress(state="ready", nodes=tuple(ready), message=f"{len(ready)} NodeClaim(s) ready")
        return Progress(
            state="pending",
            nodes=tuple(ready),
            reason="WaitingForNodeClaims",
            message=f"{len(ready)} of {len(wanted)} NodeClaim(s) ready; {'; '.join(waiting)}",
        )

    async def release(self, workspace: WorkspaceRef) -> bool:
        try:
            claims = await self._claims(workspace)
        except ProviderError:  # no NodeClaim API: nothing of ours can exist
            return True
        for claim in claims:
            if not claim["metadata"].get("deletionTimestamp"):
                await self._delete(workspace, claim["metadata"]["name"])
        return not await self._claims(workspace)

    async def close(self) -> None:
        return None
