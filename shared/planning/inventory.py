"""Bring-your-own nodes: which existing nodes a Workspace selects, and what their GPUs are."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from shared.api.workspace import LabelSelector, ResourceSpec
from shared.planning.catalog import Catalogs, GpuModel, Sku
from shared.planning.model import NodeInfo

INSTANCE_TYPE = "node.kubernetes.io/instance-type"
GPU_PRODUCT = "nvidia.com/gpu.product"
GPU_MEMORY_MIB = "nvidia.com/gpu.memory"


def selector_matches(selector: LabelSelector, labels: dict[str, str]) -> bool:
    if any(labels.get(k) != v for k, v in selector.match_labels.items()):
        return False
    for req in selector.match_expressions:
        present = req.key in labels
        if req.operator == "In" and (not present or labels[req.key] not in req.values):
            return False
        if req.operator == "NotIn" and present and labels[req.key] in req.values:
            return False
        if req.operator == "Exists" and not present:
            return False
        if req.operator == "DoesNotExist" and present:
            return False
    return True


def selector_query(selector: LabelSelector) -> str:
    """The selector in Kubernetes' query syntax (``apps=phi-3,tier in (a,b)``): the apiserver's
    ``labelSelector`` parameter, and how messages show it."""
    parts = [f"{k}={v}" for k, v in sorted(selector.match_labels.items())]
    for req in selector.match_expressions:
        values = ",".join(req.values)
        parts.append(
            {
                "In": f"{req.key} in ({values})",
                "NotIn": f"{req.key} notin ({values})",
                "Exists": req.key,
                "DoesNotExist": f"!{req.key}",
            }[req.operator]
        )
    return ",".join(parts)


def selected(resource: ResourceSpec, inventory: Sequence[NodeInfo]) -> list[NodeInfo]:
    """Nodes matching the labelSelector (Ready or not), ``preferredNodes`` first, then by name."""
    preferred = {name: i for i, name in enumerate(resource.preferred_nodes)}
    nodes = [n for n in inventory if selector_matches(resource.label_selector, n.labels)]
    return sorted(nodes, key=lambda n: (preferred.get(n.name, len(preferred)), n.name))


@dataclass(frozen=True)
class NodeShape:
    """What a node offers, as a SKU the sizing rules understand, or why it cannot be read."""

    sku: Sku | None
    gpu: GpuModel | None
    problem: str = ""

    @property
    def key(self) -> tuple[str, str, int, int, int]:
        s = self.sku
        return ("", "", 0, 0, 0) if s is None else (s.name, s.gpu, s.gpus, s.gpu_memory, s.cpu_memory)


def node_shape(node: NodeInfo, catalogs: Catalogs) -> NodeShape:
    """A node's SKU: its instance-type label when the catalog knows it, else its GPU labels."""
    known = catalogs.sku(node.labels.get(INSTANCE_TYPE, ""))
    if known is not None and not known.is_cpu and (node.gpus in (0, known.gpus)):
        return NodeShape(known, catalogs.gpu_models[known.gpu])
    if node.gpus == 0:
        if node.memory <= 0:
            return NodeShape(None, None, f"node {node.name} reports no GPUs and no allocatable memory")
        sku = Sku(name=f"node:{node.name}", cloud="byo", gpus=0, cpu_memory=node.memory, price_per_hour=0)
        return NodeShape(sku, None)
    product = node.labels.get(GPU_PRODUCT, "")
    gpu = catalogs.gpu_model_for_product(product) if product else None
    if gpu is None:
        what = f"{GPU_PRODUCT}={product!r}" if product else f"no {GPU_PRODUCT} label"
        return NodeShape(
            None,
            None,
            f"node {node.name} has {node.gpus} GPU(s) but {what}: add the GPU to the catalog's gpu_models",
        )
    try:
        memory = int(node.labels.get(GPU_MEMORY_MIB, "")) * 1024**2
    except ValueError:
        return NodeShape(None, gpu, f"node {node.name} has no numeric {GPU_MEMORY_MIB} label (MiB per GPU)")
    name = node.labels.get(INSTANCE_TYPE) or f"{product}×{node.gpus}"
    sku = Sku(name=name, cloud="byo", gpus=node.gpus, gpu=gpu.name, gpu_memory=memory, price_per_hour=0)
    return NodeShape(sku, gpu)
