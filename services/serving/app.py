"""The Ray Serve application: a typed :class:`ServingConfig` → one deployment with the HTTP API.

Ray Serve imports ``services.serving.app:build`` with the config as its arguments (the workload
renders it from a Plan into ``serveConfigV2`` or the local Serve REST API). Each replica loads its own
engine; the FastAPI app is the ingress.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from services.serving.api import Limits, make_app, process_metrics, set_process_engine
from services.serving.engines.base import CHAT_ADAPTER, AdapterInfo, Engine
from shared import telemetry
from shared.model_sources import ModelSource, resolve

log = logging.getLogger(__name__)
SERVE_HEADROOM = 32  # requests a replica takes beyond what its engine queues: cheap ones, or 429s


class AdapterSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(min_length=1)
    path: str | None = None  # a directory with adapter_config.json + adapter_model.safetensors, or
    image: str | None = None  # an OCI artifact with them (pulled when the replica starts)
    pull_secrets: list[str] = []  # docker config json files / mounted Secret dirs for ``image``
    strength: float = Field(default=1.0, ge=0, le=1)

    @model_validator(mode="after")
    def _one_source(self) -> AdapterSpec:
        if (self.path is None) == (self.image is None):
            raise ValueError(f"adapter {self.name!r}: give exactly one of path and image")
        return self

    def local_path(self) -> str:
        """The adapter's directory, pulling its image first if it has one."""
        if self.path is not None:
            return self.path
        from shared.model_sources import cache_root
        from shared.oci import pull_adapter

        assert self.image is not None
        return str(pull_adapter(self.image, cache_root() / "oci", self.pull_secrets))


