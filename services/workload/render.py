"""Pure rendering: a Workspace spec and its Plan → the serving application's config (the dict
``services.serving.app.ServingConfig`` validates) and its Ray Serve application entry.

Services are independent of one another, so this renders plain data; the serving app is the one that
validates it (and ``tests/test_workload_render.py`` checks every rendering against ``ServingConfig``).
"""

from __future__ import annotations

from typing import Any

from shared.api.workspace import Workspace
from shared.events import WorkspaceRef
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


def serving_config(workspace: Workspace, plan: Plan) -> dict[str, Any]:
    inference = workspace.inference
    if inference is None or inference.preset is None:
        raise RenderError(
            "UnsupportedWorkspace", "only preset inference Workspaces are served (not templates)"
        )
    if inference.adapters:
        raise RenderError(
            "AdaptersNotSupported",
            "adapters from images are not deployed by the local backend yet (issue 7 is open): remove them or"
            " serve them with an adapter directory",
        )
    gpus = plan.gpus_per_node if plan.tensor_parallel * plan.pipeline_parallel == 1 else 0
    return {
        "model_name": plan.preset,
        "source": model_source(plan),
        "engine": plan.engine,
        "engine_args": dict(plan.engine_args),
        "replicas": max(1, plan.data_parallel),
        "num_gpus": float(gpus),
        "max_prompt_tokens": min(plan.max_model_len, 4096),
    }


def serve_application(ref: WorkspaceRef, config: dict[str, Any]) -> dict[str, Any]:
    """One entry of a Serve config's ``applications`` (the REST API and RayService ``serveConfigV2``)."""
    return {
        "name": app_name(ref),
        "route_prefix": route_prefix(ref),
        "import_path": SERVING_IMPORT_PATH,
        "args": config,
    }
