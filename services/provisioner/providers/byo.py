"""``byo``: bring your own nodes. Nothing is created: the provider finds existing Ready nodes that match
the labelSelector (``preferredNodes`` first) with enough GPUs, and says why the others do not count."""

from __future__ import annotations

from kubernetes_asyncio import client as kclient
from kubernetes_asyncio.client.exceptions import ApiException

from services.provisioner.providers.base import NodeRequest, Progress
from shared.api.workspace import LabelSelector
from shared.events import WorkspaceRef
from shared.kube.errors import classify
from shared.planning.inventory import selector_matches, selector_query
from shared.planning.model import NodeInfo


def why_not(node: NodeInfo, request: NodeRequest) -> str:
    """Empty when the node can carry one of the request's nodes; else the reason, for the user."""
    if not node.ready:
        return "not Ready (or unschedulable)"
    if node.gpus < request.gpus_per_node:
        return f"{node.gpus} GPU(s), needs {request.gpus_per_node}"
    return ""


def choose(nodes: list[NodeInfo], request: NodeRequest) -> Progress:
    preferred = {name: i for i, name in enumerate(request.preferred_nodes or request.byo_nodes)}
    ordered = sorted(nodes, key=lambda n: (preferred.get(n.name, len(preferred)), n.name))
    good = [n.name for n in ordered if not why_not(n, request)]
    if len(good) >= request.count:
        chosen = tuple(good[: request.count])
        return Progress(state="ready", nodes=chosen, message=f"using existing node(s) {', '.join(chosen)}")
    others = [f"{n.name}: {why_not(n, request)}" for n in ordered if why_not(n, request)]
    detail = f" ({'; '.join(others)})" if others else ""
    return Progress(
        state="pending",
        nodes=tuple(good),
        reason="WaitingForNodes",
        message=(
            f"{len(good)} of {request.count} node(s) matching the labelSelector are usable;"
            f" {len(nodes)} match{detail}"
        ),
    )


class ByoProvider:
    name = "byo"
    condition = ""

    def __init__(self, api: kclient.ApiClient) -> None:
        self._api = api
        self._core = kclient.CoreV1Api(api)

    async def ensure(self, request: NodeRequest) -> Progress:
        selector = LabelSelector.model_validate(request.selector or {"matchLabels": request.labels})
        try:
            found = await self._core.list_node(label_selector=selector_query(selector))
        except ApiException as exc:
            raise classify(exc, f"[{request.workspace.key}] list nodes") from exc
        nodes = [NodeInfo.from_node(self._api.sanitize_for_serialization(n)) for n in found.items]
        nodes = [n for n in nodes if selector_matches(selector, n.labels)]  # the query is a superset
        return choose(nodes, request)

    async def release(self, workspace: WorkspaceRef) -> bool:
        return True  # the nodes are the user's: nothing to delete

    async def close(self) -> None:
        return None
