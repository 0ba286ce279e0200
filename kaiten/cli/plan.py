"""``kaiten plan -f ws.yaml``: what the planner would decide for a manifest, without a cluster."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any, get_args

import yaml
from pydantic import ValidationError

from services.planner.planning import PlanOptions, plan
from shared.api.workspace import Workspace
from shared.planning.catalog import GIB, CatalogError, Catalogs, load_catalogs
from shared.planning.model import Plan, Rejection, plan_to_dict
from shared.settings import Cloud, Provider


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "plan",
        help="print the plan for Workspace manifests (dry run, no cluster)",
        description="Plan Workspace manifests as the planner would: SKU, nodes, parallelism, dtype, "
        "context, engine arguments and why. Exit status 1 if any is rejected.",
    )
    p.add_argument(
        "-f", "--filename", action="append", type=Path, default=[], help="manifest(s); '-' for stdin"
    )
    p.add_argument("--provider", default="aks", choices=get_args(Provider), help="default: aks")
    p.add_argument(
        "--cloud",
        default="azure",
        choices=get_args(Cloud),
        help="SKUs an omitted instanceType may choose from (default: azure)",
    )
    p.add_argument(
        "--catalog", action="append", type=Path, default=[], help="operator catalog override file(s)"
    )
    p.add_argument("--max-nodes", type=int, default=PlanOptions.max_nodes)
    p.add_argument("--auto-max-nodes", type=int, default=PlanOptions.auto_max_nodes)
    p.add_argument("--context", type=int, default=PlanOptions.context, help="tokens every plan must hold")
    p.add_argument("-o", "--output", choices=("table", "json", "yaml"), default="table")
    p.add_argument("--presets", action="store_true", help="list the preset catalog and exit")
    p.add_argument("--skus", action="store_true", help="list the instance types and exit")


def run(args: argparse.Namespace, stdin: IO[str], out: IO[str], err: IO[str]) -> int:
    try:
        catalogs = load_catalogs(args.catalog)
    except CatalogError as exc:
        print(f"error: {exc}", file=err)
        return 2
    if args.presets:
        _presets(catalogs, out)
        return 0
    if args.skus:
        _skus(catalogs, out)
        return 0
    if not args.filename:
        print("error: give a manifest with -f FILE (or --presets / --skus)", file=err)
        return 2
    options = PlanOptions(
        cloud=args.cloud,
        provider=args.provider,
        max_nodes=args.max_nodes,
        auto_max_nodes=args.auto_max_nodes,
        context=args.context,
    )
    code = 0
    results: list[dict[str, Any]] = []
    for path in args.filename:
        try:
            text = stdin.read() if str(path) == "-" else path.read_text()
            docs = [d for d in yaml.safe_load_all(text) if d]
        except (OSError, yaml.YAMLError) as exc:
            print(f"error: {path}: {exc}", file=err)
            return 2
        for doc in docs:
            name = (doc.get("metadata") or {}).get("name", "?") if isinstance(doc, dict) else "?"
            try:
                workspace = Workspace.model_validate(doc)
            except ValidationError as exc:
                first = exc.errors()[0]
                print(f"error: {path}: {name}: {'.'.join(map(str, first['loc']))}: {first['msg']}", file=err)
                code = 1
                continue
            result = plan(workspace, catalogs, (), options)
            code = code or int(isinstance(result, Rejection))
            if args.output == "table":
                _table(name, result, out)
            else:
                results.append(_as_dict(name, result))
    if args.output == "json":
        print(json.dumps(results, indent=2), file=out)
    elif args.output == "yaml":
        print(yaml.safe_dump(results, sort_keys=False), file=out, end="")
    return code


def _as_dict(name: str, result: Plan | Rejection) -> dict[str, Any]:
    if isinstance(result, Plan):
        return {"name": name, "plan": plan_to_dict(result)}
    return {"name": name, "rejected": {"reason": result.reason, "message": result.message}}


def _rows(rows: Iterable[tuple[str, str]], out: IO[str]) -> None:
    for key, value in rows:
        if value:
            print(f"  {key:<14} {value}", file=out)


def _table(name: str, result: Plan | Rejection, out: IO[str]) -> None:
    if isinstance(result, Rejection):
        print(f"{name}: REJECTED ({result.reason})", file=out)
        _rows([("why", result.message)], out)
        print(file=out)
        return
    p = result
    gpus = f"{p.gpus_per_node} × {p.gpu} {p.gpu_memory // GIB} GiB per node" if p.gpus_per_node else "CPU"
    memory = ""
    if p.memory is not None:
        m = p.memory
        memory = (
            f"{m.weights / GIB:.1f} weights + {m.kv_cache / GIB:.1f} KV + {m.overhead / GIB:.1f} overhead = "
            f"{m.needed / GIB:.1f} of {m.usable / GIB:.1f} GiB usable"
        )
    args = " ".join(
        f"--{k}" if v is True else f"--{k}={v}" for k, v in p.engine_args.items() if v is not False
    )
    print(f"{name}: {p.mode} of {p.preset or 'a custom template'}", file=out)
    _rows(
        [
            ("model", p.model),
            ("instance", f"{p.nodes} × {p.sku}" + (f"  (${p.cost_per_hour:g}/h)" if p.cost_per_hour else "")),
            ("gpus", gpus),
            (
                "parallelism",
                f"tensor {p.tensor_parallel} × pipeline {p.pipeline_parallel} × data {p.data_parallel}",
            ),
            ("dtype", p.dtype + (f" ({p.quantization} weights)" if p.quantization else "")),
            ("max length", f"{p.max_model_len} tokens" if p.max_model_len else ""),
            ("engine", f"{p.engine} {args}".strip()),
            ("disk", f"{p.disk_gib} GiB"),
            ("memory", memory + (" per GPU" if memory and p.gpus_per_node else "")),
            ("nodes", ", ".join(p.byo_nodes)),
            ("why", p.explanation),
            *(("cheaper, unfit", alt) for alt in p.alternatives),
            *(("note", note) for note in p.notes),
        ],
        out,
    )
    print(file=out)


def _presets(catalogs: Catalogs, out: IO[str]) -> None:
    print(f"{'PRESET':<40} {'HF ID':<48} {'WEIGHTS':>9} {'CONTEXT':>8} {'QUANT':<10} TUNING", file=out)
    for p in sorted(catalogs.presets.values(), key=lambda p: p.name):
        print(
            f"{p.name:<40} {p.hf_id:<48} {p.weights / GIB:>7.2f}Gi {p.context_limit:>8} "
            f"{p.quantization or '-':<10} {'yes' if p.tuning else ''}",
            file=out,
        )


def _skus(catalogs: Catalogs, out: IO[str]) -> None:
    print(
        f"{'INSTANCE TYPE':<28} {'CLOUD':<6} {'GPUS':>4} {'GPU':<6} {'MEM/GPU':>8} {'CC':>4} {'USD/H':>7}",
        file=out,
    )
    for s in sorted(catalogs.skus.values(), key=lambda s: (s.cloud, s.price_per_hour, s.name)):
        gpu = catalogs.gpu_models.get(s.gpu)
        mem = f"{s.gpu_memory / GIB:.0f}Gi" if s.gpus else f"{s.cpu_memory / GIB:.0f}Gi RAM"
        print(
            f"{s.name:<28} {s.cloud:<6} {s.gpus:>4} {s.gpu or 'cpu':<6} {mem:>8} {gpu.cc if gpu else '-':>4} "
            f"{s.price_per_hour:>7.2f}",
            file=out,
        )
