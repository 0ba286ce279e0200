"""The ``workspaces.kaito.sh`` CRD, generated from this one definition.

Every rule that needs no catalog is here (OpenAPI schema + CEL ``x-kubernetes-validations``), so
``kubectl apply`` itself rejects bad input with a message a user can act on. Catalog rules (unknown
preset, model does not fit) are the planner's.

``v1alpha1`` (the seed manifests) and ``v1beta1`` (storage) share one schema, so conversion is
``None``: the apiserver only rewrites ``apiVersion``. Run ``python -m shared.api.crd`` to regenerate
``deploy/crds/kaito.sh_workspaces.yaml``; a test fails if the file is stale.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel

from shared.api.workspace import MIG_PROFILES, RESERVED_SELECTOR_KEYS, Workspace, WorkspaceState

GROUP = "kaito.sh"
PLURAL = "workspaces"
KIND = "Workspace"
VERSIONS = ("v1alpha1", "v1beta1")
STORAGE_VERSION = "v1beta1"
FINALIZER = "kaito.sh/workspace-cleanup"
CRD_PATH = Path(__file__).resolve().parents[2] / "deploy" / "crds" / "kaito.sh_workspaces.yaml"
CHART_CRD_PATH = CRD_PATH.parents[1] / "helm" / "kaiten" / "crds" / CRD_PATH.name  # the same, in the chart

Schema = dict[str, Any]

DNS_SUBDOMAIN = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"


def rule(expr: str, message: str, *, reason: str | None = None, field_path: str | None = None) -> Schema:
    out: Schema = {"rule": expr, "message": message}
    if reason:
        out["reason"] = reason
    if field_path:
        out["fieldPath"] = field_path
    return out


def string(max_length: int = 253, **extra: Any) -> Schema:
    return {"type": "string", "maxLength": max_length, **extra}


def secret_name(what: str) -> Schema:
    # Deliberately loose: the seed manifests carry placeholders such as ACR_REGISTRY_SECRET_HERE and
    # must apply unchanged; a missing Secret is reported in status when it is read.
    return string(
        253,
        minLength=1,
        x_rules=[
            rule(
                "!self.matches('\\\\s')",
                f"{what} must be a Secret name without spaces",
            )
        ],
    )


def string_list(max_items: int, item: Schema) -> Schema:
    return {"type": "array", "maxItems": max_items, "items": item}


def image_ref(what: str) -> Schema:
    return string(
        512,
        minLength=1,
        x_rules=[
            rule(
                "!self.matches('\\\\s')",
                f"{what} must be an image reference without spaces",
            )
        ],
    )


def preserved() -> Schema:
    return {"type": "object", "x-kubernetes-preserve-unknown-fields": True}


def label_selector() -> Schema:
    reserved = list(RESERVED_SELECTOR_KEYS)
    return {
        "type": "object",
        "properties": {
            "matchLabels": {"type": "object", "maxProperties": 32, "additionalProperties": string(63)},
            "matchExpressions": {
                "type": "array",
                "maxItems": 16,
                "items": {
                    "type": "object",
                    "required": ["key", "operator"],
                    "properties": {
                        "key": string(317, minLength=1),
                        "operator": {"type": "string", "enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                        "values": string_list(64, string(63)),
                    },
                    "x-kubernetes-validations": [
                        rule(
                            "self.operator in ['In', 'NotIn'] ? (has(self.values) && size(self.values) > 0)"
                            " : (!has(self.values) || size(self.values) == 0)",
                            "matchExpressions: operators In/NotIn need values, Exists/DoesNotExist take none",
                        )
                    ],
                },
            },
        },
        "x-kubernetes-validations": [
            rule(
                "(has(self.matchLabels) && size(self.matchLabels) > 0) || "
                "(has(self.matchExpressions) && size(self.matchExpressions) > 0)",
                "resource.labelSelector must select something: set matchLabels or matchExpressions",
            ),
            rule(  # the reserved keys are dropped (shared.api.workspace): what is left must select
                f"(has(self.matchLabels) && self.matchLabels.exists(k, !(k in {reserved}))) || "
                f"(has(self.matchExpressions) && self.matchExpressions.exists(e, !(e.key in {reserved})))",
                "resource.labelSelector must select something besides the labels Kaiten and KAITO put on "
                "their own nodes (" + ", ".join(RESERVED_SELECTOR_KEYS[:2]) + ", …), which it ignores",
            ),
            rule(
                "!has(self.matchLabels) || size(self.matchLabels) == 0 || "
                f"self.matchLabels.exists(k, !(k in {list(RESERVED_SELECTOR_KEYS)}))",
                "matchLabels must contain at least one non-reserved label (Kaiten and KAITO ignore "
                + ", ".join(RESERVED_SELECTOR_KEYS[:2])
                + " and the other labels they put on their own nodes)",
            ),
            rule("self == oldSelf", "resource.labelSelector is immutable; create a new Workspace to move it"),
        ],
    }


def resource() -> Schema:
    return {
        "type": "object",
        "required": ["labelSelector"],
        "properties": {
            "count": {
                "type": "integer",
                "minimum": 1,
                "maximum": 64,
                "default": 1,
            },
            "instanceType": string(
                64,
                minLength=1,
                x_rules=[
                    rule(
                        "self.matches('^[A-Za-z0-9][A-Za-z0-9_.-]*$')",
                        "resource.instanceType must look like Standard_NC6s_v3 or "
                        "g5.xlarge (letters, digits, '_', '-', '.')",
                    )
                ],
            ),
            "labelSelector": label_selector(),
            "preferredNodes": {
                "type": "array",
                "maxItems": 64,
                "items": string(253),
                "x-kubernetes-list-type": "set",
            },
            "partition": partition(),
        },
        "x-kubernetes-validations": [
            rule(
                "has(self.instanceType) == has(oldSelf.instanceType) && "
                "(!has(self.instanceType) || self.instanceType == oldSelf.instanceType)",
                "resource.instanceType is immutable; create a new Workspace for another instance type",
            ),
            rule(
                "has(self.partition) == has(oldSelf.partition) && "
                "(!has(self.partition) || self.partition == oldSelf.partition)",
                "resource.partition: field is immutable",
            ),
        ],
    }


def partition() -> Schema:
    """KAITO's ``PartitionSpec`` and the rules of its ``validatePartition`` that need no cluster."""
    return {
        "type": "object",
        "required": ["mode"],
        "properties": {
            "mode": {"type": "string", "enum": ["mig", "accelerator"]},
            "profile": string(32),
            "count": {"type": "integer", "minimum": 1, "maximum": 64},
        },
        "x-kubernetes-validations": [
            rule(
                "self.mode != 'mig' || !has(self.count)",
                "count is only valid for accelerator mode",
                field_path=".count",
            ),
            rule(
                f"self.mode != 'mig' || (has(self.profile) && self.profile in {list(MIG_PROFILES)})",
                f"unknown MIG profile: must be one of {', '.join(sorted(MIG_PROFILES))}",
                field_path=".profile",
            ),
            rule(
                "self.mode != 'accelerator' || !has(self.profile) || self.profile == ''",
                "profile is not valid for accelerator mode",
                field_path=".profile",
            ),
            rule(
                "self.mode != 'accelerator' || has(self.count)",
                "partition.count: Required value (accelerator mode allocates count whole GPUs)",
                field_path=".count",
            ),
        ],
    }


