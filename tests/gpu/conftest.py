"""GPU tests: the vLLM engine for real. They need a CUDA GPU and the ``gpu`` extra (vLLM), so they are
not collected by the default ``pytest`` run (``norecursedirs``); run them on a GPU machine with

    pip install -e '.[dev,gpu]' && python -m pytest tests/gpu

A run without a GPU fails loudly here rather than passing vacuously.
"""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    import torch

    if not torch.cuda.is_available():
        raise pytest.UsageError("tests/gpu needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        item.add_marker(pytest.mark.gpu)
