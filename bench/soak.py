"""Soak: does a node's memory stay flat under steady writes, publishes and clients coming and going?

    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres REDIS_URL=redis://127.0.0.1:6379/0 \
        .venv/bin/python bench/soak.py --minutes 30
    .venv/bin/python bench/soak.py --url http://127.0.0.1:8080 --pid 1234 --minutes 10

Without `--url` the bench starts one real server process (`python -m server serve` with the demo
data, a block every 5 s, its own fresh database on the DATABASE_URL server, Redis when REDIS_URL is
set, under a unique REDIS_PREFIX) and drops the database afterwards. With `--url` it drives a
running server with the demo data loaded; `--pid` names its process for the RSS samples, and game
rewards need `--game-token` (without it they become transfers; the bench derives the demo game's
token itself when it starts the server).

Workload, for `--minutes`:

- `--writes-per-second` REST writes of the kinds a real client makes, in a fixed mix: signed KVP
  transfers (each publishes `transaction_pending`), game rewards reported by the game's server
  (each publishes on the session, the player's and the game's channels), NFT mints, assistant chat
  messages (retrieval-only answers stream their events on the conversation's channel; a new
  conversation every 10 messages), and DataPod purchases paid with a signed transfer, each reviewed
  once it completes (buyers sign up as they need: four DataPods each). Game sessions end after 50
  rewards, so channels keep being created. `--mix` picks other kinds or proportions.
- `--clients` clients over the run, one arriving every minutes*60/clients seconds and staying
  `--stay` seconds on average: four in five are Socket.IO clients (websocket, one in four of
  them long-polling) that subscribe to the transaction feed or to the game's and a session's
  channels (presence); one in five reads a game session's channel over the REST long-poll.

RSS of the server process is sampled every `--sample-every` seconds. Printed: RSS after the
warm-up, at the end and its range in between, and the slope (least squares over the samples after
the warm-up) in MB per minute; then the writes and clients by outcome. A node without a leak ends
within a few MB of its RSS after the warm-up.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import itertools
import os
import random
import secrets
import subprocess
import sys
import tempfile
import time
import uuid
from decimal import ROUND_UP, Decimal
from pathlib import Path
from typing import Any, Awaitable, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp  # noqa: E402
import redis.asyncio as aioredis  # noqa: E402
import socketio  # noqa: E402

from bench.fanout import free_port, rss_bytes  # noqa: E402
from bench.rewards import admin, wait_ready, with_database  # noqa: E402
from server.core.secrets import load_or_create_secret  # noqa: E402
from server.core.wallets import Wallet  # noqa: E402
from server.services.demo import demo_wallet  # noqa: E402
from server.services.demo_game import demo_token  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "soak-password-1"
TRANSFER_AMOUNT = "0.00000001"
REWARD_VALUE = "0.01"
REWARDS_PER_SESSION = 50
MESSAGES_PER_CONVERSATION = 10
PODS_PER_BUYER = 4
MAX_IN_FLIGHT = 200
LONG_POLL_WAIT = 10
TRANSACTIONS_CHANNEL = "chain:transactions"
# One slot per write in turn: the mix of a busy node (transfers and game rewards dominate).
WRITE_MIX = ("transfer", "reward", "nft", "transfer", "reward", "chat", "transfer", "reward", "nft", "purchase")


def slope_per_minute(samples: list[tuple[float, int]]) -> float:
    """Least-squares slope of (seconds, bytes) samples, in bytes per minute."""
    if len(samples) < 2:
        return 0.0
    n = len(samples)
    mean_t = sum(t for t, _ in samples) / n
    mean_r = sum(r for _, r in samples) / n
    var = sum((t - mean_t) ** 2 for t, _ in samples)
    cov = sum((t - mean_t) * (r - mean_r) for t, r in samples)
    return cov / var * 60 if var else 0.0


def start_server(dsn: str, port: int, data_dir: Path, master_key: str, redis_prefix: str,
                 log_path: Path) -> subprocess.Popen:
    """One server process with the demo data on its own database."""
    env = {**os.environ, "DATABASE_URL": dsn, "HOST": "127.0.0.1", "PORT": str(port), "DATA_DIR": str(data_dir),
           "JWT_SECRET": base64.urlsafe_b64encode(secrets.token_bytes(32)).decode(), "MASTER_KEY": master_key,
           "REDIS_PREFIX": redis_prefix, "BLOCK_INTERVAL": "5", "LOG_FORMAT": "json",
           # The bench's clients neither refresh tokens nor come from more than one address.
           "ACCESS_TOKEN_TTL": "86400", "SIGNIN_ATTEMPTS_PER_ADDRESS": "1000000",
           # The bench sends more chat messages per writer than a person would.
           "AI_MESSAGES_PER_MINUTE": "600"}
    return subprocess.Popen([sys.executable, "-m", "server", "serve"], cwd=ROOT, env=env,
                            stdout=log_path.open("w"), stderr=subprocess.STDOUT)


class Api:
    """The REST calls the bench makes, counted by kind and outcome."""

    def __init__(self, http: aiohttp.ClientSession, url: str) -> None:
        self.http = http
        self.url = url
        self.outcomes: collections.Counter[tuple[str, str]] = collections.Counter()

    async def call(self, kind: str, method: str, path: str, *, token: str | None = None,
                   auth: str | None = None, body: Any = None, timeout: float = 60) -> dict[str, Any] | None:
        """One request; the envelope's data on success, None otherwise (counted either way)."""
        headers = {"Authorization": auth or f"Bearer {token}"} if (auth or token) else {}
        try:
            async with self.http.request(method, self.url + path, json=body, headers=headers,
                                         timeout=aiohttp.ClientTimeout(total=timeout)) as response:
                envelope = await response.json(content_type=None)
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            self.outcomes[(kind, type(exc).__name__)] += 1
            return None
        if not envelope.get("ok"):
            self.outcomes[(kind, envelope.get("error", {}).get("code", str(response.status)))] += 1
            return None
        self.outcomes[(kind, "ok")] += 1
        return envelope["data"]


