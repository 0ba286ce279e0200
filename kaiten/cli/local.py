"""``kaiten up`` / ``status`` / ``down`` / ``chat``: the system on one machine.

``up`` starts the supervisor (:mod:`kaiten.cli.stack`) in the background, shows each part coming up,
prints how to use the cluster with kubectl, applies the sample Workspace (unless ``--no-sample``),
follows its status events live until it is ready, and prints the endpoint and a ``curl`` line. The
system keeps running until ``kaiten down``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import httpx

from kaiten import bundle
from kaiten.bundle import EXAMPLES, SAMPLE, shown
from kaiten.cli.events import endpoint_of, watch_workspace
from kaiten.cli.stack import PROJECT, lock
from kaiten.local.nats_server import nats_server_binary
from kaiten.local.procs import StartFailed, identity, kill_pids, running, tail

SAMPLE_NAME = "workspace-smollm2"
QUESTION = "What is the capital of France?"
MARKS = {
    "healthy": "✓",
    "disabled": "-",
    "starting": "…",
    "restarting": "!",
    "unhealthy": "✗",
    "stopped": "·",
}


def state_dir() -> Path:
    base = os.environ.get("KAITEN_STATE_DIR") or str(Path.home() / ".local" / "state" / "kaiten")
    return Path(base)


def read_status(root: Path) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads((root / "status.json").read_text())
    except (OSError, ValueError):
        return None
    return data


def supervisor_running(root: Path) -> bool:
    """True while a supervisor holds the state dir's lock (a crashed one releases it at exit)."""
    if not (root / "lock").exists():
        return False
    held = lock(root)
    if held is None:
        return True
    held.close()
    return False


def _elapsed(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Live:
    """One status line rewritten in place on a terminal; on a pipe, only the lines that matter."""

    SPIN = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.tty = out.isatty()
        self.tick = 0

    def line(self, text: str) -> None:
        if self.tty:
            self.out.write("\r\x1b[K")
        print(text, file=self.out, flush=True)

    def status(self, text: str) -> None:
        if not self.tty:
            return
        self.tick += 1
        self.out.write(f"\r\x1b[K{self.SPIN[self.tick % len(self.SPIN)]} {text}")
        self.out.flush()

    def clear(self) -> None:
        if self.tty:
            self.out.write("\r\x1b[K")
            self.out.flush()


# --- up ----------------------------------------------------------------------------------------


LACKS_EXTRAS = (
    "kaiten up runs NATS, Ray and a model on this machine, and this install has not got them: "
    "pip install 'kaiten[local,serving]' (or, in a checkout: make up)"
)


def cannot_run_up() -> str:
    """Why ``up`` cannot run in this install (nothing started yet), or "" when it can."""
    if lacking := bundle.missing():
        where = ", ".join(map(str, lacking))
        return f"kaiten up: this install lacks {where} (a wheel built without its package data?)"
    try:
        nats_server_binary()
    except StartFailed:
        return LACKS_EXTRAS
    if importlib.util.find_spec("ray") is None:
        return LACKS_EXTRAS
    return ""


def up(
    root: Path, *, sample: bool, timeout: float, out: TextIO = sys.stdout, err: TextIO = sys.stderr
) -> int:
    if problem := cannot_run_up():
        print(problem, file=err)
        return 2
    root.mkdir(parents=True, exist_ok=True)
    if supervisor_running(root):
        status = read_status(root) or {}
        pid = status.get("supervisor", {}).get("pid", "?")
        print(
            f"kaiten is already running (supervisor pid {pid}, state in {root}).\n"
            f"  kaiten status    shows every component\n  kaiten down      stops it",
            file=err,
        )
        return 1
    if stale := read_status(root):  # the last supervisor died without stopping its parts
        reap(stale, out)
    (root / "status.json").unlink(missing_ok=True)
    live = Live(out)
    started = time.monotonic()
    with (root / "supervisor.log").open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kaiten.cli.stack", str(root)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=PROJECT,
            start_new_session=True,  # Ctrl-C in this terminal after `up` returns must not reach it
        )
    live.line(f"kaiten: starting in the background (supervisor pid {proc.pid}, state in {root})")
    try:
        ready = _follow_start(root, proc, live, started)
    except KeyboardInterrupt:
        live.line("interrupted: stopping what was started ...")
        proc.send_signal(signal.SIGTERM)  # the supervisor stops its parts in order, then exits
        try:
            proc.wait(timeout=180)
        except subprocess.TimeoutExpired:
            live.line(f"the supervisor did not stop within 180s; `kaiten down` (pid {proc.pid})")
            return 1
        return 130
    if ready is None:
        print(f"kaiten up failed. Supervisor log ({root / 'supervisor.log'}):", file=err)
        print(tail(root / "supervisor.log", 25), file=err)
        failed = read_status(root) or {}
        if message := failed.get("supervisor", {}).get("message"):
            print(f"\nreason: {message}", file=err)
        return 1
    endpoints = ready["endpoints"]
    kubeconfig = endpoints["kubeconfig"]
    live.line(
        f"\nKaiten is up ({_elapsed(time.monotonic() - started)}). Use the cluster with plain kubectl:\n"
        f"  export KUBECONFIG={kubeconfig}\n"
        f"  kubectl get workspaces\n"
    )
    if not sample:
        _next_steps(endpoints, None, out)
        return 0
    return _sample(root, endpoints, live, timeout, out)


