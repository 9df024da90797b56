"""Fault bench (issue 15): two hub nodes on one Redis, broken the way an operator would; what clients lost.

    .venv/bin/python bench/faults.py                          # every scenario, full size (about 4 minutes)
    .venv/bin/python bench/faults.py --quick                  # smaller and shorter (about 1.5 minutes)
    .venv/bin/python bench/faults.py --scenarios outage,storm --redis-persist
    .venv/bin/python bench/faults.py --server-root /tmp/old    # nodes from another tree, e.g. before a fix:
                                                               # git archive <commit> | tar -x -C /tmp/old

Setup: a fresh PostgreSQL database on --database-url's server (DATABASE_URL, else
postgresql://postgres@127.0.0.1:5432/postgres; dropped at the end unless --keep), its own
/usr/bin/redis-server on a free port (`--save '' --appendonly no`, so a restart comes back EMPTY;
--redis-persist turns on the append-only file instead, so history survives a restart), and two
nodes A and B (`.venv/bin/sourcenet-hub serve`, distinct ports, same database, Redis, secrets and
DATA_DIR; demo data, a block every --block-interval seconds, LOG_FORMAT=json, logs under the
work directory). Scenarios, in this order (--scenarios picks some):

1. outage (about 95 s; --quick 40 s): --watchers Python Socket.IO clients per node watch
   `chain:transactions` and `chain:blocks` on /chain, tracking positions as docs/protocol.md says
   (an offset jump or epoch change, a `history_gap` notice or a reconnect makes them resubscribe
   with since/epoch; the ack brings the missed events or `history_gap: true`). A writer signs
   --write-rate transfers per second (REST, alternately on A and B) before, during and after a
   Redis outage: Redis is SIGKILLed and restarted on the same port --outage seconds later. Ground
   truth: every accepted write (`transaction_pending`, published by the node that took it) and,
   from PostgreSQL, every block sealed and transfer confirmed in the window (`block_added` and
   `transaction_confirmed`, through the outbox). After the window each node takes one more write,
   so a hole at the very end shows as an offset jump too. Figures:
   - lost locally: events written on node X during the outage that X's own clients never got;
   - undetected lost: events a client neither got nor was told it may have missed. A hole (offset
     jump, epoch change, `history_gap` notice, reconnect) makes the client resubscribe; an ack with
     `history_gap: true` means "reload the state", so it covers every event published before it;
     an ack without a gap says nothing is missing, so it covers nothing;
   - cross-node delivery back: from the Redis restart until every write on one node reaches the
     other node's clients live again (the slower direction);
   - whether /readyz went red during the outage, and when both nodes were ready again.
2. purchase (a few seconds plus PURCHASE_JOB_LEASE): carol starts buying the cheapest demo DataPod
   with the digest of a payment she has not sent yet; the bench then holds the purchase row
   (SELECT ... FOR UPDATE), sends and confirms the payment, and waits for the job to be caught
   mid-step: the node holding the lease logs `payment_verdict` and its step waits on the row lock.
   That node is SIGKILLed, the row released; the figure is the time from the kill until the other
   node has completed the purchase (and a check that it was paid and completed exactly once).
3. storm (about 70 s at 5,000 clients, most of it connecting them; --quick 500 clients, 10 s):
   --storm-clients official socket.io-client connections (Node, bench/node/faults-client.js,
   --loadgens processes) on node A, each subscribed to `chain:transactions` on /chain and its
   user's `user:{id}` on /purchases (one Engine.IO connection, users alice, bob and carol). Node A
   is killed (--storm-signal, default SIGKILL); every client moves to B at once and resubscribes
   from its position. Figures: `unavailable` answers, other error answers, refused connects,
   connections B dropped, time until all resubscribed.
4. shutdown (about 20 s, plus up to SHUTDOWN_TIMEOUT): --shutdown-clients websocket clients and
   --polling-clients long-polling ones on node A (restarted if needed) watching `chain:blocks`;
   node A gets SIGTERM with SHUTDOWN_TIMEOUT=--shutdown-timeout. Figures: seconds until the
   process exited, until the last client saw its connection close (websocket and polling apart),
   `server_shutdown` notices, and how many connections the server closed itself before exiting.

The table at the end has one row per figure. The Node packages come from bench/node/package-lock.json
(`npm ci --prefix bench/node` when node_modules is missing). Two cores run everything here (nodes,
Redis, PostgreSQL, clients): read times as upper bounds.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import dataclasses
import json
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp  # noqa: E402
import asyncpg  # noqa: E402
import socketio  # noqa: E402
from socketio.exceptions import BadNamespaceError  # noqa: E402
from socketio.exceptions import TimeoutError as AckTimeout  # noqa: E402

from bench.fanout import NODE_DIR, Proc, ensure_node_modules, free_port, load_average  # noqa: E402
from bench.rewards import admin, with_database  # noqa: E402
from db import outbox  # noqa: E402
from server.core import wallets  # noqa: E402
from server.realtime.hub import HISTORY_GAP_EVENT  # noqa: E402
from server.services.chain import (  # noqa: E402
    BLOCK_ADDED,
    BLOCKS_CHANNEL,
    TRANSACTION_CONFIRMED,
    TRANSACTION_PENDING,
    TRANSACTIONS_CHANNEL,
)
from server.services.demo import DEMO_PASSWORD, demo_wallet  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ("outage", "purchase", "storm", "shutdown")
DEFAULT_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
REDIS_SERVER = "/usr/bin/redis-server"
NODE_NAMES = ("A", "B")
WATCHED_CHANNELS = (TRANSACTIONS_CHANNEL, BLOCKS_CHANNEL)
TINY_AMOUNT = "0.00000001"
READY_TIMEOUT = 120.0
ACK_TIMEOUT = 20.0


# --- processes: Redis and the hub nodes -----------------------------------------------------------


async def redis_answers(port: int) -> bool:
    """Whether a Redis on 127.0.0.1:`port` answers PING."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 1)
    except (OSError, TimeoutError):
        return False
    try:
        writer.write(b"PING\r\n")
        await writer.drain()
        return (await asyncio.wait_for(reader.readline(), 1)).startswith(b"+PONG")
    except (OSError, TimeoutError):
        return False
    finally:
        writer.close()


