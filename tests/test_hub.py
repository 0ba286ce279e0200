"""Any Hugging Face model id as a preset (KAITO ≥ 0.9): sized from real ``config.json`` files and file
lists, served by a hub on 127.0.0.1 (``tests/hub_server.py``) that answers the requests KAITO's preset
generator makes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.planner.hub import Hub
from services.planner.planning import PlanOptions, plan
from shared.api.workspace import Workspace
from shared.errors import Transient
from shared.planning.catalog import Catalogs, Preset, load_catalogs
from shared.planning.hub import HubModelError, is_hub_id, preset_from_hub
from shared.planning.model import Plan, Rejection
from tests.hub_server import DATA, HubServer

T4 = "Standard_NC4as_T4_v3"


@pytest.fixture(scope="module")
def catalogs() -> Catalogs:
    return load_catalogs()


@pytest.fixture
def hub() -> Iterator[HubServer]:
    with HubServer() as server:
        yield server


def from_data(repo: str) -> Preset:
    config = json.loads((DATA / repo / "config.json").read_text())
    files = [
        (f["path"], f.get("lfs", {}).get("size", f["size"]))
        for f in json.loads((DATA / repo / "tree.json").read_text())
    ]
    return preset_from_hub(repo, config, files)


def test_a_model_is_sized_from_its_config_and_files_as_the_catalog_sizes_it(catalogs: Catalogs) -> None:
    """SmolLM2's real config.json gives the figures the catalog's hand-written entry has."""
    hub = from_data("HuggingFaceTB/SmolLM2-135M-Instruct")
    catalog = catalogs.presets["smollm2-135m-instruct"]
    assert (hub.kv_bytes_per_token, hub.context_limit) == (catalog.kv_bytes_per_token, catalog.context_limit)
    assert hub.weights == 269060552  # model.safetensors only: not the onnx/ copy
    assert hub.architecture is not None and (hub.architecture.layers, hub.architecture.hidden) == (30, 576)


def test_the_converted_models_own_config_gives_the_same_figures(model_dir: Path) -> None:
    """The config.json transformers wrote for the SmolLM2 we serve (a real file of this machine)."""
    config = json.loads((model_dir / "config.json").read_text())
    preset = preset_from_hub("x/smollm2", config, [("model.safetensors", 1)])
    assert (preset.kv_bytes_per_token, preset.context_limit) == (23040, 8192)


def test_qwen3_and_a_multimodal_models_language_half() -> None:
    qwen = from_data("Qwen/Qwen3-0.6B")
    assert (qwen.name, qwen.hf_id, qwen.dtype, qwen.attention) == (
        "Qwen/Qwen3-0.6B",
        "Qwen/Qwen3-0.6B",
        "bfloat16",
        "GQA",
    )
    assert qwen.kv_bytes_per_token == 2 * 28 * 8 * 128 * 2 and qwen.context_limit == 40960
    assert qwen.weights == 1503300328 and not qwen.tuning
    gemma = from_data("google/gemma-3-4b-it")  # text_config: 34 layers, 4 KV heads of 256
    assert gemma.kv_bytes_per_token == 2 * 34 * 4 * 256 * 2
    assert gemma.weights == 4961251752 + 3639026128
    assert gemma.context_limit == 2048  # its config names none: KAITO's default


def test_what_cannot_be_sized_says_why() -> None:
    with pytest.raises(HubModelError, match="names no transformer shape"):
        preset_from_hub("a/b", {"model_type": "whisper"}, [("model.safetensors", 10)])
    shape = {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4}
    with pytest.raises(HubModelError, match=r"lists no \.safetensors or \.bin weight files"):
        preset_from_hub("a/b", shape, [("model.onnx", 10), ("sub/model.safetensors", 10)])
    with pytest.raises(HubModelError, match="quantization 'bitsandbytes' is not one Kaiten sizes"):
        preset_from_hub(
            "a/b", {**shape, "quantization_config": {"quant_method": "bitsandbytes"}}, [("x.safetensors", 1)]
        )
    assert is_hub_id("Qwen/Qwen3-0.6B") and not is_hub_id("phi-4") and not is_hub_id("a/b/c")


def test_an_hf_id_plans_like_a_preset(catalogs: Catalogs) -> None:
    def ws(instance_type: str) -> Workspace:
        return Workspace.model_validate(
            {
                "apiVersion": "kaito.sh/v1beta1",
                "metadata": {"name": "qwen"},
                "resource": {"instanceType": instance_type, "labelSelector": {"matchLabels": {"a": "b"}}},
                "inference": {"preset": {"name": "Qwen/Qwen3-0.6B"}},
            }
        )

    assert isinstance(plan(ws(T4), catalogs), Rejection)  # not in the catalog
    with_qwen = catalogs.with_preset(from_data("Qwen/Qwen3-0.6B"))
    gpu = plan(ws(T4), with_qwen)
    assert isinstance(gpu, Plan), gpu
    assert (gpu.preset, gpu.model, gpu.engine, gpu.nodes, gpu.dtype) == (
        "Qwen/Qwen3-0.6B", "Qwen/Qwen3-0.6B", "vllm", 1, "float16"  # T4: no bfloat16
    )  # fmt: skip
    assert gpu.max_model_len == 40960  # the model's own limit: two sequences of it fit the T4's memory
    cpu = plan(ws("local"), with_qwen, options=PlanOptions(provider="local"))
    assert isinstance(cpu, Plan) and cpu.engine == "transformers"


async def test_the_hub_client_asks_what_kaito_asks_and_keeps_what_it_learnt(hub: HubServer) -> None:
    client = Hub(hub.url)
    qwen = await client.preset("Qwen/Qwen3-0.6B")
    assert isinstance(qwen, Preset) and qwen == from_data("Qwen/Qwen3-0.6B")
    assert hub.requests == [
        "/api/models/Qwen/Qwen3-0.6B/tree/main",
        "/Qwen/Qwen3-0.6B/resolve/main/config.json",
    ]
    assert await client.preset("Qwen/Qwen3-0.6B") == qwen and len(hub.requests) == 2  # kept, not asked again
    gated = await client.preset("gated/llama-private")
    assert isinstance(gated, Rejection) and gated.reason == "HubAuthRequired"
    assert "reads no Secrets" in gated.message and "KAITEN_CATALOG_FILES" in gated.message
    unknown = await client.preset("nobody/nothing")
    assert isinstance(unknown, Rejection) and unknown.reason == "UnknownPreset"
    with pytest.raises(Transient, match="HTTP 500"):
        await client.preset("broken/model")


async def test_a_hub_that_cannot_be_reached_is_said_at_once() -> None:
    gone = await Hub("http://127.0.0.1:9").preset("Qwen/Qwen3-0.6B")  # nothing listens on port 9
    assert isinstance(gone, Rejection) and gone.reason == "HubUnreachable"
    assert "KAITEN_HUB_URL" in gone.message
