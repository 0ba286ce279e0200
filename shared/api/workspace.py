"""Pydantic models of the Workspace API, ``kaito.sh/v1alpha1`` and ``kaito.sh/v1beta1``.

Both versions have the same shape (the CRD converts with strategy ``None``), so one set of models
serves both, distinguished by ``apiVersion``. Objects from the apiserver are read leniently
(``extra="ignore"``): we only depend on the fields we own, and a newer CRD must not break an older
service. Admission validation lives in the CRD (``shared.api.crd``), not here.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True, frozen=True)


# Every field's ``description`` is also its description in the CRD (``kubectl explain``):
# ``shared.api.crd`` takes them from here, and fails to generate if a schema field has none.


# KAITO's annotation for the nodes' OS image; its values (any case, spaces trimmed): checked at admission
# (shared.api.policy), put on NodeClaims and AKS pools (services.provisioner.providers).
NODE_IMAGE_FAMILY_ANNOTATION = "kaito.sh/node-image-family"
NODE_IMAGE_FAMILIES = ("ubuntu", "azurelinux")

# KAITO's reserved selector keys (``reservedSelectorLabelKeys``): the labels its controllers, and Kaiten's,
# put on a Workspace's own nodes. A user's selector on them would target another Workspace's nodes, so
# they are dropped from it, as KAITO drops them; a selector of nothing else is refused (the CRD's CEL).
RESERVED_SELECTOR_KEYS = (
    "kaito.sh/workspace",
    "kaito.sh/ragengine",
    "kaito.sh/workspacenamespace",
    "kaito.sh/ragenginenamespace",
    "karpenter.kaito.sh/workspace-name",
    "karpenter.kaito.sh/workspace-namespace",
    "karpenter.kaito.sh/inferenceset",
    "karpenter.kaito.sh/inferenceset-namespace",
)


class LabelSelectorRequirement(_Lenient):
    """A label key, an operator and values."""

    key: str = Field(description="The label key the requirement applies to.")
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"] = Field(
        description="How the key relates to the values: In, NotIn, Exists or DoesNotExist."
    )
    values: list[str] = Field(
        default_factory=list,
        description="The values for In and NotIn (at least one); empty for Exists and DoesNotExist.",
    )


class LabelSelector(_Lenient):
    """Selects the nodes of this Workspace; nodes Kaiten provisions carry these labels."""

    match_labels: dict[str, str] = Field(
        default_factory=dict,
        alias="matchLabels",
        description="Labels every node of this Workspace carries (key: value). Kaiten puts them on the "
        "nodes it provisions; bring-your-own nodes must already have them.",
    )
    match_expressions: list[LabelSelectorRequirement] = Field(
        default_factory=list,
        alias="matchExpressions",
        description="Label requirements the nodes must meet, all of them (ANDed).",
    )

    def as_labels(self) -> dict[str, str]:
        """The labels a node must carry to match, as ``metav1.LabelSelectorAsMap`` reads the selector
        (KAITO): matchLabels and each single-value ``In``. ``NotIn`` and ``DoesNotExist`` need no label;
        ``Exists`` and a multi-valued ``In`` name none (:meth:`unlabelled`)."""
        labels = dict(self.match_labels)
        for e in self.match_expressions:
            if e.operator == "In" and len(e.values) == 1:
                labels[e.key] = e.values[0]
        return labels

    def unlabelled(self) -> list[LabelSelectorRequirement]:
        """The requirements a node Kaiten provisions cannot be labelled to meet."""
        return [
            e
            for e in self.match_expressions
            if e.operator == "Exists" or (e.operator == "In" and len(e.values) > 1)
        ]

    @field_validator("match_labels")
    @classmethod
    def _without_reserved_labels(cls, labels: dict[str, str]) -> dict[str, str]:
        return {k: v for k, v in labels.items() if k not in RESERVED_SELECTOR_KEYS}

    @field_validator("match_expressions")
    @classmethod
    def _without_reserved_expressions(
        cls, expressions: list[LabelSelectorRequirement]
    ) -> list[LabelSelectorRequirement]:
        return [e for e in expressions if e.key not in RESERVED_SELECTOR_KEYS]


# NVIDIA's MIG profiles KAITO knows (A30, A100 40/80 GB, H100 94 GB, H100/H200 96 GB…: mig.knownProfiles)
MIG_PROFILES = (
    "1g.5gb", "1g.6gb", "1g.10gb", "1g.12gb", "1g.20gb", "1g.24gb",
    "2g.10gb", "2g.12gb", "2g.20gb", "2g.24gb",
    "3g.20gb", "3g.40gb", "3g.47gb", "3g.48gb",
    "4g.20gb", "4g.24gb", "4g.40gb", "4g.47gb", "4g.48gb",
    "7g.40gb", "7g.80gb", "7g.94gb", "7g.96gb",
)  # fmt: skip


class PartitionSpec(_Lenient):
    """GPU partitioning (KAITO v1beta1): a MIG slice, or several whole GPUs, on bring-your-own nodes.
    Kaiten accepts and checks it as KAITO does, and refuses to plan it as a KAITO install with its
    feature gates off does (docs/kaito-compatibility.md)."""

    mode: Literal["mig", "accelerator"] = Field(
        description="The partitioning: mig (one NVIDIA Multi-Instance GPU slice) or accelerator (count "
        "whole GPUs)."
    )
    profile: str | None = Field(
        default=None, description="For mig: the MIG profile, e.g. 1g.10gb or 3g.40gb. Not for accelerator."
    )
    count: int | None = Field(
        default=None, description="For accelerator (required there): how many whole GPUs, at least 1."
    )


class ResourceSpec(_Lenient):
    """The GPU nodes to run the workload on. If fewer nodes than needed match instanceType and
    labelSelector, the provisioner creates the rest before the workload is deployed; the nodes used are
    listed in status.workerNodes."""

    count: int = Field(
        1,
        description="The number of GPU nodes (default 1; the planner may need more to fit the model, "
        "see status.targetNodeCount). Tuning runs on one node.",
    )
    instance_type: str | None = Field(
        default=None,
        alias="instanceType",
        description="The GPU node SKU, e.g. Standard_NC6s_v3 (Azure) or g5.xlarge (AWS). Omit it to let "
        "the planner choose the cheapest that fits the model; leave it empty for bring-your-own nodes. "
        "Immutable.",
    )
    label_selector: LabelSelector = Field(
        alias="labelSelector",
        description="The labels the GPU nodes must carry. Immutable.",
    )
    preferred_nodes: list[str] = Field(
        default_factory=list,
        alias="preferredNodes",
        description="Existing nodes to use first (KAITO deprecates it in v1beta1). A node without the "
        "required labels is ignored; the remaining nodes are provisioned.",
    )
    partition: PartitionSpec | None = Field(
        default=None,
        description="GPU partitioning on bring-your-own nodes (KAITO v1beta1). Immutable. Kaiten checks it "
        "and does not plan it yet (reason PartitionUnsupported).",
    )


class PresetOptions(_Lenient):
    """Options of a preset model."""

    image: str | None = Field(
        default=None,
        description="A private model image (with accessMode private): the model's weights in an OCI "
        "image. KAITO deprecates it in v1beta1.",
    )
    image_pull_secrets: list[str] = Field(
        default_factory=list,
        alias="imagePullSecrets",
        description="Secrets in the Workspace's namespace for pulling the model image.",
    )
    model_access_secret: str | None = Field(
        default=None,
        alias="modelAccessSecret",
        description="A Secret in the Workspace's namespace holding the model hub access token under "
        "the key HF_TOKEN (gated models such as Llama).",
    )


class PresetSpec(_Lenient):
    """The base model to load, by its preset name, with preset configurations."""

    name: str = Field(
        description="The preset's name, e.g. phi-3-mini-4k-instruct (`kaiten plan --presets` lists "
        "them). Immutable."
    )
    access_mode: Literal["public", "private"] | None = Field(
        default=None,
        alias="accessMode",
        description="Whether the model image is in a public (default) or a private registry; private "
        "needs presetOptions.image. KAITO deprecates it in v1beta1.",
    )
    preset_options: PresetOptions | None = Field(
        default=None,
        alias="presetOptions",
        description="Where to get the model from, and with which secrets.",
    )


class AdapterSource(_Lenient):
    """Where to obtain the adapter."""

    name: str = Field(
        description="The adapter's name, unique in the Workspace; requests select it by this name."
    )
    image: str | None = Field(
        default=None,
        description="The OCI image holding the adapter (adapter_config.json and the weights), as a tuning "
        "Workspace pushes it (KAITO's layout, or oras named files). Set image or volumeSource.",
    )
    image_pull_secrets: list[str] = Field(
        default_factory=list,
        alias="imagePullSecrets",
        description="Secrets in the Workspace's namespace for pulling the adapter image.",
    )
    volume_source: dict[str, Any] | None = Field(
        default=None,
        alias="volumeSource",
        description="A Kubernetes volume source (a PVC, for example) holding the adapter files at its root; "
        "mounted at /mnt/adapter/<name>, as KAITO mounts it.",
    )


class AdapterSpec(_Lenient):
    """A LoRA adapter served on top of the base model."""

    source: AdapterSource = Field(description="Where to obtain the adapter data.")
    strength: str | None = Field(
        default=None,
        description="The multiplier applied to the adapter's weights, a number between 0 and 1 as a "
        'string, e.g. "0.5" (default "1.0").',
    )

    @property
    def weight(self) -> float:
        return float(self.strength) if self.strength is not None else 1.0


class PodTemplate(_Lenient):
    """A pod template for a custom model, instead of a preset."""

    metadata: dict[str, Any] = Field(
        default_factory=dict, description="The pod's metadata (labels, annotations)."
    )
    spec: dict[str, Any] = Field(
        default_factory=dict, description="The pod's spec (containers, volumes, ...)."
    )


class InferenceSpec(_Lenient):
    """Serve a model: a preset (with optional adapters) or a custom pod template."""

    preset: PresetSpec | None = Field(
        default=None, description="The base model to deploy with preset configurations."
    )
    config: str | None = Field(
        default=None,
        description="The name of a ConfigMap in the Workspace's namespace holding inference arguments "
        "(inference_config.yaml).",
    )
    template: PodTemplate | None = Field(
        default=None,
        description="The pod template that runs a custom inference service, when no preset fits; set "
        "either preset or template.",
    )
    adapters: list[AdapterSpec] = Field(
        default_factory=list,
        description="LoRA adapters applied to the preset model, each with its strength (at most 10).",
    )


class DataSource(_Lenient):
    """Where the tuning data comes from: exactly one of urls, image or volumeSource."""

    name: str | None = Field(default=None, description="The dataset's name.")
    urls: list[str] = Field(
        default_factory=list,
        description="http(s) URLs of the data files (JSON Lines, JSON, CSV or Parquet). They may carry "
        "credentials (a SAS token): Kaiten keeps them in a Secret, never in logs or status.",
    )
    image: str | None = Field(
        default=None, description="An OCI image with the data under /data (as KAITO lays it out)."
    )
    image_pull_secrets: list[str] = Field(
        default_factory=list,
        alias="imagePullSecrets",
        description="Secrets in the Workspace's namespace for pulling the data image.",
    )
    volume_source: dict[str, Any] | None = Field(
        default=None,
        alias="volumeSource",
        description="A Kubernetes volume source (a PVC, for example) holding the data.",
    )


class DataDestination(_Lenient):
    """Where the tuned adapter goes: exactly one of image or volumeSource."""

    image: str | None = Field(
        default=None,
        description="The OCI image the adapter is pushed to (needs imagePushSecret); serve it with "
        "inference.adapters[].source.image.",
    )
    image_push_secret: str | None = Field(
        default=None,
        alias="imagePushSecret",
        description="A Secret in the Workspace's namespace (a docker-config-json) allowed to push the "
        "output image.",
    )
    volume_source: dict[str, Any] | None = Field(
        default=None,
        alias="volumeSource",
        description="A Kubernetes volume source to write the adapter to.",
    )


class TuningSpec(_Lenient):
    """Fine-tune a preset model with a parameter-efficient method and publish the adapter."""

    preset: PresetSpec = Field(description="The model to load for tuning.")
    method: Literal["lora", "qlora"] = Field(
        "lora",
        description="The parameter-efficient fine-tuning method: lora (default) or qlora (4-bit base model).",
    )
    config: str | None = Field(
        default=None,
        description="The name of a ConfigMap in the Workspace's namespace with tuning arguments; unset: "
        "the defaults of the method.",
    )
    input: DataSource = Field(description="The training data.")
    output: DataDestination = Field(description="Where to store the adapter.")


class Condition(_Lenient):
    """One aspect of the Workspace's state (Kubernetes' condition convention)."""

    type: str = Field(
        description="ResourceReady, InferenceReady, JobStarted, WorkspaceSucceeded (KAITO's), or a finer "
        "one: Planned, NodesReady, NodeClaimReady, ..."
    )
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field("", description="A CamelCase reason for the status, for programs.")
    message: str = Field("", description="What happened, for people.")
    observed_generation: int | None = Field(
        default=None,
        alias="observedGeneration",
        description="The metadata.generation the condition was derived from.",
    )
    last_transition_time: str | None = Field(
        default=None,
        alias="lastTransitionTime",
        description="When the status last changed.",
    )


class PlanSummary(_Lenient):
    """Summary of the planner's current plan (the full plan is in the plan.resolved event)."""

    instance_type: str = Field("", alias="instanceType", description="The node SKU the plan uses.")
    nodes: int = Field(0, description="Nodes the plan needs.")
    gpus_per_node: int = Field(0, alias="gpusPerNode", description="GPUs used on each node.")
    engine: str = Field("", description="The inference engine: vllm, or cpu without a GPU.")
    dtype: str = Field("", description="The weights' data type, e.g. float16 or bfloat16.")
    max_model_len: int = Field(0, alias="maxModelLen", description="The context length, in tokens.")
    parallelism: str = Field(
        "", description="Tensor, pipeline and data parallel degrees, e.g. 'TP2 PP1 DP1'."
    )
    observed_generation: int = Field(
        0, alias="observedGeneration", description="The metadata.generation the plan was made for."
    )


