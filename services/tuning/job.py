"""The tuning job entrypoint: ``python -m services.tuning --config job.yaml`` (in a cluster's Job
container, or as a Ray job locally).

download inputs → read conversations → train (LoRA/QLoRA) → save the adapter → push it (and/or write
it to a directory). Events, when the config names a Workspace and NATS: ``workload.job_started``,
``tuning.progress`` at most once per ``progress_interval_s`` (and the last step always), then
``workload.job_succeeded`` (output = image@digest or directory) or ``workload.job_failed`` with the
reason. Exit status 0 on success, 1 on failure (the reason is also the last log line).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from services.tuning.config import TuningJobConfig
from services.tuning.dataset import DatasetError, conversations
from services.tuning.download import DownloadError, download
from services.tuning.push import PushError, check_access, push
from services.tuning.train import Progress, Result, TrainingError, train
from shared import events as ev
from shared import telemetry

log = logging.getLogger(__name__)
EXPECTED = (DownloadError, DatasetError, TrainingError, PushError)


NATS_PASSWORD_ENV = "KAITEN_NATS_PASSWORD"  # noqa: S105 (a variable's name); from a Secret (secretKeyRef)


class Reporter:
    """Publishes the job's events (or only logs them, without NATS)."""

    def __init__(self, config: TuningJobConfig, loop: asyncio.AbstractEventLoop) -> None:
        self._config = config
        self._loop = loop
        self._publisher: Any = None
        self._nc: Any = None
        self._last = 0.0

    async def open(self) -> None:
        c = self._config
        if c.workspace is None or not c.nats_url:
            return
        from shared.bus.connection import connect
        from shared.bus.publishing import Publisher
        from shared.bus.streams import declare_stream

        self._nc = await connect(
            c.nats_url,
            name=f"tuning:{c.job}",
            connect_timeout=10,
            user=c.nats_user,
            password=os.environ.get(NATS_PASSWORD_ENV) or None,
            inbox_prefix=c.nats_inbox_prefix,
            ca_file=c.nats_ca_file,
        )
        js = self._nc.jetstream()
        if c.declare_stream:  # idempotent: the job may be the first publisher on a fresh local bus
            await declare_stream(js)
        self._publisher = Publisher(js)

    async def close(self) -> None:
        if self._nc is not None:
            from shared.bus.connection import close

            await close(self._nc)

    def _common(self) -> dict[str, Any]:
        w = self._config.workspace
        assert w is not None
        ref = ev.WorkspaceRef(namespace=w.namespace, name=w.name, uid=w.uid)
        return {"workspace": ref, "generation": w.generation}

    async def publish(self, make: Any) -> None:
        if self._publisher is not None:
            await self._publisher.publish(make(**self._common()))

    def progress(self, p: Progress) -> None:
        """From the training thread; bounded rate, the final step always."""
        now = time.monotonic()
        last_step = p.total_steps and p.step >= p.total_steps
        if not last_step and now - self._last < self._config.progress_interval_s:
            return
        self._last = now
        log.info(
            "step %d/%d epoch %.2f loss %s lr %s %s tok/s eta %s",
            p.step, p.total_steps, p.epoch, _fmt(p.loss), _fmt(p.learning_rate),
            _fmt(p.tokens_per_second), _fmt(p.eta_seconds),
        )  # fmt: skip
        if self._publisher is None:
            return

        def make(**common: Any) -> ev.TuningProgress:
            return ev.TuningProgress(
                step=p.step,
                total_steps=p.total_steps,
                epoch=p.epoch,
                loss=p.loss,
                learning_rate=p.learning_rate,
                tokens_per_second=p.tokens_per_second,
                eta_seconds=p.eta_seconds,
                **common,
            )

        future = asyncio.run_coroutine_threadsafe(self.publish(make), self._loop)
        try:
            future.result(timeout=10)
        except Exception as exc:  # progress is best effort; the final event is not
            log.warning("progress event not published: %r", exc)


def _files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


