"""The one backoff table: bounded exponential with deterministic jitter."""

from __future__ import annotations

import zlib


def delay_for(attempt: int, *, base: float = 0.5, cap: float = 30.0, key: str = "") -> float:
    """Seconds to wait before attempt ``attempt + 1`` (``attempt`` counts from 1).

    Jitter is derived from ``key`` so that two replicas retrying different objects spread out,
    yet a test can predict the value.
    """
    raw = min(cap, base * (2 ** max(0, attempt - 1)))
    jitter = (zlib.crc32(f"{key}:{attempt}".encode()) % 1000) / 1000.0  # 0 … 1
    return float(round(min(cap, raw * (0.8 + 0.4 * jitter)), 3))