class Account:
    """A signed-up user with a funded wallet."""

    def __init__(self, token: str, user_id: str, wallet: Wallet) -> None:
        self.token = token
        self.user_id = user_id
        self.wallet = wallet
        self.nonces = itertools.count()

    def transfer(self, receiver: str, amount: str) -> dict[str, Any]:
        """A signed transfer with this wallet's next nonce."""
        return self.wallet.sign_transfer(receiver, amount, next(self.nonces))


async def sign_up(api: Api, prefix: str) -> Account:
    """Register, register a wallet and take the demo faucet's funds."""
    username = f"{prefix}{uuid.uuid4().hex[:10]}"
    signed = await api.call("sign_up", "POST", "/api/v1/auth/register", body={
        "username": username, "email": f"{username}@soak.invalid", "password": PASSWORD})
    if signed is None:
        raise SystemExit("could not register a user")
    wallet = Wallet.generate()
    token = signed["token"]
    await api.call("sign_up", "PUT", "/api/v1/me/wallet", token=token, body={"public_key": wallet.public_key})
    await api.call("sign_up", "POST", "/api/v1/me/faucet", token=token)
    return Account(token, signed["user"]["id"], wallet)


class Workload:
    """The writes and the clients, and where they stand."""

    def __init__(self, api: Api, writers: list[Account], game_id: int | None, game_token: str | None,
                 pods: list[dict[str, Any]]) -> None:
        self.api = api
        self.writers = writers
        self.game_id = game_id
        self.game_auth = f"Game {game_token}" if game_token else None
        self.pods = pods
        self.receiver = demo_wallet("alice").address
        self.turn = itertools.count()
        self.sessions: dict[str, list[int]] = {}  # writer user id -> [session id, next seq]
        self.session_lock = collections.defaultdict(asyncio.Lock)
        self.conversations: dict[str, list] = {}  # writer user id -> [conversation id, messages sent]
        self.buyer: Account | None = None
        self.buyer_pods: list[dict[str, Any]] = []
        self.buyer_lock = asyncio.Lock()
        self.live_sessions: collections.deque[int] = collections.deque(maxlen=20)
        self.tasks: set[asyncio.Task] = set()
        self.skipped = 0
        self.clients: collections.Counter[str] = collections.Counter()

    def spawn(self, coro: Awaitable[Any]) -> None:
        """Run in the background, kept until done."""
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def writer(self) -> Account:
        """The next writer in turn."""
        return self.writers[next(self.turn) % len(self.writers)]

    async def write(self, kind: str) -> None:
        """One write of that kind."""
        if kind == "reward" and self.game_auth is None:
            kind = "transfer"
        try:
            await getattr(self, f"write_{kind}")()
        except Exception as exc:  # noqa: BLE001 - a bench bug or an odd answer is counted, not fatal
            self.api.outcomes[(kind, f"bench_{type(exc).__name__}")] += 1

    async def write_transfer(self) -> None:
        account = self.writer()
        await self.api.call("transfer", "POST", "/api/v1/transactions", token=account.token,
                            body=account.transfer(self.receiver, TRANSFER_AMOUNT))

    async def write_nft(self) -> None:
        account = self.writer()
        await self.api.call("nft_mint", "POST", "/api/v1/nfts", token=account.token,
                            body={"metadata": {"name": f"soak {uuid.uuid4().hex[:8]}",
                                               "attributes": [{"trait_type": "run", "value": "soak"}]}})

    async def write_reward(self) -> None:
        account = self.writer()
        async with self.session_lock[account.user_id]:
            state = self.sessions.get(account.user_id)
            if state is None:
                started = await self.api.call("game_session", "POST", "/api/v1/game-sessions", token=account.token,
                                              body={"game_id": self.game_id})
                if started is None:
                    return
                state = self.sessions[account.user_id] = [started["session_id"], started["reward_count"]]
                self.live_sessions.append(state[0])
            session_id, seq = state
            state[1] += 1
            if state[1] >= REWARDS_PER_SESSION:
                del self.sessions[account.user_id]
        await self.api.call("game_reward", "POST", f"/api/v1/game-sessions/{session_id}/rewards",
                            auth=self.game_auth, body={"seq": seq, "reward_type": "coin", "value": REWARD_VALUE})
        if seq + 1 >= REWARDS_PER_SESSION:
            await self.api.call("game_session", "POST", f"/api/v1/game-sessions/{session_id}/end",
                                token=account.token)

    async def write_chat(self) -> None:
        account = self.writer()
        state = self.conversations.get(account.user_id)
        if state is None or state[1] >= MESSAGES_PER_CONVERSATION:
            created = await self.api.call("chat", "POST", "/api/v1/conversations", token=account.token,
                                          body={"title": "soak"})
            if created is None:
                return
            state = self.conversations[account.user_id] = [created["conversation"]["id"], 0]
        state[1] += 1
        await self.api.call("chat", "POST", f"/api/v1/conversations/{state[0]}/messages", token=account.token,
                            body={"content": random.choice(("weather data", "traffic counts", "crop yields")),
                                  "client_msg_id": uuid.uuid4().hex, "stream": False})

    async def write_purchase(self) -> None:
        async with self.buyer_lock:
            if not self.buyer_pods:
                self.buyer = await sign_up(self.api, "buyer")
                self.buyer_pods = list(self.pods[:PODS_PER_BUYER])
            buyer, pod = self.buyer, self.buyer_pods.pop()
        assert buyer is not None
        price = Decimal(pod["price_sui"]).quantize(Decimal("0.00000001"), rounding=ROUND_UP)
        paid = await self.api.call("purchase_payment", "POST", "/api/v1/transactions", token=buyer.token,
                                   body=buyer.transfer(demo_wallet(pod["seller"]["username"]).address, str(price)))
        if paid is None:
            return
        purchase = await self.api.call("purchase", "POST", "/api/v1/purchases", token=buyer.token,
                                       body={"datapod_id": pod["id"], "payment_tx_digest": paid["hash"]})
        if purchase is not None:
            self.spawn(self.review_when_done(buyer, purchase["id"]))

    async def review_when_done(self, buyer: Account, purchase_id: str) -> None:
        """Review the purchase once the job completed it (a block must confirm the payment first)."""
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            await asyncio.sleep(2)
            purchase = await self.api.call("purchase_poll", "GET", f"/api/v1/purchases/{purchase_id}",
                                           token=buyer.token)
            if purchase is not None and purchase["status"] == "completed":
                await self.api.call("review", "POST", f"/api/v1/purchases/{purchase_id}/review", token=buyer.token,
                                    body={"rating": random.randint(1, 5), "comment": "soak"})
                return
            if purchase is not None and purchase["status"] in ("failed", "refunded"):
                return
        self.api.outcomes[("review", "purchase_not_completed")] += 1

    async def drive_writes(self, rate: float, until: float, mix: tuple[str, ...]) -> None:
        """Start writes of `mix` in turn at `rate` per second until `until`, at most MAX_IN_FLIGHT at once."""
        kinds = itertools.cycle(mix)
        next_at = time.monotonic()
        while next_at < until:
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            next_at += 1 / rate
            if len(self.tasks) >= MAX_IN_FLIGHT:
                self.skipped += 1
                continue
            self.spawn(self.write(next(kinds)))

    async def drive_clients(self, url: str, count: int, stay: float, until: float) -> None:
        """Clients arriving evenly over the run, each staying about `stay` seconds."""
        interval = max(0.0, until - time.monotonic()) / max(count, 1)
        for n in range(count):
            if time.monotonic() >= until:
                break
            self.spawn(self.client(url, n, random.uniform(0.5, 1.5) * stay))
            await asyncio.sleep(interval)

    async def client(self, url: str, n: int, stay: float) -> None:
        """One client's visit: subscribe, receive for a while, leave."""
        if n % 5 == 4:
            return await self.long_poll_client(stay)
        transports = ["polling"] if n % 4 == 3 else ["websocket"]
        account = self.writers[n % len(self.writers)] if n % 2 else None
        namespace = "/games" if n % 3 == 0 and self.game_id else "/chain"
        channels = [TRANSACTIONS_CHANNEL] if namespace == "/chain" else [f"game:{self.game_id}"]
        if namespace == "/games" and self.live_sessions:
            channels.append(f"session:{self.live_sessions[-1]}")
        sio = socketio.AsyncClient(reconnection=False)
        received = 0

        @sio.on("*", namespace="*")
        async def on_any(event: str, namespace: str, data: Any = None) -> None:
            nonlocal received
            received += 1

        try:
            await sio.connect(url, namespaces=[namespace], transports=transports, wait_timeout=10,
                              auth={"token": account.token} if account else None)
            for channel in channels:
                ack = await sio.call("subscribe", {"channel": channel}, namespace=namespace, timeout=10)
                if not ack.get("ok"):
                    self.clients[f"subscribe_{ack.get('error', {}).get('code')}"] += 1
            await asyncio.sleep(stay)
            self.clients["socket_ok" if received else "socket_no_events"] += 1
        except (socketio.exceptions.SocketIOError, asyncio.TimeoutError, aiohttp.ClientError) as exc:
            self.clients[f"socket_{type(exc).__name__}"] += 1
        finally:
            await sio.disconnect()

    async def long_poll_client(self, stay: float) -> None:
        """Follow a game session's (or the transaction feed's) channel over the REST long-poll."""
        channel = f"session:{self.live_sessions[-1]}" if self.live_sessions else TRANSACTIONS_CHANNEL
        until = time.monotonic() + stay
        page = await self.api.call("long_poll", "GET", f"/api/v1/events?channel={channel}")
        since = (page or {}).get("latest_id") or "0-0"
        while time.monotonic() < until:
            page = await self.api.call("long_poll", "GET", f"/api/v1/events?channel={channel}&since={since}"
                                                           f"&wait={LONG_POLL_WAIT}")
            if page is None:
                await asyncio.sleep(1)
                continue
            since = page["latest_id"] or since
        self.clients["long_poll_done"] += 1


