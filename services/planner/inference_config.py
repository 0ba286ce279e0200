"""KAITO's ``inference.config``: a ConfigMap whose ``inference_config.yaml`` holds vLLM arguments.

Pure: the planner's handler reads the ConfigMap and passes its data here (``None`` when it does not
exist). KAITO checks the same things at admission (``inference_config_validation.go``): the ConfigMap
exists, holds ``inference_config.yaml``, which parses, and ``vllm.max-model-len`` is an integer within
the model's context limit. Its messages are kept, with the reason ``InvalidInferenceConfig``.

As in KAITO, the ``vllm:`` entries are vLLM's flags and they win over the planned ones (KAITO appends
them after its own on the command line). Kaiten refuses the few that the plan must decide, because the
nodes and placement follow from them; KAITO's other top-level keys (``max_probe_steps``,
``kv_cache_cpu_memory_utilization``) configure KAITO's own server and are ignored.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import msgspec
import yaml

from shared.planning.model import EngineArg, Plan, Rejection

CONFIG_KEY = "inference_config.yaml"
REASON = "InvalidInferenceConfig"
# Flags the plan decides: the model and its name, the parallel layout the nodes were sized for, and
# where the server listens. Changing them would serve a different model or break the placement.
PLANNED = {
    "model": "the model is the preset's",
    "served-model-name": "clients use the preset's name",
    "tensor-parallel-size": "the parallel layout follows the planned nodes; change resource.instanceType",
    "pipeline-parallel-size": "the parallel layout follows the planned nodes; change resource.instanceType",
    "host": "the serving app decides where vLLM's engine runs",
    "port": "the serving app decides where vLLM's engine runs",
}


@dataclass(frozen=True)
class InferenceConfig:
    name: str  # the ConfigMap's
    vllm: dict[str, EngineArg]


def parse(name: str, namespace: str, data: Mapping[str, str] | None) -> InferenceConfig | Rejection:
    """The ConfigMap's data (``None``: not found) → its vLLM arguments, or KAITO's refusal."""
    if data is None:
        return _refuse(
            f"ConfigMap '{name}' specified in 'config' not found in namespace '{namespace}'; create it, "
            "then change the Workspace's spec (or re-create the Workspace) to plan it again"
        )
    if CONFIG_KEY not in data:
        return _refuse(f"missing field(s): {CONFIG_KEY} in ConfigMap '{name}'")
    try:
        loaded = yaml.safe_load(data[CONFIG_KEY])
    except yaml.YAMLError as exc:
        return _refuse(f"Failed to parse {CONFIG_KEY} in ConfigMap '{name}': {_one_line(exc)}")
    if loaded is None:
        loaded = {}
    if not isinstance(loaded, dict):
        return _refuse(f"Failed to parse {CONFIG_KEY} in ConfigMap '{name}': not a mapping")
    section = loaded.get("vllm") or {}
    if not isinstance(section, dict):
        return _refuse(f"{CONFIG_KEY} in ConfigMap '{name}': 'vllm' must be a mapping of vLLM flags")
    args: dict[str, EngineArg] = {}
    for key, value in section.items():
        text = str(key)
        if text.startswith("-") and not text.startswith("--"):  # vLLM's short aliases (-tp, -q, …)
            return _refuse(f"ConfigMap '{name}': vllm.{text}: write the flag's long name, without dashes")
        flag = text.removeprefix("--").replace("_", "-")  # vLLM takes both spellings: one is checked
        if flag in args:
            return _refuse(f"ConfigMap '{name}': vllm.{flag} is given twice")
        if flag in PLANNED:
            return _refuse(f"ConfigMap '{name}': vllm.{flag} cannot be set: {PLANNED[flag]}")
        if value is None or isinstance(value, (list, dict)):
            return _refuse(
                f"ConfigMap '{name}': vllm.{flag} must be one value (a string, a number or true/false)"
            )
        args[flag] = value
    return InferenceConfig(name=name, vllm=args)


def apply(plan: Plan, config: InferenceConfig, model_limit: int) -> Plan | Rejection:
    """The plan with the ConfigMap's vLLM arguments over its own; ``max-model-len`` is checked against
    the model's limit, as KAITO does. Only a vLLM plan takes them (KAITO checks and passes them only
    for its vLLM runtime); another engine gets a note saying they were not applied."""
    if plan.engine != "vllm":
        if not config.vllm:
            return plan
        note = (
            f"inference.config {config.name}: its vllm arguments are not applied; this plan serves "
            f"with {plan.engine}"
        )
        return msgspec.structs.replace(plan, notes=(*plan.notes, note))
    args = {**plan.engine_args, **config.vllm}
    changes: dict[str, object] = {}
    notes = plan.notes
    if "max-model-len" in config.vllm:
        raw = config.vllm["max-model-len"]
        length = _integer(raw)
        if length is None:
            return _refuse(f"max-model-len must be an integer: {raw!r} (ConfigMap '{config.name}')")
        if length > model_limit:
            return _refuse(
                f"max-model-len {length} exceeds model's maximum supported context window "
                f"{model_limit} (ModelTokenLimit)"
            )
        if length < 1:
            return _refuse(f"max-model-len must be positive: {length} (ConfigMap '{config.name}')")
        if length > plan.max_model_len:
            notes = (
                *notes,
                f"inference.config {config.name}: max-model-len {length} is above the planned "
                f"{plan.max_model_len}, the longest this plan's KV cache was sized to hold twice; vLLM "
                "refuses to start if one sequence of it does not fit",
            )
        args["max-model-len"] = changes["max_model_len"] = length
    if "dtype" in config.vllm:
        changes["dtype"] = str(config.vllm["dtype"])
    shown = ", ".join(f"{k}={v}" for k, v in config.vllm.items()) or "no vllm arguments"
    return msgspec.structs.replace(
        plan,
        engine_args=args,
        explanation=f"{plan.explanation}; inference.config {config.name}: {shown}",
        notes=notes,
        **changes,
    )


def _integer(raw: EngineArg) -> int | None:
    """KAITO's ``strconv.Atoi(strings.TrimSpace(raw))``: a whole number, written as one."""
    if isinstance(raw, (bool, float)):
        return None
    try:
        return int(str(raw).strip())
    except ValueError:
        return None


def _refuse(message: str) -> Rejection:
    return Rejection(reason=REASON, message=message)


def _one_line(exc: yaml.YAMLError) -> str:
    return " ".join(str(exc).split())
