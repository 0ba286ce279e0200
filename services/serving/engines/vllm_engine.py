"""The ``vllm`` engine (GPU): vLLM's own async engine, continuous batching and paged KV cache included.

vLLM is imported only when the engine starts, so this module loads on machines without it (the CPU
image, CI). What it adds around vLLM:
- the plan's engine args (vLLM's CLI flag names, ``tensor-parallel-size`` …) become ``AsyncEngineArgs``
  (:func:`engine_kwargs`), with LoRA switched on and sized from the adapters' own configs;
- KAITO's adapter ``strength``: vLLM has no per-adapter scale, so a weaker adapter is served from a copy
  whose ``lora_B`` weights are multiplied by the strength (:func:`scaled_adapter`) — the same delta
  ``strength · (alpha/r) · B·A`` the transformers engine applies;
- a bounded in-flight count (vLLM's scheduler would queue without limit) → :class:`QueueFull` (429);
- deadlines (the request is aborted in vLLM, freeing its KV blocks) and client disconnects (likewise).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from services.serving.engines.base import (
    AdapterInfo,
    Chunk,
    DeadlineExceeded,
    GenerationRequest,
    HFTokenizerEngine,
    QueueFull,
)

log = logging.getLogger(__name__)
LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts
OURS = {"max-batch-size"}  # engine args that configure Kaiten, not vLLM


def adapter_rank(path: str | Path) -> int:
    config = json.loads((Path(path) / "adapter_config.json").read_text())
    return int(config.get("r", 8))


def engine_kwargs(
    model: str, model_name: str, engine_args: Mapping[str, Any], adapters: Sequence[AdapterInfo]
) -> dict[str, Any]:
    """``AsyncEngineArgs`` keyword arguments from the plan's engine args (vLLM CLI flag names)."""
    kwargs: dict[str, Any] = {"model": model, "served_model_name": [model_name]}
    for key, value in engine_args.items():
        if key in OURS:
            continue
        kwargs[key.lstrip("-").replace("-", "_")] = value
    if kwargs.get("tensor_parallel_size", 1) * kwargs.get("pipeline_parallel_size", 1) > 1:
        # Under Ray Serve the replica's GPUs are placement-group bundles (app.replica_options), which
        # only vLLM's Ray executor uses; its default (multiprocessing) would look for local GPUs.
        kwargs.setdefault("distributed_executor_backend", "ray")
    if adapters:
        rank = max(adapter_rank(a.path) for a in adapters)
        fitting = [r for r in LORA_RANKS if r >= rank]
        if not fitting:
            raise ValueError(f"LoRA rank {rank} is above vLLM's limit of {LORA_RANKS[-1]}")
        kwargs.update(enable_lora=True, max_loras=len(adapters), max_lora_rank=fitting[0])
    return kwargs


def scaled_adapter(spec: AdapterInfo, cache: Path) -> Path:
    """The adapter directory to give vLLM: the original at strength 1, else a copy (made once, in
    ``cache``) whose ``lora_B`` weights are scaled by the strength."""
    source = Path(spec.path)
    if spec.strength == 1.0:
        return source
    config = json.loads((source / "adapter_config.json").read_text())
    if config.get("use_dora"):
        raise ValueError(f"adapter {spec.name}: strength < 1 is not supported for DoRA adapters on vLLM")
    from safetensors.torch import load_file, save_file

    weights_file = source / "adapter_model.safetensors"
    stamp = f"{weights_file.stat().st_size}-{int(weights_file.stat().st_mtime)}"
    target = cache / f"{spec.name}-s{spec.strength:g}-{stamp}"
    if (target / "adapter_model.safetensors").is_file():
        return target
    work = cache / f".{target.name}.{uuid.uuid4().hex[:8]}"
    work.mkdir(parents=True)
    weights = load_file(weights_file)
    scaled = {k: (v * spec.strength if ".lora_B." in k else v) for k, v in weights.items()}
    save_file(scaled, work / "adapter_model.safetensors", metadata={"format": "pt"})
    for extra in source.iterdir():
        if extra.is_file() and extra.name != "adapter_model.safetensors":
            (work / extra.name).write_bytes(extra.read_bytes())
    try:
        work.rename(target)
    except OSError:  # another replica made it first
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return target


