"""LoRA / QLoRA with trl's ``SFTTrainer`` and peft, on whatever device there is.

``qlora`` loads the base in 4-bit NF4 with bitsandbytes (≥ 0.50 does this on the CPU too) and prepares
it for k-bit training before anything else touches it (calling ``generate`` first makes training
silently learn nothing). Where 4-bit loading is impossible the job fails with that reason — it never
falls back to 16-bit LoRA behind the user's back.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.tuning.config import QuantizationConfig, Sections, TuningJobConfig

log = logging.getLogger(__name__)


class TrainingError(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class Progress:
    step: int
    total_steps: int
    epoch: float
    loss: float | None
    learning_rate: float | None
    tokens_per_second: float | None
    eta_seconds: float | None


@dataclass
class Result:
    adapter_dir: Path
    steps: int
    losses: list[float]
    tokens: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def _dtype(name: str) -> Any:
    import torch

    if name == "auto":
        return (
            torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
        )
    return getattr(torch, name)


def quantization_arguments(q: QuantizationConfig) -> dict[str, Any]:
    """``BitsAndBytesConfig`` arguments for qlora: 8-bit when the config asks for it, else 4-bit NF4."""
    if q.load_in_8bit:
        return {"load_in_8bit": True}
    return {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": q.bnb_4bit_quant_type,
        "bnb_4bit_compute_dtype": _dtype(q.bnb_4bit_compute_dtype),
        "bnb_4bit_use_double_quant": q.bnb_4bit_use_double_quant,
    }


def load_model(model_dir: Path, config: TuningJobConfig) -> Any:
    from transformers import AutoModelForCausalLM

    sections = config.sections
    kwargs: dict[str, Any] = {"dtype": _dtype(sections.model.torch_dtype)}
    if config.method == "qlora":
        import torch
        from peft import prepare_model_for_kbit_training
        from transformers import BitsAndBytesConfig

        quantization = quantization_arguments(sections.quantization)
        what = "8-bit" if quantization.get("load_in_8bit") else "4-bit NF4"
        try:
            kwargs["quantization_config"] = BitsAndBytesConfig(**quantization)  # type: ignore[no-untyped-call]
            model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
        except (ImportError, RuntimeError, ValueError) as exc:
            raise TrainingError(
                "QuantizationUnavailable", f"qlora needs {what} (bitsandbytes) on this device: {exc}"
            ) from exc
        device = "cuda" if torch.cuda.is_available() else "cpu"
        log.info("loaded %s in %s on %s", model_dir.name, what, device)
        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)  # type: ignore[no-untyped-call]
    return AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)


# TrainingArguments Kaiten sets itself: where checkpoints go is the job's (the adapter is written and
# pushed from its own directory), not a path from the ConfigMap (KAITO's templates say /mnt/results).
OWN_TRAINING_ARGUMENTS = ("output_dir",)


def sft_arguments(s: Sections, out: Path, *, on_gpu: bool, bf16: bool = False) -> dict[str, Any]:
    """``SFTConfig``'s arguments: Kaiten's defaults for a short job, then the ConfigMap's
    ``TrainingArguments`` over them — any ``transformers.TrainingArguments`` field, as KAITO passes
    them — except the ones the job owns (:data:`OWN_TRAINING_ARGUMENTS`)."""
    given = {k: v for k, v in s.training.model_dump().items() if k not in OWN_TRAINING_ARGUMENTS}
    return {
        "save_strategy": "no",
        "report_to": [],
        "disable_tqdm": True,
        "gradient_checkpointing": False,
        "bf16": bf16,  # trl defaults bf16 on: not on a CPU
        "dataloader_pin_memory": on_gpu,
        "use_cpu": not on_gpu,
        "max_length": s.dataset.max_seq_length,
        **given,
        "output_dir": str(out / "checkpoints"),
    }


def train(
    model_dir: Path,
    rows: list[list[dict[str, str]]],
    config: TuningJobConfig,
    out: Path,
    on_progress: Callable[[Progress], None] = lambda p: None,
) -> Result:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer  # type: ignore[attr-defined]

    if config.threads:
        torch.set_num_threads(config.threads)
    s = config.sections
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    data = Dataset.from_dict({"messages": rows})
    if s.dataset.shuffle_dataset:
        data = data.shuffle(seed=s.training.seed)
    if s.dataset.train_test_split < 1.0:
        data = data.train_test_split(train_size=s.dataset.train_test_split, seed=s.training.seed)["train"]
    model = load_model(model_dir, config)
    lora = LoraConfig(
        r=s.lora.r,
        lora_alpha=s.lora.lora_alpha,
        lora_dropout=s.lora.lora_dropout,
        target_modules=s.lora.target_modules,
        task_type="CAUSAL_LM",
    )
    on_gpu = torch.cuda.is_available()
    args = SFTConfig(**sft_arguments(s, out, on_gpu=on_gpu, bf16=on_gpu and torch.cuda.is_bf16_supported()))
    losses: list[float] = []
    tokens = 0
    started = time.monotonic()  # set again when training starts: rates count training time only

    class Report(TrainerCallback):
        def on_log(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            nonlocal tokens
            logs: dict[str, Any] = kwargs.get("logs") or {}
            if "loss" in logs:
                losses.append(float(logs["loss"]))
            tokens = int(state.num_input_tokens_seen or tokens)
            elapsed = time.monotonic() - started
            rate = tokens / elapsed if tokens and elapsed else None
            left = state.max_steps - state.global_step
            per_step = elapsed / state.global_step if state.global_step else None
            on_progress(
                Progress(
                    step=state.global_step,
                    total_steps=state.max_steps,
                    epoch=float(state.epoch or 0.0),
                    loss=float(logs["loss"]) if "loss" in logs else None,
                    learning_rate=float(logs["learning_rate"]) if "learning_rate" in logs else None,
                    tokens_per_second=rate,
                    eta_seconds=left * per_step if per_step is not None else None,
                )
            )

    args.include_num_input_tokens_seen = True
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=data,
        processing_class=tokenizer,
        peft_config=lora,
        callbacks=[Report()],
    )
    started = time.monotonic()
    trainer.train()
    seconds = time.monotonic() - started
    adapter = out / "adapter"
    trained: Any = trainer.model
    trained.save_pretrained(adapter)
    for extra_file in adapter.iterdir():  # only what a serving engine loads
        if extra_file.name not in ("adapter_config.json", "adapter_model.safetensors"):
            extra_file.unlink() if extra_file.is_file() else None
    return Result(
        adapter_dir=adapter,
        steps=int(trainer.state.global_step),
        losses=losses,
        tokens=int(trainer.state.num_input_tokens_seen or tokens),
        seconds=seconds,
    )
