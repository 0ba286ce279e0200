"""The one service lifecycle, shared by every Kaiten service.

load settings → connect NATS (bounded) → declare the stream → build the kube client → start
components → report ready → on SIGTERM/SIGINT (or a component dying) stop intake, give in-flight work
``shutdown_grace_s``, flush and close NATS, close clients. A component that dies takes the process down with a
non-zero exit so its supervisor (kubelet, ``kaiten up``) restarts it: no silent half-alive service.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from kubernetes_asyncio import client as kclient
from nats.aio.client import Client
from nats.js import JetStreamContext
from opentelemetry.instrumentation.utils import suppress_instrumentation
from pydantic import ValidationError

from shared import logs, telemetry
from shared.bus.connection import close, connect
from shared.bus.publishing import Publisher
from shared.bus.streams import declare_stream
from shared.kube.client import api_client
from shared.probes import Probes, Readiness
from shared.settings import ServiceSettings
from shared.tasks import cancel_and_wait, retrieved

log = logging.getLogger(__name__)
# What a shutdown may take beyond the in-flight grace (leases released, NATS flushed and closed): the
# process exits within shutdown_grace_s + STOP_EXTRA_S + telemetry.FLUSH_S (18 s by default, inside
# Kubernetes' 30 s terminationGracePeriod), whatever step hangs.
STOP_EXTRA_S = 5.0


class Component(Protocol):
    name: str

    async def start(self) -> None: ...

    async def stop(self, grace: float) -> None: ...

    async def wait(self) -> None:
        """Returns (or raises) when the component stops on its own."""
        ...


class LoopComponent:
    """A component that is one long-running coroutine (a reconcile loop, say); cancelled on stop."""

    def __init__(self, name: str, run: Callable[[], Coroutine[Any, Any, None]]) -> None:
        self.name = name
        self._run = run
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=self.name)

    async def stop(self, grace: float) -> None:
        if self._task:
            died = self._task.done()  # on its own, before the stop: the supervisor has said so
            await cancel_and_wait(self._task)  # not one cancel: 3.11's wait_for may swallow it
            if not died and not self._task.cancelled() and (exc := self._task.exception()) is not None:
                raise exc  # raised while stopping: _stop says so

    async def wait(self) -> None:
        if self._task:
            await self._task


@dataclass
class Runtime:
    service: str
    settings: ServiceSettings
    nc: Client
    js: JetStreamContext
    publisher: Publisher
    api: kclient.ApiClient | None
    replica: str = ""  # KAITEN_REPLICA_ID, else hostname:pid: in every log line, and a leader's identity


StartFn = Callable[[Runtime], Awaitable[Sequence[Component]]]


def replica_of(settings: ServiceSettings) -> str:
    return settings.replica_id or f"{socket.gethostname()}:{os.getpid()}"


async def serve(service: str, settings: ServiceSettings, start: StartFn, *, needs_kube: bool = True) -> int:
    """Run a service until SIGTERM/SIGINT; returns the process exit code."""
    logs.setup(service, settings.log_level, settings.log_format, replica_of(settings))
    stop_tracing = telemetry.configure(service)
    probes = None
    if settings.probe_port is not None:  # first, so liveness answers during a slow start too
        probes = Probes(service, settings.probe_host, settings.probe_port, settings.stuck_after_s).start()
        if settings.probe_port_file:
            probes.write_port(Path(settings.probe_port_file))
    try:
        return await _serve(service, settings, start, needs_kube, probes)
    finally:
        if probes is not None:
            probes.stop()
        if stop_tracing is not None:
            started = time.monotonic()
            stop_tracing()  # flushes the spans still batched (bounded: telemetry.FLUSH_S)
            if (took := time.monotonic() - started) >= _StopSteps.SLOW_S:
                log.info("traces flushed in %.1fs", took)


async def _serve(
    service: str, settings: ServiceSettings, start: StartFn, needs_kube: bool, probes: Probes | None
) -> int:
    nc = await connect(
        settings.nats_url,
        name=service,
        connect_timeout=settings.connect_timeout_s,
        user_credentials=settings.nats_credentials,
        user=settings.nats_user,
        password=settings.nats_password.get_secret_value() if settings.nats_password else None,
        inbox_prefix=settings.nats_inbox_prefix,
        ca_file=settings.nats_ca_file,
    )
    js = nc.jetstream()
    await declare_stream(js)
    api = await api_client(settings.kubeconfig) if needs_kube else None
    runtime = Runtime(service, settings, nc, js, Publisher(js), api, replica_of(settings))
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    components: Sequence[Component] = []
    watchdog = _Watchdog(nc, api, probes)
    code = 0
    try:
        watchdog.start()
        components = await start(runtime)
        for component in components:
            await component.start()
        log.info("%s ready (%s)", service, ", ".join(c.name for c in components))
        code = await _supervise(components, stopping, watchdog)
    finally:
        watchdog.stopping()
        log.info("%s stopping", service)
        steps = _StopSteps()
        deadline = settings.shutdown_grace_s + STOP_EXTRA_S
        try:
            await asyncio.wait_for(_stop(components, watchdog, nc, api, settings, steps), deadline)
        except TimeoutError:  # a step that hangs must not keep the process past its bound
            log.warning("%s: shutdown not done within %.0fs (at %s); exiting", service, deadline, steps.at)
        log.info("%s stopped%s", service, steps.slow())
    return code


async def _stop(
    components: Sequence[Component],
    watchdog: _Watchdog,
    nc: Client,
    api: kclient.ApiClient | None,
    settings: ServiceSettings,
    steps: _StopSteps,
) -> None:
    for component in reversed(components):
        with steps.timed(component.name):
            try:
                await component.stop(settings.shutdown_grace_s)
            except Exception as exc:  # said, and the next component still stops
                log.warning("%s stopped with %r", component.name, exc)
    with steps.timed("watchdog"):
        await watchdog.stop()
    with steps.timed("NATS"):
        await close(nc)
    if api is not None:
        with steps.timed("apiserver client"):
            await api.close()


class _StopSteps:
    """How long each step of a shutdown took. A slow step is logged as it ends, and named again in the
    last line, so a service that outlives its grace (and is killed) still says where the time went."""

    SLOW_S = 1.0

    def __init__(self) -> None:
        self._took: list[tuple[str, float]] = []
        self.at = ""  # the step under way

    @contextlib.contextmanager
    def timed(self, name: str) -> Iterator[None]:
        started, self.at = time.monotonic(), name
        try:
            yield
        finally:
            took = time.monotonic() - started
            self._took.append((name, took))
            if took >= self.SLOW_S:
                log.warning("stopping %s took %.1fs", name, took)

    def slow(self) -> str:
        slow = [f"{name} {took:.1f}s" for name, took in self._took if took >= self.SLOW_S]
        return f" (slow to stop: {', '.join(slow)})" if slow else ""


class _Watchdog:
    """Beats once a second for the probes: how late the loop woke, and what readiness lacks.

    The apiserver is asked for its version every ``API_CHECK_S`` in a task of its own (a slow answer
    must not delay the beat); it counts as missing once no answer came for ``API_STALE_S``.
    """

    BEAT_S = 1.0
    API_CHECK_S = 10.0
    API_STALE_S = 30.0

    def __init__(self, nc: Client, api: kclient.ApiClient | None, probes: Probes | None) -> None:
        self._nc, self._api, self._probes = nc, api, probes
        self._components: list[asyncio.Task[Any]] | None = None  # set when every component started
        self._api_ok_at = time.monotonic()
        self._stopping = False
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        if self._probes is not None:
            self._tasks.append(asyncio.create_task(self._beat(), name="probes:beat"))
            if self._api is not None:
                self._tasks.append(asyncio.create_task(self._check_api(), name="probes:apiserver"))

    def running(self, waits: list[asyncio.Task[Any]]) -> None:
        self._components = waits

    def stopping(self) -> None:
        self._stopping = True
        self._report(0.0)

    async def stop(self) -> None:
        await cancel_and_wait(*self._tasks)

    def missing(self) -> tuple[str, ...]:
        missing = []
        if self._stopping:
            missing.append("shutting down")
        if not self._nc.is_connected:
            missing.append("NATS not connected")
        if self._api is not None and time.monotonic() - self._api_ok_at > self.API_STALE_S:
            missing.append(f"apiserver not answering for {self.API_STALE_S:.0f}s")
        if self._components is None:
            missing.append("components starting")
        elif any(task.done() for task in self._components):
            missing.append("a component stopped")
        return tuple(missing)

    def _report(self, lag: float) -> None:
        if self._probes is not None:
            self._probes.beat(lag, Readiness(self.missing()))

    async def _beat(self) -> None:
        while True:
            before = time.monotonic()
            await asyncio.sleep(self.BEAT_S)
            self._report(max(0.0, time.monotonic() - before - self.BEAT_S))

    async def _check_api(self) -> None:
        assert self._api is not None
        version = kclient.VersionApi(self._api)
        while True:
            try:
                with suppress_instrumentation():  # a health check every 10 s is not worth a trace
                    await asyncio.wait_for(version.get_code(), self.API_CHECK_S / 2)
            except Exception as exc:  # any failure: readiness says so once it lasts
                log.debug("apiserver check failed: %r", exc)
            else:
                self._api_ok_at = time.monotonic()
            await asyncio.sleep(self.API_CHECK_S)


async def _supervise(components: Sequence[Component], stopping: asyncio.Event, watchdog: _Watchdog) -> int:
    waits: dict[asyncio.Task[Any], Component] = {
        asyncio.create_task(c.wait(), name=f"wait:{c.name}"): c for c in components
    }
    watchdog.running(list(waits))
    stop_wait = asyncio.create_task(stopping.wait(), name="wait:signal")
    done, _ = await asyncio.wait([stop_wait, *waits], return_when=asyncio.FIRST_COMPLETED)
    await cancel_and_wait(stop_wait)
    # The components are left running: _stop stops them one by one, in reverse order (cancelling these
    # waits would cancel every component at once, unbounded: one that swallowed it hung the shutdown).
    for task in waits:
        task.add_done_callback(retrieved)
    if stop_wait in done:
        return 0
    for task in done:
        component = waits[task]
        exc = task.exception() if not task.cancelled() else None
        log.error("component %s stopped unexpectedly: %r", component.name, exc)
    return 1


def main(
    service: str,
    settings_type: type[ServiceSettings],
    start: StartFn,
    *,
    needs_kube: bool = True,
    argv: Sequence[str] | None = None,
) -> None:
    """``python -m services.<service>``: ``--help`` lists the settings (environment); else run until
    SIGTERM with the settings read from the environment."""
    parser = argparse.ArgumentParser(
        prog=f"python -m services.{service}",
        description=f"Kaiten's {service} service: runs until SIGTERM; configured by the environment.",
        epilog=f"settings (environment):\n{settings_type.env_help()}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.parse_args(argv)
    try:
        settings = settings_type.from_env()
    except ValidationError as exc:  # a setting the operator can fix: say which, without a traceback
        problems = "\n".join(
            f"  KAITEN_{str(error['loc'][0]).upper()}: {error['msg']}" for error in exc.errors()
        )
        parser.exit(2, f"{parser.prog}: invalid settings:\n{problems}\n")
    sys.exit(asyncio.run(serve(service, settings, start, needs_kube=needs_kube)))