async def prepare(api: Api, writers: int, game_token: str | None) -> Workload:
    """Writers with funded wallets, the demo game and the DataPods on sale."""
    accounts = list(await asyncio.gather(*(sign_up(api, "writer") for _ in range(writers))))
    games = await api.call("setup", "GET", "/api/v1/games?status=active") or {"games": []}
    game_id = games["games"][0]["game_id"] if games["games"] else None
    pods = (await api.call("setup", "GET", "/api/v1/datapods?limit=20") or {"items": []})["items"]
    if game_id is None or len(pods) < PODS_PER_BUYER:
        raise SystemExit("the server needs the demo data (a game and four DataPods on sale)")
    return Workload(api, accounts, game_id, game_token, pods)


async def sample_rss(pid: int, every: float, until: float, samples: list[tuple[float, int]],
                     started: float, report: Callable[[float, int], None]) -> None:
    """RSS every `every` seconds until `until`."""
    while True:
        now = time.monotonic()
        rss = rss_bytes(pid)
        samples.append((now - started, rss))
        report(now - started, rss)
        if now >= until:
            return
        await asyncio.sleep(min(every, max(0.0, until - now)))


async def drop_redis_keys(prefix: str) -> None:
    """Delete the run's Redis keys (histories, presence) when REDIS_URL is set."""
    url = os.environ.get("REDIS_URL")
    if not url:
        return
    client = aioredis.Redis.from_url(url)
    try:
        async for key in client.scan_iter(match=prefix + "*", count=1000):
            await client.delete(key)
    finally:
        await client.aclose()


