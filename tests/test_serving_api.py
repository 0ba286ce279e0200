"""The serving API over the real transformers engine and SmolLM2, twice: on real Ray Serve (the way
the workload deploys it) and in-process on uvicorn. Both on 127.0.0.1: /chat, the official openai
client (chat, streaming, completions, models), bad input, a flood, adapters, and Ray on loopback only."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from kaiten.cli import main as cli
from kaiten.local.procs import descendants, free_port
from kaiten.local.ray_head import RayHead
from services.serving.api import Limits, make_app
from services.serving.app import AdapterSpec, ServingConfig, build, build_engine
from services.serving.engines.transformers_engine import TransformersEngine
from tests.conftest import NAME, SMOLLM2
from tests.test_loopback_only import LOOPBACK, sockets

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The first test of a server pays for loading the model and, on Ray, starting a head and deploying:
# measured 47 s cold (model converted from GGUF on first use).
pytestmark = pytest.mark.timeout(240)


class Server:
    def __init__(self, app: object) -> None:
        self.port = free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Server:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


class Endpoint:
    def __init__(self, url: str, replica_metrics: str | None = None) -> None:
        self.url = url
        self.replica_metrics = replica_metrics  # the replica's own /metrics (on Ray Serve)


@contextmanager
def in_process(
    engine: TransformersEngine, limits: Limits | None = None, api_key: str | None = None
) -> Iterator[Server]:
    asyncio.run(engine.start())  # the batch worker is a thread of its own, independent of this loop
    try:
        with Server(make_app(engine, limits, api_key)) as server:
            yield server
    finally:
        asyncio.run(engine.shutdown())


@pytest.fixture(scope="session")
def serve_url(ray_head: RayHead) -> Iterator[str]:
    """Ray Serve's HTTP proxy on the session's Ray head, on 127.0.0.1."""
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


@contextmanager
def on_ray_serve(serve_url: str, name: str, config: ServingConfig) -> Iterator[Endpoint]:
    """``config`` deployed as its own Serve application under ``/<name>``; deleted afterwards."""
    from ray import serve

    serve.run(build(config.model_dump()), name=name, route_prefix=f"/{name}")
    port = config.metrics_port
    try:
        yield Endpoint(f"{serve_url}/{name}", f"http://127.0.0.1:{port}/metrics" if port else None)
    finally:
        serve.delete(name)


@pytest.fixture(scope="module", params=["ray-serve", "in-process"])
def server(
    request: pytest.FixtureRequest, model_dir: Path, adapter_dir: Path, second_adapter_dir: Path
) -> Iterator[Endpoint]:
    """The model with two adapters, as a Workspace with two: /chat answers with their weighted sum."""
    adapters = [
        AdapterSpec(name="style", path=str(adapter_dir)),
        AdapterSpec(name="tone", path=str(second_adapter_dir), strength=0.5),
    ]
    if request.param == "ray-serve":
        config = ServingConfig(
            model_name=NAME,
            source=SMOLLM2,
            adapters=adapters,
            metrics_port=free_port(),  # each replica's own scrape target
            metrics_host="127.0.0.1",
        )
        with on_ray_serve(request.getfixturevalue("serve_url"), "kaiten", config) as endpoint:
            yield endpoint
        return
    engine = build_engine(ServingConfig(model_name=NAME, source=SMOLLM2, adapters=adapters))
    assert isinstance(engine, TransformersEngine)
    with in_process(engine) as server:
        yield Endpoint(server.url)


@pytest.fixture(scope="module")
def base_server(model_dir: Path) -> Iterator[Endpoint]:
    """The model alone, as the seed's first Workspace (no adapters): /chat answers with the base."""
    with in_process(TransformersEngine(model_dir=model_dir, model_name=NAME)) as server:
        yield Endpoint(server.url)


