"""``plan(workspace, catalogs, inventory) -> Plan | Rejection``: a pure, deterministic function.

1. Resolve the preset (name, alias, HF id); deprecated or unknown → a rejection with close matches.
2. Choose where it runs:
   - bring-your-own: the provider is ``byo``, or ``instanceType`` is omitted and Ready nodes match the
     labelSelector → plan on those nodes' real GPUs;
   - ``instanceType`` given → that SKU; it must fit at some node count up to ``max_nodes``;
   - omitted → the cheapest SKU of the installation's cloud (price × nodes, fewer nodes on ties, at most
     ``auto_max_nodes``), naming the cheaper SKUs that did not fit and why.
3. Size it (:mod:`services.planner.sizing`): node count, parallelism, dtype, max model length, engine
   arguments, disk, and a one-line explanation with the numbers.
4. Apply the Workspace's ``inference.config`` vLLM arguments over the planned ones, as KAITO does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import msgspec

from services.planner import inference_config, sizing
from services.planner.inference_config import InferenceConfig
from shared.api.workspace import Workspace
from shared.planning.catalog import GIB, Catalogs, GpuModel, Preset, Sku, cc_tuple
from shared.planning.inventory import (
    GPU_PRODUCT,
    INSTANCE_TYPE,
    NodeShape,
    node_shape,
    selected,
    selector_query,
)
from shared.planning.model import EngineArg, Memory, NodeInfo, Plan, Rejection, TuningPlan

Result = Plan | Rejection
PROVISIONING = ("aks", "nodeclaim")  # providers that make the nodes a plan needs (and label them)
BYPASS_ANNOTATION = "kaito.sh/bypass-resource-checks"  # KAITO's: skip the memory check
AZURE_SERIES = ("standard_n", "standard_d")  # KAITO's N_SERIES_PREFIX, D_SERIES_PREFIX


@dataclass(frozen=True)
class PlanOptions:
    cloud: str = "azure"  # the SKUs an omitted instanceType may choose from (azure | aws | local)
    provider: str = ""  # "byo": plan only on existing nodes; "local": only the local machine
    max_nodes: int = 16  # most nodes one Workspace may get with a named instanceType
    auto_max_nodes: int = 4  # most nodes an automatically chosen SKU may need
    context: int = sizing.DEFAULT_CONTEXT  # the context every plan must hold (KAITO: 2048)
    tuning_batch_size: int = 1  # KAITO's default per_device_train_batch_size
    tuning_max_seq_length: int = 1024


@dataclass(frozen=True)
class _Target:
    """One way to run the Workspace: a SKU, and for bring-your-own the nodes that have it."""

    sku: Sku
    gpu: GpuModel | None
    nodes_available: tuple[str, ...] = ()  # BYO: the matching Ready nodes of this shape
    byo: bool = False


def plan(
    workspace: Workspace,
    catalogs: Catalogs,
    inventory: Sequence[NodeInfo] = (),
    options: PlanOptions = PlanOptions(),
    config: InferenceConfig | None = None,
) -> Result:
    """The plan; ``config`` is the Workspace's ``inference.config`` as read (its vLLM arguments go
    over the planned ones: :mod:`services.planner.inference_config`)."""
    result = _plan(workspace, catalogs, inventory, options)
    if isinstance(result, Plan) and not result.byo_nodes and options.provider in PROVISIONING:
        unmet = workspace.resource.label_selector.unlabelled()
        if unmet:  # the nodes to be made carry the selector's labels: these name none
            e = unmet[0]
            return Rejection(
                reason="UnsatisfiableSelector",
                message=f"labelSelector: operator {e.operator!r} on {e.key!r} without a single value "
                "cannot be converted into a single value (KAITO's message): the nodes Kaiten provisions "
                "carry the selector's labels, so use matchLabels or an In with one value (any operator "
                "works on bring-your-own nodes)",
            )
    if config is None or not isinstance(result, Plan) or result.engine == "template":
        return result
    preset = catalogs.resolve_preset(result.preset)
    assert preset is not None  # the plan was made from it
    return inference_config.apply(result, config, preset.context_limit)


def _plan(
    workspace: Workspace,
    catalogs: Catalogs,
    inventory: Sequence[NodeInfo],
    options: PlanOptions,
) -> Result:
    section = workspace.tuning if workspace.tuning is not None else workspace.inference
    if section is None:
        return Rejection(reason="InvalidSpec", message="a Workspace needs inference or tuning")
    if workspace.resource.partition is not None:
        return _partition_refused(workspace, options)
    if section.preset is None:
        return _template(workspace, catalogs, inventory, options)
    preset = catalogs.resolve_preset(section.preset.name)
    if preset is None:
        return _unknown_preset(section.preset.name, catalogs)
    if workspace.tuning is not None and not preset.tuning:
        tunable = sorted(p.name for p in catalogs.presets.values() if p.tuning)
        return Rejection(
            reason="TuningUnsupported",
            message=f"preset {preset.name} has no tuning support; tunable presets: {', '.join(tunable)}",
            close_matches=tuple(catalogs.close_presets(preset.name, 3)),
        )
    secret = section.preset.preset_options.model_access_secret if section.preset.preset_options else None
    if preset.gated and not secret:
        return Rejection(
            reason="ModelAccessSecretRequired",
            message="This preset requires authentication and needs a modelAccessSecret with HF_TOKEN key "
            f"under presetOptions to download the model ({preset.hf_id} is gated on the hub)",
        )
    sizer = _Sizer(workspace, preset, catalogs, options)

    byo = _byo_targets(workspace, catalogs, inventory, options)
    if isinstance(byo, Rejection):
        return byo
    if byo:
        return sizer.best(byo, options.max_nodes, auto=False)

    instance_type = workspace.resource.instance_type
    if instance_type:
        sku = catalogs.sku(instance_type)
        if sku is None:
            close = catalogs.close_skus(instance_type)
            hint = (
                f"; did you mean {', '.join(close)}?"
                if close
                else f"; known: {', '.join(sorted(catalogs.skus))}"
            )
            return Rejection(
                reason="UnknownInstanceType",
                message=f"instance type {instance_type!r} is not in the SKU catalog{hint}",
                close_matches=tuple(close),
            )
        if options.provider == "local" and sku.cloud != "local":
            return Rejection(
                reason="InstanceTypeUnavailable",
                message=(
                    f"this installation runs on the local machine only (provider local); {sku.name} "
                    "cannot be provisioned: omit resource.instanceType or set it to 'local'"
                ),
            )
        return sizer.size(_target(sku, catalogs), options.max_nodes)

    cloud = "local" if options.provider == "local" else options.cloud
    candidates = [_target(s, catalogs) for s in catalogs.skus.values() if s.cloud == cloud]
    if not candidates:
        return Rejection(
            reason="NoInstanceTypes",
            message=f"the SKU catalog has no instance types for cloud {cloud!r}: name resource.instanceType",
        )
    return sizer.best(candidates, options.auto_max_nodes, auto=True)


def uses_existing_nodes(workspace: Workspace, options: PlanOptions) -> bool:
    """Whether existing nodes can carry the plan: always with provider byo; otherwise only when
    ``instanceType`` is omitted, and never on the local provider (it has one machine)."""
    if options.provider == "local":
        return False
    return options.provider == "byo" or not workspace.resource.instance_type


def _target(sku: Sku, catalogs: Catalogs) -> _Target:
    return _Target(sku=sku, gpu=None if sku.is_cpu else catalogs.gpu_models[sku.gpu])


def _partition_refused(workspace: Workspace, options: PlanOptions) -> Rejection:
    """KAITO plans a partition only on bring-your-own nodes and behind a feature gate that is off by
    default; Kaiten has no partitioning yet, so it refuses as such a KAITO does, with KAITO's words."""
    partition = workspace.resource.partition
    assert partition is not None
    if options.provider != "byo":
        return Rejection(
            reason="PartitionUnsupported",
            message="GPU partitioning is only supported with BYO nodes (disableNodeAutoProvisioning=true); "
            f"this installation provisions nodes (provider {options.provider or 'unset'})",
        )
    gate = {
        "mig": ("MIG support", "enableMIG"),
        "accelerator": ("accelerator partition support", "enableAccelerator"),
    }
    what, flag = gate[partition.mode]
    return Rejection(
        reason="PartitionUnsupported",
        message=f"{what} is not enabled, set feature gate {flag}=true (KAITO's message; Kaiten does not "
        "partition GPUs yet): remove resource.partition to run on whole GPUs",
    )


