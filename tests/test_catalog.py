"""The catalogs as data: complete, consistent, and overridable by an operator file."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from shared.planning.catalog import GIB, CatalogError, load_catalogs, parse_bytes

# From ../shared/data/presets.md (KAITO v0.12) and skus.md: every name must be in the catalog.
KAITO_PRESETS = 60
AZURE_SKUS = 19


def test_every_preset_and_sku_is_there() -> None:
    c = load_catalogs()
    assert len(c.presets) == KAITO_PRESETS + 1  # + smollm2-135m-instruct
    assert len([s for s in c.skus.values() if s.cloud == "azure"]) == AZURE_SKUS
    assert {s.cloud for s in c.skus.values()} == {"azure", "aws", "local"}
    for name in (
        "phi-4",
        "gpt-oss-120b",
        "deepseek-r1-0528",
        "qwen3.8-27b",
        "granite-4.1-8b",
        "kimi-k2.7-code",
    ):
        assert name in c.presets
    v100 = c.skus["Standard_NC6s_v3"]
    assert (v100.gpus, v100.gpu, v100.gpu_memory, c.gpu_models["V100"].bf16) == (1, "V100", 16 * GIB, False)
    assert c.skus["local"].is_cpu and c.skus["local"].cpu_memory > GIB


def test_presets_are_consistent() -> None:
    c = load_catalogs()
    for p in c.presets.values():
        assert p.weights > 0 and p.context_limit >= 4096 and p.kv_bytes_per_token > 0, p.name
        assert "/" in p.hf_id, p.name
        if p.tuning:
            assert p.architecture is not None, p.name
            arch = p.architecture
            # the architecture must be consistent with the KV figure: 2 (K,V) × layers × kv-width × 2 B
            assert p.kv_bytes_per_token % (4 * arch.layers) == 0, p.name
    smol = c.presets["smollm2-135m-instruct"]
    # GGUF metadata: 30 layers, 3 KV heads × 64 dims → 2 × 30 × 192 × 2 B
    assert smol.kv_bytes_per_token == 2 * 30 * 3 * 64 * 2 and smol.context_limit == 8192
    tunable = {p.name for p in c.presets.values() if p.tuning}
    assert {
        "phi-3-mini-128k-instruct",
        "qwen2.5-coder-7b-instruct",
        "mistral-7b",
        "smollm2-135m-instruct",
    } <= tunable
    assert "llama-3.1-8b-instruct" not in tunable


@pytest.mark.parametrize(
    ("name", "canonical"),
    [
        ("phi-3-mini-4k-instruct", "phi-3-mini-4k-instruct"),
        ("microsoft/Phi-3-mini-4k-instruct", "phi-3-mini-4k-instruct"),
        ("Phi-3-mini-4k-instruct", "phi-3-mini-4k-instruct"),
        ("PHI-4", "phi-4"),
        ("Mistral-7B-Instruct-v0.3", "mistral-7b-instruct"),
        ("google/gemma-3-4b-it", "gemma-3-4b-instruct"),
        ("smollm2", "smollm2-135m-instruct"),
        ("HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2-135m-instruct"),
    ],
)
def test_names_resolve(name: str, canonical: str) -> None:
    found = load_catalogs().resolve_preset(name)
    assert found is not None and found.name == canonical


def test_close_matches() -> None:
    c = load_catalogs()
    assert "phi-3-mini-4k-instruct" in c.close_presets("phi3-mini")
    assert c.close_presets("qwen-coder-32b")[0] == "qwen2.5-coder-32b-instruct"
    assert "Standard_NC6s_v3" in c.close_skus("standard_nc6s_v2")
    assert c.close_presets("zzzzzz") == []


def test_parse_bytes() -> None:
    assert parse_bytes("16Gi") == 16 * GIB
    assert parse_bytes("512Mi") == 512 * 1024**2
    assert parse_bytes("1G") == 10**9
    assert parse_bytes(123) == 123
    assert parse_bytes("27.31Gi") == round(27.31 * GIB)
    with pytest.raises(ValueError, match="not a size"):
        parse_bytes("lots")


def test_operator_file_overrides_extends_and_removes(tmp_path: Path) -> None:
    override = tmp_path / "catalog.yaml"
    override.write_text(
        yaml.safe_dump(
            {
                "skus": [
                    {"name": "Standard_NC6s_v3", "price_per_hour": 1.0},  # a negotiated price
                    {"name": "Standard_NC4as_T4_v3", "remove": True},  # not offered in this region
                    {
                        "name": "my-l40s",
                        "cloud": "azure",
                        "gpus": 4,
                        "gpu": "L40S",
                        "gpu_memory": "48Gi",
                        "price_per_hour": 9,
                    },
                ],
                "presets": [
                    {
                        "name": "my-model",
                        "hf_id": "me/my-model",
                        "weights": "3Gi",
                        "context_limit": 8192,
                        "kv_bytes_per_token": 65536,
                    }
                ],
            }
        )
    )
    c = load_catalogs([override])
    assert c.skus["Standard_NC6s_v3"].price_per_hour == 1.0 and c.skus["Standard_NC6s_v3"].gpus == 1
    assert "Standard_NC4as_T4_v3" not in c.skus
    assert c.skus["my-l40s"].gpu_memory == 48 * GIB
    assert c.resolve_preset("me/my-model") is not None
    assert str(override) in c.sources


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"skuz": []}, "unknown section"),
        ({"skus": {"name": "x"}}, "must be a list"),
        ({"skus": [{"cloud": "azure"}]}, "needs a string 'name'"),
        (
            {
                "skus": [
                    {
                        "name": "x",
                        "cloud": "azure",
                        "gpus": 1,
                        "gpu": "B300",
                        "gpu_memory": "1Gi",
                        "price_per_hour": 1,
                    }
                ]
            },
            "unknown gpu model 'B300'",
        ),
        ({"skus": [{"name": "Standard_NC6s_v3", "gpu_memory": "lots"}]}, "not a size"),
        ({"presets": [{"name": "phi-4", "weigths": "1Gi"}]}, "weigths"),
        (
            {
                "presets": [
                    {
                        "name": "m",
                        "hf_id": "a/m",
                        "weights": 1,
                        "context_limit": 8,
                        "kv_bytes_per_token": 1,
                        "tuning": True,
                    }
                ]
            },
            "tuning needs architecture",
        ),
        ({"presets": [{"name": "phi-4", "quantization": "int3"}]}, "unknown quantization 'int3'"),
    ],
)
def test_bad_operator_file_is_a_clear_error(tmp_path: Path, content: object, message: str) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(content))
    with pytest.raises(CatalogError, match=message):
        load_catalogs([bad])


def test_unreadable_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match="cannot read"):
        load_catalogs([tmp_path / "missing.yaml"])
    broken = tmp_path / "broken.yaml"
    broken.write_text("skus: [\n")
    with pytest.raises(CatalogError, match="cannot read"):
        load_catalogs([broken])
