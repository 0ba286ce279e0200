"""The tuning job's typed config: what the workload renders from a tuning Workspace and its plan.

KAITO's tuning ConfigMap sections keep their names and defaults (``ModelConfig``,
``QuantizationConfig``, ``LoraConfig``, ``TrainingArguments``, ``DataCollator``, ``DatasetConfig``), so
a KAITO tuning config file can be given as is (``sections`` below, or ``--config file.yaml``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from shared.model_sources import ModelSource


class _Section(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)


class ModelConfig(_Section):
    torch_dtype: str = "auto"  # "auto": bfloat16 where the device has it, else float32
    local_files_only: bool = True


class QuantizationConfig(_Section):
    """qlora's base-model quantization: 4-bit NF4 unless ``load_in_8bit`` (KAITO's two switches; the
    workload refuses both on, and either on for lora, as KAITO does)."""

    load_in_4bit: bool | None = None
    load_in_8bit: bool | None = None
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4"
    bnb_4bit_compute_dtype: str = "auto"
    bnb_4bit_use_double_quant: bool = False


class LoraSection(_Section):
    r: int = Field(default=8, ge=1)
    lora_alpha: int = Field(default=8, ge=1)
    lora_dropout: float = Field(default=0.0, ge=0, lt=1)
    target_modules: list[str] | str = "all-linear"


class TrainingArguments(_Section):
    per_device_train_batch_size: int = Field(default=1, ge=1)
    num_train_epochs: float = Field(default=3, gt=0)
    max_steps: int = -1  # > 0 overrides epochs
    learning_rate: float = Field(default=2e-4, gt=0)
    gradient_accumulation_steps: int = Field(default=1, ge=1)
    logging_steps: int = Field(default=1, ge=1)
    seed: int = 42


class DataCollator(_Section):
    mlm: bool = False


class DatasetConfig(_Section):
    shuffle_dataset: bool = True
    train_test_split: float = Field(default=1.0, gt=0, le=1)  # the training share
    max_seq_length: int = Field(default=512, ge=16)
    messages_column: str = "messages"
    context_column: str | None = None  # e.g. "prompt" / "instruction": else recognised by name
    response_column: str | None = None  # e.g. "completion" / "response"


class Sections(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="forbid")
    model: ModelConfig = Field(default_factory=ModelConfig, alias="ModelConfig")
    quantization: QuantizationConfig = Field(default_factory=QuantizationConfig, alias="QuantizationConfig")
    lora: LoraSection = Field(default_factory=LoraSection, alias="LoraConfig")
    training: TrainingArguments = Field(default_factory=TrainingArguments, alias="TrainingArguments")
    collator: DataCollator = Field(default_factory=DataCollator, alias="DataCollator")
    dataset: DatasetConfig = Field(default_factory=DatasetConfig, alias="DatasetConfig")


class Output(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image: str | None = None  # registry/repo:tag
    push_secret: str | None = None  # a mounted docker config json (kubernetes.io/dockerconfigjson)
    directory: str | None = None  # also (or instead) write the adapter here
    insecure: bool = False  # plain http to the registry (a local registry)

    @model_validator(mode="after")
    def _somewhere(self) -> Output:
        if not self.image and not self.directory:
            raise ValueError("output needs an image or a directory")
        return self


class WorkspaceRefConfig(BaseModel):
    namespace: str
    name: str
    uid: str
    generation: int = 1


class TuningJobConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    job: str = "tuning"  # the job's name, in events
    preset: str
    source: ModelSource
    method: Literal["lora", "qlora"] = "lora"
    sections: Sections = Field(default_factory=Sections)
    input_urls: list[str] = []
    # or: the name of a variable holding them as a JSON list (a cluster's job: from a Secret, since a
    # URL may carry a credential — a SAS token, user:pass@ — and a ConfigMap is no place for one)
    input_urls_env: str | None = None
    input_directory: str | None = None
    output: Output
    work_dir: str = "/tmp/kaiten-tuning"  # noqa: S108  (a job container's scratch space)
    workspace: WorkspaceRefConfig | None = None  # events are published when this and nats_url are set
    nats_url: str | None = None
    nats_user: str | None = None  # its password comes from $KAITEN_NATS_PASSWORD, never from this file
    nats_inbox_prefix: str = "_INBOX"  # the user may subscribe to its own inbox prefix only
    nats_ca_file: str | None = None  # a TLS bus's CA (PEM): the job trusts the bus by it
    declare_stream: bool = True  # False where the user may not (a cluster: the services declared it)
    progress_interval_s: float = Field(default=5.0, ge=0)  # at most one progress event per interval
    allow_loopback_urls: bool = False  # local runs and tests; never in a cluster
    max_download_bytes: int = 2 << 30
    threads: int = Field(default=0, ge=0)  # torch threads; 0: torch's default
    # the workload's trace context (traceparent): the job's spans and events join it
    trace: dict[str, str] = {}

    @model_validator(mode="after")
    def _input(self) -> TuningJobConfig:
        if not self.input_urls and not self.input_urls_env and not self.input_directory:
            raise ValueError("input needs urls or a directory")
        return self

    def urls(self) -> list[str]:
        """The input URLs, from this file or from ``$<input_urls_env>``."""
        if not self.input_urls_env:
            return list(self.input_urls)
        text = os.environ.get(self.input_urls_env)
        if text is None:
            raise ValueError(f"${self.input_urls_env} (the input URLs, from a Secret) is not set")
        urls = json.loads(text)
        if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
            raise ValueError(f"${self.input_urls_env} is not a JSON list of URLs")
        return [*self.input_urls, *urls]

    @classmethod
    def load(cls, path: str | Path) -> TuningJobConfig:
        return cls.model_validate(yaml.safe_load(Path(path).read_text()))

    def dump(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True)