def preset(section: str) -> Schema:
    return {
        "type": "object",
        "required": ["name"],
        "properties": {
            "name": string(
                128,
                minLength=1,
                x_rules=[
                    rule(
                        "self.matches('^[A-Za-z0-9][A-Za-z0-9._/-]*$')",
                        f"{section}.preset.name must be a preset name such as phi-3-mini-4k-instruct",
                    )
                ],
            ),
            "accessMode": {"type": "string", "enum": ["public", "private"]},
            "presetOptions": {
                "type": "object",
                "properties": {
                    "image": image_ref(f"{section}.preset.presetOptions.image"),
                    "imagePullSecrets": string_list(8, secret_name("imagePullSecrets entries")),
                    "modelAccessSecret": secret_name(f"{section}.preset.presetOptions.modelAccessSecret"),
                },
            },
        },
        "x-kubernetes-validations": [
            rule(
                "self.name == oldSelf.name",
                f"{section}.preset.name is immutable; create a new Workspace for another model",
            ),
            rule(  # as KAITO: the whole preset is immutable
                "has(self.presetOptions) == has(oldSelf.presetOptions) && "
                "(!has(self.presetOptions) || self.presetOptions == oldSelf.presetOptions) && "
                "has(self.accessMode) == has(oldSelf.accessMode) && "
                "(!has(self.accessMode) || self.accessMode == oldSelf.accessMode)",
                f"{section}.preset is immutable (presetOptions, accessMode); create a new Workspace",
            ),
            rule(
                "!has(self.accessMode) || self.accessMode == 'public' || "
                "(has(self.presetOptions) && has(self.presetOptions.image))",
                f"{section}.preset.accessMode private needs presetOptions.image",
            ),
        ],
    }


