"""KAITO's ``inference.config`` (pure): KAITO's checks with its messages, and the vLLM arguments going
over the planned ones (``services/planner/inference_config.py``)."""

from __future__ import annotations

import pytest

from services.planner.inference_config import REASON, InferenceConfig, parse
from services.planner.planning import plan
from shared.api.workspace import Workspace
from shared.planning.catalog import Catalogs, load_catalogs
from shared.planning.model import Plan, Rejection

V100 = "Standard_NC6s_v3"
# KAITO's chart default (charts/kaito/workspace/templates/inference-params.yaml), with max-model-len on
KAITO_TEMPLATE = """\
# Optional: CPU memory utilization for the vllm engine in kv cache offload mode.
kv_cache_cpu_memory_utilization: 0.5

vllm:
  cpu-offload-gb: 0
  gpu-memory-utilization: 0.9
  max-model-len: 2048
"""


@pytest.fixture(scope="module")
def catalogs() -> Catalogs:
    return load_catalogs()


def workspace(preset: str = "phi-3-mini-4k-instruct", instance_type: str = V100) -> Workspace:
    return Workspace.model_validate(
        {
            "apiVersion": "kaito.sh/v1beta1",
            "metadata": {"name": "ws", "namespace": "ns"},
            "resource": {"instanceType": instance_type, "labelSelector": {"matchLabels": {"a": "b"}}},
            "inference": {
                "preset": {"name": preset, "presetOptions": {"modelAccessSecret": "hf-token"}},
                "config": "params",
            },
        }
    )


def parsed(text: str) -> InferenceConfig:
    config = parse("params", "ns", {"inference_config.yaml": text})
    assert isinstance(config, InferenceConfig), config
    return config


def refused(result: object, *gist: str) -> None:
    assert isinstance(result, Rejection), result
    assert result.reason == REASON, result
    for words in gist:
        assert words in result.message, (words, result.message)


def test_kaitos_own_template_is_applied_over_the_plan(catalogs: Catalogs) -> None:
    before = plan(workspace(), catalogs)
    after = plan(workspace(), catalogs, config=parsed(KAITO_TEMPLATE))
    assert isinstance(before, Plan) and isinstance(after, Plan)
    assert before.engine_args["gpu-memory-utilization"] != 0.9  # the plan's own differs
    assert after.engine_args == {
        **before.engine_args,
        "cpu-offload-gb": 0,
        "gpu-memory-utilization": 0.9,
        "max-model-len": 2048,
    }
    assert after.max_model_len == 2048
    assert after.explanation.endswith(
        "; inference.config params: cpu-offload-gb=0, gpu-memory-utilization=0.9, max-model-len=2048"
    )
    # everything else is the plan's: the same nodes, layout and cost
    assert (after.nodes, after.sku, after.tensor_parallel, after.cost_per_hour) == (
        before.nodes,
        before.sku,
        before.tensor_parallel,
        before.cost_per_hour,
    )


def test_an_underscored_max_model_len_is_checked_like_the_dashed_one(catalogs: Catalogs) -> None:
    limit = catalogs.presets["phi-3-mini-4k-instruct"].context_limit
    refused(
        plan(workspace(), catalogs, config=parsed(f"vllm:\n  max_model_len: {limit * 4}\n")),
        "exceeds model's maximum supported context window",
    )


def test_a_quoted_max_model_len_is_an_integer_as_in_kaito(catalogs: Catalogs) -> None:
    after = plan(workspace(), catalogs, config=parsed('vllm:\n  max-model-len: " 1024 "\n'))
    assert isinstance(after, Plan) and after.engine_args["max-model-len"] == 1024


def test_kaitos_messages_for_a_missing_or_broken_config_map() -> None:
    def text(yaml_text: str) -> dict[str, str]:
        return {"inference_config.yaml": yaml_text}

    missing = "ConfigMap 'params' specified in 'config' not found in namespace 'ns'"
    refused(parse("params", "ns", None), missing)
    refused(parse("params", "ns", {"other.yaml": "vllm: {}"}), "inference_config.yaml")
    refused(parse("params", "ns", text("vllm: [unclosed")), "Failed to parse")
    refused(parse("params", "ns", text("- a list")), "not a mapping")
    refused(parse("params", "ns", text("vllm: 3")), "'vllm' must be a mapping")
    refused(parse("params", "ns", text("vllm:\n  x: [1, 2]")), "vllm.x must be one value")


def test_max_model_len_must_be_an_integer_within_the_models_limit(catalogs: Catalogs) -> None:
    limit = catalogs.presets["phi-3-mini-4k-instruct"].context_limit
    refused(
        plan(workspace(), catalogs, config=parsed(f"vllm:\n  max-model-len: {limit + 1}\n")),
        f"max-model-len {limit + 1} exceeds model's maximum supported context window {limit}",
        "(ModelTokenLimit)",
    )
    for bad in ("4k", "2048.0", "true"):
        refused(
            plan(workspace(), catalogs, config=parsed(f"vllm:\n  max-model-len: {bad}\n")),
            "max-model-len must be an integer",
        )
    assert isinstance(plan(workspace(), catalogs, config=parsed(f"vllm:\n  max-model-len: {limit}\n")), Plan)


def test_a_length_above_the_sized_one_is_noted(catalogs: Catalogs) -> None:
    before = plan(workspace("llama-3.1-8b-instruct", "Standard_NV36ads_A10_v5"), catalogs)
    assert isinstance(before, Plan)
    longer = before.max_model_len * 2
    after = plan(
        workspace("llama-3.1-8b-instruct", "Standard_NV36ads_A10_v5"),
        catalogs,
        config=parsed(f"vllm:\n  max-model-len: {longer}\n"),
    )
    assert isinstance(after, Plan) and after.max_model_len == longer
    assert any(f"above the planned {before.max_model_len}" in n for n in after.notes), after.notes


def test_flags_the_plan_decides_are_refused_with_the_field_to_change_instead() -> None:
    refused(
        parse("params", "ns", {"inference_config.yaml": "vllm:\n  tensor-parallel-size: 4\n"}),
        "vllm.tensor-parallel-size cannot be set",
        "resource.instanceType",
    )
    refused(
        parse("params", "ns", {"inference_config.yaml": "vllm:\n  --model: /x\n"}), "vllm.model cannot be set"
    )
    # vLLM reads tensor_parallel_size as tensor-parallel-size: both spellings are one flag here too
    refused(parse("params", "ns", {"inference_config.yaml": "vllm:\n  tensor_parallel_size: 8\n"}),
            "vllm.tensor-parallel-size cannot be set")  # fmt: skip
    refused(
        parse("params", "ns", {"inference_config.yaml": "vllm:\n  -tp: 8\n"}), "write the flag's long name"
    )
    twice = "vllm:\n  max-model-len: 1024\n  max_model_len: 2048\n"
    refused(parse("params", "ns", {"inference_config.yaml": twice}), "vllm.max-model-len is given twice")


def test_a_cpu_plan_notes_that_vllm_arguments_do_not_apply(catalogs: Catalogs) -> None:
    cpu = plan(workspace("smollm2-135m-instruct", "local"), catalogs, config=parsed(KAITO_TEMPLATE))
    assert isinstance(cpu, Plan) and cpu.engine == "transformers"
    assert "cpu-offload-gb" not in cpu.engine_args
    assert any("not applied" in n and "transformers" in n for n in cpu.notes), cpu.notes
    empty = plan(workspace("smollm2-135m-instruct", "local"), catalogs, config=parsed("vllm: {}\n"))
    assert isinstance(empty, Plan) and not empty.notes