class RedisServer:
    """The bench's own redis-server: killed with SIGKILL and restarted on the same port."""

    def __init__(self, workdir: Path, persist: bool) -> None:
        self.port = free_port()
        self.dir = workdir / "redis"
        self.dir.mkdir(exist_ok=True)
        self.persist = persist
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        """The REDIS_URL of the nodes."""
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        """Start (or restart) it and wait until it answers."""
        durability = (["--appendonly", "yes", "--appendfsync", "everysec"] if self.persist
                      else ["--appendonly", "no"])
        argv = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                *durability, "--dir", str(self.dir), "--protected-mode", "no"]
        with (self.dir / "redis.log").open("a") as log:
            self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while not await redis_answers(self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start (see {self.dir / 'redis.log'})")
            await asyncio.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: no shutdown save, clients see connection errors at once."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


class HubNode:
    """One `sourcenet-hub serve` process; its log (JSON lines) goes to a file per node."""

    def __init__(self, name: str, env: dict[str, str], workdir: Path, server_root: Path) -> None:
        self.name = name
        self.port = free_port()
        self.env = {**env, "PORT": str(self.port)}
        self.server_root = server_root
        self.log_path = workdir / f"node-{name}.log"
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        """The node's base URL."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        """Whether the process is alive."""
        return self.process is not None and self.process.poll() is None

    async def start(self, http: aiohttp.ClientSession) -> None:
        """Start the process and wait for /readyz."""
        argv = [str(Path(sys.executable).with_name("sourcenet-hub")), "serve"]
        with self.log_path.open("a") as log:
            self.process = subprocess.Popen(argv, cwd=self.server_root, env=self.env, stdout=log,
                                            stderr=subprocess.STDOUT)
        deadline = time.monotonic() + READY_TIMEOUT
        while not await self.ready(http):
            if not self.running:
                raise RuntimeError(f"node {self.name} exited with {self.process.returncode} (see {self.log_path})")
            if time.monotonic() > deadline:
                raise RuntimeError(f"node {self.name} was not ready after {READY_TIMEOUT:.0f} s (see {self.log_path})")
            await asyncio.sleep(0.2)

    async def ready(self, http: aiohttp.ClientSession) -> bool:
        """Whether /readyz answers 200."""
        try:
            async with http.get(self.url + "/readyz", timeout=aiohttp.ClientTimeout(total=3)) as response:
                return response.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    def signal(self, signum: int) -> None:
        """Send a signal to the process."""
        if self.running:
            assert self.process is not None
            self.process.send_signal(signum)

    async def wait_exit(self, timeout: float) -> float | None:
        """Wait for the process to end; the time.time() it was seen gone, None on timeout."""
        assert self.process is not None
        try:
            await asyncio.wait_for(asyncio.to_thread(self.process.wait), timeout)
        except TimeoutError:
            return None
        return time.time()

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it lingers."""
        if self.running:
            assert self.process is not None
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log_events(self, event: str) -> list[dict[str, Any]]:
        """The node's JSON log records named `event` (lines that are not JSON are skipped)."""
        found = []
        with self.log_path.open() as log:
            for line in log:
                if f'"{event}"' not in line:
                    continue
                with contextlib.suppress(ValueError):
                    record = json.loads(line)
                    if record.get("event") == event:
                        found.append(record)
        return found


class Cluster:
    """Redis, the database and nodes A and B, plus the demo accounts the scenarios act as."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.db_name = f"hub_bench_faults_{uuid.uuid4().hex[:8]}"
        self.dsn = with_database(args.database_url, self.db_name)
        self.redis = RedisServer(workdir, args.redis_persist)
        secret = lambda: base64.urlsafe_b64encode(secrets.token_bytes(32)).decode()  # noqa: E731
        env = {**os.environ, "DATABASE_URL": self.dsn, "REDIS_URL": self.redis.url, "HOST": "127.0.0.1",
               "DATA_DIR": str(workdir / "data"), "JWT_SECRET": secret(), "MASTER_KEY": secret(),
               "LOG_FORMAT": "json", "BLOCK_INTERVAL": str(args.block_interval),
               "ACCESS_TOKEN_TTL": "86400",  # the bench's clients do not refresh their tokens
               "SHUTDOWN_TIMEOUT": str(args.shutdown_timeout), "DEMO_GAME_INTERVAL": "0",
               # The storm puts thousands of connections of three users on one node.
               "MAX_CONNECTIONS_PER_USER": "1000000"}
        if args.purchase_lease is not None:
            env["PURCHASE_JOB_LEASE"] = str(args.purchase_lease)
        if args.server_root != ROOT:
            env["PYTHONPATH"] = str(args.server_root)  # ahead of the venv's editable install of this tree
        self.nodes = {name: HubNode(name, env, workdir, args.server_root) for name in NODE_NAMES}
        self.http = aiohttp.ClientSession()
        self.tokens: dict[str, str] = {}
        self.user_ids: dict[str, str] = {}
        self.wallet = wallets.Wallet.generate()  # carol's: she pays and writes with it
        self.nonce = 0

    async def start(self) -> None:
        """Database, Redis, node A (migrates, loads the demo data), then node B; sign in; fund carol."""
        await admin(self.args.database_url, f'CREATE DATABASE "{self.db_name}"')
        await self.redis.start()
        await self.ensure_nodes()
        for user in ("alice", "bob", "carol"):
            data = await self.rest("A", "POST", "/api/v1/auth/login", {"login": user, "password": DEMO_PASSWORD})
            self.tokens[user], self.user_ids[user] = data["token"], data["user"]["id"]
        await self.rest("A", "PUT", "/api/v1/me/wallet", {"public_key": self.wallet.public_key}, user="carol")
        await self.rest("A", "POST", "/api/v1/me/faucet", user="carol")

    async def ensure_nodes(self) -> None:
        """Start whichever node is not running, one at a time (the first start migrates)."""
        for node in self.nodes.values():
            if not node.running:
                await node.start(self.http)

    async def rest(self, node: str, method: str, path: str, body: Any = None, *, user: str | None = None,
                   expect: tuple[int, ...] = (200, 201, 202)) -> Any:
        """One REST call on a node; the envelope's data, RuntimeError on another status."""
        status, envelope = await self.request(node, method, path, body, user=user)
        if status not in expect:
            raise RuntimeError(f"{method} {path} on {node}: {status} {envelope}")
        return envelope["data"]

    async def request(self, node: str, method: str, path: str, body: Any = None, *,
                      user: str | None = None) -> tuple[int, Any]:
        """One REST call: (status, envelope)."""
        headers = {"Authorization": f"Bearer {self.tokens[user]}"} if user else {}
        async with self.http.request(method, self.nodes[node].url + path, json=body, headers=headers,
                                     timeout=aiohttp.ClientTimeout(total=30)) as response:
            return response.status, await response.json()

    def signed_transfer(self, receiver: str, amount: str) -> dict[str, Any]:
        """A transfer from carol's wallet with her next nonce."""
        payload = self.wallet.sign_transfer(receiver, amount, self.nonce)
        self.nonce += 1
        return payload

    async def close(self) -> None:
        """Stop everything; drop the database unless --keep."""
        for node in self.nodes.values():
            node.stop()
        self.redis.kill()
        await self.http.close()
        if self.args.keep:
            print(f"kept database {self.db_name}")
        else:
            await admin(self.args.database_url, f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)')


# --- the watching clients of the outage scenario ---------------------------------------------------


@dataclasses.dataclass
class Position:
    """Where a client stands in a channel, and since when it knows it has everything up to there."""

    id: str | None
    offset: int | None
    epoch: str | None
    complete_at: float


@dataclasses.dataclass
class Hole:
    """A hole the client noticed, and what the resubscribe that followed said about it."""

    channel: str
    reason: str
    complete_at: float          # the client's last complete position before the hole
    noticed_at: float
    seen: str = ""              # what gave it away (epochs, offsets), for the --keep details
    gap: bool | None = None     # the ack's history_gap; None while no ack came
    answered_at: float | None = None
    answer: str = ""            # the ack's position, for the --keep details

    def covers(self, published_at: float, end: float) -> bool:
        """Whether this hole tells the client it may have missed an event published at `published_at`.

        A gap the ack admits (or a resubscribe still unanswered at the end) means "reload the state":
        anything published before it may be missing. An ack without a gap says nothing was lost.
        """
        if self.gap is False:
            return False
        return published_at <= (self.answered_at if self.gap else end)


def event_key(event: dict[str, Any]) -> tuple[str, Any]:
    """What identifies an event across deliveries: its type and the block's height or the transfer's hash."""
    data = event.get("data") or {}
    return event["type"], data.get("height" if event["type"] == BLOCK_ADDED else "hash")


def id_key(event_id: str) -> tuple[int, int]:
    """A stream id as comparable numbers (the form the server speaks before offsets)."""
    ms, seq = event_id.split("-")
    return int(ms), int(seq)


class Watcher:
    """A /chain client that follows the protocol's recovery rules and records every event it gets."""

    def __init__(self, node: str, url: str) -> None:
        self.node = node
        self.url = url
        self.sio = socketio.AsyncClient(reconnection=True, reconnection_delay=0.5, reconnection_delay_max=2)
        self.positions: dict[str, Position] = {}
        self.received: dict[str, dict[tuple[str, Any], float]] = {ch: {} for ch in WATCHED_CHANNELS}
        self.live: dict[str, dict[tuple[str, Any], float]] = {ch: {} for ch in WATCHED_CHANNELS}
        self.holes: list[Hole] = []
        self.answers: collections.Counter[str] = collections.Counter()
        self.notices = 0
        self._syncing: dict[str, asyncio.Task] = {}
        self._held: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
        self._connected_once = False
        self.sio.on("*", self._on_event, namespace="/chain")
        self.sio.on("connect", self._on_connect, namespace="/chain")

    async def start(self) -> None:
        """Connect and subscribe to the watched channels (from now on)."""
        await self.sio.connect(self.url, namespaces=["/chain"], transports=["websocket"], wait_timeout=10)
        for channel in WATCHED_CHANNELS:
            self._start_sync(channel, None)
        await asyncio.gather(*self._syncing.values())

    async def _on_connect(self) -> None:
        if self._connected_once:
            for channel in WATCHED_CHANNELS:  # a reconnect may hide anything: resubscribe from positions
                self._hole(channel, "reconnected")
        self._connected_once = True

    async def _on_event(self, event: str, data: Any = None) -> None:
        if not isinstance(data, dict) or data.get("channel") not in self.received:
            return
        channel = data["channel"]
        if event == HISTORY_GAP_EVENT:
            self.notices += 1
            self._hole(channel, "history_gap notice")
            return
        now = time.time()
        key = event_key(data)
        self.received[channel].setdefault(key, now)
        self.live[channel].setdefault(key, now)
        if data.get("id") is None:
            return  # unstored (delivered during an outage): no position to advance
        if channel in self._syncing:
            self._held[channel].append(data)  # applied after the ack, in order
            return
        self._advance(channel, data, now)

    def _advance(self, channel: str, event: dict[str, Any], now: float) -> None:
        position = self.positions.get(channel)
        offset, epoch = event.get("offset"), event.get("epoch")
        if position is not None and position.id is not None:
            if position.epoch is not None and epoch is not None and epoch != position.epoch:
                self._hole(channel, "epoch change", f"{position.epoch} -> {epoch} at {event['id']}")
                return
            if offset is not None and position.offset is not None:
                if offset <= position.offset:
                    return  # a duplicate (live and replayed)
                if offset > position.offset + 1:
                    self._hole(channel, "offset jump", f"{position.offset} -> {offset}")
                    return
            elif id_key(event["id"]) <= id_key(position.id):
                return
        self.positions[channel] = Position(event["id"], offset, epoch, now)

    def _hole(self, channel: str, reason: str, seen: str = "") -> None:
        position = self.positions.get(channel)
        hole = Hole(channel, reason, position.complete_at if position else 0.0, time.time(), seen)
        self.holes.append(hole)
        self._start_sync(channel, hole)

    def _start_sync(self, channel: str, hole: Hole | None) -> None:
        if channel in self._syncing:  # one resubscribe at a time per channel; this one follows
            self._syncing[channel].add_done_callback(lambda _: self._start_sync(channel, hole))
            return
        self._syncing[channel] = asyncio.ensure_future(self._sync(channel, hole))

    async def _sync(self, channel: str, hole: Hole | None) -> None:
        """Subscribe from the current position until an ack answers; then apply the held live events."""
        try:
            attempt = 0
            while True:
                position = self.positions.get(channel)
                payload: dict[str, Any] = {"channel": channel}
                if position is not None and position.id is not None:
                    payload["since"] = position.id
                    if position.epoch is not None:
                        payload["epoch"] = position.epoch
                try:
                    ack = await self.sio.call("subscribe", payload, namespace="/chain", timeout=ACK_TIMEOUT)
                except (AckTimeout, BadNamespaceError):
                    ack = {"ok": False, "error": {"code": "no_answer"}}
                if not ack.get("ok"):
                    self.answers[ack["error"]["code"]] += 1
                    attempt += 1
                    await asyncio.sleep(min(2.0, 0.2 * 2 ** attempt))
                    continue
                self.answers["ok"] += 1
                data, now = ack["data"], time.time()
                for event in data["events"]:
                    self.received[channel].setdefault(event_key(event), now)
                if hole is not None:
                    hole.gap = hole.gap or bool(data.get("history_gap"))
                    hole.answer = (f"{len(data['events'])} events, latest {data.get('latest_id')} "
                                   f"offset {data.get('latest_offset')} epoch {data.get('epoch')}")
                last = data["events"][-1] if data["events"] else None
                if last is not None:
                    epoch = data.get("epoch") or last.get("epoch")  # the ack speaks for the channel now
                    self.positions[channel] = Position(last["id"], last.get("offset"), epoch, now)
                elif data.get("latest_id") is not None or position is None:
                    # An empty channel (reset, expired) leaves the client where it was: its next
                    # subscribe from there is answered with the gap and whatever came since.
                    self.positions[channel] = Position(data.get("latest_id"), data.get("latest_offset"),
                                                       data.get("epoch"), now)
                if not data.get("has_more"):
                    break
            if hole is not None:
                hole.answered_at = time.time()
        finally:
            self._syncing.pop(channel, None)
        held, self._held[channel] = self._held[channel], []
        for event in held:
            if channel in self._syncing:
                self._held[channel].append(event)
            else:
                self._advance(channel, event, time.time())

    @property
    def settled(self) -> bool:
        """No resubscribe is under way."""
        return not self._syncing

    async def close(self) -> None:
        """Disconnect."""
        with contextlib.suppress(Exception):
            await self.sio.disconnect()


# --- scenario 1: Redis outage ---------------------------------------------------------------------


@dataclasses.dataclass
class Write:
    """One REST transfer: which node took it, when, and its answer."""

    node: str
    hash: str
    sent_at: float
    done_at: float = 0.0
    status: int = 0


@dataclasses.dataclass(frozen=True)
class Truth:
    """An event that must reach every watcher: where, what, on which node, published when."""

    channel: str
    key: tuple[str, Any]
    node: str | None          # the node that published it (None: the outbox relay, any node)
    published_at: float       # by then it was published (the REST answer) or committed (the block)


async def write_loop(cluster: Cluster, receiver: str, rate: float, until: float, writes: list[Write]) -> None:
    """Signed transfers at `rate` per second, alternately on A and B, until `until`."""
    tasks: set[asyncio.Task] = set()
    interval, started, n = 1.0 / rate, time.monotonic(), 0
    while time.time() < until:
        node = NODE_NAMES[n % 2]
        payload = cluster.signed_transfer(receiver, TINY_AMOUNT)
        write = Write(node, wallets.transaction_hash(payload["sender"], receiver, payload["amount"],
                                                     payload["nonce"]), time.time())
        writes.append(write)
        task = asyncio.create_task(post_write(cluster, write, payload))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        n += 1
        await asyncio.sleep(max(0.0, started + n * interval - time.monotonic()))
    await asyncio.gather(*tasks)


async def post_write(cluster: Cluster, write: Write, payload: dict[str, Any]) -> None:
    """POST the transfer; record the answer's status and time."""
    try:
        write.status, _ = await cluster.request(write.node, "POST", "/api/v1/transactions", payload, user="carol")
    except (aiohttp.ClientError, TimeoutError):
        write.status = -1
    write.done_at = time.time()


async def watch_readiness(cluster: Cluster, samples: list[tuple[float, str, bool]], stop: asyncio.Event) -> None:
    """Sample each node's /readyz twice a second."""
    while not stop.is_set():
        for name, node in cluster.nodes.items():
            samples.append((time.time(), name, await node.ready(cluster.http)))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.5)