async def run(config: TuningJobConfig, on_progress: Any = lambda p: None) -> tuple[str, Result]:
    from shared.model_sources import resolve

    if config.output.image:  # fail fast: before downloads and training
        await asyncio.to_thread(
            check_access, config.output.image, config.output.push_secret, insecure=config.output.insecure
        )
    work = Path(config.work_dir)
    inputs = work / "input"
    inputs.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    left = config.max_download_bytes  # for all the inputs together, not each
    for i, url in enumerate(config.urls()):
        try:
            with telemetry.span("tuning download", **{"kaiten.input.index": i}):  # never the URL: a SAS
                got = await asyncio.to_thread(
                    download, url, inputs, allow_loopback=config.allow_loopback_urls, max_bytes=left, index=i
                )
        except DownloadError as exc:
            if exc.reason == "InputTooLarge" and left < config.max_download_bytes:
                raise DownloadError(
                    "InputTooLarge", f"the inputs are more than {config.max_download_bytes} bytes in all"
                ) from exc
            raise
        left -= got.stat().st_size
        files.append(got)
    if config.input_directory:
        found = await asyncio.to_thread(_files_under, Path(config.input_directory))
        if not found:
            raise DatasetError("EmptyInput", f"{config.input_directory}: no files")
        files += found
    rows = conversations(files, config.sections.dataset)
    log.info("%d conversation(s) from %d file(s)", len(rows), len(files))
    with telemetry.span("tuning load model", preset=config.preset):
        model_dir = await asyncio.to_thread(resolve, config.source)
    with telemetry.span("tuning train", method=config.method, rows=len(rows)):
        result = await asyncio.to_thread(train, model_dir, rows, config, work, on_progress)
    outputs = []
    if config.output.directory:
        target = Path(config.output.directory)
        await asyncio.to_thread(shutil.copytree, result.adapter_dir, target, dirs_exist_ok=True)
        outputs.append(str(target))
    if config.output.image:
        with telemetry.span("tuning push", image=config.output.image):
            digest = await asyncio.to_thread(
                push,
                result.adapter_dir,
                config.output.image,
                config.output.push_secret,
                insecure=config.output.insecure,
            )
        outputs.append(f"{config.output.image}@{digest}" if digest else config.output.image)
    return ", ".join(outputs), result


async def amain(config: TuningJobConfig) -> int:
    """The job under the workload's trace (``config.trace``): its spans, and the trace context its
    events carry, continue the Workspace's trace."""
    with telemetry.resumed(config.trace), telemetry.span("tuning job", job=config.job):
        return await _amain(config)


async def _amain(config: TuningJobConfig) -> int:
    reporter = Reporter(config, asyncio.get_running_loop())
    await reporter.open()
    try:
        await reporter.publish(lambda **c: ev.JobStarted(job=config.job, **c))
        try:
            output, result = await run(config, reporter.progress)
        except EXPECTED as exc:
            reason, message = getattr(exc, "reason", "TuningFailed"), str(exc)
            log.error("tuning failed: %s: %s", reason, message)
            await reporter.publish(
                lambda **c: ev.JobFailed(job=config.job, reason=reason, message=message, **c)
            )
            return 1
        except Exception as exc:
            log.exception("tuning failed unexpectedly")
            message = f"{type(exc).__name__}: {exc}"[:500]
            await reporter.publish(
                lambda **c: ev.JobFailed(job=config.job, reason="TuningFailed", message=message, **c)
            )
            return 1
        first, last = (result.losses[0], result.losses[-1]) if result.losses else (None, None)
        log.info(
            "tuning succeeded: %d steps, loss %s → %s, %.1f tok/s; adapter at %s",
            result.steps, _fmt(first), _fmt(last), result.tokens_per_second, output,
        )  # fmt: skip
        await reporter.publish(lambda **c: ev.JobSucceeded(job=config.job, output=output, **c))
        return 0
    finally:
        await reporter.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m services.tuning", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="the job config (YAML or JSON)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s tuning %(name)s: %(message)s")
    config = TuningJobConfig.load(args.config)
    stop_tracing = telemetry.configure("tuning")  # from OTEL_* (the workload passes its own on)
    try:
        code = asyncio.run(amain(config))
    finally:
        if stop_tracing is not None:
            stop_tracing()
    sys.exit(code)
