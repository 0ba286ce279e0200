"""Control-plane latency: how fast ``kubectl apply`` turns into action, and how that grows with the
number of Workspaces (issue 20).

Real etcd + kube-apiserver and a real nats-server on 127.0.0.1, Kaiten's four control-plane services
as processes (provider ``nodeclaim``, backend ``kuberay``); the benchmark plays Karpenter: each
NodeClaim it sees becomes a Node and is marked Ready ``--claim-delay`` seconds later. Per size N, N
inference Workspaces are applied in one ``kubectl apply``, then deleted in one ``kubectl delete``.

Figures per size, p50 / p99 over the N Workspaces (seconds):
- apply → ``plan.resolved`` on the bus;
- apply → NodeClaim created (as a watch sees it);
- claim Ready → RayService created (the workload's reaction, without the Karpenter delay);
- delete → Workspace gone (finalizer released after the provisioner and the workload cleaned up);
then each service's peak RSS and CPU seconds, events on the bus per Workspace, and the apiserver's own
count of the requests it served per Workspace, by verb and resource. Both columns include what is not
the system's own, the same on both sides: ``kubectl apply`` (a GET and a POST per Workspace) and
``kubectl delete``, the Karpenter stand-in, and the apiserver's own lease and endpoint upkeep.

With ``--replicas 2`` every service runs twice: throughput should grow, not shrink.

With ``--kaito-src DIR`` (a KAITO checkout: its Go module is not served by the module proxy here, see
docs/performance.md) KAITO's workspace controller is built and run side by side against a fresh
apiserver with KAITO's CRDs, and the last line is ``kaiten/kaito apply→claim p99 ratio @N: R``.

    python benchmarks/control_plane.py [--sizes 1,100] [--claim-delay 1.0] [--replicas 1] [--kaito-src DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import hashlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
from kubernetes_asyncio import client, watch

from kaiten.local import kuberay
from kaiten.local.controlplane import ControlPlane, served_requests
from kaiten.local.nats_server import NatsServer
from kaiten.local.procs import ManagedProcess, tail
from shared.api.crd import CRD_PATH
from shared.kube.client import api_client

REPO = Path(__file__).resolve().parents[1]
NODECLAIM_CRD = REPO / "deploy" / "test-crds" / "karpenter.sh_nodeclaims.yaml"
SERVICES = ("watcher", "planner", "provisioner", "workload")
STEPS = ("Launched", "Registered", "Initialized", "Ready")
WS_LABEL = "kaito.sh/workspace"
NS_LABEL = "kaito.sh/workspacenamespace"


@dataclass
class Seen:
    """When each Workspace (``ns/name``) reached each step, in ``time.monotonic()`` seconds."""

    applied: float = 0.0
    deleted: float = 0.0
    planned: dict[str, float] = field(default_factory=dict)
    claimed: dict[str, float] = field(default_factory=dict)
    claim_ready: dict[str, float] = field(default_factory=dict)
    rayservice: dict[str, float] = field(default_factory=dict)
    gone: dict[str, float] = field(default_factory=dict)


def kubectl(kubeconfig: Path, *args: str, stdin: str | None = None) -> str:
    done = subprocess.run(
        ["kubectl", "--kubeconfig", str(kubeconfig), *args], input=stdin, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"kubectl {' '.join(args)}: {done.stderr}")
    return done.stdout


def ready() -> list[dict[str, str]]:
    """The conditions Karpenter sets on a claim whose node joined."""
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return [
        {"type": t, "status": "True", "reason": t, "message": "", "lastTransitionTime": now} for t in STEPS
    ]


def established(kubeconfig: Path, crds: tuple[str, ...]) -> None:
    """Wait until each CRD serves (``kubectl wait`` fails while a new CRD has no conditions yet)."""
    deadline = time.monotonic() + 60
    for crd in crds:
        while True:
            conditions = json.loads(kubectl(kubeconfig, "get", crd, "-o", "json"))["status"].get("conditions")
            if any(c["type"] == "Established" and c["status"] == "True" for c in conditions or []):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{crd} not established after 60s")
            time.sleep(0.2)


def workspaces(namespace: str, count: int) -> str:
    docs = [
        {"apiVersion": "kaito.sh/v1alpha1", "kind": "Workspace",
         "metadata": {"name": f"ws-{i}", "namespace": namespace},
         "resource": {"instanceType": "Standard_NV36ads_A10_v5",  # a SKU both systems know
                      "labelSelector": {"matchLabels": {"apps": f"ws-{i}"}}},
         "inference": {"preset": {"name": "phi-3-mini-4k-instruct"}}}
        for i in range(count)
    ]  # fmt: skip
    return json.dumps({"apiVersion": "v1", "kind": "List", "items": docs})


def workspace_of(labels: dict[str, str]) -> str:
    return f"{labels.get(NS_LABEL, '')}/{labels.get(WS_LABEL, '')}"


async def karpenter(api: client.ApiClient, seen: Seen, delay: float, stop: asyncio.Event) -> None:
    """Every NodeClaim that appears: noted, and ``delay`` s later a Node with its labels, and Ready."""
    custom, core = client.CustomObjectsApi(api), client.CoreV1Api(api)
    pending: set[asyncio.Task[None]] = set()

    async def launch(claim: dict[str, Any]) -> None:
        try:
            await _launch(claim)
        except Exception as exc:  # the run fails by its deadline; say why here
            why = f"{exc!r} {getattr(exc, 'body', '')!r}"[:800]
            print(f"Karpenter stand-in: {claim['metadata']['name']}: {why}", file=sys.stderr)

    async def _launch(claim: dict[str, Any]) -> None:
        await asyncio.sleep(delay)
        name, labels = claim["metadata"]["name"], claim["metadata"].get("labels") or {}
        node = f"{name}-node"
        body: Any = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": node, "labels": labels}}
        await core.create_node(body)
        await custom.patch_cluster_custom_object_status(
            "karpenter.sh",
            "v1",
            "nodeclaims",
            name,
            {"status": {"nodeName": node, "conditions": ready()}},
            _content_type="application/merge-patch+json",
        )
        seen.claim_ready.setdefault(workspace_of(labels), time.monotonic())

    launched: set[str] = set()
    async for item in _watch(custom.list_cluster_custom_object, stop, "karpenter.sh", "v1", "nodeclaims"):
        if item["type"] == "ADDED" and item["object"]["metadata"]["name"] not in launched:  # a re-list: once
            launched.add(item["object"]["metadata"]["name"])
            key = workspace_of(item["object"]["metadata"].get("labels") or {})
            seen.claimed.setdefault(key, time.monotonic())
            task = asyncio.create_task(launch(item["object"]))
            pending.add(task)
            task.add_done_callback(pending.discard)


async def rayservices(api: client.ApiClient, seen: Seen, stop: asyncio.Event) -> None:
    custom = client.CustomObjectsApi(api)
    async for item in _watch(custom.list_cluster_custom_object, stop, "ray.io", "v1", "rayservices"):
        if item["type"] == "ADDED":
            seen.rayservice.setdefault(
                workspace_of(item["object"]["metadata"].get("labels") or {}), time.monotonic()
            )


async def deletions(api: client.ApiClient, seen: Seen, stop: asyncio.Event) -> None:
    custom = client.CustomObjectsApi(api)
    async for item in _watch(custom.list_cluster_custom_object, stop, "kaito.sh", "v1beta1", "workspaces"):
        if item["type"] == "DELETED":
            meta = item["object"]["metadata"]
            seen.gone.setdefault(f"{meta['namespace']}/{meta['name']}", time.monotonic())


async def _watch(fn: Any, stop: asyncio.Event, *args: str) -> Any:
    """Watch events; a watch the server ends goes on from the last resourceVersion seen, so no event
    (a deletion most of all) falls between two watches."""
    version = ""
    while not stop.is_set():
        options: dict[str, Any] = {"timeout_seconds": 300}
        if version:
            options["resource_version"] = version
        try:
            async for item in watch.Watch().stream(fn, *args, **options):
                version = item["object"]["metadata"].get("resourceVersion") or version
                yield item
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # ended or expired (410): say so, start again
            status = getattr(exc, "status", None)
            print(f"watch {args[-1]}: {exc!r} {status}; again", file=sys.stderr)
            version = "" if status == 410 else version  # expired: from now on (a gap, said above)
            await asyncio.sleep(0.1)


async def planned(url: str, seen: Seen, stop: asyncio.Event) -> int:
    """Notes each ``plan.resolved``; returns how many events the run's namespace got on the bus."""
    nc = await nats.connect(url)
    count = 0

    async def on_plan(msg: Any) -> None:
        parts = msg.subject.split(".")
        seen.planned.setdefault(f"{parts[-2]}/{parts[-1]}", time.monotonic())

    await nc.subscribe("kaiten.plan.resolved.>", cb=on_plan)

    async def on_any(msg: Any) -> None:
        nonlocal count
        count += 1

    await nc.subscribe("kaiten.>", cb=on_any)
    await stop.wait()
    await nc.close()
    return count