def _unknown_preset(name: str, catalogs: Catalogs) -> Rejection:
    deprecated = catalogs.deprecated.get(name.strip().lower())
    if deprecated is not None:
        instead = f"; use {deprecated.replacement} instead" if deprecated.replacement else ""
        return Rejection(
            reason="DeprecatedPreset",
            message=f"preset {name!r} is deprecated and no longer served{instead}",
            close_matches=(deprecated.replacement,) if deprecated.replacement else (),
        )
    close = catalogs.close_presets(name)
    hint = f"; close matches: {', '.join(close)}" if close else "; `kaiten plan --presets` lists them"
    return Rejection(
        reason="UnknownPreset",
        message=f"preset {name!r} is not in the catalog{hint}",
        close_matches=tuple(close),
    )


def _template(
    workspace: Workspace, catalogs: Catalogs, inventory: Sequence[NodeInfo], options: PlanOptions
) -> Result:
    """A custom pod template cannot be sized: run it on the named instance type, ``count`` nodes, or
    (bring-your-own, no instanceType) on ``count`` existing nodes the labelSelector picks."""
    name = workspace.resource.instance_type
    sku = catalogs.sku(name) if name else None
    if sku is None and not name and uses_existing_nodes(workspace, options):
        return _template_on_existing_nodes(workspace, inventory, options)
    notes: tuple[str, ...] = ()
    if sku is not None:
        gpu = "cpu" if sku.is_cpu else catalogs.gpu_models[sku.gpu].name
    elif name and name.lower().startswith(AZURE_SERIES) and options.cloud == "azure":
        # KAITO takes any Azure N- or D-series name here: the template's own requests say what it needs
        sku, gpu = Sku(name=name, cloud="azure", gpus=0, price_per_hour=0.0), "unknown"
        notes = (
            f"{name} is not in the SKU catalog: its GPUs and price are unknown, so no GPUs are "
            "requested for its nodes; the template's own resource requests apply",
        )
    else:
        return Rejection(
            reason="InstanceTypeRequired",
            message="an inference template has no preset to size: name a known resource.instanceType",
        )
    count = workspace.resource.count
    return _template_plan(
        sku=sku.name,
        cloud=sku.cloud,
        gpu=gpu,
        gpu_memory=sku.gpu_memory,
        count=count,
        gpus_per_node=sku.gpus,
        cost_per_hour=round(sku.price_per_hour * count, 4),
        explanation=f"custom template on {count} × {sku.name} as requested (no preset to size)",
        notes=notes,
    )