def adapters() -> Schema:
    return {
        "type": "array",
        "maxItems": 10,
        "items": {
            "type": "object",
            "required": ["source"],
            "properties": {
                "source": {
                    "type": "object",
                    "required": ["name"],
                    "x-kubernetes-validations": [
                        rule(
                            "has(self.image) != has(self.volumeSource)",
                            "inference.adapters[].source needs exactly one of image or volumeSource",
                        )
                    ],
                    "properties": {
                        "name": string(
                            63,
                            minLength=1,
                            x_rules=[
                                rule(
                                    "self.matches('^[a-z0-9]([-a-z0-9_.]*[a-z0-9])?$')",
                                    "inference.adapters[].source.name must be lowercase letters, "
                                    "digits, '-', '_', '.'",
                                )
                            ],
                        ),
                        "image": image_ref("inference.adapters[].source.image"),
                        "imagePullSecrets": string_list(8, secret_name("imagePullSecrets entries")),
                        "volumeSource": preserved(),
                    },
                },
                "strength": string(
                    16,
                    x_rules=[
                        rule(
                            "self.matches('^(0(\\\\.[0-9]+)?|1(\\\\.0+)?|\\\\.[0-9]+)$')",
                            'inference.adapters[].strength must be a number between 0 and 1, e.g. "0.5"',
                        )
                    ],
                ),
            },
        },
        "x-kubernetes-validations": [
            rule(
                "self.all(a, self.exists_one(b, b.source.name == a.source.name))",
                "inference.adapters[].source.name must be unique",
            )
        ],
    }


def inference() -> Schema:
    return {
        "type": "object",
        "properties": {
            "preset": preset("inference"),
            "config": string(
                253,
                x_rules=[
                    rule(f"self.matches('{DNS_SUBDOMAIN}')", "inference.config must be a ConfigMap name")
                ],
            ),
            "template": {
                "type": "object",
                "required": ["spec"],
                "x-kubernetes-preserve-unknown-fields": True,
                "properties": {"metadata": preserved(), "spec": preserved()},
            },
            "adapters": adapters(),
        },
        "x-kubernetes-validations": [
            rule(
                "has(self.preset) != has(self.template)", "inference needs exactly one of preset or template"
            ),
            rule(
                "!has(self.adapters) || size(self.adapters) == 0 || has(self.preset)",
                "inference.adapters apply to a preset model: set inference.preset",
            ),
            rule(  # as KAITO: a template may change, but not come or go
                "has(self.template) == has(oldSelf.template)",
                "inference.template cannot be set or unset once the Workspace exists (it may change); "
                "create a new Workspace",
            ),
        ],
    }


