"""The chart rendered by the real Helm (``helm lint``, ``helm template``), without a node: the values
schema refuses what would not work, and the NATS configuration it renders runs in a real nats-server,
over TLS, with the services' users and permissions."""

from __future__ import annotations

import asyncio
import os
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
import yaml

from kaiten.local import controlplane, gotools
from kaiten.local.nats_server import nats_server_binary
from kaiten.local.procs import ManagedProcess, free_port, free_ports, port_open
from shared.bus import callout
from tests.conftest import REPO, Services, http_get, until
from tests.test_watcher_e2e import KAITEN

CHART = REPO / "deploy" / "helm" / "kaiten"
USERS = ("watcher", "planner", "provisioner", "workload", "tuning", "viewer", "auth")


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(gotools.helm()), *args], capture_output=True, text=True, check=False, timeout=120
    )


def template(*sets: str) -> list[dict[str, Any]]:
    settings = [arg for s in sets for arg in ("--set", s)]
    result = helm(
        "template", "kaiten", str(CHART), "-n", "kaiten-system", "--kube-version", "1.32.4", *settings
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def test_the_chart_lints_clean_and_the_schema_refuses_bad_values() -> None:
    lint = helm("lint", "--strict", str(CHART))
    assert lint.returncode == 0, lint.stdout + lint.stderr
    for bad, says in (
        ("provider=gke", "value must be one of 'aks', 'nodeclaim', 'byo'"),
        ("provider=aks", "/azure/subscriptionId"),
        ("nats.enabled=false", "/nats/url"),
        ("services.watcher.replicas=-1", "/services/watcher/replicas"),
        ("ray.operatorLabels=nolabel", "/ray/operatorLabels"),
        ("nats.callout.image.pullPolicy=Sometimes", "/nats/callout/image/pullPolicy"),
    ):
        result = helm("template", "kaiten", str(CHART), "--kube-version", "1.32.4", "--set", bad)
        assert result.returncode != 0 and says in result.stderr, (bad, result.stderr)
    # the auth callout beside NATS runs the services' image, or its own (an upgrade of the services
    # then leaves the NATS pod alone)
    for sets, callout_image in (
        ((), "kaiten/services:0.1.0"),
        (("nats.callout.image.repository=r/c", "nats.callout.image.tag=v9"), "r/c:v9"),
    ):
        bus = next(d for d in template(*sets) if d["kind"] == "StatefulSet")["spec"]["template"]["spec"]
        images = {c["name"]: c["image"] for c in bus["initContainers"] + bus["containers"]}
        assert images == {"callout-key": callout_image, "auth-callout": callout_image,
                          "nats": "nats:2.12-alpine"}, images  # fmt: skip
    kinds = sorted(d["kind"] for d in template("services.planner.replicas=2"))
    assert kinds.count("Deployment") == 4 and kinds.count("StatefulSet") == 1
    rules = [r for d in template() if d["kind"] == "ClusterRole" for r in d["rules"]]
    assert all("*" not in r["verbs"] and "*" not in r["resources"] for r in rules)
    secrets = [r for r in rules if "secrets" in r["resources"]]
    assert not [v for r in secrets for v in r["verbs"] if v in ("get", "list", "watch")], (
        "no service reads Secrets"
    )


@pytest.fixture
def tls_nats(tmp_path: Path) -> Iterator[tuple[str, Path, dict[str, str]]]:
    """nats-server running the chart's own nats.conf, with TLS, on 127.0.0.1, and its auth callout as
    the chart runs it (``python -m shared.bus.callout``: keygen, then serve, as the auth user)."""
    port, monitor = free_ports(2)
    docs = template("bindAddress=127.0.0.1", f"nats.port={port}", f"nats.monitorPort={monitor}",
                    "nats.tls.enabled=true", "nats.tls.secretName=nats-tls")  # fmt: skip
    conf = next(d for d in docs if d["kind"] == "ConfigMap")["data"]["nats.conf"]
    pki = tmp_path / "pki"
    controlplane._write_certs(pki)  # a CA and a server certificate for 127.0.0.1 (the control plane's)
    conf = (
        conf.replace("/etc/nats/tls/tls.crt", str(pki / "apiserver.crt"))
        .replace("/etc/nats/tls/tls.key", str(pki / "apiserver.key"))
        .replace("store_dir: /data", f"store_dir: {tmp_path / 'js'}")
    )
    (tmp_path / "config").mkdir()  # the include of the callout's issuer is relative to it: ../callout/
    (tmp_path / "config" / "nats.conf").write_text(conf)
    keygen = subprocess.run([sys.executable, "-m", "shared.bus.callout", "keygen", str(tmp_path / "callout")],
                            capture_output=True, text=True, check=False, cwd=REPO)  # fmt: skip
    assert keygen.returncode == 0, keygen.stderr
    passwords = {user: f"pw-{user}-{os.getpid()}" for user in USERS}
    env = {
        "PATH": "/usr/bin:/bin",
        "POD_NAME": "nats-0",
        **{f"{u.upper()}_PASSWORD": p for u, p in passwords.items()},
    }
    config = str(tmp_path / "config" / "nats.conf")
    proc = ManagedProcess("nats-server", [str(nats_server_binary()), "-c", config],
                          tmp_path / "nats.log", env=env).start()  # fmt: skip
    callout: ManagedProcess | None = None
    try:
        proc.wait_ready(lambda: port_open("127.0.0.1", port), timeout=10, what="nats-server up")
        callout = ManagedProcess(
            "auth-callout", [sys.executable, "-m", "shared.bus.callout", "serve"], tmp_path / "callout.log",
            env={"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO), "KAITEN_NATS_URL": f"tls://127.0.0.1:{port}",
                 "KAITEN_NATS_USER": "auth", "KAITEN_NATS_PASSWORD": passwords["auth"],
                 "KAITEN_TUNING_NATS_PASSWORD": passwords["tuning"],
                 "KAITEN_CALLOUT_KEY_FILE": str(tmp_path / "callout" / "issuer.key"),
                 "KAITEN_NATS_CA_FILE": str(pki / "ca.crt")},
        ).start()  # fmt: skip
        log = tmp_path / "callout.log"
        callout.wait_ready(lambda: "answering" in log.read_text(), timeout=20, what="auth callout up")
        yield f"tls://127.0.0.1:{port}", pki / "ca.crt", passwords
    finally:
        if callout is not None:
            callout.stop()
        proc.stop()


@pytest.mark.controlplane
@pytest.mark.nats
async def test_the_charts_nats_config_runs_with_tls_users_and_permissions(
    tls_nats: tuple[str, Path, dict[str, str]], services: Services
) -> None:
    url, ca, passwords = tls_nats
    # the server requires TLS: a client is upgraded, and one that does not trust the CA cannot connect
    with pytest.raises(ssl.SSLCertVerificationError):
        await nats.connect(url.replace("tls://", "nats://"), user="planner", password=passwords["planner"],
                           connect_timeout=2, allow_reconnect=False)  # fmt: skip
    for service in ("planner", "watcher"):  # the watcher: its KV buckets and its leader election too
        port = free_port()
        proc = services.start(
            f"services.{service}", KAITEN_NATS_URL=url, KAITEN_NATS_USER=service,
            KAITEN_NATS_PASSWORD=passwords[service], KAITEN_NATS_INBOX_PREFIX=f"_INBOX_{service}",
            KAITEN_NATS_CA_FILE=str(ca), KAITEN_PROBE_PORT=str(port),
        )  # fmt: skip

        def ready(port: int = port) -> bool:
            return http_get(f"http://127.0.0.1:{port}/readyz", timeout=2)[0] == 200

        await until(ready, timeout=30, what=f"the {service} ready over TLS, its own user\n{services.logs()}")
        log = proc.log_path.read_text()
        assert service != "watcher" or "leading watcher" in log, log[-2000:]
        assert "permissions violation" not in log.lower() and passwords[service] not in log, log[-2000:]
    # a leader key is its own service's alone: the watcher's user may not take the provisioner's
    watcher = await nats.connect(url, user="watcher", password=passwords["watcher"],
                                 tls=ssl.create_default_context(cafile=str(ca)), connect_timeout=5,
                                 inbox_prefix=b"_INBOX_watcher", allow_reconnect=False)  # fmt: skip
    try:
        leaders = await watcher.jetstream(timeout=2).key_value("kaiten_leaders")
        with pytest.raises(nats.errors.TimeoutError):  # refused: the server never acks it
            await leaders.create("provisioner", b"watcher")
    finally:
        await watcher.close()


@pytest.mark.nats
async def test_each_services_user_is_refused_the_other_services_subjects(
    tls_nats: tuple[str, Path, dict[str, str]],
) -> None:
    """Least privilege on the bus: a service's user may publish what its service produces, and nothing
    another produces (the planner cannot publish a deletion, the watcher cannot publish a plan); and it
    may subscribe to its own reply inbox only (not to the events, not to another service's replies)."""
    url, ca, passwords = tls_nats
    tls = ssl.create_default_context(cafile=str(ca))
    owner = {
        "watcher": "kaiten.workspace.deleting.default.ws",
        "planner": "kaiten.plan.default.ws.g1",
        "provisioner": "kaiten.nodes.ready.default.ws",
        "workload": "kaiten.workload.ready.default.ws",
    }

    async def refusals(service: str, publish: list[str], subscribe: list[str]) -> list[str]:
        """What the server says to ``service``'s user that publishes and subscribes to these."""
        errors: list[str] = []

        async def on_error(exc: Exception) -> None:
            errors.append(str(exc).lower())

        nc = await nats.connect(url, user=service, password=passwords[service], tls=tls, error_cb=on_error,
                                inbox_prefix=f"_INBOX_{service}", allow_reconnect=False)  # fmt: skip
        try:
            for subject in publish:
                await nc.publish(subject, b"{}")
            for subject in subscribe:
                await nc.subscribe(subject)
            await nc.flush()
            expected = len(publish) + len(subscribe) - 1  # all but its own subject
            await until(lambda: len(errors) >= expected, timeout=5, what=f"{expected} refusals for {service}")
        finally:
            await nc.close()
        return errors

    for service, own in owner.items():
        others = [subject for subject in owner.values() if subject != own]
        inbox = "_INBOX_workload.>" if service != "workload" else "_INBOX_watcher.>"
        # its own subject first: were it refused, its error would be among those awaited
        errors = await refusals(service, [own, *others], ["kaiten.>", inbox])
        assert not [e for e in errors if own in e], (service, errors)
        for subject in others:
            assert any(f'violation for publish to "{subject}"' in e for e in errors), (service, errors)
        for subject in ("kaiten.>", inbox.lower()):  # the errors are lowercased
            assert any(f'violation for subscription to "{subject}"' in e for e in errors), (service, errors)


@pytest.mark.nats
async def test_a_tuning_job_reports_with_the_charts_tuning_user(
    tls_nats: tuple[str, Path, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the workload renders for a tuning job in a cluster (its own user, tuning.<ns>.<name>, with the
    password made for it; its inbox; no stream declaration; the bus's CA) is what that user may do: its
    own Workspace's events, not another's, not a deletion. The auth callout admits it; a wrong password
    or another name is refused. The job trusts the bus by the CA in its config, not a trust store."""
    from services.tuning.config import TuningJobConfig
    from services.tuning.job import NATS_PASSWORD_ENV, Reporter
    from shared import events as ev
    from shared.bus.streams import declare_stream

    url, ca, passwords = tls_nats
    tls = ssl.create_default_context(cafile=str(ca))
    watcher = await nats.connect(url, user="watcher", password=passwords["watcher"], tls=tls,
                                 inbox_prefix="_INBOX_watcher")  # fmt: skip
    try:
        await declare_stream(watcher.jetstream())  # as every service does at start
    finally:
        await watcher.close()
    user = callout.workspace_user("default", "ws")
    password = callout.workspace_password(passwords["tuning"], user)  # what the workload puts in <ws>-nats
    config = TuningJobConfig.model_validate({
        "job": "ws-g1", "preset": "smollm2-135m-instruct", "source": {"kind": "dir", "path": "/models/x"},
        "input_urls": ["https://example.invalid/data.jsonl"], "output": {"directory": "/tmp/out"},
        "workspace": {"namespace": "default", "name": "ws", "uid": "u-1", "generation": 1},
        "nats_url": url, "nats_user": user, "nats_inbox_prefix": callout.inbox_prefix(user),
        "declare_stream": False, "nats_ca_file": str(ca),
    })  # fmt: skip
    monkeypatch.setenv(NATS_PASSWORD_ENV, password)
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    reporter = Reporter(config, asyncio.get_running_loop())
    await reporter.open()
    try:
        await reporter.publish(lambda **common: ev.JobStarted(**common))  # acked by the stream, or raises
        await reporter.publish(lambda **common: ev.TuningProgress(step=1, total_steps=2, **common))
    finally:
        await reporter.close()

    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    job = await nats.connect(url, user=user, password=password, tls=tls, error_cb=on_error,
                             inbox_prefix=callout.inbox_prefix(user), allow_reconnect=False)  # fmt: skip
    try:
        js = job.jetstream(timeout=2)
        for subject in (
            "kaiten.workload.job_succeeded.default.other",
            "kaiten.workspace.deleting.default.ws",
        ):
            with pytest.raises(nats.errors.TimeoutError):  # dropped by the server: no ack ever comes
                await js.publish(subject, b"{}")
    finally:
        await job.close()
    assert any('publish to "kaiten.workload.job_succeeded.default.other"' in e for e in errors), errors
    for who, secret in ((user, "wrong"), ("tuning.default.other", password), ("tuning", passwords["tuning"])):
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            await nats.connect(url, user=who, password=secret, tls=tls, connect_timeout=3,
                               allow_reconnect=False, error_cb=on_error)  # fmt: skip


@pytest.mark.nats
async def test_kaiten_events_follows_a_clusters_bus_as_the_read_only_viewer(
    tls_nats: tuple[str, Path, dict[str, str]],
) -> None:
    """What a user runs after `kubectl port-forward` to the chart's NATS: `kaiten events` as `viewer`
    replays and follows; the viewer can neither publish an event nor create a consumer."""
    from shared import events as ev
    from shared.bus.publishing import Publisher
    from shared.bus.streams import declare_stream
    from shared.errors import Transient

    url, ca, passwords = tls_nats
    tls = ssl.create_default_context(cafile=str(ca))

    async def as_user(user: str) -> nats.aio.client.Client:
        return await nats.connect(
            url, user=user, password=passwords[user], tls=tls, inbox_prefix=f"_INBOX_{user}",
            connect_timeout=5, allow_reconnect=False,
        )  # fmt: skip

    watcher, planner = await as_user("watcher"), await as_user("planner")
    ref = ev.WorkspaceRef(namespace="team-a", name="ws", uid="u-1")
    try:
        await declare_stream(watcher.jetstream())  # as every service does at start
        rejected = ev.PlanRejected(workspace=ref, generation=1, reason="UnknownPreset", message="m")
        await Publisher(planner.jetstream()).publish(rejected)
        env = {**os.environ, "KAITEN_NATS_PASSWORD": passwords["viewer"]}
        viewer_cli = [str(KAITEN), "events", "-n", "team-a", "--nats", url, "--nats-user", "viewer",
                      "--nats-ca", str(ca), "--timeout", "30"]  # fmt: skip
        replayed = subprocess.run([*viewer_cli, "--since", "10m", "--count", "1"], env=env,
                                  capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
        assert replayed.returncode == 0, replayed.stderr
        assert "team-a/ws" in replayed.stdout and "plan.rejected" in replayed.stdout, replayed.stdout
        following = subprocess.Popen([*viewer_cli, "--count", "1"], env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)  # fmt: skip
        await asyncio.sleep(3)  # connected and subscribed
        await Publisher(watcher.jetstream()).publish(ev.WorkspaceDeleting(workspace=ref, generation=1))
        out, err = following.communicate(timeout=40)
        assert following.returncode == 0 and "workspace.deleting" in out, (out, err)
        before = (await watcher.jetstream().stream_info(ev.STREAM)).state.last_seq
    finally:
        await watcher.close()
        await planner.close()
    viewer = await as_user("viewer")
    try:
        deleting = ev.WorkspaceDeleting(
            workspace=ev.WorkspaceRef(namespace="x", name="y", uid="z"), generation=1
        )
        with pytest.raises(Transient, match="failed after 1 attempts"):  # refused: no ack ever comes
            await Publisher(viewer.jetstream(), timeout=1, attempts=1).publish(deleting)
        with pytest.raises(nats.errors.TimeoutError):
            await viewer.jetstream(timeout=1).add_consumer(ev.STREAM, durable_name="sneaky")
    finally:
        await viewer.close()
    watcher = await as_user("watcher")
    try:
        assert (await watcher.jetstream().stream_info(ev.STREAM)).state.last_seq == before  # nothing stored
    finally:
        await watcher.close()
