"""Connect storm: thousands of official socket.io-client connections at once, each authenticating
and recovering a channel's history, against Node socket.io's bare connect in the same run.

    DATABASE_URL=... REDIS_URL=... .venv/bin/python bench/connect_storm.py [--clients 5000] [--users 250]

What a node restart causes: every client reconnects at once and subscribes with `since`. The hub
(one real server process, its own fresh database, history in Redis) gets `--clients` connections
opened together by one Node process (bench/node/storm.js), authenticated with the tokens of
`--users` accounts registered through the API (MAX_CONNECTIONS_PER_USER is raised to fit), each
subscribing to `market` with `since` set to the oldest of the `--history` events the channel holds,
so every ack replays all the later ones. Reported: the time until every connection has its replay, the
failures (target 0), and the same count of bare connects to Node socket.io 4.8 (bench/node/server.js,
which does nothing on connect but join a room) in the same run: target <= 1.5x Node's time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp  # noqa: E402

from bench.fanout import NODE_DIR, cpu_seconds, ensure_node_modules, wait_port  # noqa: E402
from bench.rewards import admin, free_port, start_server, stop_server, wait_ready, with_database  # noqa: E402
from server.realtime.history import RedisHistory  # noqa: E402
from server.realtime.redis import connect_redis  # noqa: E402

CHANNEL = "market"


async def register_users(url: str, users: int) -> list[str]:
    """Tokens of `users` new accounts (8 registrations at a time: each hashes a password)."""
    limit = asyncio.Semaphore(8)

    async def one(http: aiohttp.ClientSession) -> str:
        name = f"storm{uuid.uuid4().hex[:10]}"
        async with limit, http.post(f"{url}/api/v1/auth/register", json={
                "username": name, "email": f"{name}@example.org", "password": "correct horse battery"}) as response:
            body = await response.json()
            assert response.status == 201, body
            return body["data"]["token"]

    async with aiohttp.ClientSession() as http:
        return await asyncio.gather(*(one(http) for _ in range(users)))


async def storm(url: str, namespace: str, clients: int, *extra: str, server_pid: int | None = None) -> dict:
    """Run bench/node/storm.js once and return its report, with the CPU seconds the client used
    (`client_cpu`) and, given its pid, the server used (`server_cpu`) while it ran."""
    server_before = cpu_seconds(server_pid) if server_pid else 0.0
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    process = await asyncio.create_subprocess_exec(
        "node", str(NODE_DIR / "storm.js"), url, namespace, str(clients), *extra,
        stdout=asyncio.subprocess.PIPE)
    out, _ = await asyncio.wait_for(process.communicate(), timeout=600)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)  # the client, reaped by communicate()
    report = json.loads(out.decode().strip().splitlines()[-1])
    report["client_cpu"] = (children.ru_utime + children.ru_stime
                            - children_before.ru_utime - children_before.ru_stime)
    if server_pid:
        report["server_cpu"] = cpu_seconds(server_pid) - server_before
    return report


async def node_reference(clients: int) -> dict:
    """Bare connects of the same count to Node socket.io."""
    port = free_port()
    server = subprocess.Popen(["node", str(NODE_DIR / "server.js"), str(port)], stdout=subprocess.DEVNULL)
    try:
        await wait_port(port)
        return await storm(f"http://127.0.0.1:{port}", "/", clients, server_pid=server.pid)
    finally:
        server.terminate()
        server.wait()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=5000)
    parser.add_argument("--users", type=int, default=250)
    parser.add_argument("--history", type=int, default=50, help="events in the channel's history")
    parser.add_argument("--profile", metavar="PATH", help="run the hub under cProfile (CPU time), stats to PATH")
    args = parser.parse_args()
    admin_dsn, redis_url = os.environ.get("DATABASE_URL"), os.environ.get("REDIS_URL")
    if not admin_dsn or not redis_url:
        raise SystemExit("set DATABASE_URL and REDIS_URL: the bench needs its own database and history in Redis")
    ensure_node_modules()
    name = f"hub_bench_storm_{uuid.uuid4().hex[:8]}"
    prefix = f"storm{uuid.uuid4().hex[:8]}:"
    dsn = with_database(admin_dsn, name)
    await admin(admin_dsn, f'CREATE DATABASE "{name}"')
    # Every account signs up from this one address: the per-address sign-in limit must let them.
    os.environ.update({"REDIS_PREFIX": prefix, "MAX_CONNECTIONS_PER_USER": str(-(-args.clients // args.users) + 1),
                       "SIGNIN_ATTEMPTS_PER_ADDRESS": str(args.users + 10)})
    redis = connect_redis(redis_url)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="hub-bench-storm-") as tmp:
        process = start_server(dsn, port, Path(tmp), Path(tmp) / "server.log", args.profile)
        try:
            await wait_ready(url, process)
            tokens = await register_users(url, args.users)
            tokens_file = Path(tmp) / "tokens"
            tokens_file.write_text("\n".join(tokens))
            # The history the reconnecting clients replay, written where the server reads it.
            history = RedisHistory(redis, prefix, 10_000, 3600)
            first = None
            for n in range(args.history):
                event = await history.append(CHANNEL, "datapod_listed", {"n": n, "title": f"Storm pod {n}"})
                first = first or event.id
            # `since` is the oldest retained event: the ack replays every later one, without a gap.
            ours = await storm(url, "/marketplace", args.clients, str(tokens_file), CHANNEL, str(first),
                               server_pid=process.pid)
            expected_replay = args.clients * (args.history - 1)
        finally:
            stop_server(process)
            keys = [key async for key in redis.scan_iter(match=prefix + "*")]
            if keys:
                await redis.delete(*keys)
            await redis.aclose()
            await admin(admin_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    node = await node_reference(args.clients)
    print(f"{args.clients:,} connections at once, {args.users} accounts, {args.history} events to replay each "
          f"(load average {os.getloadavg()[0]:.2f})")
    print(f"hub  : all recovered in {ours['seconds']:.2f} s, failures {ours['failed']} {ours['errors'] or ''}, "
          f"events replayed {ours['replayed']:,} of {expected_replay:,}; "
          f"CPU meanwhile: hub {ours['server_cpu']:.2f} s, client {ours['client_cpu']:.2f} s")
    print(f"node : bare connect of all in {node['seconds']:.2f} s, failures {node['failed']} {node['errors'] or ''}; "
          f"CPU meanwhile: server {node['server_cpu']:.2f} s, client {node['client_cpu']:.2f} s")
    ratio = ours["seconds"] / node["seconds"]
    print(f"hub / node: {ratio:.2f}x (target <= 1.5x): {'met' if ratio <= 1.5 and not ours['failed'] else 'NOT met'}")


if __name__ == "__main__":
    asyncio.run(main())