def tuning() -> Schema:
    return {
        "type": "object",
        "required": ["preset", "input", "output"],
        "properties": {
            "preset": preset("tuning"),
            "method": {"type": "string", "enum": ["lora", "qlora"], "default": "lora"},
            "config": string(
                253,
                x_rules=[rule(f"self.matches('{DNS_SUBDOMAIN}')", "tuning.config must be a ConfigMap name")],
            ),
            "input": {
                "type": "object",
                "properties": {
                    "name": string(63),
                    "urls": {
                        "type": "array",
                        "minItems": 1,
                        "maxItems": 100,
                        "items": string(
                            2048,
                            x_rules=[
                                rule(
                                    "self.startsWith('https://') || self.startsWith('http://')",
                                    "tuning.input.urls must be http:// or https:// URLs",
                                ),
                                rule("isURL(self)", "tuning.input.urls entries must be valid URLs"),
                            ],
                        ),
                    },
                    "image": image_ref("tuning.input.image"),
                    "imagePullSecrets": string_list(8, secret_name("imagePullSecrets entries")),
                    "volumeSource": preserved(),
                },
                "x-kubernetes-validations": [
                    rule(
                        "[has(self.urls), has(self.image), has(self.volumeSource)].exists_one(x, x)",
                        "tuning.input needs exactly one of urls, image or volumeSource",
                    ),
                    rule(  # as KAITO
                        "has(self.name) == has(oldSelf.name) && "
                        "(!has(self.name) || self.name == oldSelf.name)",
                        "tuning.input.name is immutable",
                    ),
                ],
            },
            "output": {
                "type": "object",
                "properties": {
                    "image": image_ref("tuning.output.image"),
                    "imagePushSecret": secret_name("tuning.output.imagePushSecret"),
                    "volumeSource": preserved(),
                },
                "x-kubernetes-validations": [
                    rule(
                        "has(self.image) != has(self.volumeSource)",
                        "tuning.output needs exactly one of image or volumeSource",
                    ),
                    rule(
                        "!has(self.image) || has(self.imagePushSecret)",
                        "tuning.output.image needs tuning.output.imagePushSecret "
                        "(a docker-config-json Secret allowed to push)",
                    ),
                ],
            },
        },
        "x-kubernetes-validations": [
            rule("self.method == oldSelf.method", "tuning.method is immutable; create a new Workspace"),
        ],
    }


def status() -> Schema:
    condition = {
        "type": "object",
        "required": ["type", "status"],
        "properties": {
            "type": string(316),
            "status": {"type": "string", "enum": ["True", "False", "Unknown"]},
            "reason": string(1024),
            "message": string(32768),
            "observedGeneration": {"type": "integer", "format": "int64", "minimum": 0},
            "lastTransitionTime": {"type": "string", "format": "date-time"},
        },
    }
    return {
        "type": "object",
        "properties": {
            "workerNodes": string_list(256, string(253)),
            "state": {"type": "string", "enum": list(get_args(WorkspaceState))},
            "conditions": {
                "type": "array",
                "maxItems": 64,
                "items": condition,
                "x-kubernetes-list-type": "map",
                "x-kubernetes-list-map-keys": ["type"],
            },
            "targetNodeCount": {
                "type": "integer",
                "format": "int32",
                "minimum": 0,
            },
            "plan": {
                "type": "object",
                "properties": {
                    "instanceType": string(128),
                    "nodes": {"type": "integer", "format": "int32", "minimum": 0},
                    "gpusPerNode": {"type": "integer", "format": "int32", "minimum": 0},
                    "engine": string(32),
                    "dtype": string(32),
                    "maxModelLen": {"type": "integer", "format": "int64", "minimum": 0},
                    "parallelism": string(64),
                    "observedGeneration": {"type": "integer", "format": "int64", "minimum": 0},
                },
            },
            "cleanedUpBy": {
                "type": "array",
                "maxItems": 16,
                "items": string(63),
                "x-kubernetes-list-type": "set",
            },
            "conditionEventTimes": {
                "type": "object",
                "maxProperties": 64,
                "additionalProperties": {"type": "integer", "format": "int64", "minimum": 0},
            },
        },
    }


def workspace_schema() -> Schema:
    return {
        "type": "object",
        "required": ["resource"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "resource": resource(),
            "inference": inference(),
            "tuning": tuning(),
            "status": status(),
        },
        "x-kubernetes-validations": [
            rule(
                "has(self.inference) != has(self.tuning)",
                "a Workspace needs exactly one of inference or tuning",
            ),
            rule(
                "self.metadata.name.size() <= 63 && "
                "self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')",
                "metadata.name must be a DNS label (lowercase letters, digits, '-', starting with a "
                "letter, at most 63 characters): the Workspace's Service is named after it",
            ),
            rule(
                "has(self.inference) == has(oldSelf.inference)",
                "a Workspace cannot switch between inference and tuning; create a new Workspace",
            ),
            rule(
                "!has(self.tuning) || !has(self.resource.count) || self.resource.count == 1",
                "tuning runs on a single node: resource.count must be 1",
            ),
            rule(
                "!has(self.tuning) || !has(self.resource.partition)",
                "GPU partitioning is not supported for tuning workloads",
            ),
        ],
    }


