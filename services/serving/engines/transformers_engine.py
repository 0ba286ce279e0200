"""The ``transformers`` engine: CPU (and GPUs vLLM cannot use), with dynamic batching.

Requests wait in a bounded queue (full → :class:`QueueFull`, HTTP 429). One worker thread runs a
continuous batch of up to ``max_batch_size`` rows: the first request plus whatever arrives within
``batch_wait_ms`` are prefilled together (left-padded), then decoded one step at a time with a shared KV
cache. Between steps, finished rows leave and queued requests join (prefilled, their cache left-aligned
and concatenated), so a request never waits for a whole batch to end. Each row has its own sampling
parameters, stop strings, token budget, deadline and LoRA adapter (peft mixed-adapter batches), and
streams its text as it is produced.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.serving.engines.base import (
    AdapterInfo,
    BadRequest,
    Chunk,
    DeadlineExceeded,
    EngineUnavailable,
    GenerationRequest,
    HFTokenizerEngine,
    QueueFull,
)

log = logging.getLogger(__name__)
BASE = "__base__"  # peft's name for "no adapter" in a mixed batch


@dataclass
class _Slot:
    """One request inside the engine: its queue of chunks back to the event loop."""

    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue[Chunk | BaseException]
    cancelled: threading.Event = field(default_factory=threading.Event)
    generated: list[int] = field(default_factory=list)
    emitted: str = ""
    done: bool = False
    generator: Any = None  # the request's own torch.Generator (a seed), made on admission

    def send(self, item: Chunk | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.out.put_nowait, item)


@dataclass
class _Batch:
    """The rows decoding together. ``mask`` is left-padded and one column longer than the KV cache in
    ``past``: its last column is the token each row feeds next (``next_ids``)."""

    slots: list[_Slot]
    budgets: list[int]
    generators: list[Any]
    past: Any  # transformers DynamicCache: per layer, keys/values of shape [rows, heads, length, dim]
    mask: Any
    positions: Any  # [rows, 1]: the position of each row's next token
    pad: int
    next_ids: list[int] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.steps = self.steps or [0] * len(self.slots)

    def _select(self, keep: list[int]) -> None:
        import torch

        index = torch.tensor(keep, dtype=torch.long)
        self.past.batch_select_indices(index)
        self.mask, self.positions = self.mask[index], self.positions[index]
        for name in ("slots", "budgets", "generators", "next_ids", "steps"):
            values = getattr(self, name)
            setattr(self, name, [values[i] for i in keep])

    def compact(self) -> None:
        """Drop finished rows, then the leading columns no remaining row attends to."""
        keep = [i for i, s in enumerate(self.slots) if not s.done]
        if len(keep) < len(self.slots):
            self._select(keep)
        if not self.slots:
            return
        used = self.mask.sum(0).nonzero()
        first = int(used[0]) if len(used) else 0
        if first > 0:
            self.mask = self.mask[:, first:]
            for layer in self.past.layers:
                layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]

    def merge(self, other: _Batch) -> None:
        """Append ``other``'s rows: left-pad the shorter side's mask and cache, then concatenate."""
        import torch
        import torch.nn.functional as F

        if not self.slots:
            self.__dict__.update(other.__dict__)
            return
        grow_self = max(0, other.mask.shape[1] - self.mask.shape[1])
        grow_other = max(0, self.mask.shape[1] - other.mask.shape[1])
        self.mask = torch.cat([F.pad(self.mask, (grow_self, 0)), F.pad(other.mask, (grow_other, 0))])
        for mine, theirs in zip(self.past.layers, other.past.layers, strict=True):
            for attr in ("keys", "values"):
                a = F.pad(getattr(mine, attr), (0, 0, grow_self, 0))
                b = F.pad(getattr(theirs, attr), (0, 0, grow_other, 0))
                setattr(mine, attr, torch.cat([a, b]))
        self.positions = torch.cat([self.positions, other.positions])
        for name in ("slots", "budgets", "generators", "next_ids", "steps"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


class TransformersEngine(HFTokenizerEngine):
    def __init__(
        self,
        *,
        model_dir: str | Path,
        model_name: str,
        dtype: str = "float32",
        max_batch_size: int = 8,
        batch_wait_ms: float = 10.0,
        max_queue: int = 64,
        max_prompt_tokens: int = 2048,
        max_model_len: int = 8192,
        threads: int = 1,
        adapters: Sequence[AdapterInfo] = (),
    ) -> None:
        self.model_name = model_name
        self._model_dir = str(model_dir)
        self._dtype = dtype
        self.max_batch_size = max_batch_size
        self._batch_wait = batch_wait_ms / 1000
        self._max_queue = max_queue
        self.max_prompt_tokens = max_prompt_tokens
        self.max_model_len = max_model_len
        self._threads = threads
        self._adapter_specs = list(adapters)
        # peft keeps adapters as module attributes: a user's name ("half", "a.b") can clash or break
        # module paths, so peft only ever sees these.
        self._peft_name = {a.name: f"kaiten_adapter_{i}" for i, a in enumerate(self._adapter_specs)}
        self._queue: queue.Queue[_Slot | None] = queue.Queue()
        self._pending = 0  # slots queued, not yet in a batch
        self._lock = threading.Lock()
        self._worker: threading.Thread | None = None
        self._rows: list[_Slot] = []  # the rows of the running batch (told if it fails)
        self._stopping = False
        self._ready = False
        self._error = ""
        self._stats = dict.fromkeys(("batches", "batch_rows", "joined", "last_batch_size", "running"), 0.0)
        self.tokenizer: Any = None
        self.model: Any = None

    # -- lifecycle ------------------------------------------------------------------------------------

    async def start(self) -> None:
        await asyncio.to_thread(self._load)
        self._worker = threading.Thread(target=self._run, name="kaiten-batcher", daemon=True)
        self._worker.start()
        self._ready = True

    def _load(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(self._threads)
        started = time.monotonic()
        self.tokenizer = AutoTokenizer.from_pretrained(self._model_dir)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        model = AutoModelForCausalLM.from_pretrained(self._model_dir, dtype=getattr(torch, self._dtype))
        if self._adapter_specs:
            model = self._load_adapters(model)
        self.model = model.eval()  # type: ignore[no-untyped-call]
        eos = model.generation_config.eos_token_id
        self._eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self._eos.add(self.tokenizer.eos_token_id)
        log.info(
            "loaded %s from %s in %.1fs (%s, %d adapter(s), batch ≤ %d, %d thread(s))",
            self.model_name,
            self._model_dir,
            time.monotonic() - started,
            self._dtype,
            len(self._adapter_specs),
            self.max_batch_size,
            self._threads,
        )

    def _load_adapters(self, model: Any) -> Any:
        from peft import PeftModel
        from peft.tuners.lora import LoraLayer

        first, *rest = self._adapter_specs
        model = PeftModel.from_pretrained(model, first.path, adapter_name=self._peft_name[first.name])
        for spec in rest:
            model.load_adapter(spec.path, adapter_name=self._peft_name[spec.name])
        for spec in self._adapter_specs:  # KAITO's strength: scale the adapter's delta
            internal = self._peft_name[spec.name]
            for module in model.modules():
                if isinstance(module, LoraLayer) and internal in module.scaling:
                    module.scaling[internal] *= spec.strength
        return model

    async def shutdown(self) -> None:
        self._ready = False
        self._queue.put(None)
        if self._worker is not None:
            await asyncio.to_thread(self._worker.join, 30)

    def healthy(self) -> tuple[bool, str]:
        if self._error:
            return False, self._error
        if not self._ready or self._worker is None or not self._worker.is_alive():
            return False, "model is loading" if not self._ready else "batch worker stopped"
        return True, "ok"

    # -- tokens ---------------------------------------------------------------------------------------

    def stats(self) -> dict[str, float]:
        return {**self._stats, "queue_depth": float(self._pending)}

    # -- requests -------------------------------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        self.admit(request)
        with self._lock:
            if self._pending >= self._max_queue:
                raise QueueFull(f"{self._pending} requests are waiting; try again shortly")
            self._pending += 1
        slot = _Slot(request=request, loop=asyncio.get_running_loop(), out=asyncio.Queue())
        self._queue.put(slot)
        try:
            while True:
                item = await slot.out.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            slot.cancelled.set()  # the client went away or we finished: stop spending on it

    # -- the worker thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            with self._lock:
                self._pending -= 1
            rows = [first, *self._take(self.max_batch_size - 1, wait=self._batch_wait)]
            rows = self._admit([s for s in rows if not s.cancelled.is_set()])
            self._rows = rows
            try:
                if rows:
                    self._decode(rows)
            except Exception as exc:  # one bad batch must not kill the worker
                log.exception("batch of %d failed", len(self._rows))
                for slot in self._rows:
                    if not slot.done:
                        slot.send(EngineUnavailable(f"generation failed: {type(exc).__name__}: {exc}"))
            self._rows = []
            self._stats["running"] = 0
            if self._stopping:
                return

    def _admit(self, slots: list[_Slot]) -> list[_Slot]:
        """The rows that can run: one whose parameters cannot be used (a seed torch refuses) is answered
        with its own error here, before it shares a forward pass with the others."""
        admitted = []
        for slot in slots:
            try:
                slot.generator = _generator(slot.request.params.seed)
            except BadRequest as exc:
                slot.done = True
                slot.send(exc)
                continue
            admitted.append(slot)
        return admitted

    def _take(self, n: int, *, wait: float) -> list[_Slot]:
        """Up to ``n`` more queued requests, waiting at most ``wait`` seconds for them."""
        taken: list[_Slot] = []
        deadline = time.monotonic() + wait
        while len(taken) < n and not self._stopping:
            try:
                nxt = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if nxt is None:  # shutting down: finish what runs, admit nothing more
                self._stopping = True
                break
            taken.append(nxt)
        with self._lock:
            self._pending -= len(taken)
        return taken

    def _decode(self, rows: list[_Slot]) -> None:
        """Continuous batching: one decode step at a time over the running rows; between steps, finished
        rows leave (their cache rows are dropped) and queued requests join (prefilled, then their KV
        cache is left-aligned with the batch's and concatenated), up to ``max_batch_size`` rows."""
        import torch

        with torch.inference_mode():
            batch = self._prefill(rows)
            while True:
                batch.compact()
                room = self.max_batch_size - len(batch.slots)
                if room > 0 and not self._queue.empty():
                    joining = self._admit([s for s in self._take(room, wait=0) if not s.cancelled.is_set()])
                    if joining:
                        self._stats["joined"] += len(joining) if batch.slots else 0
                        batch.merge(self._prefill(joining))
                        self._rows = list(batch.slots)
                if not batch.slots:
                    return
                self._stats["running"] = self._stats["last_batch_size"] = len(batch.slots)
                out = self.model(
                    input_ids=torch.tensor(batch.next_ids).unsqueeze(-1),
                    attention_mask=batch.mask,
                    position_ids=batch.positions,
                    past_key_values=batch.past,
                    use_cache=True,
                    **self._adapter_args(batch.slots),
                )
                batch.past = out.past_key_values
                self._sample_step(batch, out.logits[:, -1, :].float())
                batch.positions = batch.positions + 1

    def _prefill(self, slots: list[_Slot]) -> _Batch:
        """Run the (left-padded) prompts of ``slots`` and sample each row's first token."""
        import torch

        self._stats["batches"] += 1
        self._stats["batch_rows"] += len(slots)
        pad = self.tokenizer.pad_token_id
        width = max(len(s.request.prompt_ids) for s in slots)
        input_ids = torch.tensor(
            [[pad] * (width - len(s.request.prompt_ids)) + s.request.prompt_ids for s in slots]
        )
        mask = torch.tensor(
            [[0] * (width - len(s.request.prompt_ids)) + [1] * len(s.request.prompt_ids) for s in slots]
        )
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **self._adapter_args(slots),
        )
        batch = _Batch(
            slots=list(slots),
            budgets=[
                min(s.request.params.max_new_tokens, self.max_model_len - len(s.request.prompt_ids))
                for s in slots
            ],
            generators=[s.generator for s in slots],
            past=out.past_key_values,
            mask=mask,
            positions=positions[:, -1:] + 1,
            pad=pad,
        )
        self._sample_step(batch, out.logits[:, -1, :].float())
        return batch

    def _sample_step(self, batch: _Batch, logits: Any) -> None:
        """One token for each live row; the mask grows by the column those tokens will occupy."""
        import torch

        next_ids = []
        for row, slot in enumerate(batch.slots):
            if slot.done:
                next_ids.append(batch.pad)
                continue
            try:
                token = _sample(logits[row], slot, batch.generators[row])
            except Exception as exc:  # this row's parameters broke sampling: it fails, the batch goes on
                log.warning("sampling failed for one row: %r", exc)
                slot.done = True
                slot.send(BadRequest(f"sampling failed for this request: {type(exc).__name__}: {exc}"))
                next_ids.append(batch.pad)
                continue
            next_ids.append(token)
            batch.steps[row] += 1
            self._advance(slot, token, batch.steps[row] >= batch.budgets[row])
        batch.next_ids = next_ids
        column = torch.ones((len(batch.slots), 1), dtype=batch.mask.dtype)
        batch.mask = torch.cat([batch.mask, column], dim=-1)

    def _adapter_args(self, slots: list[_Slot]) -> dict[str, Any]:
        if not self._adapter_specs:
            return {}
        return {"adapter_names": [self._peft_name.get(s.request.adapter or "", BASE) for s in slots]}

    def _advance(self, slot: _Slot, token: int, out_of_budget: bool) -> None:
        """Add one token to a row; stream the new text; finish the row when it should."""
        request = slot.request
        if slot.cancelled.is_set():
            slot.done = True
            return
        if token in self._eos:
            slot.done = True
            slot.send(Chunk(text="", tokens=len(slot.generated), finish_reason="stop"))
            return
        slot.generated.append(token)
        text = self.decode(slot.generated)
        finish: str | None = None
        for stop in request.params.stop:
            at = text.find(stop, max(0, len(slot.emitted) - len(stop)))
            if at >= 0:
                text, finish = text[:at], "stop"
                break
        if finish is None and out_of_budget:
            finish = "length"
        if finish is None and time.monotonic() > request.deadline:
            slot.done = True
            slot.send(DeadlineExceeded(f"request deadline passed after {len(slot.generated)} tokens"))
            return
        held = finish is None and _incomplete(text, request.params.stop)
        new = "" if held else text[len(slot.emitted) :]
        if not held:
            slot.emitted = text
        if finish is not None:
            slot.done = True
        if new or finish is not None:
            slot.send(Chunk(text=new, tokens=len(slot.generated), finish_reason=finish))


