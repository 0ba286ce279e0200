"""``python -m services.<name> --help`` lists every setting and exits; a wrong argument is refused."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from kaiten import configuration
from kaiten.local.nats_server import NatsServer
from services.watcher.settings import WatcherSettings
from tests.conftest import REPO

OWN_SETTING = {
    "watcher": "KAITEN_CLEANUP_OWNERS",
    "planner": "KAITEN_CATALOG_FILES",
    "provisioner": "KAITEN_PROVIDER",
    "workload": "KAITEN_BACKEND",
}


@pytest.mark.parametrize("service", sorted(OWN_SETTING))
def test_help_lists_the_settings_and_exits(service: str) -> None:
    run = subprocess.run(
        [sys.executable, "-m", f"services.{service}", "--help"],
        capture_output=True, text=True, cwd=REPO, timeout=60, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert f"usage: python -m services.{service}" in run.stdout
    assert "KAITEN_NATS_URL" in run.stdout and OWN_SETTING[service] in run.stdout, run.stdout
    bad = subprocess.run(
        [sys.executable, "-m", f"services.{service}", "--bogus"],
        capture_output=True, text=True, cwd=REPO, timeout=60, check=False,
    )  # fmt: skip
    assert bad.returncode == 2 and "unrecognized arguments: --bogus" in bad.stderr


@pytest.mark.parametrize(
    ("service", "env", "problem"),
    [
        ("planner", {"KAITEN_PROVIDER": "gcp"}, "KAITEN_PROVIDER: Input should be 'aks', 'nodeclaim'"),
        ("watcher", {"KAITEN_CLEANUP_OWNERS": "provisioner,wokload"}, "unknown cleanup owner 'wokload'"),
        ("workload", {"KAITEN_SERVE_PORT": "eighty"}, "KAITEN_SERVE_PORT: Input should be a valid integer"),
        ("provisioner", {"KAITEN_LOG_FORMAT": "xml"}, "KAITEN_LOG_FORMAT: Input should be 'text' or 'json'"),
    ],
)
def test_a_bad_setting_stops_the_service_naming_the_variable(
    service: str, env: dict[str, str], problem: str
) -> None:
    run = subprocess.run(
        [sys.executable, "-m", f"services.{service}"],
        capture_output=True, text=True, cwd=REPO, timeout=60, check=False,
        env={**os.environ, **env},
    )  # fmt: skip
    assert run.returncode == 2, run.stderr
    assert "invalid settings" in run.stderr and problem in run.stderr, run.stderr
    assert "Traceback" not in run.stderr


def test_settings_read_the_environment_lists_comma_separated() -> None:
    env = {"KAITEN_CLEANUP_OWNERS": "provisioner", "KAITEN_LOG_LEVEL": "debug"}
    env["KAITEN_RESYNC_PERIOD_S"] = "2.5"
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        settings = WatcherSettings.from_env()
        patch.setenv("KAITEN_CLEANUP_OWNERS", "")
        assert WatcherSettings.from_env().cleanup_owners == ()
    assert settings.cleanup_owners == ("provisioner",)
    assert settings.log_level == "DEBUG" and settings.resync_period_s == 2.5


def test_configuration_doc_is_generated_from_the_settings() -> None:
    assert configuration.PATH.read_text() == configuration.render(), "run: python -m kaiten.configuration"


def test_every_variable_the_code_reads_is_documented() -> None:
    documented = set(re.findall(r"`((?:KAITEN|OTEL)_[A-Z0-9_]+)`", configuration.PATH.read_text()))
    read: dict[str, str] = {}
    for root in ("shared", "services", "deploy", "Makefile", ".ci"):
        path = REPO / root
        for file in [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()):
            if file.suffix in {".py", ".yaml", ".tpl", ""} and "__pycache__" not in file.parts:
                for name in re.findall(r"\bKAITEN_[A-Z0-9_]*[A-Z0-9]\b", file.read_text(errors="replace")):
                    read.setdefault(name, str(file.relative_to(REPO)))
    missing = {name: where for name, where in read.items() if name not in documented}
    assert not missing, f"not in docs/configuration.md: {missing}"


@pytest.mark.parametrize(
    ("fmt", "shown"), [("text", "planner[replica-7]"), ("json", '"replica": "replica-7"')]
)
def test_every_log_line_names_the_replica_id(fmt: str, shown: str) -> None:
    """KAITEN_REPLICA_ID is what the lines say (it used to be ignored for hostname:pid)."""
    run = subprocess.run(
        [sys.executable, "-m", "services.planner"],
        capture_output=True, text=True, cwd=REPO, timeout=60, check=False,
        env={**os.environ, "KAITEN_REPLICA_ID": "replica-7", "KAITEN_LOG_FORMAT": fmt,
             "KAITEN_NATS_URL": "nats://127.0.0.1:1", "KAITEN_CONNECT_TIMEOUT_S": "1"},
    )  # fmt: skip
    lines = [line for line in run.stderr.splitlines() if "shared.bus.connection" in line]  # NATS refused
    assert lines and all(shown in line for line in lines), run.stderr[-2000:]


def test_a_slow_shutdown_step_is_named_as_it_ends(caplog: pytest.LogCaptureFixture) -> None:
    """A service killed for outliving its grace still says where the time went: each slow step is
    logged when it ends, and the last line names them all."""
    import time

    from shared.lifecycle import _StopSteps

    steps = _StopSteps()
    steps.SLOW_S = 0.05
    with caplog.at_level(logging.INFO, logger="shared.lifecycle"):
        with steps.timed("consumer:workload"):
            time.sleep(0.06)
        with steps.timed("NATS"):
            pass
    assert [r.getMessage() for r in caplog.records] == ["stopping consumer:workload took 0.1s"]
    assert steps.slow().startswith(" (slow to stop: consumer:workload 0.")


def test_a_hung_shutdown_step_does_not_keep_the_process(nats_server: NatsServer) -> None:
    """Issue 17 (found by a CI run: a service outlived its stop window, no log saying why): however a
    step hangs, a stopping service exits within shutdown_grace_s + STOP_EXTRA_S, naming the step."""
    from shared.lifecycle import STOP_EXTRA_S

    env = {**os.environ, "KAITEN_NATS_URL": nats_server.url, "KAITEN_SHUTDOWN_GRACE_S": "1",
           "KAITEN_LOG_FORMAT": "text"}  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "tests.apps.hanging"], cwd=REPO, env=env,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert proc.stderr is not None
        seen = []
        for line in proc.stderr:  # until it says it is ready (or exits: the line is "")
            seen.append(line)
            if "hanging ready" in line:
                break
        assert proc.poll() is None, "".join(seen)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=1 + STOP_EXTRA_S + 10)
        took = time.monotonic() - started
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-2000:]
    assert took < 1 + STOP_EXTRA_S + 2, f"{took:.1f}s\n{err[-2000:]}"
    assert "shutdown not done within 6s (at hangs); exiting" in err, err[-2000:]
    assert "hanging stopped" in err


async def test_a_stop_that_lands_with_a_reply_still_stops_the_loop() -> None:
    """Python 3.11's asyncio.wait_for (nats-py awaits every request with it) loses a cancel that lands
    in the same loop iteration as its result: a CI run's watcher, cancelled once as a publish's ack
    arrived, ran on and ignored SIGTERM until killed. A component's stop cancels until the loop ends."""
    from shared.lifecycle import LoopComponent
    from shared.tasks import cancel_and_wait

    loop = asyncio.get_running_loop()
    replies: list[asyncio.Future[None]] = []
    swallowed = []

    async def publishing() -> None:
        while True:
            reply = loop.create_future()
            replies.append(reply)
            await asyncio.wait_for(reply, 3600)  # as nats-py's request awaits the ack
            task = asyncio.current_task()
            if task is not None and task.cancelling():  # cancelled, yet the result came back
                swallowed.append(len(replies))

    component = LoopComponent("publishing", publishing)
    await component.start()
    await asyncio.sleep(0)
    replies[-1].set_result(None)  # the ack arrives ...
    stopping = asyncio.create_task(component.stop(1.0))  # ... and the stop with it, in one iteration
    done, _ = await asyncio.wait({stopping}, timeout=5)  # (a timeout here would cancel the stop again)
    if not done:
        await cancel_and_wait(stopping)
    assert done, "the loop ran on after its stop"
    assert swallowed == [1] if sys.version_info < (3, 12) else swallowed == []  # the race did happen


async def test_a_signal_leaves_the_components_to_be_stopped_in_reverse_order() -> None:
    """SIGTERM ends the supervision without cancelling anything: the components stop one by one, last
    started first (the watcher's status writer, then its watch loop, then its leadership: the leader
    hands over only once it has stopped acting). It used to cancel them all at once, unbounded."""
    from shared.lifecycle import LoopComponent, _supervise, _Watchdog

    stopped: list[str] = []

    def looping(name: str):  # type: ignore[no-untyped-def]
        async def run() -> None:
            try:
                await asyncio.Event().wait()
            finally:
                stopped.append(name)

        return run

    components = [LoopComponent(name, looping(name)) for name in ("leadership", "watcher", "status")]
    for component in components:
        await component.start()
    stopping = asyncio.Event()
    stopping.set()
    assert await _supervise(components, stopping, _Watchdog(None, None, None)) == 0  # type: ignore[arg-type]
    await asyncio.sleep(0.05)
    assert stopped == []
    for component in reversed(components):
        await component.stop(1.0)
    assert stopped == ["status", "watcher", "leadership"]