def _template_plan(
    *,
    sku: str,
    cloud: str,
    gpu: str,
    gpu_memory: int,
    count: int,
    gpus_per_node: int,
    cost_per_hour: float,
    explanation: str,
    byo_nodes: tuple[str, ...] = (),
    notes: tuple[str, ...] = (),
) -> Plan:
    """A template's plan: ``count`` pods, one per node; nothing sized, no engine of ours."""
    return Plan(
        mode="inference",
        preset="",
        model="",
        sku=sku,
        cloud=cloud,
        gpu=gpu,
        gpu_memory=gpu_memory,
        nodes=count,
        gpus_per_node=gpus_per_node,
        tensor_parallel=1,
        pipeline_parallel=1,
        data_parallel=count,
        dtype="",
        quantization=None,
        max_model_len=0,
        engine="template",
        engine_args={},
        disk_gib=64,
        memory=None,
        cost_per_hour=cost_per_hour,
        byo_nodes=byo_nodes,
        explanation=explanation,
        notes=notes,
    )


def _template_on_existing_nodes(
    workspace: Workspace, inventory: Sequence[NodeInfo], options: PlanOptions
) -> Result:
    resource, count = workspace.resource, workspace.resource.count
    ready = [n for n in selected(resource, inventory) if n.ready]
    if len(ready) < count:
        if not ready and options.provider != "byo":
            return Rejection(
                reason="InstanceTypeRequired",
                message="an inference template has no preset to size: name a known resource.instanceType "
                "or label existing nodes for it",
            )
        return Rejection(
            reason="NoMatchingNodes",
            message=f"an inference template runs on resource.count={count} node(s); "
            f"{len(ready)} Ready node(s) match labelSelector '{selector_query(resource.label_selector)}'",
        )
    nodes = ready[:count]  # preferredNodes first
    gpus = min(n.gpus for n in nodes)
    return _template_plan(
        sku=nodes[0].labels.get(INSTANCE_TYPE, "") or f"node:{nodes[0].name}",
        cloud="byo",
        gpu=nodes[0].labels.get(GPU_PRODUCT, "gpu") if gpus else "cpu",
        gpu_memory=0,
        count=count,
        gpus_per_node=gpus,
        cost_per_hour=0.0,
        byo_nodes=tuple(n.name for n in nodes),
        explanation=f"custom template on {count} existing node(s): {', '.join(n.name for n in nodes)}",
    )