def _incomplete(text: str, stops: Sequence[str]) -> bool:
    """Hold the text back while it ends in half a UTF-8 character or in the start of a stop string."""
    return text.endswith("\ufffd") or any(text.endswith(s[:i]) for s in stops for i in range(1, len(s)))


MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed's range
MIN_TEMPERATURE = 1e-5  # sampling below this temperature is greedy decoding (and numerically safe)


def _generator(seed: int | None) -> Any:
    import torch

    if seed is None:
        return None
    if not 0 <= seed <= MAX_SEED:
        raise BadRequest(f"seed must be between 0 and {MAX_SEED}, got {seed}")
    gen = torch.Generator()
    gen.manual_seed(seed)
    return gen


def _sample(logits: Any, slot: _Slot, generator: Any) -> int:
    import torch

    p = slot.request.params
    if p.repetition_penalty != 1.0 and slot.generated:
        seen = torch.tensor(sorted(set(slot.generated)))
        values = logits[seen]
        logits[seen] = torch.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and slot.generated:
        tokens, counts = torch.unique(torch.tensor(slot.generated), return_counts=True)
        logits[tokens] -= p.presence_penalty + p.frequency_penalty * counts.to(logits.dtype)
    if not p.do_sample or p.temperature < MIN_TEMPERATURE:  # below it, logits / t overflow: greedy
        return int(torch.argmax(logits))
    logits = logits / p.temperature
    if p.top_k > 0:
        kth = torch.topk(logits, min(p.top_k, logits.shape[-1])).values[-1]
        logits = torch.where(logits < kth, torch.full_like(logits, float("-inf")), logits)
    probs = torch.softmax(logits, dim=-1)
    if p.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = sorted_probs.cumsum(-1) - sorted_probs < p.top_p
        sorted_probs = sorted_probs * keep
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
        probs = probs / probs.sum()
    return int(torch.multinomial(probs, 1, generator=generator))
