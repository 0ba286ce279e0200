"""QLoRA on CUDA: the 4-bit NF4 base on the GPU (bfloat16 compute where the GPU has it), the loss
falls, and the adapter is written."""

from __future__ import annotations

import asyncio
from pathlib import Path

import torch

from services.tuning.config import TuningJobConfig
from services.tuning.job import run
from tests.conftest import SMOLLM2


def test_qlora_on_cuda(tmp_path: Path) -> None:
    import pandas as pd

    rows = [
        [{"role": "user", "content": f"What is {a} plus {b}?"},
         {"role": "assistant", "content": f"Ahoy! {a} plus {b} is {a + b}. Arr."}]
        for a in range(2, 12) for b in range(3, 11)
    ]  # fmt: skip
    data = tmp_path / "data"
    data.mkdir()
    pd.DataFrame({"messages": rows}).to_parquet(data / "train.parquet")
    config = TuningJobConfig.model_validate(
        {
            "preset": "smollm2-135m-instruct",
            "source": SMOLLM2.model_dump(),
            "method": "qlora",
            "input_directory": str(data),
            "output": {"directory": str(tmp_path / "adapter")},
            "work_dir": str(tmp_path / "work"),
            "sections": {
                "TrainingArguments": {
                    "per_device_train_batch_size": 8,
                    "max_steps": 30,
                    "learning_rate": 1e-3,
                },
                "DatasetConfig": {"max_seq_length": 128},
            },
        }
    )
    losses: list[float] = []
    output, result = asyncio.run(run(config, lambda p: losses.append(p.loss) if p.loss is not None else None))
    assert torch.cuda.is_available() and result.steps == 30
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 * 0.7, losses
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file() and output == str(
        tmp_path / "adapter"
    )
