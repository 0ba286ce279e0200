"""Pure rendering: a Workspace spec and its Plan → the serving application's config (the dict
``services.serving.app.ServingConfig`` validates) and its Ray Serve application entry.

Services are independent of one another, so this renders plain data; the serving app is the one that
validates it (and ``tests/test_workload_render.py`` checks every rendering against ``ServingConfig``).
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable
from typing import Any

from shared.api.workspace import Workspace
from shared.events import WorkspaceRef
from shared.oci import OciError, is_local
from shared.planning.model import Plan

SERVING_IMPORT_PATH = "services.serving.app:build"


class RenderError(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def app_name(ref: WorkspaceRef) -> str:
    return f"{ref.namespace}--{ref.name}"


def route_prefix(ref: WorkspaceRef) -> str:
    return f"/{ref.namespace}/{ref.name}"


def model_source(plan: Plan) -> dict[str, Any]:
    runtime = plan.runtime or {}
    if runtime.get("gguf_package") and runtime.get("gguf_file"):
        return {
            "kind": "package",
            "path": str(runtime["gguf_package"]).replace("-", "_"),
            "file": runtime["gguf_file"],
        }
    return {"kind": "hf", "path": plan.model}


ADAPTERS_PATH = "/mnt/adapter"  # KAITO's DefaultAdapterVolumePath: a volume adapter at <it>/<name>


def adapter_path(name: str) -> str:
    return f"{ADAPTERS_PATH}/{name}"


def local_adapter_paths(workspace: Workspace, config: dict[str, Any]) -> None:
    """On this machine (the local backend) a volume adapter must be a ``hostPath``: its directory is
    the adapter's path. Other volume kinds need a cluster."""
    sources = {a.source.name: a.source for a in (workspace.inference.adapters if workspace.inference else [])}
    for adapter in config.get("adapters", []):
        source = sources.get(adapter["name"])
        if source is None or source.volume_source is None:
            continue
        adapter["path"] = _host_path(
            source.volume_source, "InvalidAdapter", f"adapter {source.name}: volumeSource"
        )


def serving_config(
    workspace: Workspace, plan: Plan, pull_secret_dir: Callable[[str], str] = str
) -> dict[str, Any]:
    """``pull_secret_dir`` maps an adapter's pull Secret name to where the replica finds its docker
    config json (a mounted volume in a cluster; a 0600 copy on the local machine)."""
    inference = workspace.inference
    if inference is None or inference.preset is None:
        raise RenderError(
            "UnsupportedWorkspace", "only preset inference Workspaces are served (not templates)"
        )
    adapters = []
    for adapter in inference.adapters:
        try:
            strength = adapter.weight
        except ValueError as exc:
            raise RenderError(
                "InvalidAdapter",
                f"adapter {adapter.source.name}: strength {adapter.strength!r} is not a number",
            ) from exc
        if not 0 <= strength <= 1:
            raise RenderError(
                "InvalidAdapter", f"adapter {adapter.source.name}: strength {strength} is not within 0..1"
            )
        source = adapter.source
        if source.volume_source is not None:  # mounted where KAITO mounts it (manifests.adapter_volumes)
            adapters.append({"name": source.name, "path": adapter_path(source.name), "strength": strength})
            continue
        adapters.append(
            {
                "name": source.name,
                "image": source.image,
                "strength": strength,
                "pull_secrets": [pull_secret_dir(s) for s in source.image_pull_secrets],
            }
        )
    gpus = plan.gpus_per_node if plan.tensor_parallel * plan.pipeline_parallel == 1 else 0
    return {
        "model_name": plan.preset,
        "source": model_source(plan),
        "engine": plan.engine,
        "engine_args": dict(plan.engine_args),
        "adapters": adapters,
        "replicas": max(1, plan.data_parallel),
        "num_gpus": float(gpus),
        "max_prompt_tokens": min(plan.max_model_len, 4096),
    }


def serve_application(
    ref: WorkspaceRef, config: dict[str, Any], env: dict[str, str] | None = None
) -> dict[str, Any]:
    """One entry of a Serve config's ``applications`` (the REST API and RayService ``serveConfigV2``);
    ``env``: variables for its replicas (where their traces go)."""
    app: dict[str, Any] = {
        "name": app_name(ref),
        "route_prefix": route_prefix(ref),
        "import_path": SERVING_IMPORT_PATH,
        "args": config,
    }
    if env:
        app["runtime_env"] = {"env_vars": env}
    return app


