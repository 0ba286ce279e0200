"""Bus overhead: Kaiten's Publisher and ConsumerRunner against raw nats-py, in the same run.

Starts a real nats-server (JetStream, temp store) on 127.0.0.1 and measures:
- publish: ``js.publish`` (baseline) vs ``Publisher.publish`` (msgspec encode, Nats-Msg-Id, trace headers);
- consume: pull ``fetch`` + decode + ``ack`` (baseline) vs ``ConsumerRunner`` (per-Workspace ordering,
  KV lease, heartbeats, metrics, decode) with a no-op handler, over 64 Workspaces; both read the same
  messages (the ones ``Publisher`` stored, headers and all).
Each path is measured ``--rounds`` times, baseline and ours alternating, on fresh messages; the table
shows the median of each (on a busy 2-core machine single rounds vary by a third). The ratio column
(ours / baseline throughput) is what to compare between runs.

    python benchmarks/bus_throughput.py [--messages 3000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import nats

from kaiten.local.nats_server import NatsServer
from shared import events as ev
from shared.bus.consuming import ConsumerRunner, ConsumerSpec
from shared.bus.publishing import Publisher
from shared.bus.streams import declare_stream


def sample(i: int, workspaces: int) -> ev.ConditionReported:
    ref = ev.WorkspaceRef(namespace="bench", name=f"w{i % workspaces}", uid=f"u{i % workspaces}")
    return ev.ConditionReported(workspace=ref, generation=1, type=f"T{i}", status="True", reason="Bench")


async def bench_publish(url: str, n: int, workspaces: int) -> tuple[float, float]:
    nc = await nats.connect(url)
    js = nc.jetstream()
    await declare_stream(js)
    events = [sample(i, workspaces) for i in range(n)]
    started = time.perf_counter()
    for event in events:
        await js.publish(f"kaiten.raw.x.bench.{event.workspace.name}", ev.encode(event))
    raw = n / (time.perf_counter() - started)
    pub = Publisher(js)
    started = time.perf_counter()
    for event in events:
        await pub.publish(event)
    ours = n / (time.perf_counter() - started)
    await nc.close()
    return raw, ours


async def bench_consume(url: str, n: int, round_: int) -> tuple[float, float, float, float]:
    """Messages per second, and this process's CPU µs per message, of raw nats-py and of the runner."""
    nc = await nats.connect(url)
    js = nc.jetstream()
    # the very messages the runner consumes below (Publisher's, with their headers): the difference is
    # the runner's work, not the message format's
    psub = await js.pull_subscribe("kaiten.status.>", durable=f"raw-bench-{round_}")
    started, cpu = time.perf_counter(), time.process_time()
    got = 0
    while got < n:
        for msg in await psub.fetch(256, timeout=5):
            ev.decode(msg.data)
            await msg.ack()
            got += 1
    raw = n / (time.perf_counter() - started)
    raw_cpu = (time.process_time() - cpu) / n * 1e6

    done = asyncio.Event()
    count = 0

    async def handler(batch: Sequence[ev.AnyEvent]) -> None:
        nonlocal count
        count += len(batch)
        if count >= n:
            done.set()

    runner = ConsumerRunner(
        nc=nc,
        spec=ConsumerSpec(
            durable=f"ours-bench-{round_}",
            filter_subjects=["kaiten.status.>"],
            fetch_batch=256,
            max_concurrency=64,
        ),
        handler=handler,
        publisher=Publisher(js),
        reporter="bench",
    )
    started, cpu = time.perf_counter(), time.process_time()
    await runner.start()
    await asyncio.wait_for(done.wait(), timeout=300)
    ours = n / (time.perf_counter() - started)
    ours_cpu = (time.process_time() - cpu) / n * 1e6
    await runner.stop()
    await nc.close()
    return raw, ours, raw_cpu, ours_cpu


async def main(n: int, workspaces: int, rounds: int) -> None:
    published: list[tuple[float, float]] = []
    consumed: list[tuple[float, float, float, float]] = []
    with tempfile.TemporaryDirectory() as tmp, NatsServer(Path(tmp)) as server:
        for round_ in range(rounds):  # each round consumes what it published, with new durables
            published.append(await bench_publish(server.url, n, workspaces))
            consumed.append(await bench_consume(server.url, n, round_))
    print(f"{n} messages, {workspaces} Workspaces, nats-server on 127.0.0.1, median of {rounds} rounds\n")
    print(f"{'path':<10}{'baseline msg/s':>16}{'kaiten msg/s':>15}{'ratio':>8}")
    for path, runs in (("publish", published), ("consume", [c[:2] for c in consumed])):
        raw, ours = statistics.median(r for r, _ in runs), statistics.median(o for _, o in runs)
        ratio = statistics.median(o / r for r, o in runs)
        print(f"{path:<10}{raw:>16.0f}{ours:>15.0f}{ratio:>8.2f}")
    raw_cpu, ours_cpu = statistics.median(c[2] for c in consumed), statistics.median(c[3] for c in consumed)
    # steadier than msg/s on a shared machine: this process's CPU only, not nats-server's or a neighbour's
    print(f"\nconsume CPU µs per message: baseline {raw_cpu:.1f}, kaiten {ours_cpu:.1f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--workspaces", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    asyncio.run(main(args.messages, args.workspaces, args.rounds))
