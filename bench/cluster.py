"""Rolling restart and kill -9 under load: N hub processes behind HAProxy, many official clients, a steady stream.

    .venv/bin/python bench/cluster.py                       # 2,000 clients, 3 processes, 20 events/s
    .venv/bin/python bench/cluster.py --clients 500 --transports websocket

Setup: `server.cluster.Cluster` (what `sourcenet-hub cluster` runs) with --processes hub processes
on a fresh database on --database-url's server (DATABASE_URL, else the local PostgreSQL; dropped
at the end) and REDIS_URL (else the cluster's embedded Valkey). --clients official Node
socket.io-client connections (tests/node/cluster-clients.mjs; half websocket, half long-polling
with --transports mixed) connect through HAProxy and watch one public channel the way
docs/protocol.md asks. This process publishes --rate events per second on that channel, as
another node would (history in Redis, then the cross-node PUBLISH), so the stream outlives every
hub process. Then each process in turn gets SIGTERM and the cluster starts it again (the next one
only once HAProxy has the new process back in rotation), then one process gets SIGKILL. At the
end every client must hold every offset 1..N exactly once: the figures are what was lost (0 is the
target), applied twice, and the holes clients saw and filled by replay. tests/test_cluster.py runs
the same scenario with fewer clients.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server.cluster import Cluster, free_port  # noqa: E402
from server.core.aio import wait_event  # noqa: E402
from server.core.settings import Settings  # noqa: E402
from server.realtime.fanout import RedisFanoutManager  # noqa: E402
from server.realtime.history import Event, EventBus, RedisHistory  # noqa: E402
from server.realtime.hub import room_name  # noqa: E402
from server.realtime.redis import connect_redis  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
NODE_DIR = ROOT / "tests" / "node"
NAMESPACE = "/marketplace"
EVENT = "stream_tick"
SUMMARY_KEYS = ("clients", "complete", "missing", "duplicates", "beyond", "total", "connects", "shutdownNotices",
                "detectedHoles", "gapNotices", "historyGapAcks", "replayHoles", "replayed", "live", "nodes",
                "disconnects", "connectErrors", "subscribeErrors", "ackTimeouts", "incomplete")


class Stream:
    """Publishes on a public channel from outside the hub processes, as another node would."""

    def __init__(self, redis_url: str, prefix: str, channel: str, history_cap: int | None = None) -> None:
        defaults = Settings()
        self.channel = channel
        self.redis = connect_redis(redis_url)
        self.manager = RedisFanoutManager(redis_url, channel=prefix + "socketio")
        # The hubs' HISTORY_CAP: each append trims the channel to the appender's cap.
        self.bus = EventBus(RedisHistory(self.redis, prefix, history_cap or defaults.history_cap,
                                         defaults.history_ttl), self._to_every_node)
        self.published: list[Event] = []
        self._task: asyncio.Task | None = None
        self._stopping = asyncio.Event()

    async def _to_every_node(self, event: Event) -> None:
        # What a hub's delivery hands its client manager for the other nodes; every hub is "other".
        await self.manager._publish({"method": "emit", "event": event.type, "data": event.to_wire(),
                                     "namespace": NAMESPACE, "room": room_name(event.channel),
                                     "host_id": self.manager.host_id})

    async def publish(self) -> Event:
        """One event, numbered by how many came before it."""
        event = await self.bus.publish(self.channel, EVENT, {"n": len(self.published) + 1})
        self.published.append(event)
        return event

    async def publish_due(self, count: int) -> None:
        """`count` events in order, as one batch (history in one round trip), numbered on."""
        first = len(self.published) + 1
        self.published += await self.bus.publish_many(
            [(self.channel, EVENT, {"n": n}) for n in range(first, first + count)])

    def start(self, rate: float) -> None:
        """Publish `rate` events per second until stop(): what is due each tick, as one batch (one
        publish and its round trips per event could not keep up with the hubs beyond ~100/s)."""
        async def run() -> None:
            started, done = time.monotonic(), 0
            while not self._stopping.is_set():
                due = int((time.monotonic() - started) * rate) + 1 - done
                if due > 0:
                    await self.publish_due(due)
                    done += due
                await wait_event(self._stopping, max(0.0, started + done / rate - time.monotonic()))
        self._stopping.clear()
        self._task = asyncio.create_task(run())

    async def stop(self) -> int:
        """Stop publishing; returns how many events were published (all out to the other nodes)."""
        if self._task is not None:
            # Not cancelled: a publish cut between its history append and its count would leave
            # an event the clients get but the count does not have.
            self._stopping.set()
            await self._task
            self._task = None
        await self.manager.flush()
        return len(self.published)

    async def close(self) -> None:
        """Stop, then close the Redis connections."""
        await self.stop()
        await self.manager.close()
        await self.redis.aclose()


async def delete_keys(redis_url: str, prefix: str) -> None:
    """Remove what a run left in Redis under its REDIS_PREFIX (histories keep for HISTORY_TTL)."""
    redis = connect_redis(redis_url)
    try:
        keys = [key async for key in redis.scan_iter(match=prefix + "*")]
        if keys:
            await redis.delete(*keys)
    finally:
        await redis.aclose()


@contextlib.asynccontextmanager
async def fresh_database(admin_dsn: str, label: str) -> AsyncIterator[str]:
    """A new database on `admin_dsn`'s server for one run, dropped afterwards; its DSN."""
    import asyncpg

    from tests.conftest import with_database

    name = f"hub_{label}_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(admin_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield with_database(admin_dsn, name)
        finally:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@contextlib.asynccontextmanager
