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
    repetition_penalty: float = 1.0  # transformers' (divides a generated token's positive logit)
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from a generated token's logit
    frequency_penalty: float = 0.0  # OpenAI's: subtracted per time a token was generated


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    params: SamplingParams
    adapter: str | None = None
    deadline: float = field(default_factory=lambda: time.monotonic() + 300)


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


# The adapter KAITO's /chat answers with when a Workspace has several: their weighted sum
# (services.serving.engines.combine). Served like any adapter, listed nowhere, not addressable by name.
CHAT_ADAPTER = "_kaito_chat"


class Engine(Protocol):
    model_name: str
    chat_refusal: str

    async def start(self) -> None: ...

    def healthy(self) -> tuple[bool, str]: ...

    def encode_chat(self, messages: Sequence[dict[str, Any]]) -> list[int]: ...

    def encode(self, prompt: str) -> list[int]: ...

    def encode_prompt(self, prompt: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[Chunk]: ...

    def adapters(self) -> list[AdapterInfo]: ...

    def chat_adapter(self) -> str | None: ...

    def stats(self) -> dict[str, float]: ...

    async def shutdown(self) -> None: ...


class HFTokenizerEngine:
    """What both engines share: a Hugging Face tokenizer (chat template included), the adapter list,
    and the checks every request passes before it is queued. Subclasses set ``tokenizer``,
    ``_adapter_specs``, ``max_prompt_tokens`` and ``max_model_len``, and implement ``healthy``."""

    tokenizer: Any = None
    chat_refusal = ""  # why /chat cannot apply the adapters (services.serving.app.chat_adapters)
    _adapter_specs: list[AdapterInfo]
    max_prompt_tokens: int
    max_model_len: int

    def healthy(self) -> tuple[bool, str]:
        raise NotImplementedError

    def encode_chat(self, messages: Sequence[dict[str, Any]]) -> list[int]:
        try:
            text = self.tokenizer.apply_chat_template(
                list(messages), tokenize=False, add_generation_prompt=True
            )
        except Exception as exc:  # a template error is the caller's input
            raise BadRequest(f"messages do not fit the model's chat template: {exc}") from exc
        return self.encode(text, special=False)

    def encode(self, prompt: str, special: bool = True) -> list[int]:
        ids: list[int] = self.tokenizer(prompt, add_special_tokens=special)["input_ids"]
        return ids

    def encode_prompt(self, prompt: str) -> list[int]:
        """KAITO's ``/chat`` ``prompt``: one user turn through the chat template when the model has one
        (an instruct model given the raw text stops at once: the answer was the question), else the
        text as it is, for a base model to continue."""
        if getattr(self.tokenizer, "chat_template", None):
            return self.encode_chat([{"role": "user", "content": prompt}])
        return self.encode(prompt)

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))

    def adapters(self) -> list[AdapterInfo]:
        """The Workspace's adapters, which clients may name."""
        return [a for a in self._adapter_specs if a.name != CHAT_ADAPTER]

    def chat_adapter(self) -> str | None:
        """What KAITO's ``/chat`` applies: the Workspace's adapter, the sum of its adapters
        (:data:`CHAT_ADAPTER`), or none."""
        if any(a.name == CHAT_ADAPTER for a in self._adapter_specs):
            return CHAT_ADAPTER
        if self.chat_refusal:
            raise BadRequest(self.chat_refusal)
        mine = self.adapters()
        return mine[0].name if len(mine) == 1 else None

    def admit(self, request: GenerationRequest) -> int:
        """Raise the error a request gets before queueing, or return its new-token budget."""
        ok, why = self.healthy()
        if not ok:
            raise EngineUnavailable(why)
        if request.adapter and request.adapter not in {a.name for a in self._adapter_specs}:  # _chat too
            raise BadRequest(f"unknown adapter {request.adapter!r}")
        if len(request.prompt_ids) > self.max_prompt_tokens:
            raise BadRequest(
                f"prompt is {len(request.prompt_ids)} tokens; the limit is {self.max_prompt_tokens}"
            )
        budget = self.max_model_len - len(request.prompt_ids)
        if budget <= 0:
            raise BadRequest(f"prompt fills the model's {self.max_model_len}-token context")
        return budget
