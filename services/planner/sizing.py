"""The memory model: what a model needs on a device, and how many devices it takes.

GPU inference (per GPU, the model split evenly over ``n`` GPUs by tensor × pipeline parallelism)::

    weights × 1.02 × 1.05 / n  +  context × KV B/token / n  +  2.3 GiB  ≤  memory × utilization

The factors are KAITO's: 1.02 and 1.05 are load slack on the weights, 2.3 GiB is the CUDA context,
activations and allocator slack, utilization is 0.84 (0.82 on A10-class cards). Where we differ from
KAITO (:func:`kaito_gpus_needed`, kept as the reference and tested against its published results):

1. GPUs needed is ``ceil(x)``, not ``floor(x) + 1``: when the weights divide evenly there is no spare GPU.
2. The KV cache divides over *all* GPUs (tensor × pipeline), not only a node's: each pipeline stage
   holds the KV of its own layers, so multi-node plans reserve what they really need.

CPU (the ``transformers`` engine): weights in float32 when that is small next to the RAM (else
bfloat16), a KV cache for ``CPU_BATCH`` sequences in the same dtype, 1 GiB for the Python process,
against half the machine's RAM (the rest is the control plane, NATS and Ray beside it).

Tuning (one node): base weights (16-bit for LoRA, NF4 ≈ 4.13 bits/param for QLoRA, embeddings kept
16-bit) + LoRA parameters on every linear layer with fp32 AdamW state (16 B/param) + activations of one
batch with gradient checkpointing + fp32 logits and their gradient + 2.3 GiB.
"""

from __future__ import annotations

import math

from shared.planning.catalog import GIB, GpuModel, Preset, Sku
from shared.planning.model import Memory, TuningPlan

WEIGHT_SLACK = 1.02 * 1.05
GPU_OVERHEAD = round(2.3 * GIB)
CPU_OVERHEAD = 1 * GIB
CPU_RAM_FRACTION = 0.5
CPU_BATCH = 8
CPU_FP32_SHARE = 0.25  # float32 weights when they take at most this share of usable RAM
DEFAULT_CONTEXT = 2048
LORA_RANK = 8  # KAITO's default r
LORA_WIDTHS_PER_LAYER = 14  # Σ(d_in + d_out)/hidden over q,k,v,o (2 each) and gate,up,down (~2 each)
NF4_RATIO = 4.13 / 16  # NF4 with double-quantized absmax, against 16-bit


def gpu_usable(sku: Sku, gpu: GpuModel) -> int:
    return int(sku.gpu_memory * gpu.memory_utilization)


def gpu_inference_memory(preset: Preset, usable: int, gpus: int, context: int) -> Memory:
    return Memory(
        usable=usable,
        weights=math.ceil(preset.weights * WEIGHT_SLACK / gpus),
        kv_cache=math.ceil(context * preset.kv_bytes_per_token / gpus),
        overhead=GPU_OVERHEAD,
        context_tokens=context,
    )


def gpus_needed(preset: Preset, usable: int, context: int) -> int | None:
    """The fewest GPUs (of ``usable`` bytes each) the model fits on; None if no count is enough."""
    room = usable - GPU_OVERHEAD
    if room <= 0:
        return None
    need = math.ceil((preset.weights * WEIGHT_SLACK + context * preset.kv_bytes_per_token) / room)
    while gpu_inference_memory(preset, usable, need, context).needed > usable:  # integer rounding
        need += 1
    return max(1, need)


def kv_tokens(memory: Memory, gpus: int, kv_bytes_per_token: int) -> int:
    """Tokens of KV cache the leftover memory of ``gpus`` devices holds."""
    spare = memory.usable - memory.weights - memory.overhead
    return max(0, spare * gpus // kv_bytes_per_token)


def kaito_gpus_needed(preset: Preset, sku: Sku, context: int = DEFAULT_CONTEXT) -> int | None:
    """KAITO v0.12's rule, verbatim (../shared/data/presets.md); the reference our rule is tested
    against. None when even one GPU's reserve exceeds its usable memory."""
    usable = 0.84 * sku.gpu_memory / GIB
    reserve = 2.3 + context * preset.kv_bytes_per_token / sku.gpus / GIB
    room = (usable - reserve) / 1.05
    if room <= 0:
        return None
    return math.floor(1.02 * preset.weights / GIB / room) + 1


def kaito_nodes(preset: Preset, sku: Sku, context: int = DEFAULT_CONTEXT) -> int | None:
    gpus = kaito_gpus_needed(preset, sku, context)
    return None if gpus is None else math.ceil(gpus / sku.gpus)


def cpu_dtype(preset: Preset, usable: int) -> str:
    return "float32" if preset.weights_16bit * 2 <= usable * CPU_FP32_SHARE else "bfloat16"


def cpu_inference_memory(preset: Preset, ram: int, context: int) -> tuple[Memory, str]:
    usable = int(ram * CPU_RAM_FRACTION)
    dtype = cpu_dtype(preset, usable)
    width = 2 if dtype == "float32" else 1  # relative to 16-bit
    memory = Memory(
        usable=usable,
        weights=preset.weights_16bit * width,
        kv_cache=CPU_BATCH * context * preset.kv_bytes_per_token * width,
        overhead=CPU_OVERHEAD,
        context_tokens=context,
    )
    return memory, dtype


def tuning_memory(
    preset: Preset, method: str, *, batch_size: int, max_seq_length: int, fp32_base: bool = False
) -> TuningPlan:
    """What tuning ``preset`` with ``method`` needs, summed over the devices it uses."""
    arch = preset.architecture
    assert arch is not None, "tunable presets carry their architecture (catalog check)"
    embeddings = arch.vocab * arch.hidden * 2 * 2  # input embeddings + lm_head, 16-bit
    if method == "qlora":
        base = int(max(0, preset.weights_16bit - embeddings) * NF4_RATIO) + embeddings
    else:
        base = preset.weights_16bit * (2 if fp32_base else 1)
    lora_params = arch.layers * LORA_RANK * LORA_WIDTHS_PER_LAYER * arch.hidden
    tokens = batch_size * max_seq_length
    activations = (
        tokens * arch.hidden * arch.layers * 2 * 2  # checkpointed layer inputs (+ their gradients)
        + tokens * arch.hidden * 34  # one layer recomputed in full during backward
        + tokens * arch.vocab * 4 * 2  # fp32 logits and their gradient
    )
    return TuningPlan(
        method="qlora" if method == "qlora" else "lora",
        base_weights=base,
        lora_params=lora_params,
        optimizer=lora_params * 16,
        activations=activations,
        batch_size=batch_size,
        max_seq_length=max_seq_length,
    )


def gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


def round_up(value: float, step: int) -> int:
    return int(math.ceil(value / step) * step)


def disk_gib(preset: Preset, *, tuning: bool = False) -> int:
    """OS disk for a node: the serving image (~30 GiB) + the weights with download slack (+ tuning's
    dataset, checkpoints and output), in 16 GiB steps, at least 64 GiB."""
    need = 30 + preset.weights_16bit / GIB * 1.25 + (preset.weights_16bit / GIB * 0.5 + 20 if tuning else 0)
    return max(64, round_up(need, 16))