@pytest.fixture(scope="module")
def client(server: Endpoint) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def test_chat_answers_a_question(base_server: Endpoint) -> None:
    server = base_server
    r = httpx.post(
        f"{server.url}/chat",
        json={"messages": [{"role": "user", "content": "What is the capital of France?"}]},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    assert "Paris" in r.json()["Result"]
    prompt = httpx.post(
        f"{server.url}/chat",
        json={"prompt": "The capital of France is", "generate_kwargs": {"max_new_tokens": 8}},
        timeout=60,
    )
    assert prompt.status_code == 200 and prompt.json()["Result"].startswith("The capital of France is")
    short = httpx.post(
        f"{server.url}/chat",
        json={
            "prompt": "Count: one, two,",
            "return_full_text": False,
            "generate_kwargs": {"max_new_tokens": 3},
        },
        timeout=60,
    )
    assert 0 < len(short.json()["Result"].split()) <= 4


def test_the_seeds_curl_line_gets_an_answer_not_its_question_back(base_server: Endpoint) -> None:
    """Issue 18: the seed's walkthrough sends ``{"prompt": "YOUR QUESTION HERE"}`` to /chat. The raw prompt
    made the instruct model stop at once: the answer was the question, echoed. A prompt to a model with
    a chat template is now one user turn through it; ``return_full_text`` keeps KAITO's meaning."""
    server = base_server
    question = "What is the capital of France?"
    r = httpx.post(  # curl -X POST .../chat -H "Content-Type: application/json" -d '{"prompt":"..."}'
        f"{server.url}/chat",
        content=f'{{"prompt":"{question}"}}',
        headers={"Content-Type": "application/json"},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    result = r.json()["Result"]
    assert result.startswith(question) and "Paris" in result[len(question) :], result
    alone = httpx.post(f"{server.url}/chat", json={"prompt": question, "return_full_text": False}, timeout=60)
    assert "Paris" in alone.json()["Result"] and not alone.json()["Result"].startswith(question), alone.text


def test_openai_client_chat_stream_completions_models(client: openai.OpenAI) -> None:
    chat = client.chat.completions.create(
        model=NAME,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0,
        max_tokens=20,
    )
    assert "Paris" in (chat.choices[0].message.content or "")
    assert (
        chat.usage is not None
        and chat.usage.completion_tokens > 0
        and chat.choices[0].finish_reason == "stop"
    )
    pieces = [
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(
            model=NAME,
            messages=[{"role": "user", "content": "Name three colors."}],
            temperature=0,
            max_tokens=24,
            stream=True,
        )
    ]
    assert len([p for p in pieces if p]) > 3 and "".join(pieces).strip()
    completion = client.completions.create(model=NAME, prompt="1, 2, 3, 4,", max_tokens=6, temperature=0)
    assert completion.choices[0].text.strip() and completion.choices[0].finish_reason == "length"
    models = [m.id for m in client.models.list()]
    assert models == [NAME, "style", "tone"]  # not the sum /chat uses: it is no model a client names


def test_bad_inputs_get_clear_errors(server: Endpoint, client: openai.OpenAI) -> None:
    cases = [
        ({"nothing": 1}, "nothing"),
        ({}, "exactly one of 'prompt' or 'messages'"),
        ({"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "exactly one"),
        ({"prompt": "  "}, "prompt is empty"),
        ({"prompt": "hi", "generate_kwargs": {"temperature": -1}}, "temperature"),
        ({"prompt": "hi", "generate_kwargs": {"beams": 4}}, "beams"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "role"),
        ({"prompt": "hi", "generate_kwargs": {"seed": 2**64}}, "seed"),  # beyond torch's range
        ({"prompt": "hi", "generate_kwargs": {"seed": -1}}, "seed"),
    ]
    for body, says in cases:
        r = httpx.post(f"{server.url}/chat", json=body, timeout=30)
        assert r.status_code == 400 and says in r.json()["detail"], (body, r.text)
    not_json = httpx.post(
        f"{server.url}/chat", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert not_json.status_code == 400 and "not JSON" in not_json.json()["detail"]
    huge = httpx.post(f"{server.url}/chat", json={"prompt": "x" * (2 << 20)}, timeout=30)
    assert huge.status_code == 413 and "limit" in huge.json()["detail"]
    too_long = httpx.post(f"{server.url}/chat", json={"prompt": "hello " * 3000}, timeout=30)
    assert too_long.status_code == 400 and "limit is 2048" in too_long.json()["detail"]
    with pytest.raises(
        openai.NotFoundError, match="does not exist; served: smollm2-135m-instruct, style, tone"
    ):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.UnprocessableEntityError, match="n"):
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], n=2)
    with pytest.raises(openai.UnprocessableEntityError, match="messages"):
        client.chat.completions.create(model=NAME, messages=[])
    with pytest.raises(openai.UnprocessableEntityError, match="seed"):
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], seed=2**64)
    with pytest.raises(openai.UnprocessableEntityError, match="presence_penalty"):  # OpenAI's range: ±2
        client.chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": "hi"}], presence_penalty=3
        )