def job_id(ref: WorkspaceRef, generation: int) -> str:
    """The Ray job submission id: the idempotency key (Ray refuses a second job with it)."""
    return f"kaiten-{ref.namespace}-{ref.name}-g{generation}-{ref.uid[:8]}"


TUNING_CONFIG_KEY = "training_config.yaml"
TUNING_SECTIONS = (  # KAITO's TrainingConfig sections (tuning_config_validation.go)
    "ModelConfig",
    "QuantizationConfig",
    "LoraConfig",
    "TrainingArguments",
    "DatasetConfig",
    "DataCollator",
)


def kaito_sections(data: dict[str, str] | None, *, name: str, namespace: str, method: str) -> dict[str, Any]:
    """KAITO's tuning ConfigMap (``data``: its data; ``None``: the Workspace names none) → its
    ``training_config`` sections, checked as KAITO's webhook checks them, with KAITO's messages: the
    key, YAML, known sections, ``load_in_4bit``/``load_in_8bit`` booleans and not both, ``lora`` not
    quantized and ``qlora`` quantized (when the ConfigMap has a QuantizationConfig; without one qlora is
    4-bit NF4 where KAITO refuses), ``output_dir`` a directory under ``/mnt``."""
    import yaml

    if data is None:
        return {}
    where = f"in ConfigMap '{name}' in namespace '{namespace}'"
    if TUNING_CONFIG_KEY not in data:
        raise _invalid(
            f"ConfigMap '{name}' does not contain '{TUNING_CONFIG_KEY}' in namespace '{namespace}'",
        )
    try:
        doc = yaml.safe_load(data[TUNING_CONFIG_KEY]) or {}
    except yaml.YAMLError as exc:
        message = " ".join(str(exc).split())
        raise _invalid(f"Failed to parse '{TUNING_CONFIG_KEY}' {where}: {message}") from exc
    sections = doc.get("training_config") if isinstance(doc, dict) else None
    if not isinstance(sections, dict):
        raise _invalid(f"Expected 'training_config' key to contain a map ({where})")
    for section in sections:
        if section not in TUNING_SECTIONS:
            known = ", ".join(TUNING_SECTIONS)
            raise _invalid(f"Unrecognized section: {section} ({where}; known: {known})")
    _check_quantization(sections.get("QuantizationConfig"), name, method)
    _check_output_dir(sections.get("TrainingArguments"), where)
    return sections


def _check_quantization(section: object, name: str, method: str) -> None:
    if section is None:
        return
    if not isinstance(section, dict):
        raise _invalid(f"QuantizationConfig in ConfigMap '{name}' must be a mapping")
    bits = {}
    for key in ("load_in_4bit", "load_in_8bit"):
        value = section.get(key)
        if value is not None and not isinstance(value, bool):
            raise _invalid(
                f"{key}: value must be either nil or a boolean, got {type(value).__name__} {value!r} "
                f"(ConfigMap '{name}')",
            )
        bits[key] = bool(value)
    if bits["load_in_4bit"] and bits["load_in_8bit"]:
        raise _invalid(
            f"Cannot set both 'load_in_4bit' and 'load_in_8bit' to true in ConfigMap '{name}'",
        )
    if method == "lora" and any(bits.values()):
        raise _invalid(
            f"For method 'lora', 'load_in_4bit' or 'load_in_8bit' in ConfigMap '{name}' must not be true",
        )
    if method == "qlora" and not any(bits.values()):
        raise _invalid(
            f"For method 'qlora', either 'load_in_4bit' or 'load_in_8bit' must be true in ConfigMap '{name}'",
        )


def _check_output_dir(section: object, where: str) -> None:
    """KAITO's rule, though the job writes where it decides (``services.tuning.train``): a manifest
    Kaiten takes is one KAITO takes."""
    if not isinstance(section, dict) or "output_dir" not in section:
        return
    value = section["output_dir"]
    if not isinstance(value, str):
        raise _invalid(f"output_dir is not a string {where}")
    clean = posixpath.normpath("/mnt/" + value)  # Go's filepath.Join: an absolute value stays under /mnt
    if not clean.startswith("/mnt/"):
        raise _invalid(f"Invalid output_dir specified: '{value}', must be a directory")


def _host_path(source: dict[str, Any], reason: str, what: str) -> str:
    """A volumeSource that is a ``hostPath``: its directory on this machine; another kind needs a
    cluster (the local backend runs no pods)."""
    host = source.get("hostPath")
    if not isinstance(host, dict) or not str(host.get("path", "")).startswith("/"):
        kinds = ", ".join(sorted(source)) or "none"
        raise RenderError(reason, f"{what} ({kinds}) needs a cluster: the local backend takes a hostPath")
    return str(host["path"])