def start_services(env: dict[str, str], logs: Path, replicas: int) -> list[ManagedProcess]:
    procs = []
    for name in SERVICES:
        for replica in range(replicas):
            procs.append(
                ManagedProcess(
                    name=f"{name}-{replica}", argv=[sys.executable, "-m", f"services.{name}"],
                    log_path=logs / f"{name}-{replica}.log", cwd=REPO,
                    env={**env, "KAITEN_REPLICA_ID": f"{name}-{replica}"},
                ).start()
            )  # fmt: skip
    deadline = time.monotonic() + 60
    for proc in procs:
        service = proc.name.rsplit("-", 1)[0]
        while f"{service} ready" not in proc.log_path.read_text(errors="replace"):
            if not proc.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"{proc.name} did not start:\n{tail(proc.log_path)}")
            time.sleep(0.2)
    return procs


def usage(pid: int) -> tuple[float, float]:
    """(peak RSS in MiB, CPU seconds) of a running process."""
    status = Path(f"/proc/{pid}/status").read_text()
    peak = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return peak / 1024, (int(fields[11]) + int(fields[12])) / ticks


def percentile99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]


def pcts(values: list[float]) -> str:
    if not values:
        return f"{'—':>8}{'—':>8}"
    return f"{statistics.median(values):>8.2f}{percentile99(values):>8.2f}"


