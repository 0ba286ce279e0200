"""The ``kaiten`` command: one entry point, subcommands.

- ``kaiten up``      start the local system (NATS, etcd + kube-apiserver, the CRDs, the services built
                     so far) in the foreground; Ctrl-C stops everything it started.
- ``kaiten events``  follow Workspace status events as they happen.
- ``kaiten plan``    what the planner would decide for a manifest (dry run, no cluster).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import re
import sys
from pathlib import Path

from shared.cli import local
from shared.cli import plan as plan_cmd
from shared.cli.events import follow


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

    plan_cmd.add_parser(sub)

    up = sub.add_parser("up", help="run the whole system on this machine (foreground)")
    up.add_argument("--state-dir", type=Path, default=None, help=f"default: {local.state_dir()}")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "events":
        code = asyncio.run(
            follow(
                nats_url=args.nats or default_nats_url(),
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
        sys.exit(code)
    if args.command == "plan":
        try:
            code = plan_cmd.run(args, sys.stdin, sys.stdout, sys.stderr)
        except BrokenPipeError:  # `kaiten plan --presets | head`
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            code = 0
        sys.exit(code)
    if args.command == "up":
        sys.exit(local.up(args.state_dir or local.state_dir()))
