"""The preset and SKU catalogs: validated data, overridable by operators without a code change.

``load_catalogs(extra_files)`` reads the built-in ``shared/catalog/*.yaml`` and then each operator file
(a mounted ConfigMap key, say) in order. An operator file may hold any of ``presets``, ``deprecated``,
``gpu_models``, ``skus``, ``quantizations``; an entry whose ``name`` already exists replaces the fields
it gives (a shallow merge), a new name is added, and ``remove: true`` drops an entry. A malformed file is
a :class:`CatalogError` naming the file and the field, so a planner with a bad override fails at start.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

BUILTIN_DIR = Path(__file__).resolve().parent.parent / "catalog"
GIB = 1024**3

_UNITS = {"": 1, "k": 1000, "ki": 1024, "m": 1000**2, "mi": 1024**2, "g": 1000**3, "gi": GIB, "t": 1000**4}
_UNITS["ti"] = 1024**4
_QUANTITY = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]{0,2})\s*$")


class CatalogError(ValueError):
    pass


def parse_bytes(value: object) -> int:
    """``"27.31Gi"`` → bytes (Kubernetes-style binary/decimal suffixes); ints pass through."""
    if isinstance(value, bool):
        raise ValueError(f"not a size: {value!r}")
    if isinstance(value, int):
        return value
    match = _QUANTITY.match(str(value))
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"not a size: {value!r} (use e.g. 16Gi, 7.12Gi, 512Mi)")
    return round(float(match.group(1)) * _UNITS[match.group(2).lower()])


def cc_tuple(cc: str) -> tuple[int, int]:
    major, _, minor = cc.partition(".")
    return int(major), int(minor or 0)


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(min_length=1)


class Architecture(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    layers: int = Field(gt=0)
    hidden: int = Field(gt=0)
    vocab: int = Field(gt=0)


class Preset(_Entry):
    hf_id: str
    params: str = ""
    weights: int  # bytes of the model files at their shipped precision
    context_limit: int = Field(gt=0)
    attention: str = ""
    kv_bytes_per_token: int = Field(gt=0)
    quantization: str | None = None
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    bf16_only: bool = False
    tuning: bool = False
    architecture: Architecture | None = None
    runtime: dict[str, str] = {}
    aliases: tuple[str, ...] = ()
    gated: bool = False  # the hub serves it only with a token (KAITO's downloadAuthRequired)

    _sizes = field_validator("weights", mode="before")(parse_bytes)

    @property
    def weights_16bit(self) -> int:
        """The weights' size at 16 bits (what LoRA tuning and CPU engines hold), ≥ ``weights``."""
        return self.weights if self.quantization is None else max(self.weights, self.param_count * 2)

    @property
    def param_count(self) -> int:
        """From the name (``14B``, ``135M``, ``~671B MoE``); else from 16-bit weights."""
        match = re.search(r"([0-9]+(?:\.[0-9]+)?)\s*([BMT])", self.params)
        if not match:
            return self.weights // 2
        scale = {"M": 10**6, "B": 10**9, "T": 10**12}[match.group(2)]
        return round(float(match.group(1)) * scale)


class Deprecated(_Entry):
    replacement: str = ""


class GpuModel(_Entry):
    cc: str
    memory_utilization: float = Field(default=0.84, gt=0, le=1)
    products: tuple[str, ...] = ()

    @property
    def bf16(self) -> bool:
        return cc_tuple(self.cc) >= (8, 0)


class Sku(_Entry):
    cloud: str
    gpus: int = Field(ge=0)
    gpu: str = ""  # a gpu_models name; empty for CPU
    gpu_memory: int = 0  # bytes per GPU
    cpu_memory: int = 0  # bytes of RAM (CPU SKUs; "auto" = this machine)
    nvme: bool = False
    price_per_hour: float = Field(ge=0)

    @field_validator("gpu_memory", mode="before")
    @classmethod
    def _gpu_memory(cls, value: object) -> int:
        return parse_bytes(value)

    @field_validator("cpu_memory", mode="before")
    @classmethod
    def _cpu_memory(cls, value: object) -> int:
        return machine_memory() if value == "auto" else parse_bytes(value)

    @property
    def is_cpu(self) -> bool:
        return self.gpus == 0


class Quantization(_Entry):
    min_cc: str
    bf16_only: bool = False