async def outbox_backlog(dsn: str) -> int:
    """Events still waiting in the outbox."""
    conn = await asyncpg.connect(dsn)
    try:
        return await outbox.pending_count(conn)
    finally:
        await conn.close()


async def committed_truth(dsn: str, writes: list[Write], start: float, end: float) -> list[Truth]:
    """Blocks sealed and our transfers confirmed (or rejected) in [start, end], from PostgreSQL."""
    conn = await asyncpg.connect(dsn)
    try:
        blocks = await conn.fetch(
            """SELECT block_id AS height, extract(epoch FROM "timestamp")::float8 AS at FROM blocks
                WHERE "timestamp" BETWEEN to_timestamp($1) AND to_timestamp($2)""", start, end)
        sealed = await conn.fetch(
            """SELECT t.transaction_hash AS hash, t.status, extract(epoch FROM b."timestamp")::float8 AS at
                 FROM transactions t JOIN blocks b ON b.block_id = t.block_id
                WHERE t.transaction_hash = ANY($1::text[])
                  AND b."timestamp" BETWEEN to_timestamp($2) AND to_timestamp($3)""",
            [w.hash for w in writes], start, end)
        rejected = await conn.fetch(
            """SELECT transaction_hash AS hash FROM transactions
                WHERE transaction_hash = ANY($1::text[]) AND status = 'rejected'""", [w.hash for w in writes])
    finally:
        await conn.close()
    truth = [Truth(BLOCKS_CHANNEL, (BLOCK_ADDED, row["height"]), None, row["at"]) for row in blocks]
    truth += [Truth(TRANSACTIONS_CHANNEL, (TRANSACTION_CONFIRMED, row["hash"]), None, row["at"])
              for row in sealed if row["status"] == "confirmed"]
    if rejected:
        print(f"  note: {len(rejected)} transfers were rejected at sealing (not counted)", flush=True)
    return truth