WorkspaceState = Literal["Pending", "Ready", "NotReady", "Running", "Succeeded", "Failed"]


class WorkspaceStatus(_Lenient):
    """The observed state of the Workspace, written by Kaiten."""

    worker_nodes: list[str] = Field(
        default_factory=list,
        alias="workerNodes",
        description="The nodes chosen to run the workload.",
    )
    state: WorkspaceState | None = Field(
        default=None,
        description="The high-level state, as KAITO reports it. Inference: Pending, then Ready, or "
        "NotReady once it has been up. Tuning: Pending, Running, Succeeded or Failed.",
    )
    conditions: list[Condition] = Field(
        default_factory=list, description="The current conditions of the Workspace."
    )
    cleaned_up_by: list[str] = Field(
        default_factory=list,
        alias="cleanedUpBy",
        description="Owners of external state (provisioner, workload) that finished cleaning up after a "
        "delete; the finalizer goes when all have.",
    )
    target_node_count: int | None = Field(
        default=None,
        alias="targetNodeCount",
        description="The number of GPU nodes the current plan needs (KAITO's field).",
    )
    plan: PlanSummary | None = Field(default=None, description=PlanSummary.__doc__)
    condition_event_times: dict[str, int] = Field(
        default_factory=dict,
        alias="conditionEventTimes",
        description="Kaiten's bookkeeping: for each condition, when the event that last set it occurred "
        "(microseconds since the epoch). An event older than this is a late redelivery and does not "
        "change the condition.",
    )


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


