"""The HTTP API over an engine: KAITO's ``/chat``, the OpenAI API, health and Prometheus metrics.

``make_app()`` returns a FastAPI app whose routes read the engine from ``app.state.engine``, so the
same app serves in-process (tests, benchmarks) and as a Ray Serve ingress (one engine per replica).
Errors: ``/chat`` answers ``{"detail": ...}`` (KAITO's shape); ``/v1/*`` answers OpenAI's
``{"error": {"message", "type", "code"}}``. A stream's first chunk is awaited before the 200 is
committed, so a request that fails at once gets a real error status, not a broken stream.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from services.serving.auth import allowed, configured_key, presented_key
from services.serving.engines.base import (
    Chunk,
    Engine,
    EngineError,
    EngineUnavailable,
    GenerationRequest,
    SamplingParams,
)
from services.serving.metrics import Metrics, vllm_native

DEFAULT_MAX_NEW_TOKENS = 256


class Limits(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    max_new_tokens: int = 512  # per request, whatever the client asks
    max_body_bytes: int = 1 << 20
    request_timeout_s: float = 120.0


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = ""

    def text(self) -> dict[str, Any]:
        content = self.content
        if isinstance(content, list):  # OpenAI content parts: keep the text ones
            content = "".join(str(p.get("text", "")) for p in content if p.get("type") == "text")
        return {"role": "system" if self.role == "developer" else self.role, "content": content or ""}


class ChatBody(BaseModel):
    """KAITO's /chat request."""

    model_config = ConfigDict(extra="forbid")
    prompt: str | None = None
    messages: list[Message] | None = None
    return_full_text: bool = True
    clean_up_tokenization_spaces: bool = False
    generate_kwargs: dict[str, Any] = {}


class GenerateKwargs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_length: int | None = Field(default=None, gt=0)  # prompt + new tokens (transformers' meaning)
    max_new_tokens: int | None = Field(default=None, gt=0)
    temperature: float = Field(default=1.0, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=0)
    do_sample: bool = False
    repetition_penalty: float = Field(default=1.0, gt=0)
    seed: int | None = Field(default=None, ge=0, le=2**64 - 1)  # torch's range


class OpenAIBase(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send fields we do not use (user, logprobs: false, …)
    model: str
    max_tokens: int | None = Field(default=None, gt=0)
    max_completion_tokens: int | None = Field(default=None, gt=0)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=1)
    stop: str | list[str] | None = None
    stream: bool = False
    seed: int | None = Field(default=None, ge=0, le=2**64 - 1)  # torch's range
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)


class ChatCompletionBody(OpenAIBase):
    messages: list[Message] = Field(min_length=1)


class CompletionBody(OpenAIBase):
    prompt: str


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind


_process_engine: Engine | None = None
_process_metrics: Metrics | None = None


def set_process_engine(engine: Engine) -> None:
    """The engine of this process, for apps built without one. Ray Serve serves a copy of the ingress
    app it was given, so a replica cannot hand its engine to that app through ``app.state`` (nor take
    its metrics from there: they are the process's too, see :func:`process_metrics`)."""
    global _process_engine, _process_metrics
    _process_engine = engine
    if _process_metrics is None:
        _process_metrics = Metrics()


def process_metrics() -> str:
    """This process's ``/metrics`` text (a replica's own scrape port serves it), or "" before its
    engine is set."""
    if _process_engine is None or _process_metrics is None:
        return ""
    return render_metrics(_process_metrics, _process_engine)


def render_metrics(metrics: Metrics, engine: Engine) -> str:
    stats = engine.stats()
    text = metrics.render(stats)
    if getattr(engine, "exports_vllm_metrics", False):  # the vLLM engine: vLLM's own, unchanged
        return text + vllm_native()
    return text + metrics.render_vllm_names(stats, engine.model_name)


def _metrics(request: Request) -> Metrics:
    # module-level for the same reason as _loaded_engine: the app's own (in process), else the process's
    metrics: Metrics | None = request.app.state.metrics or _process_metrics
    if metrics is None:
        raise EngineUnavailable("the model is still loading")
    return metrics


def _loaded_engine(request: Request) -> Engine | None:
    # Module-level on purpose: Ray Serve ships the app's route closures by value (cloudpickle), with a
    # snapshot of the module globals they name, so a closure must never read ``_process_engine`` itself.
    engine: Engine | None = request.app.state.engine or _process_engine
    return engine


def _engine(request: Request) -> Engine:
    engine = _loaded_engine(request)
    if engine is None:
        raise EngineUnavailable("the model is still loading")
    return engine


def _limits(request: Request) -> Limits:
    limits: Limits = request.app.state.limits
    return limits