def cross_node_recovery(writes: list[Write], watchers: list[Watcher], restart: float) -> float | None:
    """Seconds from the Redis restart until every later write on one node reached the other's clients live."""
    worst = 0.0
    for source in NODE_NAMES:
        others = [w for w in watchers if w.node != source]
        after = sorted((w for w in writes if w.node == source and w.status == 201 and w.sent_at >= restart),
                       key=lambda w: w.sent_at)
        arrivals = [max((c.live[TRANSACTIONS_CHANNEL].get((TRANSACTION_PENDING, w.hash), float("inf"))
                         for c in others), default=float("inf")) for w in after]
        missed = [i for i, at in enumerate(arrivals) if at == float("inf")]
        first_good = missed[-1] + 1 if missed else 0
        if first_good >= len(after):
            return None  # never came back within the run
        worst = max(worst, arrivals[first_good] - restart)
    return worst


async def scenario_outage(cluster: Cluster, args: argparse.Namespace) -> list[tuple[str, str]]:
    """Redis killed for --outage seconds while writes and watchers run on both nodes."""
    await cluster.ensure_nodes()
    receiver = demo_wallet("alice").address
    watchers = [Watcher(name, node.url) for name, node in cluster.nodes.items() for _ in range(args.watchers)]
    await asyncio.gather(*(w.start() for w in watchers))
    samples: list[tuple[float, str, bool]] = []
    stop_sampling = asyncio.Event()
    sampler = asyncio.create_task(watch_readiness(cluster, samples, stop_sampling))
    writes: list[Write] = []
    start = time.time()
    kill_at, end = start + args.before, start + args.before + args.outage + args.after
    writer = asyncio.create_task(write_loop(cluster, receiver, args.write_rate, end, writes))
    try:
        await asyncio.sleep(kill_at - time.time())
        cluster.redis.kill()
        killed = time.time()
        print(f"  Redis killed; {len([w for w in writes if w.status == 201])} writes accepted so far", flush=True)
        await asyncio.sleep(args.outage)
        await cluster.redis.start()
        restarted = time.time()
        print(f"  Redis restarted ({'append-only file' if args.redis_persist else 'empty'})", flush=True)
        await writer
        # One more write per node: a hole at the very end shows as an offset jump as well.
        await write_loop(cluster, receiver, 10.0, time.time() + 0.2, [])
        await settle(cluster, watchers, args.drain)
    finally:
        writer.cancel()
        stop_sampling.set()
        await asyncio.gather(sampler, return_exceptions=True)
        await asyncio.gather(*(w.close() for w in watchers))
    finished = time.time()
    truth = [Truth(TRANSACTIONS_CHANNEL, (TRANSACTION_PENDING, w.hash), w.node, w.done_at)
             for w in writes if w.status == 201]
    truth += await committed_truth(cluster.dsn, writes, start, end)
    details = cluster.workdir / "outage-details.json" if args.keep else None
    return outage_figures(writes, watchers, truth, samples, killed, restarted, finished, details)