def _follow_start(
    root: Path, proc: subprocess.Popen[bytes], live: Live, started: float
) -> dict[str, Any] | None:
    shown: dict[str, tuple[str, str]] = {}
    while True:
        status = read_status(root)
        if status is not None and status["supervisor"]["pid"] == proc.pid:
            for part in status["components"]:
                key = (part["state"], part["detail"])
                if shown.get(part["name"]) == key:
                    continue
                shown[part["name"]] = key
                if part["state"] == "healthy":
                    live.line(f"✓ {part['name']:<15} {part['endpoint']}".rstrip())
                elif part["state"] in ("disabled", "unhealthy", "restarting") or part["detail"]:
                    mark = MARKS.get(part["state"], "·")
                    live.line(f"{mark} {part['name']:<15} {part['state']}: {part['detail']}")
            phase = status["supervisor"]["phase"]
            if phase in ("up", "degraded"):
                live.clear()
                if phase == "degraded":
                    live.line(f"! {status['supervisor']['message']} (see `kaiten status`)")
                return status
            if phase == "failed":
                live.clear()
                return None
            starting = [p["name"] for p in status["components"] if p["state"] == "starting"]
            if starting:
                live.status(f"starting {', '.join(starting)} ({_elapsed(time.monotonic() - started)})")
        if proc.poll() is not None:
            live.clear()
            return None
        time.sleep(0.2)


def _kubectl(kubeconfig: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["kubectl", *args],
        env={**os.environ, "KUBECONFIG": kubeconfig},
        capture_output=True,
        text=True,
        check=check,
        timeout=60,
    )


def condition(obj: dict[str, Any], kind: str) -> dict[str, Any]:
    return next((c for c in obj.get("status", {}).get("conditions", []) if c["type"] == kind), {})


def _sample(root: Path, endpoints: dict[str, str], live: Live, timeout: float, out: TextIO) -> int:
    kubeconfig = endpoints["kubeconfig"]
    since = time.time() - 1
    applied = _kubectl(kubeconfig, "apply", "-f", str(SAMPLE), check=False)
    if applied.returncode != 0:
        live.line(f"✗ could not apply {SAMPLE}: {applied.stderr.strip()}")
        return 1
    live.line(f"applied {shown(SAMPLE)}: {applied.stdout.strip()}")
    try:
        result = watch_workspace(
            nats_url=endpoints["nats_url"],
            kubeconfig=kubeconfig,
            namespace="default",
            name=SAMPLE_NAME,
            since=since,
            timeout=timeout,
            live=live,
        )
    except KeyboardInterrupt:
        live.line("\nstopped watching; Kaiten keeps running (`kaiten status`, `kaiten down`)")
        return 130
    if not result.ok:
        live.line(f"✗ {SAMPLE_NAME}: {result.message}")
        live.line(f"  kubectl describe workspace {SAMPLE_NAME} · kaiten events --since 10m · logs in {root}")
        return 1
    live.line(f"✓ {SAMPLE_NAME} ready in {_elapsed(result.seconds)}: {result.message}")
    _next_steps(endpoints, result.endpoint, out)
    return 0