class VLLMEngine(HFTokenizerEngine):
    def __init__(
        self,
        *,
        model: str,
        model_name: str,
        engine_args: Mapping[str, Any],
        adapters: Sequence[AdapterInfo] = (),
        max_queue: int = 64,
        max_prompt_tokens: int = 2048,
        max_model_len: int = 8192,
        adapter_cache: Path,
    ) -> None:
        self.model_name = model_name
        self.exports_vllm_metrics = True  # its stat logger fills prometheus_client's registry: /metrics
        self.max_prompt_tokens = max_prompt_tokens
        self.max_model_len = int(engine_args.get("max-model-len", max_model_len))
        self._model = model
        self._engine_args = dict(engine_args)
        self._adapter_specs = list(adapters)
        self._adapter_cache = adapter_cache
        self._max_in_flight = max_queue + int(engine_args.get("max-num-seqs", 256))
        self._in_flight = 0
        self._lora: dict[str, Any] = {}
        self._engine: Any = None
        self._stats = dict.fromkeys(("requests", "aborted"), 0.0)
        self.tokenizer: Any = None

    async def start(self) -> None:
        from transformers import AutoTokenizer
        from vllm import AsyncEngineArgs
        from vllm.lora.request import LoRARequest
        from vllm.v1.engine.async_llm import AsyncLLM

        started = time.monotonic()
        kwargs = engine_kwargs(self._model, self.model_name, self._engine_args, self._adapter_specs)
        self._engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))
        self.tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, self._model)
        for i, spec in enumerate(self._adapter_specs, start=1):
            path = await asyncio.to_thread(scaled_adapter, spec, self._adapter_cache)
            self._lora[spec.name] = LoRARequest(spec.name, i, str(path))
            await self._engine.add_lora(self._lora[spec.name])
        log.info(
            "vLLM loaded %s in %.1fs (%s)",
            self.model_name,
            time.monotonic() - started,
            ", ".join(f"{k}={v}" for k, v in kwargs.items() if k != "served_model_name"),
        )

    async def shutdown(self) -> None:
        if self._engine is not None:
            self._engine.shutdown()
            self._engine = None

    def healthy(self) -> tuple[bool, str]:
        if self._engine is None:
            return False, "model is loading"
        if getattr(self._engine, "errored", False):
            return False, f"vLLM engine failed: {getattr(self._engine, 'dead_error', 'unknown error')}"
        return True, "ok"

    def stats(self) -> dict[str, float]:
        return {**self._stats, "running": float(self._in_flight), "queue_depth": 0.0}

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        budget = self.admit(request)
        if self._in_flight >= self._max_in_flight:
            raise QueueFull(f"{self._in_flight} requests are in flight; try again shortly")
        p = request.params
        greedy = not p.do_sample or p.temperature <= 0
        params = SamplingParams(
            max_tokens=min(p.max_new_tokens, budget),
            temperature=0.0 if greedy else p.temperature,
            top_p=1.0 if greedy else p.top_p,
            top_k=0 if greedy else p.top_k,
            seed=p.seed,
            repetition_penalty=p.repetition_penalty,
            presence_penalty=p.presence_penalty,
            frequency_penalty=p.frequency_penalty,
            stop=list(p.stop) or None,
            output_kind=RequestOutputKind.DELTA,
        )
        request_id = uuid.uuid4().hex
        self._in_flight += 1
        self._stats["requests"] += 1
        tokens = 0
        finished = False
        try:
            stream = self._engine.generate(
                {"prompt_token_ids": list(request.prompt_ids)},
                params,
                request_id,
                lora_request=self._lora.get(request.adapter or ""),
            )
            async for out in stream:
                if time.monotonic() > request.deadline:
                    raise DeadlineExceeded(f"request deadline passed after {tokens} tokens")
                piece = out.outputs[0]
                tokens += len(piece.token_ids)
                reason = piece.finish_reason if out.finished else None
                finished = out.finished
                if piece.text or reason:
                    yield Chunk(text=piece.text, tokens=tokens, finish_reason=_finish(reason))
        finally:
            self._in_flight -= 1
            if not finished and self._engine is not None:  # deadline, error or the client left
                self._stats["aborted"] += 1
                await self._engine.abort(request_id)


def _finish(reason: str | None) -> str | None:
    if reason is None:
        return None
    return "length" if reason == "length" else "stop"
