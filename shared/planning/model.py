"""What the planner produces (:class:`Plan` or :class:`Rejection`) and consumes (:class:`NodeInfo`).

A :class:`Plan` travels typed inside ``plan.resolved`` events (``shared.events.PlanResolved``) and in
the services' KV records; :func:`plan_to_dict` is its JSON for ``kaiten plan -o json``. Everything
here is deterministic: the same spec, catalogs and inventory give an identical Plan, byte for byte.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

GIB = 1024**3

EngineArg = str | int | float | bool


class Memory(msgspec.Struct, frozen=True, kw_only=True):
    """The per-device memory budget behind a plan, in bytes (device = one GPU, or the CPU's RAM)."""

    usable: int  # what the engine may use on one device
    weights: int  # this device's share of the weights, with load slack
    kv_cache: int  # KV cache for the planned minimum context, this device's share
    overhead: int  # CUDA context, activations, allocator slack (or the Python process on CPU)
    context_tokens: int  # the context the node count was sized for

    @property
    def needed(self) -> int:
        return self.weights + self.kv_cache + self.overhead


class TuningPlan(msgspec.Struct, frozen=True, kw_only=True):
    method: Literal["lora", "qlora"]
    base_weights: int  # bytes of the base model as loaded (4-bit NF4 for qlora)
    lora_params: int
    optimizer: int  # LoRA weights + gradients + AdamW moments, fp32
    activations: int  # for batch_size × max_seq_length, with gradient checkpointing
    batch_size: int
    max_seq_length: int


class Plan(msgspec.Struct, frozen=True, kw_only=True):
    mode: Literal["inference", "tuning"]
    preset: str  # canonical preset name ("" for a custom template)
    model: str  # HF id
    sku: str
    cloud: str
    gpu: str  # GPU model, or "cpu"
    gpu_memory: int  # bytes per GPU (0 on CPU)
    nodes: int
    gpus_per_node: int  # GPUs the workload requests per node (0 on CPU)
    tensor_parallel: int
    pipeline_parallel: int
    data_parallel: int
    dtype: str
    quantization: str | None
    max_model_len: int
    engine: Literal["vllm", "transformers", "template"]
    engine_args: dict[str, EngineArg]
    disk_gib: int
    memory: Memory | None
    cost_per_hour: float
    explanation: str
    byo_nodes: tuple[str, ...] = ()  # bring-your-own: the matched nodes, preferred first
    alternatives: tuple[str, ...] = ()  # cheaper SKUs that did not fit, and why
    notes: tuple[str, ...] = ()  # adjustments the user should know (count raised, context capped, …)
    tuning: TuningPlan | None = None
    runtime: dict[str, str] = {}

    def summary(self) -> str:
        where = f"{self.nodes} × {self.sku}" if self.sku else f"{self.nodes} node(s)"
        par = f"TP{self.tensor_parallel}×PP{self.pipeline_parallel}×DP{self.data_parallel}"
        return f"{self.preset or 'custom'} on {where} ({self.gpu}, {self.dtype}, {self.engine} {par})"


class Rejection(msgspec.Struct, frozen=True, kw_only=True):
    """A plan that cannot be made; ``reason`` is CamelCase, ``message`` says what to change."""

    reason: str
    message: str
    close_matches: tuple[str, ...] = ()
    short: str = ""  # a few words, for listing alternatives ("needs 6 nodes > 4")


def gpu_count(capacity: dict[str, Any], labels: dict[str, str]) -> int:
    """A node's GPUs: the device plugin's ``nvidia.com/gpu`` capacity, else (as KAITO reads bring-your-own
    nodes) NVIDIA GPU feature discovery's ``nvidia.com/gpu.count`` label."""
    if "nvidia.com/gpu" in capacity:
        return int(str(capacity["nvidia.com/gpu"]) or 0)
    count = labels.get("nvidia.com/gpu.count", "")
    return int(count) if count.isdigit() else 0


class NodeInfo(msgspec.Struct, frozen=True, kw_only=True):
    """A node as the planner sees it (bring-your-own inventory)."""

    name: str
    ready: bool
    labels: dict[str, str] = {}
    gpus: int = 0  # capacity nvidia.com/gpu, else the nvidia.com/gpu.count label
    memory: int = 0  # allocatable memory, bytes

    @classmethod
    def from_node(cls, node: dict[str, Any]) -> NodeInfo:
        from shared.planning.catalog import parse_bytes

        meta = node.get("metadata") or {}
        status = node.get("status") or {}
        ready = any(
            c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or []
        )
        capacity = status.get("capacity") or {}
        allocatable = status.get("allocatable") or capacity
        unschedulable = bool((node.get("spec") or {}).get("unschedulable"))
        try:
            memory = parse_bytes(allocatable.get("memory", 0))
        except ValueError:
            memory = 0
        return cls(
            name=meta.get("name", ""),
            ready=ready and not unschedulable,
            labels=dict(meta.get("labels") or {}),
            gpus=gpu_count(capacity, meta.get("labels") or {}),
            memory=memory,
        )


def plan_to_dict(plan: Plan) -> dict[str, Any]:
    result: dict[str, Any] = msgspec.json.decode(msgspec.json.encode(plan))  # JSON types only
    return result


def plan_from_dict(data: dict[str, Any]) -> Plan:
    return msgspec.convert(data, Plan)