async def run_size(
    cp: ControlPlane, size: int, claim_delay: float, limit: float, nats_url: str | None
) -> tuple[Seen, int]:
    """One size against one system: Kaiten when ``nats_url`` is given (done when every RayService
    exists), else KAITO's controller (done when every NodeClaim is Ready). Returns the times, and for
    Kaiten how many events the run put on the bus."""
    namespace = f"bench-{size}-{os.getpid() % 1000}"
    kubectl(cp.kubeconfig, "create", "namespace", namespace)
    seen, stop = Seen(), asyncio.Event()
    api = await api_client(str(cp.kubeconfig))
    watchers = [
        asyncio.create_task(karpenter(api, seen, claim_delay, stop)),
        asyncio.create_task(deletions(api, seen, stop)),
    ]
    if nats_url:
        watchers.append(asyncio.create_task(rayservices(api, seen, stop)))
    counting = asyncio.create_task(planned(nats_url, seen, stop)) if nats_url else None
    await asyncio.sleep(1.0)  # the watches are open
    names = [f"{namespace}/ws-{i}" for i in range(size)]
    reached = seen.rayservice if nats_url else seen.claim_ready
    seen.applied = time.monotonic()
    await asyncio.to_thread(kubectl, cp.kubeconfig, "apply", "-f", "-", stdin=workspaces(namespace, size))
    deadline = time.monotonic() + limit
    while not all(n in reached for n in names):
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"size {size}: {len(seen.planned)} planned, {len(seen.claimed)} claimed, "
                f"{len(seen.claim_ready)} ready, {len(seen.rayservice)} RayServices after {limit:.0f}s"
            )
        await asyncio.sleep(0.1)
    seen.deleted = time.monotonic()
    await asyncio.to_thread(
        kubectl, cp.kubeconfig, "delete", "workspaces", "--all", "-n", namespace, "--wait=false"
    )
    while not all(n in seen.gone for n in names):
        if time.monotonic() > deadline + limit:
            raise RuntimeError(f"size {size}: {len(seen.gone)} of {size} Workspaces gone")
        await asyncio.sleep(0.1)
    stop.set()
    for task in watchers:
        task.cancel()
    await asyncio.gather(*watchers, return_exceptions=True)
    events = await counting if counting else 0
    await api.close()
    return seen, events