def test_adapter_changes_the_output(client: openai.OpenAI) -> None:
    ask = [{"role": "user", "content": "What is the capital of France?"}]
    base = client.chat.completions.create(model=NAME, messages=ask, temperature=0, max_tokens=16)
    styled = client.chat.completions.create(model="style", messages=ask, temperature=0, max_tokens=16)
    assert base.choices[0].message.content != styled.choices[0].message.content


def test_chat_applies_the_workspaces_adapters_as_kaito_does(server: Endpoint, client: openai.OpenAI) -> None:
    """Issue 18: /chat answered with the base model; KAITO's answers with the Workspace's adapters, merged
    and weighted by strength. Two adapters here: /chat is neither the base nor either adapter alone."""
    ask = [{"role": "user", "content": "What is the capital of France?"}]

    def openai_answer(model: str) -> str:
        got = client.chat.completions.create(model=model, messages=ask, temperature=0, max_tokens=16)
        return got.choices[0].message.content or ""

    r = httpx.post(
        f"{server.url}/chat",
        json={"messages": ask, "generate_kwargs": {"max_new_tokens": 16}},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    answers = {"chat": r.json()["Result"], **{m: openai_answer(m) for m in (NAME, "style", "tone")}}
    assert len(set(answers.values())) == 4, answers


def test_metrics_and_health(server: Endpoint) -> None:
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    text = httpx.get(f"{server.url}/metrics").text
    ok = next(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith('kaiten_requests_total{outcome="ok"}')
    )
    assert ok >= 1
    for name in (
        "kaiten_completion_tokens_total",
        "kaiten_time_to_first_token_seconds_count",
        "kaiten_queue_depth",
        "kaiten_batch_size",
    ):
        assert f"\n{name} " in text, name
    # vLLM's names for what means the same here (KAITO's dashboards, its KEDA scaler)
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in (
        "vllm:num_requests_waiting",
        "vllm:num_requests_running",
        "vllm:time_to_first_token_seconds",
    ):
        assert name in families and families[name].samples[0].labels["model_name"] == NAME, name
    generated = families["vllm:generation_tokens"].samples[0]  # the parser drops _total from the name
    assert generated.value == families["kaiten_completion_tokens"].samples[0].value > 0
    if server.replica_metrics:  # the replica's own port: what the proxy's random replica said, and more
        own = {f.name: f for f in text_string_to_metric_families(httpx.get(server.replica_metrics).text)}
        served = next(s.value for s in own["kaiten_requests"].samples if s.labels.get("outcome") == "ok")
        assert served >= ok, own.keys()
        assert "vllm:num_requests_waiting" in own


@pytest.fixture(params=["ray-serve", "in-process"])
def small_queue(request: pytest.FixtureRequest, model_dir: Path) -> Iterator[Endpoint]:
    """A server that batches one request at a time and queues at most two."""
    if request.param == "ray-serve":
        config = ServingConfig(model_name=NAME, source=SMOLLM2, max_queue=2, max_batch_size=1)
        with on_ray_serve(request.getfixturevalue("serve_url"), "flood", config) as endpoint:
            yield endpoint
        return
    engine = TransformersEngine(model_dir=model_dir, model_name=NAME, max_queue=2, max_batch_size=1)
    with in_process(engine) as server:
        yield Endpoint(server.url)


def test_a_flood_gets_429_not_a_crash(small_queue: Endpoint) -> None:
    async def flood() -> list[int]:
        async with httpx.AsyncClient(timeout=120) as http:
            body = {"prompt": "Once upon a time", "generate_kwargs": {"max_new_tokens": 24}}
            replies = await asyncio.gather(
                *(http.post(f"{small_queue.url}/chat", json=body) for _ in range(12))
            )
            return [r.status_code for r in replies]

    codes = asyncio.run(flood())
    assert codes.count(200) >= 2 and codes.count(429) >= 5 and set(codes) == {200, 429}, codes
    after = httpx.post(
        f"{small_queue.url}/chat", json={"prompt": "Hi", "generate_kwargs": {"max_new_tokens": 2}}, timeout=60
    )
    assert after.status_code == 200  # still serving
    assert "kaiten_requests_rejected_total " in httpx.get(f"{small_queue.url}/metrics").text


def test_ray_listens_and_dials_on_loopback_only(ray_head: RayHead, serve_url: str) -> None:
    """Every socket of the Ray head, its workers and replicas, and this driver, is on loopback."""
    assert httpx.get(f"{serve_url}/-/healthz", timeout=10).status_code == 200
    pids = descendants(ray_head.pid) | {ray_head.pid, os.getpid()}
    listeners = sockets(pids, listening=True)
    connections = sockets(pids, listening=False)
    assert {pid for _, _, pid in listeners} - {os.getpid()}, "expected the Ray head's listeners"
    assert any(local.endswith(f":{ray_head.port}") for local, _, _ in listeners)
    assert any(local.endswith(f":{serve_url.rsplit(':', 1)[1]}") for local, _, _ in listeners)
    bad = [s for s in listeners if not LOOPBACK.match(s[0])]
    bad += [s for s in connections if not (LOOPBACK.match(s[0]) and LOOPBACK.match(s[1]))]
    assert not bad, f"non-loopback sockets: {bad}"


def test_an_api_key_guards_the_model_routes_but_not_the_probes(
    model_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = TransformersEngine(model_dir=model_dir, model_name=NAME)
    with in_process(engine, api_key="s3cret-key") as server:
        for path, body in (
            ("/chat", {"prompt": "hi"}),
            ("/v1/chat/completions", {"model": NAME, "messages": []}),
        ):
            refused = httpx.post(f"{server.url}{path}", json=body, timeout=30)
            assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer", (
                refused.text
            )
            assert "s3cret" not in refused.text
        assert httpx.post(f"{server.url}/chat", json={"prompt": "hi"}, timeout=30).json() == {
            "detail": "missing or wrong API key"
        }
        assert (
            httpx.get(f"{server.url}/v1/models", headers={"X-API-Key": "wrong"}, timeout=30).status_code
            == 401
        )
        assert (
            httpx.get(f"{server.url}/v1/models", headers={"X-API-Key": "s3cret-key"}, timeout=30).status_code
            == 200
        )
        assert httpx.get(f"{server.url}/health", timeout=30).status_code == 200
        assert httpx.get(f"{server.url}/metrics", timeout=30).status_code == 200

        wrong = openai.OpenAI(base_url=f"{server.url}/v1", api_key="nope", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
        right = openai.OpenAI(base_url=f"{server.url}/v1", api_key="s3cret-key", max_retries=0)
        stream = right.chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": "Say hi"}], max_tokens=4, stream=True
        )
        assert [chunk for chunk in stream], "a streamed completion with the key"

        # `kaiten chat --url` (a port-forward to a cluster's Workspace, say) sends the key it is given
        ask = ["chat", "Say hi", "--max-tokens", "4", "--url", server.url]
        refused_cli = _kaiten(ask, capsys)
        assert refused_cli[0] == 1 and "needs an API key (--api-key or $KAITEN_API_KEY)" in refused_cli[2]
        code, out, err = _kaiten([*ask, "--api-key", "s3cret-key"], capsys)
        assert code == 0 and out.strip(), err
        monkeypatch.setenv("KAITEN_API_KEY", "s3cret-key")
        assert _kaiten(ask, capsys)[0] == 0


def _kaiten(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.run(cli.build_parser().parse_args(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_the_api_key_comes_from_the_replicas_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from services.serving.auth import API_KEY_ENV, configured_key
    from services.workload import manifests

    assert manifests.API_KEY_ENV == API_KEY_ENV  # what the workload renders is what the replica reads
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    assert configured_key(None) == "from-env"
    assert configured_key("explicit") == "explicit"
    monkeypatch.setenv(API_KEY_ENV, "")
    assert configured_key(None) is None


def test_vllms_own_metrics_pass_through_unchanged() -> None:
    """With the vLLM engine, /metrics adds what vLLM's stat logger registered in prometheus_client
    (names and labels as vLLM exports them), and nothing else of the registry."""
    from prometheus_client import REGISTRY, Gauge

    from services.serving.metrics import vllm_native

    waiting = Gauge("vllm:num_requests_waiting", "Number of requests waiting.", ["model_name", "engine"])
    try:
        waiting.labels(NAME, "0").set(3)
        text = vllm_native()
    finally:
        REGISTRY.unregister(waiting)
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert list(families) == ["vllm:num_requests_waiting"], text
    sample = families["vllm:num_requests_waiting"].samples[0]
    assert sample.labels == {"model_name": NAME, "engine": "0"} and sample.value == 3
    assert vllm_native() == ""  # no vLLM engine in this process: nothing
