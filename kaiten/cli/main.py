"""The ``kaiten`` command: one entry point, subcommands.

- ``kaiten up``      start the local system in the background (NATS, etcd + kube-apiserver, the CRD,
                     a registry, Ray, every service), apply the sample Workspace and follow it live.
- ``kaiten status``  every component, healthy or not and why; the Workspaces.
- ``kaiten chat``    ask a Workspace's model a question.
- ``kaiten events``  follow Workspace status events as they happen.
- ``kaiten down``    stop everything ``up`` started (``--purge`` also removes the state).
- ``kaiten plan``    what the planner would decide for a manifest (dry run, no cluster).
- ``kaiten completion bash|zsh|tcsh``  a shell completion script (shtab).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import re
import sys
from importlib.metadata import version
from pathlib import Path

import shtab

from kaiten.cli import local
from kaiten.cli import plan as plan_cmd
from kaiten.cli.events import BusAccess, follow
from shared.bus.errors import BusUnavailable


def parse_since(text: str) -> dt.datetime:
    """``90s``, ``5m``, ``2h``, ``1d`` ago, or an RFC 3339 time."""
    match = re.fullmatch(r"(\d+)([smhd])", text.strip())
    if match:
        seconds = int(match.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
        return dt.datetime.now(dt.UTC) - dt.timedelta(seconds=seconds)
    try:
        parsed = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"--since takes 90s/5m/2h/1d or an RFC 3339 time, not {text!r}"
        ) from exc
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


def default_nats_url() -> str:
    if url := os.environ.get("KAITEN_NATS_URL"):
        return url
    endpoints = local.state_dir() / "endpoints.json"
    if endpoints.exists():
        return str(json.loads(endpoints.read_text())["nats_url"])
    return "nats://127.0.0.1:4222"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kaiten",
        description="Kaiten: LLM inference and fine-tuning on Kubernetes from one Workspace resource.",
    )
    parser.add_argument("--version", action="version", version=f"kaiten {version('kaiten')}")
    sub = parser.add_subparsers(dest="command", required=True)

    events = sub.add_parser("events", help="follow Workspace status events")
    events.add_argument("name", nargs="?", help="one Workspace (default: all)")
    events.add_argument("-n", "--namespace", help="one namespace (default: all)")
    events.add_argument(
        "-A",
        "--all-events",
        action="store_true",
        help="also show observed/progress events, not only status-bearing ones",
    )
    events.add_argument("--since", type=parse_since, help="replay from this long ago (5m, 2h) or a time")
    events.add_argument("--json", action="store_true", help="one JSON object per line")
    events.add_argument("--count", type=int, help="exit after this many events")
    events.add_argument("--timeout", type=float, help="exit after this many seconds")
    events.add_argument(
        "--nats", default=None, help="NATS URL (default: $KAITEN_NATS_URL, then `kaiten up`'s)"
    )
    events.add_argument(
        "--nats-user",
        default=os.environ.get("KAITEN_NATS_USER"),
        help="a cluster's NATS user, e.g. the chart's read-only `viewer` (its password: "
        "$KAITEN_NATS_PASSWORD; default: $KAITEN_NATS_USER)",
    )
    events.add_argument(
        "--nats-ca", default=os.environ.get("KAITEN_NATS_CA_FILE"), help="CA bundle for a tls:// URL"
    )
    events.add_argument("--nats-creds", default=None, help="a NATS .creds file (JWT accounts)")

    plan_cmd.add_parser(sub)

    state_help = f"default: $KAITEN_STATE_DIR or {local.state_dir()}"
    up = sub.add_parser("up", help="run the whole system on this machine, in the background")
    up.add_argument("--no-sample", action="store_true", help="do not apply the sample Workspace")
    up.add_argument(
        "--timeout", type=float, default=1200, help="seconds to wait for the sample (default 1200)"
    )
    status = sub.add_parser("status", help="every local component, healthy or not, and the Workspaces")
    status.add_argument("--json", action="store_true")
    down = sub.add_parser("down", help="stop everything `kaiten up` started")
    down.add_argument("--purge", action="store_true", help="also delete the state (cluster data, logs)")
    chat = sub.add_parser("chat", help="ask a Workspace's model")
    chat.add_argument("question")
    chat.add_argument("-w", "--workspace", default=local.SAMPLE_NAME, help=f"default: {local.SAMPLE_NAME}")
    chat.add_argument("-n", "--namespace", default="default")
    chat.add_argument("--max-tokens", type=int, default=128)
    chat.add_argument(
        "--url",
        help="the Workspace's endpoint, e.g. http://127.0.0.1:8080 after `kubectl port-forward "
        "svc/<workspace> 8080:80` (default: the endpoint its InferenceReady condition reports)",
    )
    chat.add_argument("--api-key", default=None, help="the serving API key (default: $KAITEN_API_KEY)")
    completion = sub.add_parser("completion", help="print a shell completion script")
    completion.add_argument("shell", choices=shtab.SUPPORTED_SHELLS)
    for command in (up, status, down, chat):
        command.add_argument("--state-dir", type=Path, default=None, help=state_help)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        code = run(args)
    except BrokenPipeError:  # `kaiten plan --presets | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 0
    except BusUnavailable as exc:
        print(f"kaiten: {exc}. Is `kaiten up` running? (`kaiten status`)", file=sys.stderr)
        code = 1
    sys.exit(code)


def run(args: argparse.Namespace) -> int:
    if args.command == "events":
        return asyncio.run(
            follow(
                bus=BusAccess(
                    url=args.nats or default_nats_url(),
                    user=args.nats_user,
                    password=os.environ.get("KAITEN_NATS_PASSWORD")
                    or None,  # never an argument: ps shows those
                    ca_file=args.nats_ca,
                    credentials=args.nats_creds,
                ),
                namespace=args.namespace,
                name=args.name,
                since=args.since,
                as_json=args.json,
                count=args.count,
                stop_after=args.timeout,
                everything=args.all_events,
                out=sys.stdout,
            )
        )
    if args.command == "plan":
        return plan_cmd.run(args, sys.stdin, sys.stdout, sys.stderr)
    if args.command == "completion":  # e.g. `source <(kaiten completion bash)`
        print(shtab.complete(build_parser(), shell=args.shell))
        return 0
    root = getattr(args, "state_dir", None) or local.state_dir()
    if args.command == "up":
        return local.up(root, sample=not args.no_sample, timeout=args.timeout)
    if args.command == "status":
        return local.status(root, as_json=args.json)
    if args.command == "down":
        return local.down(root, purge=args.purge)
    assert args.command == "chat"
    return local.chat(
        root,
        args.question,
        name=args.workspace,
        namespace=args.namespace,
        max_tokens=args.max_tokens,
        url=args.url,
        api_key=args.api_key or os.environ.get("KAITEN_API_KEY") or None,
        out=sys.stdout,
        err=sys.stderr,
    )