def local_paths(workspace: Workspace) -> tuple[str | None, str | None]:
    """Where a job on this machine (the local backend) reads its input and writes its output when the
    Workspace names volumes: a ``hostPath`` is a directory here; other volumes and data images need a
    cluster (the kuberay backend mounts them)."""
    tuning = workspace.tuning
    assert tuning is not None
    paths: list[str | None] = []
    for what, source, image in (
        ("input", tuning.input.volume_source, tuning.input.image),
        ("output", tuning.output.volume_source, None),
    ):
        reason = "InputNotSupported" if what == "input" else "OutputNotSupported"
        if image:
            raise RenderError(
                reason, f"tuning.{what}.image needs a cluster: the local backend reads URLs or a hostPath"
            )
        paths.append(None if source is None else _host_path(source, reason, f"tuning.{what}.volumeSource"))
    return paths[0], paths[1]


def _invalid(message: str) -> RenderError:
    return RenderError("InvalidTuningConfig", message)


def tuning_config(
    workspace: Workspace,
    plan: Plan,
    ref: WorkspaceRef,
    generation: int,
    *,
    sections: dict[str, Any],
    push_secret: str | None,
    nats_url: str,
    work_dir: str,
    allow_loopback_urls: bool,
    nats_user: str | None = None,
    urls_env: str | None = None,
    trace: dict[str, str] | None = None,
    input_directory: str | None = None,
    output_directory: str | None = None,
    nats_ca_file: str | None = None,
) -> dict[str, Any]:
    """The tuning job's config (what ``services.tuning.config.TuningJobConfig`` validates).

    ``input_directory``/``output_directory``: where the backend makes a volume (or a data image) of the
    Workspace's input, and its output volume, appear to the job (:func:`local_paths`, or the cluster's
    mounts in ``manifests.rayjob``).

    ``urls_env``: the input URLs are not written here but read by the job from that variable (which a
    cluster fills from a Secret: a URL may carry a credential).

    ``nats_user``: the job's own NATS user (its password reaches it as an environment variable from a
    Secret); it may publish its events and receive replies on its own inbox, not manage the stream.

    ``nats_ca_file``: where the job finds the CA of a TLS bus (the cluster's: in its ConfigMap).

    ``trace``: the submitting span's context (``telemetry.carrier()``), which the job continues."""
    tuning = workspace.tuning
    if tuning is None:
        raise RenderError("UnsupportedWorkspace", "not a tuning Workspace")
    if not tuning.input.urls and not input_directory:
        raise RenderError("InputNotSupported", "the tuning input has no URLs and no directory to read")
    if not tuning.output.image and not output_directory:
        raise RenderError("OutputNotSupported", "the tuning output has no image and no directory to write")
    insecure = False
    if tuning.output.image:
        try:
            insecure = is_local(tuning.output.image)  # a registry on this machine speaks plain http
        except OciError as exc:  # no registry host: the job could never push it
            raise RenderError(exc.reason, str(exc)) from exc
    merged = {**sections}
    if plan.tuning is not None:  # the plan sized memory for this batch and length: keep to it
        merged.setdefault("TrainingArguments", {}).setdefault(
            "per_device_train_batch_size", plan.tuning.batch_size
        )
        merged.setdefault("DatasetConfig", {}).setdefault("max_seq_length", plan.tuning.max_seq_length)
    return {
        "job": job_id(ref, generation),
        "preset": plan.preset,
        "source": model_source(plan),
        "method": tuning.method,
        "sections": merged,
        **(
            {"input_directory": input_directory}
            if input_directory
            else {"input_urls_env": urls_env}
            if urls_env
            else {"input_urls": list(tuning.input.urls)}
        ),
        "output": {
            "image": tuning.output.image,
            "push_secret": push_secret if tuning.output.image else None,
            "insecure": insecure,
            **({"directory": output_directory} if output_directory else {}),
        },
        "work_dir": work_dir,
        "workspace": {"namespace": ref.namespace, "name": ref.name, "uid": ref.uid, "generation": generation},
        "nats_url": nats_url,
        **({"nats_ca_file": nats_ca_file} if nats_ca_file else {}),
        "allow_loopback_urls": allow_loopback_urls,
        **({"trace": trace} if trace else {}),
        **(
            {"nats_user": nats_user, "nats_inbox_prefix": f"_INBOX_{nats_user}", "declare_stream": False}
            if nats_user
            else {}
        ),
    }
