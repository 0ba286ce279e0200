"""The engine protocol and the request/response types every engine shares."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol


class EngineError(Exception):
    """A request the engine cannot take; ``status`` is the HTTP status the API answers with."""

    status = 400


class BadRequest(EngineError):
    status = 400


class QueueFull(EngineError):
    status = 429


class DeadlineExceeded(EngineError):
    status = 504


class EngineUnavailable(EngineError):
    status = 503


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    do_sample: bool = False  # greedy unless asked (KAITO's /chat default); the OpenAI API sets True
    stop: tuple[str, ...] = ()
    seed: int | None = None
    repetition_penalty: float = 1.0


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    params: SamplingParams
    adapter: str | None = None
    deadline: float = field(default_factory=lambda: time.monotonic() + 300)
    enqueued_at: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class Chunk:
    text: str
    tokens: int = 0  # tokens generated so far
    finish_reason: str | None = None  # "stop" | "length" | "deadline" | None while streaming


@dataclass(frozen=True)
class AdapterInfo:
    name: str
    path: str
    strength: float = 1.0


class Engine(Protocol):
    model_name: str

    async def start(self) -> None: ...

    def healthy(self) -> tuple[bool, str]: ...

    def encode_chat(self, messages: Sequence[dict[str, Any]]) -> list[int]: ...

    def encode(self, prompt: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[Chunk]: ...

    def adapters(self) -> list[AdapterInfo]: ...

    def stats(self) -> dict[str, float]: ...

    async def shutdown(self) -> None: ...