Rows = list[tuple[int, Seen, int]]
Usage = dict[str, tuple[float, float]]


def requests(kubeconfig: Path) -> Counter[str]:
    """The apiserver's count of the requests it has served so far, less the benchmark's own setup."""
    counts = served_requests(kubectl(kubeconfig, "get", "--raw", "/metrics"))
    setup = ("namespaces", "customresourcedefinitions")
    return Counter({what: n for what, n in counts.items() if what.split()[1].split("/")[0] not in setup})


async def bench_kaiten(
    root: Path, sizes: list[int], claim_delay: float, replicas: int, limit: float
) -> tuple[Rows, Usage, Counter[str]]:
    kuberay.ensure()  # its CRDs
    with NatsServer(root / "nats") as server, ControlPlane(root / "kaiten-cp") as cp:
        for crd in (CRD_PATH, NODECLAIM_CRD, *kuberay.crds()):
            kubectl(cp.kubeconfig, "apply", "--server-side", "-f", str(crd))
        crds = ("crd/workspaces.kaito.sh", "crd/nodeclaims.karpenter.sh", "crd/rayservices.ray.io")
        established(cp.kubeconfig, crds)
        env = {
            **os.environ, "KAITEN_NATS_URL": server.url, "KUBECONFIG": str(cp.kubeconfig),
            "KAITEN_PROVIDER": "nodeclaim", "KAITEN_BACKEND": "kuberay",
            "KAITEN_RAY_IMAGE": "bench/ray:1",
            "KAITEN_RECONCILE_INTERVAL_S": "1", "KAITEN_CLEANUP_OWNERS": "provisioner,workload",
            "PYTHONUNBUFFERED": "1",
        }  # fmt: skip
        procs = start_services(env, root / "logs", replicas)
        try:
            before = requests(cp.kubeconfig)
            rows = [(size, *await run_size(cp, size, claim_delay, limit, server.url)) for size in sizes]
            served = requests(cp.kubeconfig) - before
            # what the services share, too: on 2 cores the apiserver is the first thing to run out
            shared = [*cp.processes, server.process]
            return rows, {p.name: usage(p.pid) for p in [*procs, *shared]}, served
        finally:
            for proc in procs:
                proc.stop(timeout=10)


def build_kaito(src: Path) -> Path:
    """KAITO's workspace controller (``cmd/workspace``) built from a checkout, cached by its sources."""
    digest = hashlib.sha256()
    for path in sorted([src / "go.mod", src / "go.sum", *src.glob("cmd/**/*.go"), *src.glob("pkg/**/*.go"),
                        *src.glob("api/**/*.go")]):  # fmt: skip
        digest.update(path.read_bytes())
    out = Path.home() / ".cache" / "kaiten" / "kaito" / f"workspace-{digest.hexdigest()[:16]}"
    if not out.exists():
        print(f"building KAITO's workspace controller from {src} (minutes, once) ...", flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["go", "build", "-trimpath", "-o", str(out), "./cmd/workspace"], cwd=src, check=True,
            env={**os.environ, "CGO_ENABLED": "0"},
        )  # fmt: skip
    return out