async def hub_cluster(dsn: str, redis_url: str | None, processes: int, work: Path | None = None,
                      env: dict[str, str] | None = None) -> AsyncIterator[tuple[Cluster, str]]:
    """HAProxy and `processes` hubs on the database `dsn`, with a REDIS_PREFIX named after it (its
    keys deleted afterwards when Redis is ours to clean); the cluster and that prefix. Logs and
    data go to `work` (default /tmp/<database>)."""
    name = urlsplit(dsn).path.strip("/")
    prefix = f"{name}:"
    work = work or Path("/tmp") / name
    settings = Settings(database_url=dsn, redis_url=redis_url, data_dir=work / "data", shutdown_timeout=4.0)
    try:
        async with Cluster(settings, processes, port=free_port(), demo_data=False,
                           env={"REDIS_PREFIX": prefix, "LOG_FORMAT": "json", **(env or {})},
                           log_dir=work / "logs", ready_timeout=180) as cluster:
            yield cluster, prefix
    finally:
        if redis_url:  # an embedded Valkey goes with the cluster
            await delete_keys(redis_url, prefix)


class NodeClients:
    """tests/node/cluster-clients.mjs: many official clients watching the stream's channel."""

    def __init__(self, process: Any) -> None:
        self.process = process

    @classmethod
    async def start(cls, url: str, channel: str, clients: int, transports: str = "mixed",
                    timeout: float = 300) -> NodeClients:
        """Start the script; returns once every client has subscribed."""
        node = shutil.which("node")
        if node is None or not (NODE_DIR / "node_modules" / "socket.io-client").exists():
            raise RuntimeError("Node.js and tests/node's packages are required (make test installs them)")
        config = {"url": url, "namespace": NAMESPACE, "channel": channel, "event": EVENT, "clients": clients,
                  "transports": transports, "concurrency": 50, "maxEvents": 100_000}
        process = await asyncio.create_subprocess_exec(
            node, str(NODE_DIR / "cluster-clients.mjs"), json.dumps(config), cwd=str(NODE_DIR),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, limit=1 << 22)
        self = cls(process)
        ready = await self._reply(timeout)
        if ready.get("ready") != clients:
            await self.close()
            raise RuntimeError(f"the clients did not all subscribe: {ready}")
        self.ready_seconds = ready["seconds"]
        return self

    async def _reply(self, timeout: float) -> dict:
        line = await asyncio.wait_for(self.process.stdout.readline(), timeout)
        if not line:
            raise RuntimeError("the Node clients exited")
        return json.loads(line)

    async def ask(self, command: dict, timeout: float = 30) -> dict:
        """Send a command (status, finish) and return the script's answer."""
        self.process.stdin.write(json.dumps(command).encode() + b"\n")
        await self.process.stdin.drain()
        return await self._reply(timeout)

    async def close(self) -> None:
        """Stop the script (it exits by itself after `finish`)."""
        if self.process.returncode is None:
            self.process.kill()
        await self.process.wait()