def _first_error(exc: ValidationError | RequestValidationError) -> str:
    errors = exc.errors()
    first = errors[0]
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    return f"{where}: {first.get('msg')}" if where else str(first.get("msg"))


def make_app(
    engine: Engine | None = None, limits: Limits | None = None, api_key: str | None = None
) -> FastAPI:
    """``api_key``: required on /chat and /v1/* (None: the replica's ``KAITEN_API_KEY``, if set)."""
    app = FastAPI(title="Kaiten serving", docs_url=None, redoc_url=None)
    app.state.engine = engine
    app.state.limits = limits or Limits()
    app.state.metrics = Metrics() if engine is not None else None  # None: the process's (a Serve replica)
    app.state.api_key = api_key

    @app.middleware("http")
    async def require_key(request: Request, call_next: Any) -> Response:
        expected = configured_key(request.app.state.api_key)
        presented = presented_key(request.headers.get("authorization"), request.headers.get("x-api-key"))
        if not allowed(request.url.path, expected, presented):
            response = _error(request, 401, "missing or wrong API key", "authentication_error")
            response.headers["WWW-Authenticate"] = "Bearer"
            return response
        answer: Response = await call_next(request)
        return answer

    @app.middleware("http")
    async def body_limit(request: Request, call_next: Any) -> Response:
        length = request.headers.get("content-length")
        limit = _limits(request).max_body_bytes
        if length is not None and length.isdigit() and int(length) > limit:
            return _error(request, 413, f"request body is {length} bytes; the limit is {limit}")
        response: Response = await call_next(request)
        return response

    # Outermost: a server span per model request (not /health, /metrics), continuing the caller's trace
    # (traceparent); spans go nowhere until the replica configures an exporter (app.Server).
    app.add_middleware(
        OpenTelemetryMiddleware, excluded_urls="/health,/metrics", exclude_spans=["receive", "send"]
    )

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        return _error(request, 422 if _openai_route(request) else 400, _first_error(exc))

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> Response:
        return _error(request, exc.status, str(exc), exc.kind)

    @app.exception_handler(EngineError)
    async def engine_error(request: Request, exc: EngineError) -> Response:
        kind = {429: "rate_limit_error", 503: "server_error", 504: "timeout"}.get(
            exc.status, "invalid_request_error"
        )
        if exc.status == 429:
            _metrics(request).rejected += 1
        return _error(request, exc.status, str(exc), kind)

    @app.get("/health")
    async def health(request: Request) -> Response:
        engine = _loaded_engine(request)
        ok, why = engine.healthy() if engine is not None else (False, "the model is still loading")
        return JSONResponse({"status": "ok" if ok else why}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        text = render_metrics(_metrics(request), _engine(request))
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        engine = _engine(request)
        created = int(_metrics(request).started)
        data = [{"id": engine.model_name, "object": "model", "created": created, "owned_by": "kaiten"}]
        data += [
            {
                "id": a.name,
                "object": "model",
                "created": created,
                "owned_by": "kaiten",
                "parent": engine.model_name,
            }
            for a in engine.adapters()
        ]
        return {"object": "list", "data": data}

    @app.post("/chat")
    async def chat(request: Request) -> Response:
        engine = _engine(request)
        try:
            body = ChatBody.model_validate(await request.json())
            kwargs = GenerateKwargs.model_validate(body.generate_kwargs)
        except ValidationError as exc:
            raise ApiError(400, _first_error(exc)) from exc
        except ValueError as exc:
            raise ApiError(400, f"body is not JSON: {exc}") from exc
        if (body.prompt is None) == (body.messages is None):
            raise ApiError(400, "give exactly one of 'prompt' or 'messages'")
        if body.prompt is not None:
            if not body.prompt.strip():
                raise ApiError(400, "prompt is empty")
            ids = engine.encode_prompt(body.prompt)
        else:
            assert body.messages is not None
            if not body.messages:
                raise ApiError(400, "messages is empty")
            ids = engine.encode_chat([m.text() for m in body.messages])
        max_new = kwargs.max_new_tokens or (
            max(1, kwargs.max_length - len(ids)) if kwargs.max_length else DEFAULT_MAX_NEW_TOKENS
        )
        params = SamplingParams(
            max_new_tokens=min(max_new, _limits(request).max_new_tokens),
            temperature=kwargs.temperature,
            top_p=kwargs.top_p,
            top_k=kwargs.top_k,
            do_sample=kwargs.do_sample,
            repetition_penalty=kwargs.repetition_penalty,
            seed=kwargs.seed,
        )
        # KAITO's /chat applies the Workspace's adapters: the one, or the strength-weighted sum of several
        text, _, _ = await _collect(request, _request(request, ids, params, engine.chat_adapter()))
        if body.return_full_text and body.prompt is not None:
            text = body.prompt + text
        return JSONResponse({"Result": text})

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request, body: ChatCompletionBody) -> Response:
        engine = _engine(request)
        adapter = _adapter(engine, body.model)
        ids = engine.encode_chat([m.text() for m in body.messages])
        gen = _request(request, ids, _openai_params(request, body), adapter)
        return await _openai_response(request, body, gen, len(ids), chat=True)

    @app.post("/v1/completions", response_model=None)
    async def completions(request: Request, body: CompletionBody) -> Response:
        engine = _engine(request)
        adapter = _adapter(engine, body.model)
        if not body.prompt:
            raise ApiError(422, "prompt is empty")
        ids = engine.encode(body.prompt)
        gen = _request(request, ids, _openai_params(request, body, default_max=16), adapter)
        return await _openai_response(request, body, gen, len(ids), chat=False)

    return app