async def bench_kaito(
    root: Path, src: Path, sizes: list[int], claim_delay: float, limit: float
) -> tuple[Rows, Usage, Counter[str]]:
    """KAITO's controller against a fresh apiserver with KAITO's own CRDs, its webhook off, creating
    NodeClaims (``--node-provisioner=azure-gpu-provisioner``) for the same Karpenter stand-in."""
    binary = build_kaito(src)
    with ControlPlane(root / "kaito-cp") as cp:
        crds = (*sorted((src / "config" / "crd" / "bases").glob("*.yaml")),  # all its kinds: it watches them
                src / "charts" / "kaito" / "workspace" / "crds" / "karpenter.sh_nodeclaims.yaml")  # fmt: skip
        for crd in crds:
            kubectl(cp.kubeconfig, "apply", "--server-side", "-f", str(crd))
        crds_kaito = ("crd/workspaces.kaito.sh", "crd/nodeclaims.karpenter.sh")
        established(cp.kubeconfig, crds_kaito)
        kubectl(cp.kubeconfig, "create", "namespace", "kaito-system")
        proc = ManagedProcess(
            name="kaito-workspace",
            argv=[str(binary), "--webhook=false", "--node-provisioner=azure-gpu-provisioner",
                  "--leader-elect=false", "--metrics-bind-address=0", "--health-probe-bind-address=0"],
            log_path=root / "logs" / "kaito-workspace.log",
            env={**os.environ, "KUBECONFIG": str(cp.kubeconfig), "SYSTEM_NAMESPACE": "kaito-system",
                 "CLOUD_PROVIDER": "azure", "CLUSTER_NAME": "bench"},
        ).start()  # fmt: skip
        try:
            deadline = time.monotonic() + 60
            while "Starting workers" not in proc.log_path.read_text(errors="replace"):
                if not proc.alive() or time.monotonic() > deadline:
                    raise RuntimeError(f"KAITO's controller did not start:\n{tail(proc.log_path)}")
                await asyncio.sleep(0.2)
            before = requests(cp.kubeconfig)
            try:
                rows = [(size, *await run_size(cp, size, claim_delay, limit, None)) for size in sizes]
            except RuntimeError as exc:
                errors = [
                    line for line in proc.log_path.read_text().splitlines() if "Reconciler error" in line
                ]
                raise RuntimeError(f"{exc}; KAITO's last error: {errors[-1:]}") from exc
            served = requests(cp.kubeconfig) - before
            return rows, {p.name: usage(p.pid) for p in [proc, *cp.processes]}, served
        finally:
            proc.stop(timeout=10)


def table(title: str, rows: Rows, usages: Usage, *, kaiten: bool) -> None:
    print(f"{title}\n")
    print(f"{'size':>5}  {'apply→plan':>16}  {'apply→claim':>16}  {'ready→RayService':>16}"
          f"  {'delete→gone':>16}  events/ws")  # fmt: skip
    print(f"{'':>5}  {'p50     p99':>16}  {'p50     p99':>16}  {'p50     p99':>16}  {'p50     p99':>16}")
    for size, seen, events in rows:
        keys = list(seen.claim_ready)
        plan = [seen.planned[k] - seen.applied for k in keys if k in seen.planned]
        claim = [seen.claimed[k] - seen.applied for k in keys if k in seen.claimed]
        ray = [seen.rayservice[k] - seen.claim_ready[k] for k in keys if k in seen.rayservice]
        gone = [t - seen.deleted for t in seen.gone.values()]
        per_ws = f"{events / size:>9.1f}" if kaiten else f"{'—':>9}"
        print(f"{size:>5}  {pcts(plan)}  {pcts(claim)}  {pcts(ray)}  {pcts(gone)}  {per_ws}")
    print(f"\n{'process':<18}{'peak RSS MiB':>14}{'CPU s':>8}")
    for name, (rss, cpu) in usages.items():
        print(f"{name:<18}{rss:>14.0f}{cpu:>8.1f}")
    print()