def _next_steps(endpoints: dict[str, str], endpoint: str | None, out: TextIO) -> None:
    lines = []
    if endpoint:
        body = json.dumps({"messages": [{"role": "user", "content": QUESTION}]})
        lines += [
            f"\nEndpoint: {endpoint}",
            "Ask it:",
            f'  kaiten chat "{QUESTION}"',
            f"  curl -s {endpoint}/chat -H 'content-type: application/json' -d '{body}'",
            f"  (OpenAI API: {endpoint}/v1)",
        ]
    lines += [
        f"\nMore: kubectl apply -f {shown(EXAMPLES / 'tuning-smollm2.yaml')}  (tunes an adapter on bundled"
        " data)",
        f"      kubectl apply -f {shown(EXAMPLES / 'workspace-smollm2-adapter.yaml')}  (then serves it)",
        "      kaiten status · kaiten events · kaiten down [--purge]",
    ]
    print("\n".join(lines), file=out, flush=True)


# --- status ------------------------------------------------------------------------------------


def status(root: Path, *, as_json: bool, out: TextIO = sys.stdout) -> int:
    """Every component, healthy or not and why; the Workspaces. Exit 0 healthy, 1 not, 3 not running."""
    data = read_status(root)
    alive = supervisor_running(root)
    if as_json:
        print(json.dumps({"running": alive, **(data or {})}, indent=1), file=out)
        return 3 if not alive else (0 if data and data["supervisor"]["phase"] == "up" else 1)
    if not alive:
        print(f"kaiten is not running (state in {root}). `kaiten up` starts it.", file=out)
        if data and data["supervisor"]["phase"] == "failed":
            print(f"last start failed: {data['supervisor']['message']}", file=out)
        return 3
    if data is None:
        print("kaiten is starting (no status yet)", file=out)
        return 1
    sup = data["supervisor"]
    since = time.time() - sup["started_at"]
    print(
        f"kaiten: {sup['phase']} (supervisor pid {sup['pid']}, {_elapsed(since)}; state in {root})", file=out
    )
    rows = [("COMPONENT", "STATE", "PID", "RESTARTS", "ENDPOINT", "DETAIL")]
    for part in data["components"]:
        pid = str(part["pids"][0]) if part["pids"] else "-"
        detail = part["detail"]
        if part["state"] == "healthy":
            detail = f"for {_elapsed(time.time() - part['since'])}"
            if part.get("last_exit"):
                detail += f" (last {part['last_exit']})"
        rows.append(
            (part["name"], part["state"], pid, str(part["restarts"]), part["endpoint"] or "-", detail)
        )
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for row in rows:
        print("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:5])) + "  " + row[5], file=out)
    kubeconfig = data.get("endpoints", {}).get("kubeconfig")
    if kubeconfig:
        _workspaces(kubeconfig, out)
    return 0 if sup["phase"] == "up" else 1


def _workspaces(kubeconfig: str, out: TextIO) -> None:
    try:
        got = _kubectl(kubeconfig, "get", "workspaces", "-A", "-o", "json", check=False)
    except subprocess.TimeoutExpired:
        print("\nworkspaces: the apiserver did not answer within 60s", file=out)
        return
    if got.returncode != 0:
        print(f"\nworkspaces: {got.stderr.strip()}", file=out)
        return
    items = json.loads(got.stdout)["items"]
    if not items:
        print(f"\nno Workspaces (kubectl apply -f {shown(SAMPLE)})", file=out)
        return
    print("\nWORKSPACE                                  SUCCEEDED  DETAIL", file=out)
    for item in items:
        meta = item["metadata"]
        cond = condition(item, "WorkspaceSucceeded")
        detail = cond.get("message") or cond.get("reason") or "pending"
        key = f"{meta['namespace']}/{meta['name']}"
        print(f"{key:<42} {cond.get('status', 'Unknown'):<10} {detail}", file=out)


# --- down --------------------------------------------------------------------------------------


def down(root: Path, *, purge: bool, out: TextIO = sys.stdout, wait: float = 180.0) -> int:
    data = read_status(root) or {}
    code = 0
    if supervisor_running(root):
        pid = int(data.get("supervisor", {}).get("pid", 0))
        if not pid:
            print("kaiten is starting; try again in a moment", file=out)
            return 1
        print(f"stopping kaiten (supervisor pid {pid}) ...", file=out, flush=True)
        started = time.monotonic()
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + wait
        while supervisor_running(root) and time.monotonic() < deadline:
            time.sleep(0.2)
        if supervisor_running(root):
            print(f"the supervisor did not stop within {wait:.0f}s; killing what it started", file=out)
            code = 1
        else:
            print(f"✓ stopped in {_elapsed(time.monotonic() - started)}", file=out)
    else:
        print(f"kaiten is not running (state in {root})", file=out)
    reap(data, out)
    if purge and root.exists():
        shutil.rmtree(root)
        print(f"✓ removed {root}", file=out)
    return code


def reap(data: dict[str, Any], out: TextIO) -> None:
    """Kill what a supervisor recorded and left running (it was SIGKILLed, say): ours, by PID, and only
    while each PID is still the process that was recorded (same boot, same start time)."""
    recorded = {
        pid: part.get("ids", {}).get(str(pid))
        for part in data.get("components", [])
        for pid in part.get("pids", [])
    }
    alive = running(set(recorded))
    strangers = {pid for pid in alive if identity(pid) != recorded[pid]}
    if strangers:
        print(f"not killing {sorted(strangers)}: not ours any more (restarted or reused PIDs)", file=out)
    leftovers = alive - strangers
    if leftovers:
        print(f"killing processes a previous kaiten left running: {sorted(leftovers)}", file=out)
        kill_pids(leftovers)
        if temp := data.get("endpoints", {}).get("ray_temp_dir"):  # RayHead.stop would have removed it
            shutil.rmtree(temp, ignore_errors=True)


# --- chat --------------------------------------------------------------------------------------


def chat(
    root: Path,
    question: str,
    *,
    name: str,
    namespace: str,
    max_tokens: int,
    url: str | None = None,
    api_key: str | None = None,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
) -> int:
    """Ask ``name``'s model; at ``url`` when given (a port-forward to a cluster's Workspace, say), else
    at the endpoint its ``InferenceReady`` condition reports (``kaiten up``'s cluster or $KUBECONFIG)."""
    endpoint = url.rstrip("/") if url else _ready_endpoint(root, name, namespace, err)
    if endpoint is None:
        return 1
    body = {
        "messages": [{"role": "user", "content": question}],
        "generate_kwargs": {"max_new_tokens": max_tokens},
    }
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        answer = httpx.post(f"{endpoint}/chat", json=body, headers=headers, timeout=300)
    except httpx.HTTPError as exc:
        print(f"{endpoint}/chat: {exc}", file=err)
        return 1
    if answer.status_code == 401:
        print(f"{endpoint}/chat: this Workspace needs an API key (--api-key or $KAITEN_API_KEY)", file=err)
        return 1
    if answer.status_code != 200:
        print(f"{endpoint}/chat answered {answer.status_code}: {answer.text[:500]}", file=err)
        return 1
    print(answer.json()["Result"], file=out)
    return 0


def _ready_endpoint(root: Path, name: str, namespace: str, err: TextIO) -> str | None:
    data = read_status(root) or {}
    kubeconfig = os.environ.get("KUBECONFIG") or data.get("endpoints", {}).get("kubeconfig")
    if not kubeconfig:
        print("no cluster: start one with `kaiten up`, set KUBECONFIG, or give --url", file=err)
        return None
    got = _kubectl(kubeconfig, "get", "workspace", name, "-n", namespace, "-o", "json", check=False)
    if got.returncode != 0:
        print(f"workspace {namespace}/{name}: {got.stderr.strip()}", file=err)
        return None
    ready = condition(json.loads(got.stdout), "InferenceReady")
    if ready.get("status") != "True":
        why = ready.get("message") or ready.get("reason") or "no InferenceReady condition yet"
        print(f"workspace {namespace}/{name} is not serving: {why}", file=err)
        return None
    endpoint = endpoint_of(ready.get("message", ""))
    if not endpoint:
        print(f"workspace {namespace}/{name} reports no endpoint: {ready.get('message')!r}", file=err)
        return None
    return endpoint