async def settle(cluster: Cluster, watchers: list[Watcher], drain: float) -> None:
    """Wait until the outbox is empty and no watcher is resubscribing (at most `drain` seconds), plus 1 s."""
    deadline = time.monotonic() + drain
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, asyncpg.PostgresError):
            if all(w.settled for w in watchers) and await outbox_backlog(cluster.dsn) == 0:
                break
        await asyncio.sleep(0.5)
    await asyncio.sleep(1.0)


def outage_figures(writes: list[Write], watchers: list[Watcher], truth: list[Truth],
                   samples: list[tuple[float, str, bool]], killed: float, restarted: float,
                   finished: float, details: Path | None) -> list[tuple[str, str]]:
    """The outage scenario's rows of the table (and, with --keep, every hole and undetected loss as JSON)."""
    accepted = [w for w in writes if w.status == 201]
    during = [w for w in accepted if w.sent_at >= killed and w.done_at <= restarted]
    refused = collections.Counter(w.status for w in writes if w.status != 201)
    # Lost locally: written on X during the outage, never seen by one of X's own clients.
    local_lost = {w.hash for w in during for c in watchers if c.node == w.node
                  and (TRANSACTION_PENDING, w.hash) not in c.received[TRANSACTIONS_CHANNEL]}
    detected_pairs = undetected_pairs = 0
    undetected: dict[tuple[str, Any], Truth] = {}
    lost_events: set[tuple[str, Any]] = set()
    undetected_at: list[list[Truth]] = [[] for _ in watchers]
    for event in truth:
        for n, client in enumerate(watchers):
            if event.key in client.received[event.channel]:
                continue
            lost_events.add(event.key)
            if any(h.channel == event.channel and h.covers(event.published_at, finished)
                   for h in client.holes):
                detected_pairs += 1
            else:
                undetected_pairs += 1
                undetected[event.key] = event
                undetected_at[n].append(event)
    if details is not None:
        since_kill = lambda at: None if at is None else round(at - killed, 3)  # noqa: E731
        details.write_text(json.dumps({"restart": since_kill(restarted), "clients": [{
            "node": client.node,
            "holes": [{**dataclasses.asdict(h), **{k: since_kill(getattr(h, k))
                                                   for k in ("complete_at", "noticed_at", "answered_at")}}
                      for h in client.holes],
            "undetected": [{"channel": e.channel, "key": e.key, "from": e.node, "published": since_kill(e.published_at)}
                           for e in lost]} for client, lost in zip(watchers, undetected_at)]}, indent=1))
    for event in sorted(undetected.values(), key=lambda e: e.published_at)[:10]:
        missing_at = [c.node for c in watchers if event.key not in c.received[event.channel]]
        print(f"  undetected: {event.key[0]} {str(event.key[1])[:12]} from {event.node or 'the outbox'}, published "
              f"{event.published_at - killed:+.2f} s from the kill, missing at clients of {''.join(missing_at)}")
    recovery = cross_node_recovery(writes, watchers, restarted)
    red = sorted({name for at, name, ok in samples if killed + 1 <= at <= restarted and not ok})
    back = [at for at, _, _ in samples if at >= restarted
            and all(ok for at2, _, ok in samples if at2 >= at)]
    answers = sum((w.answers for w in watchers), collections.Counter())
    holes = collections.Counter(h.reason for w in watchers for h in w.holes)
    clients = len(watchers)
    return [
        ("writes accepted (before / during / after the outage)",
         f"{len([w for w in accepted if w.done_at < killed])} / {len(during)} / "
         f"{len([w for w in accepted if w.sent_at > restarted])}"
         + (f"  (refused: {dict(refused)})" if refused else "")),
        ("events to deliver x clients", f"{len(truth):,} x {clients} = {len(truth) * clients:,}"),
        ("events lost locally during the outage", f"{len(local_lost)} of {len(during)}"),
        ("events lost, client told (detected)", f"{detected_pairs:,} client-events"),
        ("UNDETECTED lost events", f"{len(undetected):,} events ({undetected_pairs:,} client-events)"),
        ("events missing at some client at the end", f"{len(lost_events):,}"),
        ("cross-node delivery back after the Redis restart",
         f"{recovery:.1f} s" if recovery is not None else "never (within the run)"),
        ("/readyz red during the outage", ", ".join(red) if red else "no: green all along"),
        ("both nodes ready after the Redis restart", f"{back[0] - restarted:.1f} s" if back else "never"),
        ("holes clients noticed (by reason)", ", ".join(f"{k}: {v}" for k, v in sorted(holes.items())) or "none"),
        ("subscribe answers (watchers)", ", ".join(f"{k}: {v}" for k, v in sorted(answers.items()))),
    ]


