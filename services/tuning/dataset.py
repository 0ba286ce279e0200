"""Training data: parquet, jsonl/json or csv files → conversations (``messages``) for SFT.

Recognised rows: a conversational ``messages`` column (lists of ``{role, content}``, like the
dolly-15k-oai-style parquet), or a prompt and a response column (``DatasetConfig.context_column`` /
``response_column``, else the first pair found of prompt/completion, instruction/response,
question/answer, input/output). The model's chat template is applied by the trainer. Anything else
fails with the file and the problem named.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from services.tuning.config import DatasetConfig

PAIRS = [("prompt", "completion"), ("instruction", "response"), ("question", "answer"), ("input", "output")]
ROLES = {"system", "user", "assistant", "tool"}


class DatasetError(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def read_table(path: Path) -> Any:
    """A pandas DataFrame from a parquet, jsonl, json or csv file (by extension, else by content)."""
    import pandas as pd

    suffix = path.suffix.lower()
    head = path.read_bytes()[:4]
    try:
        if suffix == ".parquet" or head == b"PAR1":
            return pd.read_parquet(path)
        if suffix in (".jsonl", ".ndjson"):
            return pd.read_json(path, lines=True)
        if suffix == ".json":
            text = path.read_text()
            return pd.read_json(path, lines=not text.lstrip().startswith("["))
        if suffix == ".csv":
            return pd.read_csv(path)
        text = path.read_text(errors="replace").lstrip()
        if text.startswith("{"):
            return pd.read_json(path, lines=True)
        if text.startswith("["):
            return pd.read_json(path)
        return pd.read_csv(path)
    except (ValueError, OSError, UnicodeDecodeError) as exc:
        raise DatasetError(
            "InvalidDataset", f"{path.name}: cannot be read as {suffix or 'data'}: {exc}"
        ) from exc
    except Exception as exc:  # pyarrow and pandas parser errors
        raise DatasetError(
            "InvalidDataset", f"{path.name}: cannot be read: {type(exc).__name__}: {exc}"
        ) from exc


def _messages(value: Any, where: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        value = json.loads(value)
    out = []
    for turn in list(value):
        role, content = turn.get("role"), turn.get("content")
        if role not in ROLES or not isinstance(content, str):
            raise DatasetError(
                "InvalidDataset", f"{where}: a turn needs a role in {sorted(ROLES)} and text content"
            )
        out.append({"role": str(role), "content": content})
    if not any(t["role"] == "assistant" for t in out):
        raise DatasetError("InvalidDataset", f"{where}: no assistant turn to learn from")
    return out


def conversations(files: list[Path], config: DatasetConfig) -> list[list[dict[str, str]]]:
    rows: list[list[dict[str, str]]] = []
    for path in files:
        if path.stat().st_size == 0:
            raise DatasetError("EmptyInput", f"{path.name}: the file is empty")
        table = read_table(path)
        columns = list(table.columns)
        if len(table) == 0:
            raise DatasetError("EmptyInput", f"{path.name}: no rows")
        if config.messages_column in columns:
            for i, value in enumerate(table[config.messages_column]):
                rows.append(_messages(value, f"{path.name} row {i}"))
            continue
        pair = (
            (config.context_column, config.response_column)
            if config.context_column and config.response_column
            else next(((p, r) for p, r in PAIRS if p in columns and r in columns), None)
        )
        if pair is None or pair[0] not in columns or pair[1] not in columns:
            raise DatasetError(
                "InvalidDataset",
                f"{path.name}: no usable columns (found {columns}); expected '{config.messages_column}'"
                f" or a prompt/response pair such as {', '.join('/'.join(p) for p in PAIRS)}",
            )
        prompt, response = pair
        extra = "context" if "context" in columns and prompt == "instruction" else None
        for _, row in table.iterrows():
            question = str(row[prompt])
            if extra and isinstance(row[extra], str) and row[extra].strip():
                question = f"{question}\n\n{row[extra]}"
            rows.append(
                [{"role": "user", "content": question}, {"role": "assistant", "content": str(row[response])}]
            )
    if not rows:
        raise DatasetError("EmptyInput", "the input has no rows")
    return rows
