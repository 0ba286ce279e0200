"""Prometheus metrics for the serving API, rendered in the text exposition format.

Counters: requests (by outcome), prompt and completion tokens, 429 rejections. Histogram: time to first
token. Gauges from the engine: queue depth, running rows, last batch size, mean batch size.

vLLM's own names too, so KAITO's dashboards and its KEDA scaler (``vllm:num_requests_waiting``) work
unchanged: with the vLLM engine its own ``vllm:*`` metrics are passed through as vLLM exports them
(:func:`vllm_native`); with the CPU engine the ones that mean the same thing here are rendered under the
same names and labels (:meth:`Metrics.render_vllm_names`).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from services.serving.engines.base import Chunk, EngineError

TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass
class Metrics:
    started: float = field(default_factory=time.time)
    requests: dict[str, int] = field(default_factory=lambda: {"ok": 0, "error": 0, "cancelled": 0})
    rejected: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_counts: list[int] = field(default_factory=lambda: [0] * len(TTFT_BUCKETS))
    ttft_sum: float = 0.0
    ttft_n: int = 0

    async def observe(self, gen: AsyncIterator[Chunk], prompt_tokens: int) -> AsyncIterator[Chunk]:
        """Wrap an engine stream: count tokens, time the first chunk, record the outcome."""
        begun = time.monotonic()
        first = True
        tokens = 0
        outcome = "cancelled"
        try:
            async for chunk in gen:
                if first:
                    self._ttft(time.monotonic() - begun)
                    first = False
                tokens = chunk.tokens
                yield chunk
            outcome = "ok"
        except EngineError:
            outcome = "error"
            raise
        finally:
            self.requests[outcome] += 1
            self.prompt_tokens += prompt_tokens
            self.completion_tokens += tokens

    def _ttft(self, seconds: float) -> None:
        self.ttft_sum += seconds
        self.ttft_n += 1
        for i, bound in enumerate(TTFT_BUCKETS):
            if seconds <= bound:
                self.ttft_counts[i] += 1

    def render_vllm_names(self, engine: dict[str, float], model_name: str) -> str:
        """The ``vllm:*`` metrics the CPU engine can give with vLLM's meaning (label ``model_name``)."""
        label = f'model_name="{model_name}"'
        running = engine.get("running", engine.get("last_batch_size", 0))
        lines = [
            "# HELP vllm:num_requests_running Number of requests in model execution batches.",
            "# TYPE vllm:num_requests_running gauge",
            f"vllm:num_requests_running{{{label}}} {running:g}",
            "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.",
            "# TYPE vllm:num_requests_waiting gauge",
            f"vllm:num_requests_waiting{{{label}}} {engine.get('queue_depth', 0):g}",
            "# HELP vllm:prompt_tokens_total Number of prefill tokens processed.",
            "# TYPE vllm:prompt_tokens_total counter",
            f"vllm:prompt_tokens_total{{{label}}} {self.prompt_tokens}",
            "# HELP vllm:generation_tokens_total Number of generation tokens processed.",
            "# TYPE vllm:generation_tokens_total counter",
            f"vllm:generation_tokens_total{{{label}}} {self.completion_tokens}",
            "# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.",
            "# TYPE vllm:time_to_first_token_seconds histogram",
            *(
                f'vllm:time_to_first_token_seconds_bucket{{{label},le="{b}"}} {c}'
                for b, c in zip(TTFT_BUCKETS, self.ttft_counts, strict=True)
            ),
            f'vllm:time_to_first_token_seconds_bucket{{{label},le="+Inf"}} {self.ttft_n}',
            f"vllm:time_to_first_token_seconds_sum{{{label}}} {self.ttft_sum:.6f}",
            f"vllm:time_to_first_token_seconds_count{{{label}}} {self.ttft_n}",
        ]
        return "\n".join(lines) + "\n"

    def render(self, engine: dict[str, float]) -> str:
        lines = [
            "# HELP kaiten_requests_total Generation requests by outcome.",
            "# TYPE kaiten_requests_total counter",
            *(f'kaiten_requests_total{{outcome="{k}"}} {v}' for k, v in self.requests.items()),
            "# HELP kaiten_requests_rejected_total Requests refused with 429 (queue full).",
            "# TYPE kaiten_requests_rejected_total counter",
            f"kaiten_requests_rejected_total {self.rejected}",
            "# HELP kaiten_prompt_tokens_total Prompt tokens received.",
            "# TYPE kaiten_prompt_tokens_total counter",
            f"kaiten_prompt_tokens_total {self.prompt_tokens}",
            "# HELP kaiten_completion_tokens_total Tokens generated.",
            "# TYPE kaiten_completion_tokens_total counter",
            f"kaiten_completion_tokens_total {self.completion_tokens}",
            "# HELP kaiten_time_to_first_token_seconds Time from request to first streamed text.",
            "# TYPE kaiten_time_to_first_token_seconds histogram",
            *(
                f'kaiten_time_to_first_token_seconds_bucket{{le="{b}"}} {c}'
                for b, c in zip(TTFT_BUCKETS, self.ttft_counts, strict=True)
            ),
            f'kaiten_time_to_first_token_seconds_bucket{{le="+Inf"}} {self.ttft_n}',
            f"kaiten_time_to_first_token_seconds_sum {self.ttft_sum:.6f}",
            f"kaiten_time_to_first_token_seconds_count {self.ttft_n}",
            "# HELP kaiten_queue_depth Requests waiting for a batch.",
            "# TYPE kaiten_queue_depth gauge",
            f"kaiten_queue_depth {engine.get('queue_depth', 0):g}",
            "# HELP kaiten_batch_size Rows decoding together in the latest step (continuous batching).",
            "# TYPE kaiten_batch_size gauge",
            f"kaiten_batch_size {engine.get('last_batch_size', 0):g}",
            "# HELP kaiten_batches_total Prefills run: a new batch, or requests joining a running one.",
            "# TYPE kaiten_batches_total counter",
            f"kaiten_batches_total {engine.get('batches', 0):g}",
            "# HELP kaiten_batch_rows_total Requests prefilled (÷ batches = mean prefill size).",
            "# TYPE kaiten_batch_rows_total counter",
            f"kaiten_batch_rows_total {engine.get('batch_rows', 0):g}",
            "# HELP kaiten_batch_joined_total Requests that joined a batch already decoding.",
            "# TYPE kaiten_batch_joined_total counter",
            f"kaiten_batch_joined_total {engine.get('joined', 0):g}",
        ]
        return "\n".join(lines) + "\n"


def vllm_native() -> str:
    """vLLM's own ``vllm:*`` metrics, from the registry its stat logger writes to in this process."""
    from prometheus_client import REGISTRY, generate_latest

    text = generate_latest(REGISTRY).decode()
    keep: list[str] = []
    for line in text.splitlines():
        name = line.split(" ", 3)[2] if line.startswith("# ") else line
        if name.startswith("vllm:"):
            keep.append(line)
    return "\n".join(keep) + "\n" if keep else ""
