"""A preset for any Hugging Face model: sized from its ``config.json`` and its weight files' sizes.

KAITO (≥ 0.9) takes any ``org/model`` id as a preset and generates its parameters from the hub: the
weight files (``/api/models/<repo>/tree/main``) and ``config.json`` (``/<repo>/resolve/main/…``).
Kaiten does the same; this module is the pure half (what the planner's hub client fetched → a
:class:`~shared.planning.catalog.Preset`), so the sizing is tested on real ``config.json`` files.

What is read: the transformer's shape (layers, attention heads, key/value heads, head size; a
multimodal model's ``text_config``), its context (``max_position_embeddings`` and the other names
models use), its dtype, and a ``quantization_config``'s method. The weights are the top-level
``*.safetensors`` files (else ``*.bin``; Mistral's ``consolidated*.safetensors`` only when nothing else),
summed. The KV cache per token is ``2 · layers · kv_heads · head_dim · 2`` bytes (16-bit K and V).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from shared.planning.catalog import Architecture, Preset

HF_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
DTYPES = {
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "float32": "float32",
}
# quant_method (config.json) → the catalog's quantization names; anything else is refused with its name
QUANTIZATIONS = {"fp8": "fp8", "awq": "awq", "gptq": "gptq", "mxfp4": "mxfp4"}
DEFAULT_CONTEXT = 2048  # a config that names no context length (KAITO assumes the same)


class HubModelError(ValueError):
    """The model cannot be sized from what the hub holds; ``reason`` is a condition reason."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def is_hub_id(name: str) -> bool:
    return bool(HF_ID.match(name.strip()))


def _first(config: Mapping[str, Any], *keys: str) -> Any:
    return next((config[k] for k in keys if config.get(k) is not None), None)


def weight_bytes(files: Sequence[tuple[str, int]]) -> int:
    """The model's weights: top-level safetensors, else PyTorch ``.bin`` files, else Mistral's
    ``consolidated`` safetensors (KAITO's preference order)."""
    top = [(path, size) for path, size in files if "/" not in path]
    safetensors = [s for p, s in top if p.endswith(".safetensors") and not p.startswith("consolidated")]
    bins = [s for p, s in top if p.endswith(".bin") and p.startswith("pytorch_model")]
    consolidated = [s for p, s in top if p.startswith("consolidated") and p.endswith(".safetensors")]
    return sum(safetensors or bins or consolidated)


def preset_from_hub(repo: str, config: Mapping[str, Any], files: Sequence[tuple[str, int]]) -> Preset:
    """The preset for ``repo`` from its ``config.json`` and ``(path, size)`` of its files."""
    text = {**config, **(config.get("text_config") or {})}  # a multimodal model's language half
    layers = _first(text, "num_hidden_layers", "n_layer", "num_layers", "n_layers")
    hidden = _first(text, "hidden_size", "n_embd", "d_model", "dim")
    heads = _first(text, "num_attention_heads", "n_head", "num_heads", "n_heads")
    if not (isinstance(layers, int) and isinstance(hidden, int) and isinstance(heads, int)) or heads <= 0:
        raise HubModelError(
            "UnsupportedModel",
            f"{repo}: config.json names no transformer shape Kaiten can size (num_hidden_layers, "
            "hidden_size, num_attention_heads); add the model to the catalog instead",
        )
    kv_heads = _first(text, "num_key_value_heads", "n_kv_heads", "num_kv_heads") or heads
    head_dim = _first(text, "head_dim") or hidden // heads
    context = _first(text, "max_position_embeddings", "n_positions", "max_seq_len", "seq_length")
    weights = weight_bytes(files)
    if weights <= 0:
        raise HubModelError("UnsupportedModel", f"{repo}: the hub lists no .safetensors or .bin weight files")
    method = str((config.get("quantization_config") or {}).get("quant_method") or "").lower() or None
    if method is not None and method not in QUANTIZATIONS:
        raise HubModelError(
            "UnsupportedModel",
            f"{repo}: quantization {method!r} is not one Kaiten sizes ({', '.join(sorted(QUANTIZATIONS))})",
        )
    dtype = DTYPES.get(str(_first(text, "torch_dtype", "dtype") or "bfloat16").lower(), "bfloat16")
    vocab = _first(text, "vocab_size")
    return Preset(
        name=repo,
        hf_id=repo,
        params="",  # from the weights: Preset.param_count
        weights=weights,
        context_limit=int(context) if isinstance(context, int) and context > 0 else DEFAULT_CONTEXT,
        attention="GQA" if kv_heads < heads else "MHA",
        kv_bytes_per_token=2 * layers * int(kv_heads) * int(head_dim) * 2,
        quantization=QUANTIZATIONS[method] if method else None,
        dtype=dtype,
        architecture=Architecture(layers=layers, hidden=hidden, vocab=vocab)
        if isinstance(vocab, int) and vocab > 0
        else None,
    )