# --- scenario 2: purchase resume ------------------------------------------------------------------


async def scenario_purchase(cluster: Cluster, args: argparse.Namespace) -> list[tuple[str, str]]:
    """Catch a purchase job mid-step on the node holding its lease, kill that node, time the resume."""
    await cluster.ensure_nodes()
    pods = await cluster.rest("A", "GET", "/api/v1/datapods?sort=price&order=asc&limit=100")
    bought = {p["datapod_id"] for p in (await cluster.rest("A", "GET", "/api/v1/purchases", user="carol"))["items"]}
    pod = next(p for p in pods["items"] if p["id"] not in bought)
    seller = await cluster.rest("A", "GET", f"/api/v1/users/{pod['seller']['id']}/wallet", user="carol")
    amount = wallets.canonical_amount(Decimal(pod["price_sui"]))
    payment = cluster.signed_transfer(seller["address"], amount)
    digest = wallets.transaction_hash(payment["sender"], payment["receiver"], payment["amount"], payment["nonce"])
    # The payment is not sent yet: the job verifies, finds nothing and retries with backoff.
    purchase = await cluster.rest("A", "POST", "/api/v1/purchases",
                                  {"datapod_id": pod["id"], "payment_tx_digest": digest}, user="carol")
    purchase_id = purchase["id"]
    await poll(lambda: purchase_status(cluster, "A", purchase_id), lambda s: s == "processing", 30)
    lock = await asyncpg.connect(cluster.dsn)
    try:
        holder = lock.transaction()
        await holder.start()
        await lock.execute("SELECT 1 FROM purchases WHERE id = $1 FOR UPDATE", uuid.UUID(purchase_id))
        await cluster.rest("A", "POST", "/api/v1/transactions", payment, user="carol")
        # The next retry verifies the payment and then waits on our row lock, its lease held.
        victim = await poll(lambda: verified_on(cluster, purchase_id), lambda name: name is not None,
                            60 + 4 * args.block_interval)
        await poll(lambda: waiting_behind(lock), lambda n: n > 0, 30)
        cluster.nodes[victim].signal(signal.SIGKILL)
        killed = time.time()
        await holder.rollback()
    finally:
        await lock.close()
    await cluster.nodes[victim].wait_exit(10)
    survivor = next(name for name in NODE_NAMES if name != victim)
    print(f"  node {victim} held the job mid-step and was killed; waiting for {survivor}", flush=True)
    status = await poll(lambda: purchase_status(cluster, survivor, purchase_id),
                        lambda s: s in ("completed", "failed", "refunded"), args.purchase_timeout)
    resumed = time.time() - killed
    receipts, escrows = await exactly_once(cluster.dsn, purchase_id)
    return [
        ("node killed mid-step", f"{victim} (the job's lease holder)"),
        ("purchase resumed and finished by the other node", f"{resumed:.1f} s ({status})"),
        ("payment receipts / escrow rows for the purchase", f"{receipts} / {escrows}"),
    ]


async def purchase_status(cluster: Cluster, node: str, purchase_id: str) -> str | None:
    """The purchase's status as the node answers it (None when the node does not answer)."""
    try:
        return (await cluster.rest(node, "GET", f"/api/v1/purchases/{purchase_id}", user="carol"))["status"]
    except (aiohttp.ClientError, TimeoutError, RuntimeError):
        return None


async def verified_on(cluster: Cluster, purchase_id: str) -> str | None:
    """The node whose worker logged a verified payment for the purchase, if one did."""
    for name, node in cluster.nodes.items():
        if any(r.get("purchase_id") == purchase_id and r.get("outcome") == "verified"
               for r in node.log_events("payment_verdict")):
            return name
    return None


async def waiting_behind(conn: asyncpg.Connection) -> int:
    """How many backends wait for a lock this connection holds (the job's step, behind our row lock)."""
    return await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))",
                               conn.get_server_pid())


async def exactly_once(dsn: str, purchase_id: str) -> tuple[int, int]:
    """Payment receipts and escrow rows recorded for the purchase."""
    conn = await asyncpg.connect(dsn)
    try:
        pid = uuid.UUID(purchase_id)
        return (await conn.fetchval("SELECT count(*) FROM payment_receipts WHERE purchase_id = $1", pid),
                await conn.fetchval("SELECT count(*) FROM escrow_transactions WHERE purchase_id = $1", pid))
    finally:
        await conn.close()