def _byo_targets(
    workspace: Workspace, catalogs: Catalogs, inventory: Sequence[NodeInfo], options: PlanOptions
) -> list[_Target] | Rejection:
    """Targets made of existing nodes, grouped by shape; [] when this is not a BYO Workspace."""
    resource = workspace.resource
    if not uses_existing_nodes(workspace, options):
        return []
    matching = selected(resource, inventory)
    ready = [n for n in matching if n.ready]
    if not ready:
        if options.provider != "byo":
            return []  # nothing to bring: provision instead
        not_ready = [n.name for n in matching if not n.ready]
        extra = f"; matching but not Ready: {', '.join(not_ready)}" if not_ready else ""
        return Rejection(
            reason="NoMatchingNodes",
            message=f"no Ready node matches labelSelector '{selector_query(resource.label_selector)}'{extra}",
        )
    groups: dict[tuple[str, str, int, int, int], tuple[NodeShape, list[str]]] = {}
    problems: list[str] = []
    for node in ready:
        shape = node_shape(node, catalogs)
        if shape.sku is None:
            problems.append(shape.problem)
            continue
        groups.setdefault(shape.key, (shape, []))[1].append(node.name)
    if not groups:
        return Rejection(reason="UnknownNodeGPU", message="; ".join(problems))
    return [
        _Target(sku=shape.sku, gpu=shape.gpu, nodes_available=tuple(names), byo=True)
        for shape, names in groups.values()
        if shape.sku is not None
    ]