def _lower(schema: Any) -> Any:
    """Turn the ``x_rules`` shorthand into ``x-kubernetes-validations`` (merged)."""
    if isinstance(schema, list):
        return [_lower(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: _lower(value) for key, value in schema.items() if key != "x_rules"}
    if "x_rules" in schema:
        out["x-kubernetes-validations"] = schema["x_rules"] + out.get("x-kubernetes-validations", [])
    return out


class SchemaDrift(ValueError):
    """The CRD's schema and the pydantic models disagree (a field missing on one side, or without a
    description): the CRD is not generated."""


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The model a field holds (itself, in a list, or optional), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) in (list, Union, types.UnionType):
        return next((m for m in map(_model_in, get_args(annotation)) if m is not None), None)
    return None


def describe(schema: Schema, model: type[BaseModel], path: str = "") -> Schema:
    """``schema`` with each property's description taken from the model field of the same (alias)
    name, recursively: the descriptions have one source, the models ``kaiten`` reads Workspaces with."""
    props = schema.get("properties")
    if props is None:  # opaque here (metadata): described by Kubernetes itself
        return schema
    fields = {field.alias or name: field for name, field in model.model_fields.items()}
    if set(props) != set(fields):
        raise SchemaDrift(
            f"{path or model.__name__}: only in the CRD: {sorted(set(props) - set(fields))}; "
            f"only in {model.__name__}: {sorted(set(fields) - set(props))}"
        )
    described = {}
    for key, sub in props.items():
        if not path and key == "metadata":
            described[key] = sub  # Kubernetes' own: the apiserver refuses anything but name rules here
            continue
        field = fields[key]
        if not field.description:
            raise SchemaDrift(f"{path}{key}: {model.__name__}.{key} has no Field(description=...)")
        inner = _model_in(field.annotation)
        if inner is not None and sub.get("type") == "array":
            sub = {**sub, "items": describe(sub["items"], inner, f"{path}{key}[].")}
        elif inner is not None:
            sub = describe(sub, inner, f"{path}{key}.")
        described[key] = {"description": " ".join(field.description.split()), **sub}
    return {**schema, "properties": described}


def printer_columns() -> list[Schema]:
    def cond(name: str, condition: str, priority: int = 0) -> Schema:
        col: Schema = {
            "name": name,
            "type": "string",
            "jsonPath": f'.status.conditions[?(@.type=="{condition}")].status',
        }
        if priority:
            col["priority"] = priority
        return col

    return [
        {"name": "Instance", "type": "string", "jsonPath": ".resource.instanceType"},
        cond("ResourceReady", "ResourceReady"),
        cond("InferenceReady", "InferenceReady"),
        cond("WorkspaceReady", "WorkspaceSucceeded"),
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        {"name": "State", "type": "string", "jsonPath": ".status.state", "priority": 1},
        cond("JobStarted", "JobStarted", priority=1),
        {"name": "Preset", "type": "string", "jsonPath": ".inference.preset.name", "priority": 1},
        {"name": "TuningPreset", "type": "string", "jsonPath": ".tuning.preset.name", "priority": 1},
        {"name": "Nodes", "type": "string", "jsonPath": ".status.workerNodes", "priority": 1},
        {"name": "Target", "type": "integer", "jsonPath": ".status.targetNodeCount", "priority": 1},
        {"name": "Plan", "type": "string", "jsonPath": ".status.plan.instanceType", "priority": 1},
    ]


def crd() -> Schema:
    schema = {
        "description": " ".join((Workspace.__doc__ or "").split()),
        **describe(_lower(workspace_schema()), Workspace),
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{GROUP}", "labels": {"app.kubernetes.io/part-of": "kaiten"}},
        "spec": {
            "group": GROUP,
            "names": {
                "kind": KIND,
                "listKind": "WorkspaceList",
                "plural": PLURAL,
                "singular": "workspace",
                "shortNames": ["wk", "wks"],
                "categories": ["workspace", "kaito", "kaiten"],  # KAITO's, then ours
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": version,
                    "served": True,
                    "storage": version == STORAGE_VERSION,
                    "schema": {"openAPIV3Schema": schema},
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": printer_columns(),
                }
                for version in VERSIONS
            ],
        },
    }


def render() -> str:
    header = "# Generated by `python -m shared.api.crd`; do not edit by hand.\n"
    return header + yaml.safe_dump(crd(), sort_keys=False, width=120)


if __name__ == "__main__":
    for path in (CRD_PATH, CHART_CRD_PATH):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render())
        print(f"wrote {path}", file=sys.stderr)
