"""The engines on the real SmolLM2: continuous batching (requests that arrive while a batch is decoding
join it, and every row's greedy output is exactly what it is alone); adapter strength as scaled LoRA
weights (what the vLLM engine serves); vLLM engine args and Ray placement from a real plan."""

from __future__ import annotations

import asyncio
import math
import os
from pathlib import Path

import pytest

from services.serving.app import AdapterSpec, ServingConfig, chat_adapters, replica_options
from services.serving.engines.base import AdapterInfo, BadRequest, GenerationRequest, SamplingParams
from services.serving.engines.transformers_engine import TransformersEngine
from services.serving.engines.vllm_engine import engine_kwargs, scaled_adapter
from shared.model_sources import ModelSource

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytestmark = pytest.mark.timeout(180)  # the batching test measured 16 s, plus the model's first load
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


def test_adapter_strength_as_scaled_lora_b_weights(
    model_dir: Path, adapter_dir: Path, tmp_path: Path
) -> None:
    """vLLM has no per-adapter scale, so strength s is served as a copy with lora_B × s: the same
    delta the transformers engine applies. Checked on the weights, and on the output of one engine
    holding the original at strength 0.5 and the scaled copy at strength 1."""
    from safetensors.torch import load_file

    half = AdapterInfo(name="half", path=str(adapter_dir), strength=0.5)
    assert scaled_adapter(AdapterInfo(name="full", path=str(adapter_dir)), tmp_path) == adapter_dir
    copy = scaled_adapter(half, tmp_path)
    assert copy != adapter_dir and scaled_adapter(half, tmp_path) == copy  # made once
    original, scaled = (
        load_file(adapter_dir / "adapter_model.safetensors"),
        load_file(copy / "adapter_model.safetensors"),
    )
    assert original.keys() == scaled.keys() and any(".lora_B." in k for k in original)
    for key, value in original.items():
        assert scaled[key].allclose(value * 0.5 if ".lora_B." in key else value), key
    assert (copy / "adapter_config.json").read_text() == (adapter_dir / "adapter_config.json").read_text()

    engine = TransformersEngine(
        model_dir=model_dir,
        model_name="smollm2",
        adapters=[
            half,
            AdapterInfo(name="scaled", path=str(copy)),
            AdapterInfo(name="full", path=str(adapter_dir)),
        ],
    )

    async def text(adapter: str | None) -> str:
        request = GenerationRequest(
            prompt_ids=engine.encode(PROMPTS[1]), params=SamplingParams(max_new_tokens=12), adapter=adapter
        )
        return "".join([chunk.text async for chunk in engine.generate(request)])

    async def outputs() -> list[str]:
        await engine.start()
        try:
            return [await text(a) for a in ("half", "scaled", "full", None)]
        finally:
            await engine.shutdown()

    half_out, scaled_out, full_out, base_out = asyncio.run(outputs())
    assert half_out == scaled_out
    assert len({half_out, full_out, base_out}) == 3  # strength matters: neither the base nor the full adapter


def test_vllm_engine_args_from_a_multi_gpu_plan(adapter_dir: Path) -> None:
    """The planner's vLLM flags become AsyncEngineArgs fields, LoRA is sized from the adapter, and a
    tensor-parallel replica gets one placement-group bundle per GPU."""
    from services.planner.planning import PlanOptions, plan
    from shared.api.workspace import Workspace
    from shared.planning.catalog import load_catalogs
    from shared.planning.model import Plan

    ws = Workspace.model_validate(
        {
            "apiVersion": "kaito.sh/v1alpha1",
            "metadata": {"name": "ws"},
            "resource": {"instanceType": "Standard_NC12s_v3", "labelSelector": {"matchLabels": {"a": "b"}}},
            "inference": {"preset": {"name": "mistral-7b-instruct"}},
        }
    )
    got = plan(ws, load_catalogs(), [], PlanOptions(cloud="azure", provider="aks"))
    assert isinstance(got, Plan) and got.engine == "vllm" and got.tensor_parallel == 2, got
    config = ServingConfig(
        model_name=got.preset,
        source=ModelSource(kind="hf", path=got.model),
        engine="vllm",
        engine_args=dict(got.engine_args),
        adapters=[AdapterSpec(name="style", path=str(adapter_dir))],
        num_gpus=1,
    )
    kwargs = engine_kwargs(
        got.model, got.preset, config.engine_args, [AdapterInfo("style", str(adapter_dir))]
    )
    assert kwargs["tensor_parallel_size"] == 2 and kwargs["distributed_executor_backend"] == "ray"
    assert kwargs["dtype"] == "float16" and kwargs["served_model_name"] == [got.preset]  # V100: no bf16
    assert kwargs["enable_lora"] is True and kwargs["max_loras"] == 1 and kwargs["max_lora_rank"] == 8
    assert all("-" not in key for key in kwargs)
    options = replica_options(config)
    assert options["placement_group_bundles"] == [{"CPU": 1.0}, {"GPU": 1.0}, {"GPU": 1.0}]
    assert options["placement_group_strategy"] == "STRICT_PACK"
    assert "num_gpus" not in options["ray_actor_options"]  # the GPUs are in the bundles
    single = replica_options(ServingConfig(model_name="m", source=config.source, engine="vllm", num_gpus=1))
    assert single == {"ray_actor_options": {"num_cpus": 1.0, "num_gpus": 1.0}}