class ServingConfig(BaseModel):
    """What the workload renders from a Plan; everything the server needs, nothing secret."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    model_name: str  # the name clients use (the preset name)
    source: ModelSource
    engine: Literal["transformers", "vllm"] = "transformers"
    engine_args: dict[str, str | int | float | bool] = {}  # the plan's (vLLM flags, or dtype etc.)
    adapters: list[AdapterSpec] = []
    limits: Limits = Limits()
    max_batch_size: int = Field(default=8, ge=1)
    batch_wait_ms: float = Field(default=10.0, ge=0)
    max_queue: int = Field(default=64, ge=1)
    max_prompt_tokens: int = Field(default=2048, ge=1)
    threads: int = Field(default=1, ge=1)  # torch threads; 1 when other processes share the CPU
    replicas: int = Field(default=1, ge=1)
    num_cpus: float = Field(default=1.0, gt=0)
    num_gpus: float = Field(default=0.0, ge=0)
    # Each replica's own /metrics on this port (a scrape through Serve's proxy reaches one replica,
    # chosen by the proxy); None: none. A second replica in the same network namespace finds it taken
    # and is scraped through the proxy only.
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    metrics_host: str = "0.0.0.0"  # noqa: S104 - a pod's own network; 127.0.0.1 on a host network

    @model_validator(mode="after")
    def _distinct_names(self) -> ServingConfig:
        names = [a.name for a in self.adapters]
        clash = sorted({n for n in names if names.count(n) > 1 or n == self.model_name})
        if clash:
            raise ValueError(f"adapter names must be distinct from each other and the model: {clash}")
        return self


def chat_adapters(adapters: list[AdapterInfo]) -> tuple[list[AdapterInfo], str]:
    """The adapters to load, with their weighted sum for KAITO's ``/chat`` when there are several; and
    why ``/chat`` must refuse, when they cannot be summed (the OpenAI routes still serve each)."""
    if len(adapters) < 2:
        return adapters, ""
    from services.serving.engines.combine import CombineError, combined_adapter
    from shared.model_sources import cache_root

    try:
        chat = combined_adapter(adapters, cache_root() / "adapters")
    except Exception as exc:  # CombineError, or files that are not what they say: the rest still serves
        why = exc if isinstance(exc, CombineError) else f"{type(exc).__name__}: {exc}"
        log.warning("/chat will refuse requests: %s", why)
        return adapters, (
            f"/chat answers with the Workspace's adapters together, and these cannot be summed: {why}; "
            "ask /v1/chat/completions with one adapter as the model"
        )
    return [*adapters, AdapterInfo(name=CHAT_ADAPTER, path=str(chat))], ""


def build_engine(config: ServingConfig) -> Engine:
    adapters, refusal = chat_adapters(
        [AdapterInfo(name=a.name, path=a.local_path(), strength=a.strength) for a in config.adapters]
    )
    engine = _engine(config, adapters)
    engine.chat_refusal = refusal
    return engine


def _engine(config: ServingConfig, adapters: list[AdapterInfo]) -> Engine:
    if config.engine == "vllm":
        from services.serving.engines.vllm_engine import VLLMEngine
        from shared.model_sources import cache_root

        # vLLM downloads a HF id itself (and reads safetensors directories); GGUF is converted first.
        model = config.source.path if config.source.kind == "hf" else str(resolve(config.source))
        return VLLMEngine(
            model=model,
            model_name=config.model_name,
            engine_args=config.engine_args,
            adapters=adapters,
            max_queue=config.max_queue,
            max_prompt_tokens=config.max_prompt_tokens,
            adapter_cache=cache_root() / "adapters",
        )
    from services.serving.engines.transformers_engine import TransformersEngine

    args = config.engine_args
    return TransformersEngine(
        model_dir=resolve(config.source),
        model_name=config.model_name,
        dtype=str(args.get("dtype", "float32")),
        max_batch_size=int(args.get("max-batch-size", config.max_batch_size)),
        batch_wait_ms=config.batch_wait_ms,
        max_queue=config.max_queue,
        max_prompt_tokens=config.max_prompt_tokens,
        max_model_len=int(args.get("max-model-len", 8192)),
        threads=config.threads,
        adapters=adapters,
    )


def gpus_per_replica(config: ServingConfig) -> int:
    args = config.engine_args
    return int(args.get("tensor-parallel-size", 1)) * int(args.get("pipeline-parallel-size", 1))


def replica_options(config: ServingConfig) -> dict[str, Any]:
    """Ray resources for one replica. A vLLM replica spanning several GPUs (tensor/pipeline parallel)
    gets a placement group, one bundle per GPU worker, as Ray Serve LLM lays it out: packed on one node
    for tensor parallelism, spread over nodes only when pipeline parallelism splits the model."""
    gpus = gpus_per_replica(config)
    if config.engine != "vllm" or gpus <= 1:
        return {"ray_actor_options": {"num_cpus": config.num_cpus, "num_gpus": config.num_gpus}}
    spread = int(config.engine_args.get("pipeline-parallel-size", 1)) > 1
    return {
        "ray_actor_options": {"num_cpus": config.num_cpus},
        "placement_group_bundles": [{"CPU": config.num_cpus}] + [{"GPU": 1.0}] * gpus,
        "placement_group_strategy": "PACK" if spread else "STRICT_PACK",
    }


def keep_internal_grpc_on_loopback() -> bool:
    """On a loopback-only Ray node, bind the replica's inter-deployment gRPC server to 127.0.0.1.

    Ray Serve 2.60 replicas open that server on ``[::]:0`` (every address) after the deployment's
    constructor returns, with no setting to change it; a found-by-test leak on ``kaiten up``, which
    promises that nothing listens beyond loopback. Peers dial it at the replica's node IP, so on a node
    whose IP is 127.0.0.1 the loopback bind is equivalent. Elsewhere (a KubeRay pod) nothing changes.
    Returns whether the rebind is in place.
    """
    import ray
    from ray.serve._private import replica

    if ray.util.get_node_ip_address() != "127.0.0.1":  # type: ignore[no-untyped-call]
        return False
    original = getattr(replica, "add_port_to_grpc_server", None)
    if original is None:  # a Ray that no longer has this hook: the loopback test will say so
        return False
    if getattr(original, "kaiten_loopback", False):
        return True

    def on_loopback(server: Any, address: str) -> Any:
        if address.startswith("[::]:"):
            address = "127.0.0.1:" + address.rsplit(":", 1)[1]
        return original(server, address)

    on_loopback.kaiten_loopback = True  # type: ignore[attr-defined]
    replica.add_port_to_grpc_server = on_loopback  # type: ignore[attr-defined]
    return True


def serve_replica_metrics(host: str, port: int) -> bool:
    """This replica's ``/metrics`` (the same text as the app's) on ``host:port``, from prometheus_client's
    HTTP server in a thread of its own; False when the port is taken."""
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.parser import text_string_to_metric_families

    class Replica:
        def collect(self) -> Any:
            yield from text_string_to_metric_families(process_metrics())

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Replica())
    try:
        start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        log.warning("replica metrics on %s:%d: %s; scraped through Serve's proxy only", host, port, exc)
        return False
    log.info("replica metrics on http://%s:%d/metrics", host, port)
    return True


_tracing: list[bool] = []  # configured in this replica process already


def trace_requests() -> None:
    """Export the replica's request spans (the app's OpenTelemetry middleware makes them) as the
    workload's ``OTEL_*`` say, passed to the replica in its runtime env; once per process."""
    if not _tracing:
        _tracing.append(telemetry.configure("serving") is not None)


def build(args: dict[str, Any]) -> Any:
    """Ray Serve application builder (``import_path: services.serving.app:build``)."""
    from ray import serve

    config = ServingConfig.model_validate(args)
    api = make_app(None, config.limits)
    ongoing = config.max_queue + config.max_batch_size + SERVE_HEADROOM

    @serve.deployment(
        name="kaiten-serving",
        num_replicas=config.replicas,
        **replica_options(config),
        # The engine's bounded queue is the one that says 429: let every request reach the replica
        # (rejecting there is cheap), with headroom so /health and /metrics never wait behind
        # generations. Serve's own queue is only the outer net (503 when full): it also holds a burst
        # for the moment the router takes to assign it, so it must not be small.
        max_ongoing_requests=ongoing,
        max_queued_requests=ongoing,
        health_check_period_s=10,
    )
    @serve.ingress(api)
    class Server:
        async def __init__(self, raw: dict[str, Any]) -> None:  # type: ignore[misc]  # Serve awaits it
            keep_internal_grpc_on_loopback()  # before Serve opens the server, after this returns
            trace_requests()
            config = ServingConfig.model_validate(raw)
            self.engine = build_engine(config)
            await self.engine.start()
            set_process_engine(self.engine)
            if config.metrics_port is not None:
                serve_replica_metrics(config.metrics_host, config.metrics_port)

        def check_health(self) -> None:
            ok, why = self.engine.healthy()
            if not ok:
                raise RuntimeError(why)

    return Server.bind(config.model_dump())  # type: ignore[attr-defined]
