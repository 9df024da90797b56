"""Broadcast across processes: delivered msgs/s with 1 and with N hub processes behind HAProxy.

    REDIS_URL=redis://127.0.0.1:6379/0 .venv/bin/python bench/scaleout.py
    .venv/bin/python bench/scaleout.py --processes 1,2 --clients 1000 --rates 100,200,400 --duration 5

For each process count: `server.cluster.Cluster` (what `sourcenet-hub cluster` runs: HAProxy in
front of the hub processes, on a fresh database) and `--clients` official Node socket.io-client
connections (tests/node/cluster-clients.mjs, websocket, split over `--loadgens` Node processes)
spread over the processes by HAProxy, all subscribed to one public channel. This process publishes
on that channel at rising rates (events/s) as another node would (history append in Redis, then
the cross-node PUBLISH that every hub fans out to its own clients: the real multi-process path).
Per step: delivered msgs/s (events the clients applied live / the step's length), the share of
what was expected, and the hubs' CPU (all processes, % of one core). A step is sustained when >= 99%
arrived within the step plus a 3 s drain; the steps stop at the first that is not. The clients
check order and completeness themselves (every offset once), as in bench/cluster.py.

Everything shares the machine: with 2 cores, the Node clients, this publisher, Redis and HAProxy
compete with the hubs, so read the ratio against the cores the hubs actually got (their CPU column).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.cluster import NodeClients, Stream, fresh_database, hub_cluster  # noqa: E402
from bench.fanout import cpu_seconds  # noqa: E402
from server.cluster import Cluster  # noqa: E402

SUSTAINED_SHARE = 0.99
DRAIN_SECONDS = 3.0


def hubs_cpu(cluster: Cluster) -> float:
    """CPU seconds of every hub process so far."""
    return sum(cpu_seconds(hub.pid) for hub in cluster.hubs if hub.pid)


async def applied_live(loadgens: list[NodeClients]) -> int:
    """Events the clients of every load generator have applied live so far."""
    return sum([(await nodes.ask({"cmd": "status"}))["live"] for nodes in loadgens])


async def step(cluster: Cluster, stream: Stream, loadgens: list[NodeClients], clients: int, rate: float,
               duration: float) -> dict:
    """Publish `rate` events/s for `duration` s; what the clients applied live, and the hubs' CPU."""
    before = await applied_live(loadgens)
    published_before = len(stream.published)
    cpu0, started = hubs_cpu(cluster), time.monotonic()
    stream.start(rate)
    await asyncio.sleep(duration)
    published = await stream.stop() - published_before
    expected = published * clients
    deadline = time.monotonic() + DRAIN_SECONDS
    while True:
        live = await applied_live(loadgens) - before
        if live >= expected or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    elapsed = time.monotonic() - started
    return {"rate": rate, "published": published, "expected": expected, "delivered": live,
            "delivered_per_s": live / duration, "share": live / max(expected, 1),
            "hub_cpu": (hubs_cpu(cluster) - cpu0) / elapsed,
            "sustained": live >= SUSTAINED_SHARE * expected}


async def run(processes: int, args: argparse.Namespace) -> dict:
    """Rising steps against `processes` hubs behind HAProxy."""
    steps: list[dict] = []
    async with fresh_database(args.database_url, "scaleout") as dsn, \
            hub_cluster(dsn, args.redis_url, processes, env={"BLOCK_PRODUCER": "false"}) as (cluster, prefix):
        assert cluster.redis_url is not None
        stream = Stream(cluster.redis_url, prefix, f"market:category:bench-{uuid.uuid4().hex[:8]}")
        share = args.clients // args.loadgens
        loadgens = [await NodeClients.start(cluster.url, stream.channel, share, "websocket")
                    for _ in range(args.loadgens)]
        try:
            spread: dict[str, int] = {}
            for nodes in loadgens:
                for node, count in (await nodes.ask({"cmd": "status"}))["nodes"].items():
                    spread[node] = spread.get(node, 0) + count
            print(f"{processes} process(es): {share * args.loadgens} clients in {args.loadgens} load "
                  f"generator(s), spread {json.dumps(spread, sort_keys=True)}", flush=True)
            for rate in args.rates:
                result = await step(cluster, stream, loadgens, share * args.loadgens, rate, args.duration)
                steps.append(result)
                print(f"  {rate:>6g} events/s: {result['delivered_per_s']:>9,.0f} msgs/s delivered "
                      f"({result['share']:.1%} of {result['expected']:,}), hubs' CPU "
                      f"{result['hub_cpu']:.0%} of a core, load {os.getloadavg()[0]:.1f}"
                      f"{'' if result['sustained'] else '  <- not sustained'}", flush=True)
                if not result["sustained"]:
                    break
        finally:
            for nodes in loadgens:
                await nodes.close()
            await stream.close()
    sustained = [s["delivered_per_s"] for s in steps if s["sustained"]]
    return {"processes": processes, "clients": args.clients, "steps": steps,
            "max_sustained_per_s": max(sustained) if sustained else None}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", default="1,2", help="process counts to compare, comma-separated")
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--rates", default="50,100,200,300,400,600,800,1200",
                        help="events/s on the channel per step")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per step")
    parser.add_argument("--loadgens", type=int, default=2, help="Node processes sharing the clients")
    parser.add_argument("--database-url", default=os.environ.get("DATABASE_URL",
                                                                 "postgresql://postgres@127.0.0.1:5432/postgres"))
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL"))
    parser.add_argument("--json", metavar="PATH", help="also write the results to this file")
    args = parser.parse_args()
    args.rates = [float(r) for r in args.rates.split(",")]
    results = [await run(int(p), args) for p in args.processes.split(",")]
    print("\nprocesses  max sustained msgs/s  ratio to the first")
    base = results[0]["max_sustained_per_s"]
    for result in results:
        best = result["max_sustained_per_s"]
        ratio = f"{best / base:.2f}x" if best and base else "-"
        print(f"{result['processes']:>9}  {best or 0:>20,.0f}  {ratio:>18}")
    if args.json:
        Path(args.json).write_text(json.dumps({"bench": "scaleout", "load_average": os.getloadavg()[0],
                                               "results": results}, indent=1))


if __name__ == "__main__":
    asyncio.run(main())