def mb(value: float) -> str:
    return f"{value / 2**20:.1f} MB"


async def soak(args: argparse.Namespace, url: str, pid: int, game_token: str | None) -> None:
    """Drive the workload, sample the RSS, print the figures."""
    async with aiohttp.ClientSession() as http:
        api = Api(http, url)
        if await api.call("setup", "GET", "/readyz") is None:
            raise SystemExit(f"{url} is not ready")
        workload = await prepare(api, args.writers, game_token)
        started = time.monotonic()
        until = started + args.minutes * 60
        samples: list[tuple[float, int]] = []

        def report(elapsed: float, rss: int) -> None:
            if args.verbose:
                writes = sum(count for (kind, _), count in api.outcomes.items())
                print(f"  {elapsed / 60:5.1f} min  RSS {mb(rss)}  requests {writes}  in flight {len(workload.tasks)}",
                      flush=True)

        await asyncio.gather(
            workload.drive_writes(args.writes_per_second, until, tuple(args.mix.split(","))),
            workload.drive_clients(url, args.clients, args.stay, until),
            sample_rss(pid, args.sample_every, until, samples, started, report))
        if workload.tasks:
            await asyncio.wait(list(workload.tasks), timeout=LONG_POLL_WAIT + 30)
    after_warmup = [(t, r) for t, r in samples if t >= args.warmup * 60] or samples[-1:]
    warm, end = after_warmup[0][1], samples[-1][1]
    rss_values = [r for _, r in after_warmup]
    print(f"soak: {args.minutes:g} min, {args.writes_per_second:g} writes/s, {args.clients} clients "
          f"(~{args.stay:g} s each), redis: {'yes' if os.environ.get('REDIS_URL') or args.url else 'no'}")
    print(f"RSS at start {mb(samples[0][1])}; after the {args.warmup:g} min warm-up {mb(warm)}; at the end {mb(end)} "
          f"({(end - warm) / 2**20:+.1f} MB); range after warm-up {mb(min(rss_values))} .. {mb(max(rss_values))}")
    print(f"RSS slope after warm-up: {slope_per_minute(after_warmup) / 2**20:+.3f} MB/min "
          f"over {len(after_warmup)} samples")
    by_kind: dict[str, dict[str, int]] = collections.defaultdict(dict)
    for (kind, outcome), count in sorted(api.outcomes.items()):
        by_kind[kind][outcome] = count
    print("requests: " + "; ".join(f"{kind} " + ", ".join(f"{o} {c}" for o, c in outcomes.items())
                                   for kind, outcomes in by_kind.items()))
    print(f"writes not started (over {MAX_IN_FLIGHT} in flight): {workload.skipped}")
    print("clients: " + ", ".join(f"{k} {v}" for k, v in sorted(workload.clients.items())))


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", help="a running server (default: start one)")
    parser.add_argument("--pid", type=int, help="the running server's process id (with --url)")
    parser.add_argument("--game-token", help="the demo game's token (with --url; else rewards become transfers)")
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--warmup", type=float, default=3.0, help="minutes before the RSS baseline")
    parser.add_argument("--writes-per-second", type=float, default=20.0)
    parser.add_argument("--mix", default=",".join(WRITE_MIX),
                        help=f"the writes made in turn, comma-separated (default {','.join(WRITE_MIX)})")
    parser.add_argument("--clients", type=int, default=1000, help="clients connecting and leaving over the run")
    parser.add_argument("--stay", type=float, default=60.0, help="seconds a client stays, on average")
    parser.add_argument("--writers", type=int, default=12, help="signed-up users making the writes")
    parser.add_argument("--sample-every", type=float, default=10.0, help="seconds between RSS samples")
    parser.add_argument("--verbose", action="store_true", help="print every RSS sample")
    parser.add_argument("--server-log", help="where the started server's log goes (default: a temporary file)")
    args = parser.parse_args()
    if args.url:
        if args.pid is None:
            raise SystemExit("--url needs --pid: the RSS is read from /proc/<pid>/status")
        await soak(args, args.url.rstrip("/"), args.pid, args.game_token)
        return
    admin_dsn = os.environ.get("DATABASE_URL")
    if not admin_dsn:
        raise SystemExit("set DATABASE_URL to a PostgreSQL server where the bench may create a database")
    name = f"hub_bench_soak_{uuid.uuid4().hex[:8]}"
    redis_prefix = f"{name}:"
    await admin(admin_dsn, f'CREATE DATABASE "{name}"')
    master_key = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode()
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="hub-bench-soak-") as tmp:
        log_path = Path(args.server_log) if args.server_log else Path(tmp) / "server.log"
        process = start_server(with_database(admin_dsn, name), port, Path(tmp), master_key, redis_prefix, log_path)
        try:
            # The demo game's id is 1 in a fresh database; its token is derived from the master key.
            url = f"http://127.0.0.1:{port}"
            await wait_ready(url, process, timeout=120)  # the first start migrates and loads the demo data
            token = demo_token(load_or_create_secret(Path(tmp), "master_key", master_key), 1)
            await soak(args, url, process.pid, token)
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
            await admin(admin_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            await drop_redis_keys(redis_prefix)


if __name__ == "__main__":
    asyncio.run(main())