def test_catalog_figures_match_the_model_we_serve(model_dir: Path) -> None:
    """The planner sizes SmolLM2 from the catalog; those figures must be the real model's."""
    import json

    from safetensors import safe_open

    from shared.planning.catalog import GIB, load_catalogs

    preset = load_catalogs().resolve_preset("smollm2")
    assert preset is not None and preset.architecture is not None
    config = json.loads((model_dir / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    layers, kv_heads = config["num_hidden_layers"], config["num_key_value_heads"]
    assert (preset.architecture.layers, preset.architecture.hidden, preset.architecture.vocab) == (
        layers,
        config["hidden_size"],
        config["vocab_size"],
    )
    assert preset.kv_bytes_per_token == 2 * layers * kv_heads * head_dim * 2  # K and V, 16-bit
    assert preset.context_limit == config["max_position_embeddings"]
    params = 0
    for file in model_dir.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            for key in f.keys():  # noqa: SIM118  (safe_open is not a mapping)
                params += math.prod(f.get_slice(key).get_shape())
    assert abs(params * 2 / GIB - preset.weights / GIB) < 0.05, (params, preset.weights)


async def test_a_bad_row_fails_alone_and_its_batch_finishes(model_dir: Path) -> None:
    """Issue 16 (7): a seed torch cannot take and a temperature that turns the logits into inf/nan, each
    in a batch with good requests: the good ones finish with the text they get alone; the seed one is
    refused by itself; a vanishing temperature is greedy, not a crash."""
    from services.serving.engines.base import BadRequest

    engine = TransformersEngine(model_dir=model_dir, model_name="smollm2", max_batch_size=8)
    await engine.start()

    async def run(params: SamplingParams, prompt: str = PROMPTS[1]) -> str | Exception:
        request = GenerationRequest(prompt_ids=engine.encode(prompt), params=params)
        try:
            return "".join([chunk.text async for chunk in engine.generate(request)])
        except Exception as exc:
            return exc

    try:
        good = SamplingParams(max_new_tokens=8)
        alone = await run(good)
        results = await asyncio.gather(
            run(good),
            run(SamplingParams(max_new_tokens=8, do_sample=True, seed=2**64)),
            run(SamplingParams(max_new_tokens=8, do_sample=True, temperature=1e-40)),
            run(good),
            run(SamplingParams(max_new_tokens=8, do_sample=True, temperature=1e-40, top_k=5, top_p=0.5)),
        )
    finally:
        await engine.shutdown()
    assert results[0] == results[3] == alone, results
    assert isinstance(results[1], BadRequest) and "seed" in str(results[1]), results[1]
    assert results[2] == results[4] == alone, results  # a temperature this small is greedy decoding


def test_openai_presence_and_frequency_penalties_lower_the_logits_of_tokens_already_generated() -> None:
    """OpenAI's meaning: a generated token's logit drops by ``presence_penalty`` once and by
    ``frequency_penalty`` per time it occurred (they were accepted and ignored, or approximated by a
    repetition penalty)."""
    import torch

    from services.serving.engines.transformers_engine import _sample, _Slot

    def pick(**params: float) -> int:
        logits = torch.tensor([0.0, 3.0, 2.5, 1.0])
        slot = _Slot(
            GenerationRequest([0], SamplingParams(**params)), asyncio.new_event_loop(), asyncio.Queue()
        )
        slot.generated = [1, 1, 3]  # token 1 twice, token 3 once
        slot.loop.close()
        return _sample(logits, slot, None)

    assert pick() == 1  # greedy: the highest logit
    assert pick(frequency_penalty=0.2) == 1  # 3.0 - 2 × 0.2 = 2.6 > 2.5
    assert pick(frequency_penalty=0.3) == 2  # 3.0 - 2 × 0.3 = 2.4 < 2.5
    assert pick(presence_penalty=0.6) == 2  # 3.0 - 0.6 = 2.4: once, however often it came
    assert pick(presence_penalty=0.2, frequency_penalty=0.1) == 1  # 3.0 - 0.2 - 0.2 = 2.6
    assert pick(presence_penalty=0.4, frequency_penalty=0.1) == 2  # 3.0 - 0.4 - 0.2 = 2.4
    assert pick(presence_penalty=-2.0) == 1  # a negative penalty favours what came: 1.0 + 2 < 3.0 + 2


def test_several_adapters_sum_into_the_one_chat_answers_with(
    model_dir: Path, adapter_dir: Path, second_adapter_dir: Path, tmp_path: Path
) -> None:
    """KAITO's /chat merges a Workspace's adapters, weighted by strength. The combined adapter's delta,
    as peft itself computes it from the saved adapter, is exactly Σ strength · scaling · B·A of the
    originals, module by module (a module only one adapter adapts included); vLLM's rank limit holds."""
    import json

    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from services.serving.engines.combine import CombineError, combined_adapter

    specs = [AdapterInfo("style", str(adapter_dir), 1.0), AdapterInfo("tone", str(second_adapter_dir), 0.5)]
    combined = combined_adapter(specs, tmp_path)
    assert combined_adapter(specs, tmp_path) == combined  # made once
    config = json.loads((combined / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], sorted(config["target_modules"])) == (
        12,
        12,
        ["k_proj", "q_proj", "v_proj"],
    )
    assert (
        engine_kwargs("m", "m", {}, [*specs, AdapterInfo("_kaito_chat", str(combined))])["max_lora_rank"]
        == 16
    )

    def expected(module: str) -> torch.Tensor:
        total = None
        for spec, scaling in ((specs[0], 64 / 8), (specs[1], 16 / math.sqrt(4))):  # lora_alpha/r, rsLoRA
            weights = load_file(Path(spec.path) / "adapter_model.safetensors")
            key = f"base_model.model.{module}"
            if f"{key}.lora_A.weight" not in weights:
                continue
            delta = (
                spec.strength * scaling * weights[f"{key}.lora_B.weight"] @ weights[f"{key}.lora_A.weight"]
            )
            total = delta if total is None else total + delta
        assert total is not None
        return total

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), str(combined))
    layer = model.base_model.model.model.layers[3].self_attn
    for name in ("q_proj", "k_proj", "v_proj"):  # both adapters / tone only / style only
        got = getattr(layer, name).get_delta_weight("default")
        assert torch.allclose(got, expected(f"model.layers.3.self_attn.{name}"), atol=1e-5), name

    dora = tmp_path / "dora"
    dora.mkdir()
    for f in adapter_dir.iterdir():
        (dora / f.name).write_bytes(f.read_bytes())
    (dora / "adapter_config.json").write_text(
        json.dumps({**json.loads((adapter_dir / "adapter_config.json").read_text()), "use_dora": True})
    )
    with pytest.raises(
        CombineError, match="adapter d cannot be combined with the others: it is a DoRA adapter"
    ):
        combined_adapter([specs[0], AdapterInfo("d", str(dora))], tmp_path)
    # the replica still starts and serves each adapter by name; /chat says why it cannot answer
    loaded, refusal = chat_adapters([specs[0], AdapterInfo("d", str(dora))])
    assert [a.name for a in loaded] == ["style", "d"]
    assert "ask /v1/chat/completions with one adapter" in refusal
    engine = TransformersEngine(model_dir=model_dir, model_name="m", adapters=loaded)
    engine.chat_refusal = refusal
    with pytest.raises(BadRequest, match="it is a DoRA adapter"):
        engine.chat_adapter()
    # ranks that add up past vLLM's LoRA limit are refused before any weight is read
    wide = []
    for name in ("w1", "w2"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text(json.dumps({"r": 300, "lora_alpha": 300}))
        wide.append(AdapterInfo(name, str(tmp_path / name)))
    with pytest.raises(CombineError, match="ranks sum to 600, above vLLM's LoRA limit of 512"):
        combined_adapter(wide, tmp_path)