async def poll(probe: Any, done: Any, timeout: float, interval: float = 0.1) -> Any:
    """Call the async `probe` until `done(result)`; the result, TimeoutError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = await probe()
        if done(result):
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"still {result!r} after {timeout:.0f} s")
        await asyncio.sleep(interval)


# --- Node clients (scenarios 3 and 4) -------------------------------------------------------------


class NodeClients:
    """faults-client.js processes sharing the clients; their reports are merged into one."""

    def __init__(self, procs: list[Proc]) -> None:
        self.procs = procs

    @classmethod
    async def connect(cls, url: str, clients: int, processes: int, profiles: list[list[dict[str, Any]]], *,
                      failover: str | None = None, transports: tuple[str, ...] = ("websocket",)) -> NodeClients:
        """Start the processes and connect every client (all channels acked)."""
        processes = max(1, min(processes, clients))
        shares = [clients // processes + (i < clients % processes) for i in range(processes)]
        gen = cls([Proc(["node", str(NODE_DIR / "faults-client.js")]) for _ in shares])
        try:
            replies = await asyncio.gather(*(proc.ask(
                {"cmd": "connect", "url": url, "clients": share, "concurrency": 100, "profiles": profiles,
                 "failover": failover, "transports": list(transports)}, timeout=120 + share / 20)
                for proc, share in zip(gen.procs, shares)))
        except BaseException:
            gen.stop()
            raise
        assert sum(r["ready"] for r in replies) == clients, replies
        return gen

    async def report(self) -> dict[str, Any]:
        """Counters summed, time lists joined."""
        merged: dict[str, Any] = {}
        for report in await asyncio.gather(*(p.ask({"cmd": "report"}) for p in self.procs)):
            for key, value in report.items():
                merged[key] = merge(merged.get(key), value)
        return merged

    async def exit(self) -> None:
        """Close the clients and end the processes."""
        for proc in self.procs:
            with contextlib.suppress(Exception):
                proc.popen.stdin.write(json.dumps({"cmd": "exit"}) + "\n")  # type: ignore[union-attr]
                proc.popen.stdin.flush()  # type: ignore[union-attr]
        await asyncio.sleep(0.5)
        self.stop()

    def stop(self) -> None:
        """Kill what is left."""
        for proc in self.procs:
            proc.stop()


def merge(a: Any, b: Any) -> Any:
    """Sum numbers, join lists, merge dicts key by key."""
    if a is None or b is None:
        return b if a is None else a
    if isinstance(b, dict):
        return {k: merge(a.get(k), b.get(k)) for k in {*a, *b}}
    return a + b


def counts(table: dict[str, int], skip: str = "ok") -> str:
    """"code: n, ..." without the `skip` key, or 0."""
    rest = {k: v for k, v in sorted(table.items()) if k != skip}
    return ", ".join(f"{k}: {v:,}" for k, v in rest.items()) if rest else "0"


def user_profiles(cluster: Cluster) -> list[list[dict[str, Any]]]:
    """Per demo user: the public transactions feed on /chain and the user's own channel on /purchases."""
    return [[{"namespace": "/chain", "token": None, "channels": [TRANSACTIONS_CHANNEL]},
             {"namespace": "/purchases", "token": cluster.tokens[user], "channels": [f"user:{cluster.user_ids[user]}"]}]
            for user in ("alice", "bob", "carol")]


# --- scenario 3: reconnect storm ------------------------------------------------------------------


async def scenario_storm(cluster: Cluster, args: argparse.Namespace) -> list[tuple[str, str]]:
    """Every client of node A moves to node B at once when A dies."""
    await cluster.ensure_nodes()
    a, b = cluster.nodes["A"], cluster.nodes["B"]
    clients = await NodeClients.connect(a.url, args.storm_clients, args.loadgens, user_profiles(cluster),
                                        failover=b.url)
    try:
        before = await clients.report()
        print(f"  {before['ready']:,} clients on A, {sum(before['answers']['initial'].values()):,} subscribes "
              f"({counts(before['answers']['initial'])} errors); killing A with SIG{args.storm_signal.upper()}",
              flush=True)
        a.signal(signal.SIGKILL if args.storm_signal == "kill" else signal.SIGTERM)
        killed = time.time()
        deadline = time.monotonic() + args.storm_timeout
        report = before
        while time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            report = await clients.report()
            if len(report["resubscribedTimes"]) >= args.storm_clients:
                break
        await a.wait_exit(30)
    finally:
        await clients.exit()
    answers, refused = report["answers"]["failover"], report["connectErrors"]["failover"]
    done = sorted(t / 1000 - killed for t in report["resubscribedTimes"])
    spread = f"p50 {statistics.median(done):.1f} s, last {done[-1]:.1f} s" if done else "none"
    return [
        ("clients moved from A to B", f"{len(done):,} of {args.storm_clients:,} (SIG{args.storm_signal.upper()})"),
        ("subscribe calls on B", f"{sum(answers.values()):,}"),
        ("`unavailable` answers", f"{answers.get('unavailable', 0):,}"),
        ("other error answers", counts({k: v for k, v in answers.items() if k != "unavailable"})),
        ("refused connects on B", counts(refused, skip="")),
        ("connections B dropped during the storm", f"{report['failoverCloses']:,}"),
        ("time until all resubscribed", f"{done[-1]:.1f} s (p50 {statistics.median(done):.1f} s)"
         if len(done) == args.storm_clients else f"not all within {args.storm_timeout:.0f} s ({spread})"),
    ]


# --- scenario 4: shutdown -------------------------------------------------------------------------


