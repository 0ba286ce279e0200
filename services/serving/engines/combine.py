"""KAITO's ``/chat`` with several adapters: one LoRA adapter that is their strength-weighted sum.

KAITO's transformers runtime merges a Workspace's adapters into one (peft's ``add_weighted_adapter``,
its default combination ``svd``, weights = the strengths) and answers ``/chat`` with it. Kaiten builds
the same sum without a base model in memory, so both engines can serve it: a LoRA delta is
``scaling · B·A``, and stacking the adapters' ``A`` matrices along the rank and their ``B`` matrices,
each multiplied by its adapter's ``strength · scaling``, gives a rank-Σr adapter whose delta (at scaling
1) is exactly ``Σ strength_i · scaling_i · B_i·A_i`` (peft's ``cat`` combination). KAITO's ``svd``
approximates that sum at a lower rank; this is the sum itself.

A module that only some adapters adapt gets zero rows and columns from the others. Refused, with the
reason: DoRA adapters, per-module ranks or alphas (``rank_pattern``/``alpha_pattern``), LoRA on
embeddings, trained biases and ``modules_to_save`` (none of them is a plain sum of ``B·A``).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from services.serving.engines.base import AdapterInfo

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
_A, _B = ".lora_A.weight", ".lora_B.weight"
MAX_RANK = 512  # vLLM's largest max_lora_rank (services.serving.engines.vllm_engine.LORA_RANKS)


class CombineError(ValueError):
    """The adapters cannot be summed into one."""


def _config(adapter: AdapterInfo) -> dict[str, Any]:
    config: dict[str, Any] = json.loads((Path(adapter.path) / CONFIG).read_text())
    why = None
    if config.get("use_dora"):
        why = "it is a DoRA adapter"
    elif config.get("rank_pattern") or config.get("alpha_pattern"):
        why = "it has per-module ranks or alphas"
    elif config.get("bias", "none") != "none":
        why = "it trains biases"
    elif config.get("modules_to_save"):
        why = "it saves whole modules (modules_to_save)"
    if why:
        raise CombineError(f"adapter {adapter.name} cannot be combined with the others: {why}")
    return config


def _scaling(config: dict[str, Any]) -> float:
    r, alpha = int(config.get("r", 8)), float(config.get("lora_alpha", 8))
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def combined_adapter(adapters: Sequence[AdapterInfo], cache: Path) -> Path:
    """The directory of one adapter whose delta is the strength-weighted sum of ``adapters``'; made
    once per set of adapters and strengths (in ``cache``), then reused."""
    import torch
    from safetensors.torch import load_file, save_file

    if len(adapters) < 2:
        raise CombineError("combining needs two adapters or more")
    configs = [_config(a) for a in adapters]
    total = sum(int(c.get("r", 8)) for c in configs)
    if total > MAX_RANK:
        raise CombineError(f"the adapters' ranks sum to {total}, above vLLM's LoRA limit of {MAX_RANK}")
    stamp = hashlib.sha256()
    for adapter in adapters:
        weights = Path(adapter.path) / WEIGHTS
        stamp.update(
            f"{adapter.name}:{adapter.strength!r}:{weights.stat().st_size}:{weights.stat().st_mtime_ns}".encode()
        )
    target = cache / f"combined-{stamp.hexdigest()[:16]}"
    if (target / WEIGHTS).is_file():
        return target

    tensors = [load_file(Path(a.path) / WEIGHTS) for a in adapters]
    for adapter, found in zip(adapters, tensors, strict=True):
        odd = sorted(k for k in found if not k.endswith((_A, _B)))
        if odd:
            raise CombineError(
                f"adapter {adapter.name} cannot be combined: it has non-LoRA weights ({odd[0]}, …)"
            )
    modules = sorted({k.removesuffix(_A) for found in tensors for k in found if k.endswith(_A)})
    ranks = [int(c.get("r", 8)) for c in configs]
    combined: dict[str, Any] = {}
    for module in modules:
        shapes = next((f[module + _A].shape, f[module + _B].shape) for f in tensors if module + _A in f)
        (_, fan_in), (fan_out, _) = shapes
        a_parts, b_parts = [], []
        for adapter, config, found, rank in zip(adapters, configs, tensors, ranks, strict=True):
            if module + _A in found:
                a = found[module + _A].to(torch.float32)
                b = found[module + _B].to(torch.float32) * (adapter.strength * _scaling(config))
            else:  # this adapter leaves the module alone
                a, b = torch.zeros(rank, fan_in), torch.zeros(fan_out, rank)
            a_parts.append(a)
            b_parts.append(b)
        dtype = next(f[module + _A].dtype for f in tensors if module + _A in f)
        combined[module + _A] = torch.cat(a_parts, dim=0).to(dtype).contiguous()
        combined[module + _B] = torch.cat(b_parts, dim=1).to(dtype).contiguous()

    config = dict(configs[0])
    config.update(
        r=total,
        lora_alpha=total,  # scaling 1: the strengths and scalings are in B
        use_rslora=False,
        lora_dropout=0.0,
        target_modules=sorted({m.rsplit(".", 1)[-1] for m in modules}),
        rank_pattern={},
        alpha_pattern={},
    )
    work = cache / f".{target.name}.{uuid.uuid4().hex[:8]}"
    work.mkdir(parents=True)
    save_file(combined, work / WEIGHTS, metadata={"format": "pt"})
    (work / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
    try:
        work.rename(target)
    except OSError:  # another replica made it first
        shutil.rmtree(work, ignore_errors=True)
    return target