def requests_table(ours: Counter[str], theirs: Counter[str] | None, workspaces: int) -> None:
    """Requests per Workspace, the most frequent first; KAITO's beside Kaiten's when it ran."""
    print(
        "apiserver requests per Workspace (the whole run; kubectl's and the Karpenter stand-in's in both)\n"
    )
    print(f"{'request':<36}{'Kaiten':>8}{'KAITO' if theirs is not None else '':>8}")
    both = ours + (theirs or Counter())
    for what, _ in both.most_common():
        if both[what] < workspaces / 10:  # rarer than one per ten Workspaces: setup and resyncs
            continue
        kaito = f"{theirs[what] / workspaces:>8.1f}" if theirs is not None else ""
        print(f"{what:<36}{ours[what] / workspaces:>8.1f}{kaito}")
    kaito = f"{sum(theirs.values()) / workspaces:>8.1f}" if theirs is not None else ""
    print(f"{'all':<36}{sum(ours.values()) / workspaces:>8.1f}{kaito}\n")


def p99(rows: Rows, size: int) -> float:
    seen = next(s for n, s, _ in rows if n == size)
    return percentile99([t - seen.applied for t in seen.claimed.values()])


async def main(args: argparse.Namespace) -> None:
    running = asyncio.current_task()
    assert running is not None  # SIGTERM as Ctrl-C: the run stops what it started (it used to leave it all)
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, running.cancel)
    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="kaiten-bench-") as tmp:
        root = Path(args.keep or tmp)  # --keep: the services' logs (root/logs) stay for a post-mortem
        rows, usages, ours = (
            ([], {}, Counter[str]())
            if args.only_kaito
            else await bench_kaiten(root, sizes, args.claim_delay, args.replicas, args.limit)
        )
        theirs = None
        if args.kaito_src:
            theirs = await bench_kaito(root, Path(args.kaito_src), sizes, args.claim_delay, args.limit)
    delay = f"Karpenter stand-in {args.claim_delay}s"
    table(f"Kaiten, {args.replicas} replica(s) per service, {delay}", rows, usages, kaiten=True)
    if theirs is None:
        requests_table(ours, None, sum(sizes))
        print("KAITO's controller: not run (--kaito-src DIR, a KAITO checkout; see docs/performance.md)")
        return
    table(f"KAITO's workspace controller, {delay}", theirs[0], theirs[1], kaiten=False)
    requests_table(ours, theirs[2], sum(sizes))
    largest = max(sizes)
    if not rows:
        return
    print(
        f"kaiten/kaito apply→claim p99 ratio @{largest}: {p99(rows, largest) / p99(theirs[0], largest):.2f}"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1,100", help="comma-separated numbers of Workspaces")
    parser.add_argument("--claim-delay", type=float, default=1.0, help="s from NodeClaim to Ready")
    parser.add_argument("--replicas", type=int, default=1, help="of each Kaiten service")
    parser.add_argument("--limit", type=float, default=600.0, help="s per size and phase before giving up")
    parser.add_argument("--kaito-src", help="a KAITO checkout: build its controller and compare")
    parser.add_argument("--keep", help="an empty directory to run in and keep (the services' logs: logs/)")
    parser.add_argument("--only-kaito", action="store_true", help=argparse.SUPPRESS)  # debugging its side
    arguments = parser.parse_args()
    if arguments.keep:
        Path(arguments.keep).mkdir(parents=True, exist_ok=True)
    asyncio.run(main(arguments))