class WorkspaceSpec(_Lenient):
    """The user's intent: the top-level spec fields of a Workspace (KAITO's Workspace has no ``spec``
    wrapper), without metadata and status. Events carry it typed (``shared.events``): the watcher
    validates it once, where it reads the object, and every service downstream reads fields."""

    resource: ResourceSpec = Field(description=ResourceSpec.__doc__)
    inference: InferenceSpec | None = Field(
        default=None, description="Serve a model. Set exactly one of inference and tuning."
    )
    tuning: TuningSpec | None = Field(
        default=None, description="Fine-tune a model. Set exactly one of inference and tuning."
    )

    def as_json(self) -> dict[str, Any]:
        """The spec as the user wrote it (camelCase, unset fields left out): what goes on the wire."""
        return self.model_dump(mode="json", by_alias=True, exclude_unset=True)


class Workspace(WorkspaceSpec):
    """A model to serve (inference) or fine-tune (tuning), and the GPU nodes for it."""

    # Either served version; ``api_version`` tells which it was read as.

    api_version: Literal["kaito.sh/v1alpha1", "kaito.sh/v1beta1"] = Field(
        alias="apiVersion",
        description="The versioned schema of this object: kaito.sh/v1alpha1 or kaito.sh/v1beta1 (the "
        "same schema; v1beta1 is stored).",
    )
    kind: Literal["Workspace"] = Field("Workspace", description="Workspace.")
    metadata: ObjectMeta = Field(description="The object's metadata; the name must be a DNS label.")
    status: WorkspaceStatus = Field(WorkspaceStatus(), description=WorkspaceStatus.__doc__)

    @classmethod
    def of(cls, spec: WorkspaceSpec, *, api_version: str, metadata: ObjectMeta) -> Workspace:
        """The Workspace a typed spec describes (its sections are taken as they are, not re-validated)."""
        fields = {name: getattr(spec, name) for name in SPEC_FIELDS if name in spec.model_fields_set}
        return cls.model_validate({"apiVersion": api_version, "metadata": metadata, **fields})

    def spec(self) -> WorkspaceSpec:
        return WorkspaceSpec.model_validate(
            {name: getattr(self, name) for name in SPEC_FIELDS if name in self.model_fields_set}
        )

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