def machine_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@dataclass(frozen=True)
class Catalogs:
    presets: dict[str, Preset]
    deprecated: dict[str, Deprecated]
    gpu_models: dict[str, GpuModel]
    skus: dict[str, Sku]
    quantizations: dict[str, Quantization]
    sources: tuple[str, ...] = ()
    _index: dict[str, str] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for preset in self.presets.values():
            for key in (preset.name, preset.hf_id, preset.hf_id.rsplit("/", 1)[-1], *preset.aliases):
                self._index.setdefault(key.lower(), preset.name)

    def with_preset(self, preset: Preset) -> Catalogs:
        """These catalogs and one more preset (one the hub described: :mod:`shared.planning.hub`)."""
        return Catalogs(
            presets={**self.presets, preset.name: preset},
            deprecated=self.deprecated,
            gpu_models=self.gpu_models,
            skus=self.skus,
            quantizations=self.quantizations,
            sources=self.sources,
        )

    def resolve_preset(self, name: str) -> Preset | None:
        """A preset by its name, any alias, its HF id or HF repo name; case-insensitive."""
        canonical = self._index.get(name.strip().lower())
        return self.presets[canonical] if canonical else None

    def close_presets(self, name: str, n: int = 5) -> list[str]:
        return _close(name, self.presets, n)

    def sku(self, name: str) -> Sku | None:
        found = self.skus.get(name)
        if found is None:  # instance types are case-insensitive in Azure
            found = next((s for s in self.skus.values() if s.name.lower() == name.lower()), None)
        return found

    def close_skus(self, name: str, n: int = 5) -> list[str]:
        return _close(name, self.skus, n)

    def gpu_model_for_product(self, product: str) -> GpuModel | None:
        """The GPU model a ``nvidia.com/gpu.product`` label names (longest pattern wins)."""
        padded = product.upper() + " "
        best: tuple[int, GpuModel] | None = None
        for model in self.gpu_models.values():
            for pattern in model.products:
                if pattern.upper() in padded and (best is None or len(pattern) > best[0]):
                    best = (len(pattern), model)
        return best[1] if best else None


def _close(name: str, names: Iterable[str], n: int) -> list[str]:
    pool = list(names)
    lowered = {p.lower(): p for p in pool}
    key = name.strip().lower()
    found = [lowered[m] for m in difflib.get_close_matches(key, list(lowered), n=n, cutoff=0.6)]
    squeezed = _squeeze(key)
    for p in sorted(pool):  # a fragment ("phi3", "a100") names its family
        if len(found) >= n:
            break
        if len(squeezed) >= 3 and squeezed in _squeeze(p) and p not in found:
            found.append(p)
    return found[:n]


def _squeeze(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


_SECTIONS: dict[str, type[_Entry]] = {
    "presets": Preset,
    "deprecated": Deprecated,
    "gpu_models": GpuModel,
    "skus": Sku,
    "quantizations": Quantization,
}


def _read(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise CatalogError(f"catalog {path}: cannot read: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict) or set(data) - set(_SECTIONS):
        unknown = sorted(set(data) - set(_SECTIONS)) if isinstance(data, dict) else type(data).__name__
        raise CatalogError(f"catalog {path}: unknown section(s) {unknown}; known: {sorted(_SECTIONS)}")
    return data


def _merge(raw: dict[str, dict[str, dict[str, Any]]], data: dict[str, Any], path: Path) -> None:
    for section, entries in data.items():
        if not isinstance(entries, list):
            raise CatalogError(f"catalog {path}: {section} must be a list of entries")
        table = raw.setdefault(section, {})
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
                raise CatalogError(f"catalog {path}: {section}[{i}] needs a string 'name'")
            name = entry["name"]
            if entry.get("remove") is True:
                table.pop(name, None)
            else:
                table[name] = {**table.get(name, {}), **{k: v for k, v in entry.items() if k != "remove"}}


def load_catalogs(extra_files: Sequence[str | Path] = ()) -> Catalogs:
    files = [BUILTIN_DIR / "presets.yaml", BUILTIN_DIR / "skus.yaml", *map(Path, extra_files)]
    raw: dict[str, dict[str, dict[str, Any]]] = {}
    for path in files:
        _merge(raw, _read(path), path)
    parsed: dict[str, dict[str, Any]] = {}
    for section, model in _SECTIONS.items():
        parsed[section] = {}
        for name, entry in raw.get(section, {}).items():
            try:
                parsed[section][name] = model.model_validate(entry)
            except ValidationError as exc:
                first = exc.errors()[0]
                where = ".".join(str(p) for p in first["loc"])
                sources = ", ".join(map(str, files))
                raise CatalogError(
                    f"catalog {section} entry {name!r}: {where}: {first['msg']} (files: {sources})"
                ) from exc
    for sku in parsed["skus"].values():
        if not sku.is_cpu and sku.gpu not in parsed["gpu_models"]:
            raise CatalogError(f"catalog skus entry {sku.name!r}: unknown gpu model {sku.gpu!r}")
        if not sku.is_cpu and sku.gpu_memory <= 0:
            raise CatalogError(f"catalog skus entry {sku.name!r}: gpu_memory is required for a GPU SKU")
    for preset in parsed["presets"].values():
        if preset.tuning and preset.architecture is None:
            raise CatalogError(
                f"catalog presets entry {preset.name!r}: tuning needs architecture (layers, hidden, vocab)"
            )
        if preset.quantization and preset.quantization not in parsed["quantizations"]:
            raise CatalogError(
                f"catalog presets entry {preset.name!r}: unknown quantization {preset.quantization!r}"
            )
    return Catalogs(
        presets=parsed["presets"],
        deprecated=parsed["deprecated"],
        gpu_models=parsed["gpu_models"],
        skus=parsed["skus"],
        quantizations=parsed["quantizations"],
        sources=tuple(map(str, files)),
    )