async def scenario_shutdown(cluster: Cluster, args: argparse.Namespace) -> list[tuple[str, str]]:
    """SIGTERM a node with many clients; how long until it is gone and the clients know."""
    await cluster.ensure_nodes()
    node = cluster.nodes["A"]
    profile = [[{"namespace": "/chain", "token": None, "channels": [BLOCKS_CHANNEL]}]]
    groups = {"websocket": await NodeClients.connect(node.url, args.shutdown_clients, args.loadgens, profile)}
    try:
        if args.polling_clients:
            groups["polling"] = await NodeClients.connect(node.url, args.polling_clients, 1, profile,
                                                          transports=("polling",))
        await asyncio.sleep(1.0)
        node.signal(signal.SIGTERM)
        terminated = time.time()
        exited = await node.wait_exit(args.shutdown_timeout * 6)
        await asyncio.sleep(1.0)
        reports = {name: await group.report() for name, group in groups.items()}
    finally:
        for group in groups.values():
            await group.exit()
    rows = [("process exit after SIGTERM", f"{exited - terminated:.1f} s (SHUTDOWN_TIMEOUT={args.shutdown_timeout:g})"
             if exited else f"still running after {args.shutdown_timeout * 6:.0f} s")]
    for name, report in reports.items():
        closes = sorted(t / 1000 - terminated for t in report["closeTimes"])
        total = report["clients"]
        if closes:
            by_server = sum(1 for t in closes if exited is None or t + terminated < exited - 0.05)
            rows.append((f"{name} clients: connection closed, last / p50",
                         f"{closes[-1]:.1f} / {statistics.median(closes):.1f} s ({len(closes):,} of {total:,}; "
                         f"{by_server:,} before the process exited)"))
        else:
            rows.append((f"{name} clients: connection closed", f"none of {total:,}"))
        rows.append((f"{name} clients: server_shutdown notices / close reasons",
                     f"{report['shutdownNotices']:,} / {counts(report['closeReasons'], skip='')}"))
    return rows


# --- the driver -----------------------------------------------------------------------------------


RUNNERS = {"outage": scenario_outage, "purchase": scenario_purchase, "storm": scenario_storm,
           "shutdown": scenario_shutdown}


def print_table(rows: list[tuple[str, str, str]]) -> None:
    """scenario | figure | value."""
    width = max(len(figure) for _, figure, _ in rows)
    print()
    print(f"{'scenario':<10}{'figure':<{width + 2}}value")
    print("-" * (width + 40))
    for scenario, figure, value in rows:
        print(f"{scenario:<10}{figure:<{width + 2}}{value}")


async def main(args: argparse.Namespace) -> None:
    """Run the chosen scenarios in order and print one table."""
    if "storm" in args.scenarios or "shutdown" in args.scenarios:
        ensure_node_modules()
    if load_average() > 1.0:
        print(f"warning: load average {load_average():.2f} before the run: times will be pessimistic", flush=True)
    rows: list[tuple[str, str, str]] = []
    workdir = Path(tempfile.mkdtemp(prefix="hub-bench-faults-"))
    cluster = Cluster(args, workdir)
    failed = False
    try:
        print(f"starting Redis and nodes A, B (database {cluster.db_name})", flush=True)
        await cluster.start()
        for scenario in args.scenarios:
            print(f"{scenario}: running (load average {load_average():.2f})", flush=True)
            started = time.monotonic()
            try:
                figures = await RUNNERS[scenario](cluster, args)
            except Exception as exc:  # noqa: BLE001 - one broken scenario must not hide the others' figures
                failed = True
                figures = [("FAILED", f"{type(exc).__name__}: {exc}")]
                print(f"  {scenario} failed: {type(exc).__name__}: {exc}", flush=True)
            rows += [(scenario, figure, value) for figure, value in figures]
            print(f"  {scenario} took {time.monotonic() - started:.0f} s", flush=True)
    finally:
        await cluster.close()
        if args.keep or failed:
            print(f"logs (nodes, Redis{', outage details' if args.keep else ''}) kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps([{"scenario": s, "figure": f, "value": v} for s, f, v in rows], indent=2))


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Options; --quick shrinks what was not given explicitly."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenarios", default=",".join(SCENARIOS),
                        help="comma-separated subset of " + ",".join(SCENARIOS))
    parser.add_argument("--quick", action="store_true",
                        help="a shorter outage, 500 storm clients, 200 shutdown clients")
    parser.add_argument("--database-url", default=os.environ.get("DATABASE_URL") or DEFAULT_ADMIN_DSN,
                        help="PostgreSQL server where the bench creates its database")
    parser.add_argument("--redis-persist", action="store_true",
                        help="Redis keeps an append-only file across the restart")
    parser.add_argument("--keep", action="store_true",
                        help="keep the database, the logs and outage-details.json (every hole, every loss)")
    parser.add_argument("--block-interval", type=float, default=2.0, help="BLOCK_INTERVAL of the nodes (seconds)")
    parser.add_argument("--watchers", type=int, default=3, help="outage: watching clients per node")
    parser.add_argument("--write-rate", type=float, default=20.0, help="outage: REST writes per second (both nodes)")
    parser.add_argument("--before", type=float, default=None, help="outage: seconds of writes before the kill (10)")
    parser.add_argument("--outage", type=float, default=None, help="outage: seconds Redis stays down (40)")
    parser.add_argument("--after", type=float, default=None, help="outage: seconds of writes after the restart (40)")
    parser.add_argument("--drain", type=float, default=20.0, help="outage: seconds at most for the outbox to drain")
    parser.add_argument("--purchase-lease", type=float, default=None,
                        help="PURCHASE_JOB_LEASE of the nodes (default: the server's)")
    parser.add_argument("--purchase-timeout", type=float, default=120.0,
                        help="purchase: seconds to wait for the resume")
    parser.add_argument("--storm-clients", type=int, default=None, help="storm: clients (5000)")
    parser.add_argument("--storm-signal", choices=("kill", "term"), default="kill", help="storm: how node A dies")
    parser.add_argument("--storm-timeout", type=float, default=120.0,
                        help="storm: seconds to wait for all to resubscribe")
    parser.add_argument("--loadgens", type=int, default=2, help="Node client processes sharing the clients")
    parser.add_argument("--shutdown-clients", type=int, default=None, help="shutdown: websocket clients (1000)")
    parser.add_argument("--polling-clients", type=int, default=None, help="shutdown: long-polling clients (50)")
    parser.add_argument("--shutdown-timeout", type=float, default=10.0, help="SHUTDOWN_TIMEOUT of the nodes")
    parser.add_argument("--server-root", type=Path, default=ROOT,
                        help="run the nodes from this source tree (e.g. `git archive` of an older commit) to compare")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    args.scenarios = [s for s in args.scenarios.split(",") if s]
    unknown = set(args.scenarios) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    quick = args.quick
    defaults = {"before": (5, 10), "outage": (15, 40), "after": (20, 40), "storm_clients": (500, 5000),
                "shutdown_clients": (200, 1000), "polling_clients": (20, 50)}
    for name, (small, full) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, small if quick else full)
    return args


if __name__ == "__main__":
    asyncio.run(main(parse_args(sys.argv[1:])))
