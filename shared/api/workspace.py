"""Pydantic models of the Workspace API, ``kaito.sh/v1alpha1`` and ``kaito.sh/v1beta1``.

Both versions have the same shape (the CRD converts with strategy ``None``), so one set of models
serves both, distinguished by ``apiVersion``. Objects from the apiserver are read leniently
(``extra="ignore"``): we only depend on the fields we own, and a newer CRD must not break an older
service. Admission validation lives in the CRD (``shared.api.crd``), not here.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True, frozen=True)


class LabelSelectorRequirement(_Lenient):
    key: str
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: list[str] = []


class LabelSelector(_Lenient):
    match_labels: dict[str, str] = Field(default_factory=dict, alias="matchLabels")
    match_expressions: list[LabelSelectorRequirement] = Field(default_factory=list, alias="matchExpressions")


class ResourceSpec(_Lenient):
    count: int = 1
    instance_type: str | None = Field(default=None, alias="instanceType")
    label_selector: LabelSelector = Field(alias="labelSelector")
    preferred_nodes: list[str] = Field(default_factory=list, alias="preferredNodes")


class PresetOptions(_Lenient):
    image: str | None = None
    image_pull_secrets: list[str] = Field(default_factory=list, alias="imagePullSecrets")
    model_access_secret: str | None = Field(default=None, alias="modelAccessSecret")


class PresetSpec(_Lenient):
    name: str
    access_mode: Literal["public", "private"] | None = Field(default=None, alias="accessMode")
    preset_options: PresetOptions | None = Field(default=None, alias="presetOptions")


class AdapterSource(_Lenient):
    name: str
    image: str
    image_pull_secrets: list[str] = Field(default_factory=list, alias="imagePullSecrets")


class AdapterSpec(_Lenient):
    source: AdapterSource
    strength: str | None = None

    @property
    def weight(self) -> float:
        return float(self.strength) if self.strength is not None else 1.0


class InferenceSpec(_Lenient):
    preset: PresetSpec | None = None
    config: str | None = None
    template: dict[str, Any] | None = None
    adapters: list[AdapterSpec] = []


class DataSource(_Lenient):
    name: str | None = None
    urls: list[str] = []
    image: str | None = None
    image_pull_secrets: list[str] = Field(default_factory=list, alias="imagePullSecrets")
    volume_source: dict[str, Any] | None = Field(default=None, alias="volumeSource")


class DataDestination(_Lenient):
    image: str | None = None
    image_push_secret: str | None = Field(default=None, alias="imagePushSecret")
    volume_source: dict[str, Any] | None = Field(default=None, alias="volumeSource")


class TuningSpec(_Lenient):
    preset: PresetSpec
    method: Literal["lora", "qlora"] = "lora"
    config: str | None = None
    input: DataSource
    output: DataDestination


class Condition(_Lenient):
    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str = ""
    message: str = ""
    observed_generation: int | None = Field(default=None, alias="observedGeneration")
    last_transition_time: str | None = Field(default=None, alias="lastTransitionTime")


class WorkspaceStatus(_Lenient):
    worker_nodes: list[str] = Field(default_factory=list, alias="workerNodes")
    conditions: list[Condition] = []
    cleaned_up_by: list[str] = Field(default_factory=list, alias="cleanedUpBy")
    target_node_count: int | None = Field(default=None, alias="targetNodeCount")


class ObjectMeta(_Lenient):
    name: str
    namespace: str = "default"
    uid: str = ""
    generation: int = 0
    resource_version: str = Field(default="", alias="resourceVersion")
    labels: dict[str, str] = {}
    annotations: dict[str, str] = {}
    finalizers: list[str] = []
    deletion_timestamp: str | None = Field(default=None, alias="deletionTimestamp")


class Workspace(_Lenient):
    """A Workspace of either served version; ``api_version`` tells which."""

    api_version: Literal["kaito.sh/v1alpha1", "kaito.sh/v1beta1"] = Field(alias="apiVersion")
    kind: Literal["Workspace"] = "Workspace"
    metadata: ObjectMeta
    resource: ResourceSpec
    inference: InferenceSpec | None = None
    tuning: TuningSpec | None = None
    status: WorkspaceStatus = WorkspaceStatus()

    @property
    def mode(self) -> Literal["inference", "tuning"]:
        return "tuning" if self.tuning is not None else "inference"

    @property
    def preset_name(self) -> str | None:
        section = self.tuning if self.tuning is not None else self.inference
        return section.preset.name if section is not None and section.preset is not None else None


class WorkspaceV1Alpha1(Workspace):
    api_version: Literal["kaito.sh/v1alpha1"] = Field(default="kaito.sh/v1alpha1", alias="apiVersion")


class WorkspaceV1Beta1(Workspace):
    api_version: Literal["kaito.sh/v1beta1"] = Field(default="kaito.sh/v1beta1", alias="apiVersion")


SPEC_FIELDS = ("resource", "inference", "tuning")


def spec_of(obj: dict[str, Any]) -> dict[str, Any]:
    """The user's intent: the top-level spec fields, without metadata and status."""
    return {key: obj[key] for key in SPEC_FIELDS if key in obj}