class _Sizer:
    """Sizes one Workspace's preset on targets; all the per-target rules live here."""

    def __init__(
        self, workspace: Workspace, preset: Preset, catalogs: Catalogs, options: PlanOptions
    ) -> None:
        self.ws = workspace
        self.preset = preset
        self.catalogs = catalogs
        self.options = options
        self.tuning = workspace.tuning
        self.context = min(options.context, preset.context_limit)
        # KAITO's kaito.sh/bypass-resource-checks (any value): plan a named instance type or the
        # existing nodes even where the model does not fit their GPU memory
        self.bypass = BYPASS_ANNOTATION in workspace.metadata.annotations and workspace.tuning is None

    def need_text(self) -> str:
        kv = sizing.gib(self.context * self.preset.kv_bytes_per_token)
        return f"{sizing.gib(self.preset.weights)} weights + {kv} KV for {self.context} tokens"

    # -- choosing among targets ---------------------------------------------------------------------

    def best(self, targets: Sequence[_Target], max_nodes: int, *, auto: bool) -> Result:
        sized = [(t, self.size(t, max_nodes)) for t in targets]
        fits = [(t, p) for t, p in sized if isinstance(p, Plan)]
        if not fits:
            if len(sized) == 1:
                return sized[0][1]
            by_reason: dict[str, list[str]] = {}
            for t, r in sized:
                if isinstance(r, Rejection):
                    by_reason.setdefault(r.short or r.reason, []).append(t.sku.name)
            reasons = "; ".join(f"{why}: {', '.join(names)}" for why, names in by_reason.items())
            where = "the matching nodes" if targets[0].byo else f"any {targets[0].sku.cloud} instance type"
            return Rejection(
                reason="NoInstanceTypeFits",
                message=f"{self.preset.name} ({self.need_text()}) fits on none of {where} "
                f"within {max_nodes} node(s): {reasons}",
            )
        # cheapest total, then fewer nodes, then the cheaper node, then the name (determinism)
        _, chosen = min(
            fits, key=lambda tp: (tp[1].cost_per_hour, tp[1].nodes, tp[0].sku.price_per_hour, tp[0].sku.name)
        )
        if not auto:
            return chosen
        cheaper = [
            f"{t.sku.name} (${t.sku.price_per_hour:g}/h): {r.short or r.message}"
            for t, r in sorted(sized, key=lambda tp: (tp[0].sku.price_per_hour, tp[0].sku.name))
            if isinstance(r, Rejection) and t.sku.price_per_hour < chosen.cost_per_hour
        ]
        if len(sized) == 1:
            return chosen
        explanation = f"cheapest fit at ${chosen.cost_per_hour:g}/h: {chosen.explanation}"
        return _replace(chosen, explanation=explanation, alternatives=tuple(cheaper))

    # -- one target ---------------------------------------------------------------------------------

    def size(self, target: _Target, max_nodes: int) -> Result:
        if target.sku.is_cpu:
            return self._cpu(target)
        assert target.gpu is not None
        incompatible = self._gpu_compatibility(target)
        if incompatible is not None:
            return incompatible
        if self.tuning is not None:
            return self._gpu_tuning(target)
        return self._gpu_inference(target, max_nodes)

    def _gpu_compatibility(self, target: _Target) -> Rejection | None:
        gpu, preset = target.gpu, self.preset
        assert gpu is not None
        what = f"{target.sku.name} ({gpu.name}, compute capability {gpu.cc})"
        if preset.bf16_only and not gpu.bf16:
            return Rejection(
                reason="IncompatibleGPU",
                message=f"{preset.name} runs only in bfloat16 (float16 overflows) and {what} has no "
                "bfloat16; choose a GPU with compute capability ≥ 8.0 (A10, A100, H100, L4, …)",
                short=f"{gpu.name} has no bfloat16",
            )
        quant = self.catalogs.quantizations.get(preset.quantization) if preset.quantization else None
        if quant is not None and cc_tuple(gpu.cc) < cc_tuple(quant.min_cc):
            return Rejection(
                reason="IncompatibleGPU",
                message=f"{preset.name} is {quant.name}-quantized, which needs compute capability ≥ "
                f"{quant.min_cc}{' and bfloat16' if quant.bf16_only else ''}; {what} does not have it",
                short=f"{quant.name} needs compute capability ≥ {quant.min_cc}",
            )
        if quant is not None and quant.bf16_only and not gpu.bf16:
            return Rejection(
                reason="IncompatibleGPU",
                message=f"{preset.name} is {quant.name}-quantized and its kernels compute in bfloat16; "
                f"{what} has no bfloat16",
                short=f"{quant.name} needs bfloat16",
            )
        return None

    def _dtype(self, gpu: GpuModel | None) -> tuple[str, str]:
        """The dtype, and a note when it differs from the model's own."""
        if gpu is not None and not gpu.bf16 and self.preset.dtype == "bfloat16":
            return "float16", f"float16 ({gpu.name} has no bfloat16)"
        return self.preset.dtype, ""

    def _gpu_inference(self, target: _Target, max_nodes: int) -> Result:
        sku, gpu, preset = target.sku, target.gpu, self.preset
        assert gpu is not None
        usable = sizing.gpu_usable(sku, gpu)
        needed = sizing.gpus_needed(preset, usable, self.context)
        limit = min(max_nodes, len(target.nodes_available)) if target.byo else max_nodes
        nodes = None if needed is None else math.ceil(needed / sku.gpus)
        bypassed = ""
        if needed is None or nodes is None or nodes > limit:
            too_large = self._too_large(target, usable, needed, nodes, limit)
            if not (self.bypass and (target.byo or self.ws.resource.instance_type)):
                return too_large
            nodes = max(1, min(limit, self.ws.resource.count))
            needed = nodes * sku.gpus
            bypassed = (
                f"{BYPASS_ANNOTATION}: planned on {nodes} × {sku.name} although the memory check refuses "
                f"it ({too_large.short or too_large.message}); vLLM may fail to load the model"
            )
        fewest = needed

        gpn = sku.gpus
        if nodes == 1:  # one node: the smallest tensor-parallel group that leaves half its memory for KV
            tp = next(
                (
                    t
                    for t in _divisors(gpn)
                    if t >= fewest and preset.weights * sizing.WEIGHT_SLACK / t <= usable / 2
                ),
                gpn,
            )
            pp, dp = 1, gpn // tp
        else:
            tp, pp, dp = gpn, nodes, 1
        memory = sizing.gpu_inference_memory(preset, usable, tp * pp, self.context)
        tokens = sizing.kv_tokens(memory, tp * pp, preset.kv_bytes_per_token)
        max_len = _max_model_len(tokens, self.context, preset.context_limit)

        nodes_total, replicas, notes = self._replicas(nodes, target)
        if bypassed:
            notes = (*notes, bypassed)
        dtype, dtype_note = self._dtype(gpu)
        args: dict[str, EngineArg] = {
            "tensor-parallel-size": tp,
            "pipeline-parallel-size": pp,
            "dtype": dtype,
            "max-model-len": max_len,
            "gpu-memory-utilization": gpu.memory_utilization,
        }
        if pp > 1:
            args["distributed-executor-backend"] = "ray"
        args.update(_runtime_args(preset))
        gpus = tp * pp
        per_gpu = " per GPU" if gpus > 1 else ""
        explanation = (
            f"{self.need_text()} + {sizing.gib(memory.overhead)} overhead{per_gpu} "
            f"{'exceeds (checks bypassed)' if bypassed else 'fits'} {gpus} × "
            f"{gpu.name} {sku.gpu_memory // GIB} GiB (TP {tp} × PP {pp}; {sizing.gib(memory.needed)} of "
            f"{sizing.gib(usable)} usable per GPU) on {nodes} × {sku.name}"
        )
        if dp > 1:
            explanation += f"; {dp} data-parallel replicas per node"
        explanation += f"; max-model-len {max_len}"
        if dtype_note:
            explanation += f"; {dtype_note}"
        return self._plan(
            target,
            nodes=nodes_total,
            gpus_per_node=gpn,
            tp=tp,
            pp=pp,
            dp=dp * replicas,
            dtype=dtype,
            max_len=max_len,
            engine="vllm",
            args=args,
            memory=memory,
            explanation=explanation,
            notes=notes,
        )

    def _too_large(
        self, target: _Target, usable: int, needed: int | None, nodes: int | None, limit: int
    ) -> Rejection:
        sku, gpu, preset = target.sku, target.gpu, self.preset
        assert gpu is not None
        what = self.need_text()
        per = f"{sku.name} ({sku.gpus} × {gpu.name}, {sizing.gib(usable)} usable per GPU)"
        if needed is None:
            overhead = sizing.gib(sizing.GPU_OVERHEAD)
            why = f"{per}: usable memory does not even cover the {overhead} runtime overhead"
            short = "GPU too small for the runtime overhead"
        elif target.byo:
            have = len(target.nodes_available)
            why = f"needs {nodes} nodes like {per} ({needed} GPUs) but {have} Ready node(s) match"
            short = f"needs {nodes} nodes, {len(target.nodes_available)} match"
        else:
            why = f"needs {nodes} nodes of {per} ({needed} GPUs), more than the limit of {limit}"
            short = f"needs {nodes} nodes > {limit}"
        return Rejection(reason="ModelTooLarge", message=f"{preset.name} ({what}) {why}", short=short)

    def _replicas(self, nodes: int, target: _Target) -> tuple[int, int, tuple[str, ...]]:
        """``resource.count`` as whole replicas of ``nodes`` nodes each."""
        count = self.ws.resource.count
        if count < nodes:
            return nodes, 1, (f"resource.count {count} raised to {nodes}: the model needs {nodes} nodes",)
        replicas = count // nodes
        if target.byo:
            replicas = max(1, min(replicas, len(target.nodes_available) // nodes))
        notes: tuple[str, ...] = ()
        if replicas * nodes != count:
            notes = (f"resource.count {count} planned as {replicas} replica(s) of {nodes} node(s)",)
        return nodes * replicas, replicas, notes

    def _gpu_tuning(self, target: _Target) -> Result:
        sku, gpu, preset = target.sku, target.gpu, self.preset
        assert gpu is not None and self.tuning is not None
        method = self.tuning.method
        usable = sizing.gpu_usable(sku, gpu)
        need = sizing.tuning_memory(
            preset,
            method,
            batch_size=self.options.tuning_batch_size,
            max_seq_length=self.options.tuning_max_seq_length,
        )
        shared = int(need.base_weights * 1.02) + need.optimizer  # split over GPUs by device_map
        per_gpu = need.activations + sizing.GPU_OVERHEAD
        gpus = next((g for g in _divisors(sku.gpus) if shared / g + per_gpu <= usable), None)
        total = shared + need.activations + sizing.GPU_OVERHEAD
        breakdown = (
            f"{sizing.gib(need.base_weights)} {'4-bit ' if method == 'qlora' else ''}base + "
            f"{sizing.gib(need.optimizer)} LoRA/optimizer + {sizing.gib(need.activations)} activations "
            f"(batch {need.batch_size} × {need.max_seq_length} tokens) + "
            f"{sizing.gib(sizing.GPU_OVERHEAD)} overhead"
        )
        if gpus is None:
            return Rejection(
                reason="ModelTooLarge",
                message=f"{method} tuning of {preset.name} needs {breakdown} = {sizing.gib(total)}; one "
                f"{sku.name} node has {sku.gpus} × {sizing.gib(usable)} usable and tuning runs on a "
                "single node" + ("; try method qlora" if method == "lora" else ""),
                short=f"needs {sizing.gib(total)} on one node",
            )
        dtype, dtype_note = self._dtype(gpu)
        memory = Memory(
            usable=usable,
            weights=math.ceil(need.base_weights * 1.02 / gpus),
            kv_cache=0,
            overhead=sizing.GPU_OVERHEAD + need.activations + math.ceil(need.optimizer / gpus),
            context_tokens=need.max_seq_length,
        )
        where = f"{gpus} × {gpu.name} {sku.gpu_memory // GIB} GiB on 1 × {sku.name}"
        explanation = f"{method} tuning: {breakdown} fits {where}"
        if dtype_note:
            explanation += f"; {dtype_note}"
        args: dict[str, EngineArg] = {
            "method": method,
            "load_in_4bit": method == "qlora",
            "dtype": dtype,
            "max_seq_length": need.max_seq_length,
            "per_device_train_batch_size": need.batch_size,
        }
        return self._plan(
            target,
            gpus_per_node=gpus,
            dtype=dtype,
            max_len=need.max_seq_length,
            args=args,
            memory=memory,
            explanation=explanation,
            tuning=need,
        )

    def _cpu(self, target: _Target) -> Result:
        sku, preset = target.sku, self.preset
        if preset.quantization:
            return Rejection(
                reason="UnsupportedOnCPU",
                message=f"{preset.name} is {preset.quantization}-quantized: it needs a GPU engine (vLLM), "
                f"and {sku.name} has no GPU",
                short=f"{preset.quantization} needs a GPU",
            )
        notes: tuple[str, ...] = ()
        if self.ws.resource.count > 1 and not target.byo:
            notes = (f"resource.count {self.ws.resource.count} ignored: {sku.name} is one machine",)
        if self.tuning is not None:
            return self._cpu_tuning(target, notes)
        memory, dtype = sizing.cpu_inference_memory(preset, sku.cpu_memory, self.context)
        if memory.needed > memory.usable:
            return Rejection(
                reason="ModelTooLarge",
                message=f"{preset.name} on CPU needs {sizing.gib(memory.weights)} {dtype} weights + "
                f"{sizing.gib(memory.kv_cache)} KV ({sizing.CPU_BATCH} × {self.context} tokens) + "
                f"{sizing.gib(memory.overhead)} = {sizing.gib(memory.needed)}, but {sku.name} offers "
                f"{sizing.gib(memory.usable)} (half its RAM)",
                short=f"needs {sizing.gib(memory.needed)} RAM > {sizing.gib(memory.usable)}",
            )
        width = 2 if dtype == "float32" else 1
        spare = memory.usable - memory.weights - memory.overhead
        tokens = spare // (sizing.CPU_BATCH * preset.kv_bytes_per_token * width)
        max_len = _max_model_len(tokens * 2, self.context, preset.context_limit)  # all of it: 1 seq/slot
        explanation = (
            f"{sizing.gib(memory.weights)} {dtype} weights + {sizing.gib(memory.kv_cache)} KV for "
            f"{sizing.CPU_BATCH} × {self.context} tokens + {sizing.gib(memory.overhead)} overhead fits "
            f"{sku.name} CPU ({sizing.gib(memory.usable)} of {sizing.gib(sku.cpu_memory)} RAM); "
            f"max-model-len {max_len}"
        )
        args: dict[str, EngineArg] = {
            "dtype": dtype,
            "max-model-len": max_len,
            "max-batch-size": sizing.CPU_BATCH,
        }
        return self._plan(
            target,
            dtype=dtype,
            max_len=max_len,
            args=args,
            memory=memory,
            explanation=explanation,
            notes=notes,
        )

    def _cpu_tuning(self, target: _Target, notes: tuple[str, ...]) -> Result:
        sku, preset = target.sku, self.preset
        assert self.tuning is not None
        method = self.tuning.method
        need = sizing.tuning_memory(
            preset,
            method,
            batch_size=self.options.tuning_batch_size,
            max_seq_length=self.options.tuning_max_seq_length,
            fp32_base=True,
        )
        usable = int(sku.cpu_memory * sizing.CPU_RAM_FRACTION)
        total = need.base_weights + need.optimizer + need.activations + sizing.CPU_OVERHEAD
        if total > usable:
            return Rejection(
                reason="ModelTooLarge",
                message=f"{method} tuning of {preset.name} on CPU needs {sizing.gib(total)}; "
                f"{sku.name} offers "
                f"{sizing.gib(usable)} (half its RAM)",
            )
        memory = Memory(
            usable=usable,
            weights=need.base_weights,
            kv_cache=0,
            overhead=sizing.CPU_OVERHEAD + need.activations + need.optimizer,
            context_tokens=need.max_seq_length,
        )
        explanation = (
            f"{method} tuning on CPU: {sizing.gib(need.base_weights)} base + {sizing.gib(need.optimizer)} "
            f"LoRA/optimizer + {sizing.gib(need.activations)} activations + "
            f"{sizing.gib(sizing.CPU_OVERHEAD)} overhead fits {sku.name} "
            f"({sizing.gib(usable)} of {sizing.gib(sku.cpu_memory)} RAM)"
        )
        args: dict[str, EngineArg] = {
            "method": method,
            "load_in_4bit": method == "qlora",
            "dtype": "float32",
            "max_seq_length": need.max_seq_length,
            "per_device_train_batch_size": need.batch_size,
        }
        return self._plan(
            target,
            dtype="float32",
            max_len=need.max_seq_length,
            args=args,
            memory=memory,
            explanation=explanation,
            notes=notes,
            tuning=need,
        )

    def _plan(
        self,
        target: _Target,
        *,
        dtype: str,
        max_len: int,
        args: dict[str, EngineArg],
        memory: Memory,
        explanation: str,
        notes: tuple[str, ...] = (),
        tuning: TuningPlan | None = None,
        engine: str = "transformers",
        nodes: int = 1,  # the defaults are one CPU machine / one device
        gpus_per_node: int = 0,
        tp: int = 1,
        pp: int = 1,
        dp: int = 1,
    ) -> Plan:
        sku, preset = target.sku, self.preset
        return Plan(
            mode="tuning" if self.tuning is not None else "inference",
            preset=preset.name,
            model=preset.hf_id,
            sku=sku.name,
            cloud=sku.cloud,
            gpu=target.gpu.name if target.gpu else "cpu",
            gpu_memory=sku.gpu_memory,
            nodes=nodes,
            gpus_per_node=gpus_per_node,
            tensor_parallel=tp,
            pipeline_parallel=pp,
            data_parallel=dp,
            dtype=dtype,
            quantization=preset.quantization,
            max_model_len=max_len,
            engine="vllm" if engine == "vllm" else "transformers",
            engine_args=args,
            disk_gib=sizing.disk_gib(preset, tuning=self.tuning is not None),
            memory=memory,
            cost_per_hour=0.0 if target.byo else round(sku.price_per_hour * nodes, 4),
            explanation=explanation,
            byo_nodes=target.nodes_available[:nodes] if target.byo else (),
            notes=notes,
            tuning=tuning,
            runtime=dict(preset.runtime),
        )


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _max_model_len(kv_tokens: int, minimum: int, limit: int) -> int:
    """The longest context that leaves room for at least two sequences of it, in steps of 1024
    tokens, never below the sized ``minimum`` and never above the model's own limit."""
    two_sequences = kv_tokens // 2
    stepped = two_sequences // 1024 * 1024 if two_sequences >= 1024 else two_sequences
    return min(limit, max(minimum, stepped))


def _runtime_args(preset: Preset) -> dict[str, EngineArg]:
    args: dict[str, EngineArg] = {}
    hints = preset.runtime
    if "tool_call_parser" in hints:
        args["enable-auto-tool-choice"] = True
        args["tool-call-parser"] = hints["tool_call_parser"]
    for hint in ("reasoning_parser", "tokenizer_mode", "chat_template"):
        if hint in hints:
            args[hint.replace("_", "-")] = hints[hint]
    return args


def _replace(plan: Plan, **changes: object) -> Plan:
    return msgspec.structs.replace(plan, **changes)