async def restart(cluster: Cluster, index: int, signum: int) -> str:
    """Signal one hub and wait until its replacement is ready and back in HAProxy's rotation."""
    hub = cluster.hubs[index]
    old_pid = hub.pid
    assert old_pid is not None and hub.process is not None
    started = time.monotonic()
    os.kill(old_pid, signum)
    await asyncio.wait_for(hub.process.wait(), 60)
    exited = time.monotonic() - started
    await cluster.wait_restarted(hub, old_pid, timeout=120)
    return f"exited after {exited:.1f} s, back in rotation after {time.monotonic() - started:.1f} s"


async def rolling_restart_and_kill(cluster: Cluster, stream: Stream, clients: int, *, rate: float = 20.0,
                                   transports: str = "mixed", kill: int = 1) -> tuple[dict, dict[str, str]]:
    """The scenario: clients watch, the stream runs, every hub restarts in turn, one is killed.

    Returns the clients' summary (only its main keys) and how long each restart took.
    """
    nodes = await NodeClients.start(cluster.url, stream.channel, clients, transports)
    timings = {"clients subscribed": f"{nodes.ready_seconds:.1f} s"}
    try:
        spread = await nodes.ask({"cmd": "status"})
        timings["spread before"] = json.dumps(spread["nodes"], sort_keys=True)
        stream.start(rate)
        await asyncio.sleep(2)
        for index, hub in enumerate(cluster.hubs):
            timings[f"{hub.name} SIGTERM"] = await restart(cluster, index, signal.SIGTERM)
            await asyncio.sleep(0.5)
        timings[f"{cluster.hubs[kill].name} SIGKILL"] = await restart(cluster, kill, signal.SIGKILL)
        await asyncio.sleep(1)
        total = await stream.stop()
        if stream.published[-1].offset != total:
            raise RuntimeError(f"the stream's channel was not fresh: offset {stream.published[-1].offset}")
        started = time.monotonic()
        summary = await nodes.ask({"cmd": "finish", "total": total, "timeoutMs": 60_000}, timeout=120)
        timings["caught up after the stream stopped"] = f"{time.monotonic() - started:.1f} s"
    finally:
        await nodes.close()
    return {key: summary[key] for key in SUMMARY_KEYS if key in summary} | {"connected": summary["connected"]}, timings


async def main() -> None:
    """Run the scenario once on a fresh database and print what the clients hold."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=2000)
    parser.add_argument("--processes", type=int, default=3)
    parser.add_argument("--rate", type=float, default=20.0, help="events per second on the stream")
    parser.add_argument("--transports", choices=("mixed", "websocket", "polling"), default="mixed")
    parser.add_argument("--history-cap", type=int, default=Settings().history_cap,
                        help="HISTORY_CAP of the hubs: events a client may fall behind and still recover")
    parser.add_argument("--database-url", default=os.environ.get("DATABASE_URL",
                                                                 "postgresql://postgres@127.0.0.1:5432/postgres"))
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL"))
    args = parser.parse_args()

    env = {"SHUTDOWN_TIMEOUT": "4", "BLOCK_INTERVAL": "60", "HISTORY_CAP": str(args.history_cap)}
    async with fresh_database(args.database_url, "cluster") as dsn, \
            hub_cluster(dsn, args.redis_url, args.processes, env=env) as (cluster, prefix):
        print(f"{args.processes} processes behind HAProxy at {cluster.url}; {args.clients} clients "
              f"({args.transports}); {args.rate:g} events/s; HISTORY_CAP {args.history_cap}; "
              f"logs in {cluster.log_dir}", flush=True)
        assert cluster.redis_url is not None
        stream = Stream(cluster.redis_url, prefix, f"market:category:bench-{uuid.uuid4().hex[:8]}",
                        history_cap=args.history_cap)
        try:
            summary, timings = await rolling_restart_and_kill(cluster, stream, args.clients, rate=args.rate,
                                                              transports=args.transports)
        finally:
            await stream.close()
    for step, took in timings.items():
        print(f"{step:<36} {took}")
    print(json.dumps(summary, indent=1))
    ok = summary["complete"] == summary["clients"] and not (summary["missing"] or summary["duplicates"]
                                                           or summary["replayHoles"] or summary["historyGapAcks"])
    print(f"\n{summary['complete']}/{summary['clients']} clients hold every one of {summary['total']} events exactly "
          f"once; lost {summary['missing']}, applied twice {summary['duplicates']}, holes seen live and filled by "
          f"replay {summary['detectedHoles']}, holes in replayed history {summary['replayHoles']}, gaps only "
          f"reported (reload) {summary['historyGapAcks']}: {'OK' if ok else 'FAILED'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    asyncio.run(main())
