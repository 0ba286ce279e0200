"""The transformers engine's continuous batching on the real SmolLM2: requests that arrive while a
batch is decoding join it, and every row's greedy output is exactly what it is alone."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from services.serving.engines.base import AdapterInfo, GenerationRequest, SamplingParams
from services.serving.engines.transformers_engine import TransformersEngine

os.environ.setdefault("HF_HUB_OFFLINE", "1")
PROMPTS = [
    "Once upon a time, in a small village by the sea, there lived",
    "The capital of France is",
    "1, 2, 3, 4,",
    "def fibonacci(n):",
    "Hi",
]


async def test_requests_join_a_running_batch_and_match_their_solo_output(
    model_dir: Path, adapter_dir: Path
) -> None:
    engine = TransformersEngine(
        model_dir=model_dir,
        model_name="smollm2",
        max_batch_size=4,
        adapters=[AdapterInfo(name="style", path=str(adapter_dir))],
    )
    await engine.start()

    async def one(i: int, delay: float = 0.0) -> str:
        await asyncio.sleep(delay)
        request = GenerationRequest(
            prompt_ids=engine.encode(PROMPTS[i % len(PROMPTS)]),
            params=SamplingParams(max_new_tokens=6 + 5 * (i % len(PROMPTS))),  # rows end at different steps
            adapter="style" if i % 2 else None,  # base and adapter rows share batches
        )
        return "".join([chunk.text async for chunk in engine.generate(request)])

    try:
        alone = [await one(i) for i in range(10)]
        assert engine.stats()["joined"] == 0
        together = await asyncio.gather(*(one(i, delay=0.04 * i) for i in range(10)))
        stats = engine.stats()
    finally:
        await engine.shutdown()
    assert together == alone
    assert stats["joined"] >= 3, stats  # most arrived while a batch was decoding
    assert stats["queue_depth"] == 0 and stats["batch_rows"] == 20, stats