def _openai_route(request: Request) -> bool:
    """An OpenAI API path, wherever the app is mounted (Ray Serve's route prefix is the root path)."""
    path, root = request.url.path, request.scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :]
    return path.startswith("/v1/")


def _error(request: Request, status: int, message: str, kind: str = "invalid_request_error") -> Response:
    if _openai_route(request):
        return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)
    return JSONResponse({"detail": message}, status_code=status)


def _adapter(engine: Engine, model: str) -> str | None:
    if model == engine.model_name:
        return None
    if model in {a.name for a in engine.adapters()}:
        return model
    known = [engine.model_name, *(a.name for a in engine.adapters())]
    raise ApiError(404, f"model {model!r} does not exist; served: {', '.join(known)}", "not_found_error")


def _openai_params(
    request: Request, body: OpenAIBase, default_max: int = DEFAULT_MAX_NEW_TOKENS
) -> SamplingParams:
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    if len(stop) > 4 or any(not s for s in stop):
        raise ApiError(422, "stop takes at most 4 non-empty strings")
    asked = body.max_completion_tokens or body.max_tokens or default_max
    return SamplingParams(
        max_new_tokens=min(asked, _limits(request).max_new_tokens),
        temperature=body.temperature,
        top_p=body.top_p,
        do_sample=body.temperature > 0,
        stop=stop,
        seed=body.seed,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
    )


def _request(
    request: Request, ids: list[int], params: SamplingParams, adapter: str | None
) -> AsyncIterator[Chunk]:
    deadline = time.monotonic() + _limits(request).request_timeout_s
    return _metrics(request).observe(
        _engine(request).generate(GenerationRequest(ids, params, adapter, deadline)), len(ids)
    )


async def _collect(request: Request, gen: AsyncIterator[Chunk]) -> tuple[str, str, int]:
    text, finish, tokens = [], "stop", 0
    async for chunk in gen:
        text.append(chunk.text)
        tokens = chunk.tokens
        finish = chunk.finish_reason or finish
    return "".join(text), finish, tokens


async def _openai_response(
    request: Request, body: OpenAIBase, gen: AsyncIterator[Chunk], prompt_tokens: int, *, chat: bool
) -> Response:
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    created = int(time.time())
    kind = "chat.completion" if chat else "text_completion"
    if not body.stream:
        text, finish, tokens = await _collect(request, gen)
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": tokens,
            "total_tokens": prompt_tokens + tokens,
        }
        return JSONResponse(
            {
                "id": rid,
                "object": kind,
                "created": created,
                "model": body.model,
                "choices": [choice],
                "usage": usage,
            }
        )
    first = await anext(gen)  # raises EngineError before anything is committed
    kind = "chat.completion.chunk" if chat else "text_completion"

    def frame(chunk: Chunk, role: bool = False) -> str:
        if chat:
            delta: dict[str, Any] = (
                {"role": "assistant", "content": chunk.text} if role else {"content": chunk.text}
            )
            choice = {"index": 0, "delta": delta, "finish_reason": chunk.finish_reason}
        else:
            choice = {"index": 0, "text": chunk.text, "finish_reason": chunk.finish_reason}
        data = {"id": rid, "object": kind, "created": created, "model": body.model, "choices": [choice]}
        return f"data: {json.dumps(data)}\n\n"

    async def events() -> AsyncIterator[str]:
        yield frame(first, role=True)
        if first.finish_reason is None:
            try:
                async for chunk in gen:
                    yield frame(chunk)
            except EngineError as exc:  # after the 200: report in-band, as OpenAI does
                yield f"data: {json.dumps({'error': {'message': str(exc), 'code': exc.status}})}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")
