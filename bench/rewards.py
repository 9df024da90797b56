"""Reward ingest: sustained accepted rewards per second and ack latency with many live sessions.

    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres .venv/bin/python bench/rewards.py
    .venv/bin/python bench/rewards.py --sessions 500 --duration 20 --game-servers 10
    .venv/bin/python bench/rewards.py --batch   # game servers send many reports per call
    .venv/bin/python bench/rewards.py --batch --rate 6500   # an open loop: 6,500 reports/s whatever the acks

Workload: one real server process (`python -m server serve`, its own fresh database on the
DATABASE_URL server, Redis when REDIS_URL is set) and one game with `--sessions` active sessions,
one per player. `--game-servers` Socket.IO connections authenticated with the game's token share
the sessions; every session reports `report_reward` in a closed loop (the next report as soon as
the previous one is acked, like a game server that streams each session's rewards in order).
With `--batch` each game server sends the reports its sessions made in one turn of its loop as
one `report_rewards` call (at most 200), without waiting for earlier calls' acks; each session
still has one report in flight and its latency is still measured per report.
A closed loop runs the hub at its capacity, where the mean latency is the sessions over the rate.
With `--rate R` the loop is open instead, as game events happen: the sessions report R rewards/s in
all, in turn, whatever the acks (so a session may have several reports in flight); each game
server sends the reports due every `--tick-ms` (one call with `--batch`), and a report's latency
counts from its tick, so a driver or hub that falls behind shows in it.
After `--warmup` seconds, the run counts for `--duration` seconds:

- accepted rewards/s: acks of new rewards in the window / its length (open loop: of the reports
  sent in it, however late the ack);
- p50/p99/max ack latency: from emit to ack, client side (includes the socket and the batch wait);
- afterwards, the database is checked: rewards booked = acks, and the players' balances and the
  ledger both sum to the rewards; the outbox backlog when the load stops shows whether event
  publishing (two lossless `reward_earned` per reward, on the game's and the session's channels,
  through the outbox relay) kept up (target: under one second of ingest), and the relay's rate
  while it drains the backlog is printed (up to 30 s); the run fails (exit 1) if the sums differ
  or the relay left events behind.

The setup (players, game, sessions) is written straight into the database: the figure is the
ingest path, not sign-up. The client runs in this process; on a small machine it competes with
the server and PostgreSQL for the same cores, so read the figures as a floor.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from decimal import Decimal
from pathlib import Path
from typing import AsyncIterator, Callable
from urllib.parse import urlsplit, urlunsplit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp  # noqa: E402
import asyncpg  # noqa: E402

from bench.cluster import fresh_database, hub_cluster  # noqa: E402
from bench.fanout import cpu_seconds  # noqa: E402
from bench.lean_socket import LeanSocket  # noqa: E402
from db.outbox import pending_count  # noqa: E402
from server.services.games import new_token  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TARGET_REWARDS_PER_S = 6_500  # issue 21, at the default 500 sessions and 10 game servers
TARGET_ACK_P99_MS = 100.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def with_database(dsn: str, name: str) -> str:
    return urlunsplit(urlsplit(dsn)._replace(path="/" + name))


async def admin(dsn: str, statement: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


async def setup(dsn: str, sessions: int) -> tuple[int, str, list[int]]:
    """Players, one active game with a generous policy, and one active session per player."""
    token, digest = new_token()
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            ids = [uuid.uuid4() for _ in range(sessions)]
            await conn.execute(
                """INSERT INTO users (id, username, email, password_hash)
                   SELECT id, 'bench_' || n, 'bench_' || n || '@example.org', 'not-a-login'
                   FROM unnest($1::uuid[]) WITH ORDINALITY AS t(id, n)""", ids)
            await conn.execute("""INSERT INTO reward_pools (pool_name, total_tokens) VALUES ('gaming', 99999999999)
                                  ON CONFLICT (pool_name) DO UPDATE SET total_tokens = 99999999999""")
            game_id = await conn.fetchval(
                """INSERT INTO games (name, developer_wallet, revenue_share, status, token_hash, max_reward_per_event,
                                      max_reward_per_minute, max_reward_per_session)
                   VALUES ('Bench Runner', 'kvp1bench', 0.1, 'active', $1, 100, 999999999999, 999999999999)
                   RETURNING game_id""", digest)
            rows = await conn.fetch(
                """INSERT INTO game_sessions (game_id, user_id, player_wallet, session_start, status)
                   SELECT $1, id, 'user:' || id, now(), 'Active' FROM unnest($2::uuid[]) AS t(id)
                   RETURNING session_id""", game_id, ids)
        # A deployment's tables have statistics (autovacuum analyzes them within a minute); a fresh
        # bench database has none for its 15 s, and PostgreSQL planned the booking from guesses.
        await conn.execute("ANALYZE users, games, game_sessions, reward_pools")
    finally:
        await conn.close()
    return game_id, token, [row["session_id"] for row in rows]


# Loaded into the hub by `profile` (a sitecustomize module): cProfile on CPU time, saved at exit. Not
# wall time (python -m cProfile's default): on a busy machine the wall clock charges other processes'
# time slices, and the hub's own waits in epoll, to whatever call was running. With a window, the
# profile starts at SIGUSR1 and is saved at SIGUSR2 (`profile_window`), so start-up and the driver's
# set-up stay out of it.
PROFILER = """import atexit, cProfile, signal, time
_profile = cProfile.Profile(time.process_time)
if {window!r}:
    signal.signal(signal.SIGUSR1, lambda *_: _profile.enable())
    signal.signal(signal.SIGUSR2, lambda *_: (_profile.disable(), _profile.dump_stats({path!r})))
else:
    _profile.enable()
    atexit.register(lambda: (_profile.disable(), _profile.dump_stats({path!r})))
"""


def start_server(dsn: str, port: int, data_dir: Path, log_path: Path, profile: str | None,
                 env: dict[str, str] | None = None, *, profile_window: bool = False) -> subprocess.Popen:
    """The hub on `port`, under a CPU-time profiler writing to `profile` if given (from SIGUSR1 to
    SIGUSR2 with `profile_window`, else start to exit); `env` overrides the environment built here
    (e.g. BLOCK_PRODUCER, PURCHASE_WORKERS)."""
    secret = lambda: base64.urlsafe_b64encode(secrets.token_bytes(32)).decode()  # noqa: E731
    env = {**os.environ, "DATABASE_URL": dsn, "PORT": str(port), "HOST": "127.0.0.1", "DATA_DIR": str(data_dir),
           "JWT_SECRET": os.environ.get("JWT_SECRET") or secret(),
           "MASTER_KEY": os.environ.get("MASTER_KEY") or secret(), "BLOCK_PRODUCER": "false", "LOG_FORMAT": "json",
           # Idle sessions must not time out while the driver is connecting.
           "GAME_SESSION_IDLE_SECONDS": "3600", **(env or {})}
    if profile:
        hook = data_dir / "profiler"
        hook.mkdir(exist_ok=True)
        hook_code = PROFILER.format(path=str(Path(profile).resolve()), window=profile_window)
        (hook / "sitecustomize.py").write_text(hook_code)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(hook), env.get("PYTHONPATH")) if p)
    return subprocess.Popen([sys.executable, "-m", "server", "serve", "--host", "127.0.0.1", "--port", str(port),
                             "--no-demo-data"], cwd=ROOT, env=env, stdout=log_path.open("w"),
                            stderr=subprocess.STDOUT)


def stop_server(process: subprocess.Popen, timeout: float = 15.0) -> None:
    """SIGTERM (a graceful shutdown), then SIGKILL if the server has not exited within `timeout` s."""
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


async def wait_ready(url: str, process: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise SystemExit(f"the server exited with {process.returncode}")
            try:
                async with http.get(url + "/readyz") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    raise SystemExit("the server did not become ready")


class Stats:
    """What the session loops measure inside the window."""

    def __init__(self, paced: bool = False) -> None:
        self.window_start = float("inf")
        self.window_end = float("inf")
        self.latencies: list[float] = []
        self.accepted = 0
        self.acked_total = 0
        self.errors: dict[str, int] = {}
        self.hub_cpu = 0.0  # seconds of CPU in the window, all hub processes
        self.driver_cpu = 0.0
        # Open loop: every report sent in the window counts, however late its ack. Closed loop: only
        # those acked in it (the loops' last reports are acked after the load stops).
        self.paced = paced

    def record(self, ack: dict, sent: float, done: float) -> float:
        """Count one report's ack; the seconds to wait before reporting again (rate_limited), or 0."""
        if not ack.get("ok"):
            code = ack["error"]["code"]
            self.errors[code] = self.errors.get(code, 0) + 1
            return ack["error"].get("retry_after", 0.1) if code == "rate_limited" else 0.0
        self.acked_total += 1
        if self.window_start <= sent < self.window_end and (self.paced or done <= self.window_end):
            self.accepted += 1
            self.latencies.append(done - sent)
        return 0.0


class GameServer:
    """One game-server connection. Alone, each report is its own `report_reward` call; batching, the
    reports its sessions made in one turn of the loop go together in one `report_rewards` call (at
    most `MAX_BATCH`) without waiting for earlier calls' acks, as a game server streaming many
    sessions' rewards would send them."""

    MAX_BATCH = 200

    def __init__(self, socket: LeanSocket, batching: bool) -> None:
        self.socket = socket
        self.batching = batching
        self._waiting: list[tuple[dict, asyncio.Future]] = []
        self._calls: set[asyncio.Task] = set()

    async def report(self, report: dict) -> dict:
        """Report one reward; its ack envelope."""
        if not self.batching:
            return await self.socket.call("report_reward", report, timeout=60)
        loop = asyncio.get_running_loop()
        if not self._waiting:
            loop.call_soon(self._send_waiting)
        future = loop.create_future()
        self._waiting.append((report, future))
        return await future

    def _send_waiting(self) -> None:
        waiting, self._waiting = self._waiting, []
        for start in range(0, len(waiting), self.MAX_BATCH):
            call = asyncio.create_task(self._call(waiting[start:start + self.MAX_BATCH]))
            self._calls.add(call)
            call.add_done_callback(self._calls.discard)

    async def _call(self, batch: list[tuple[dict, asyncio.Future]]) -> None:
        try:
            results = await self.send([report for report, _ in batch])
        except Exception as exc:  # noqa: BLE001 - each waiting session fails as a single call would
            for _, future in batch:
                future.set_exception(exc)
            return
        for (_, future), result in zip(batch, results):
            future.set_result(result)

    async def send(self, reports: list[dict]) -> list[dict]:
        """Send reports now, batching in one `report_rewards` call; each one's ack envelope."""
        if not self.batching:
            return [await self.socket.call("report_reward", report, timeout=60) for report in reports]
        ack = await self.socket.call("report_rewards", {"rewards": reports}, timeout=60)
        return ack["data"]["results"] if ack.get("ok") else [ack] * len(reports)

    async def close(self) -> None:
        for call in list(self._calls):
            call.cancel()
        await self.socket.close()


async def session_loop(server: GameServer, session_id: int, stats: Stats, stop: asyncio.Event) -> None:
    """Closed loop: the session's next report as soon as the last one is acked."""
    seq = 0
    while not stop.is_set():
        seq += 1
        sent = time.perf_counter()
        ack = await server.report({"session_id": session_id, "seq": seq, "reward_type": "coin", "value": "1.25"})
        retry_after = stats.record(ack, sent, time.perf_counter())
        if retry_after:
            await asyncio.sleep(retry_after)


async def paced_loop(server: GameServer, session_ids: list[int], rate: float, tick: float, stats: Stats,
                     stop: asyncio.Event) -> None:
    """Open loop: this connection's sessions report `rate` rewards/s in turn whatever the acks, as game
    events happen; the reports due by each tick go out at that tick (together with `--batch`), and a
    report's latency counts from that tick, not from when the driver got round to sending it (no
    coordinated omission)."""
    seqs = dict.fromkeys(session_ids, 0)
    in_flight: set[asyncio.Task] = set()
    start = time.perf_counter()
    tick_at, sent = start, 0
    step = GameServer.MAX_BATCH if server.batching else 1
    while not stop.is_set():
        due = int((tick_at - start) * rate)
        reports = []
        for n in range(sent, due):
            session_id = session_ids[n % len(session_ids)]
            seqs[session_id] += 1
            reports.append({"session_id": session_id, "seq": seqs[session_id], "reward_type": "coin",
                            "value": "1.25"})
        sent = due
        for first in range(0, len(reports), step):
            call = asyncio.create_task(paced_call(server, reports[first:first + step], tick_at, stats))
            in_flight.add(call)
            call.add_done_callback(in_flight.discard)
        tick_at += tick
        await asyncio.sleep(max(0.0, tick_at - time.perf_counter()))
    await asyncio.gather(*in_flight)


async def paced_call(server: GameServer, reports: list[dict], due: float, stats: Stats) -> None:
    """One call of the open loop (one report, or many with `--batch`), each report timed from its tick."""
    for ack in await server.send(reports):
        stats.record(ack, due, time.perf_counter())


async def drive(url: str, token: str, session_ids: list[int], servers: int, warmup: float, duration: float,
                hub_pids: Callable[[], list[int]], batching: bool, rate: float | None, tick: float) -> Stats:
    """Run the session loops (closed, or paced at `rate` rewards/s); the window's figures, with the
    hubs' and this driver's CPU in it."""
    async with aiohttp.ClientSession() as http:
        connections = []
        for _ in range(servers):
            socket = LeanSocket("/games")
            await socket.open(http, url, {"game_token": token})
            connections.append(GameServer(socket, batching))
        stats, stop = Stats(paced=bool(rate)), asyncio.Event()
        if rate:
            loops = [asyncio.create_task(paced_loop(connection, session_ids[i::servers], rate / servers, tick,
                                                    stats, stop))
                     for i, connection in enumerate(connections)]
        else:
            loops = [asyncio.create_task(session_loop(connections[i % servers], sid, stats, stop))
                     for i, sid in enumerate(session_ids)]
        await asyncio.sleep(warmup)
        hub_cpu, driver_cpu = sum(map(cpu_seconds, hub_pids())), time.process_time()
        stats.window_start = time.perf_counter()
        stats.window_end = stats.window_start + duration
        await asyncio.sleep(duration)
        stats.hub_cpu = sum(map(cpu_seconds, hub_pids())) - hub_cpu
        stats.driver_cpu = time.process_time() - driver_cpu
        stop.set()
        await asyncio.gather(*loops)
        for connection in connections:
            await connection.close()
    return stats


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def check(dsn: str, acked: int, drain_timeout: float = 30.0) -> dict:
    conn = await asyncpg.connect(dsn)
    try:
        backlog = await pending_count(conn)
        started = time.monotonic()
        left = backlog
        while left and time.monotonic() - started < drain_timeout:
            await asyncio.sleep(0.2)
            left = await pending_count(conn)
        drained = backlog - left
        row = await conn.fetchrow(
            """SELECT (SELECT count(*) FROM game_rewards) AS rewards,
                      (SELECT coalesce(sum(reward_value), 0) FROM game_rewards) AS reward_sum,
                      (SELECT coalesce(sum(total_balance), 0) FROM users) AS balances,
                      (SELECT coalesce(sum(delta), 0) FROM balance_ledger) AS ledger,
                      (SELECT coalesce(sum(rewards_earned), 0) FROM game_sessions) AS earned,
                      (SELECT count(*) FROM event_outbox) AS outbox""")  # after the drain wait
    finally:
        await conn.close()
    result = dict(row)
    result.update(backlog=backlog, drain_rate=drained / max(time.monotonic() - started, 1e-9), left=left)
    result["consistent"] = (result["rewards"] == acked and result["reward_sum"] == result["balances"]
                            == result["ledger"] == result["earned"] == Decimal("1.25") * acked)
    return result


@contextlib.asynccontextmanager
async def hubs(dsn: str, processes: int, tmp: Path,
               profile: str | None) -> AsyncIterator[tuple[str, Callable[[], list[int]]]]:
    """The hub(s) on the bench database: one process on its own port (`processes` 0), or HAProxy in
    front of `processes` processes (server/cluster.py); where clients connect and the hubs' pids."""
    if not processes:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        process = start_server(dsn, port, tmp, tmp / "server.log", profile)
        try:
            await wait_ready(url, process)  # the server migrates the new database on start
            yield url, lambda: [process.pid]
        finally:
            stop_server(process)
        return
    redis_url = os.environ.get("REDIS_URL")
    if not redis_url:
        raise SystemExit("--processes needs REDIS_URL (the processes share it)")
    async with hub_cluster(dsn, redis_url, processes, tmp, env={"BLOCK_PRODUCER": "false",
                                                                "GAME_SESSION_IDLE_SECONDS": "3600"}) as (cluster, _):
        yield cluster.url, lambda: [hub.pid for hub in cluster.hubs if hub.pid]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sessions", type=int, default=500)
    parser.add_argument("--game-servers", type=int, default=10, help="game-server connections sharing the sessions")
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--batch", action="store_true",
                        help="each game server sends its sessions' waiting reports in one report_rewards call")
    parser.add_argument("--rate", type=float, metavar="R",
                        help="open loop: the sessions report R rewards/s in all, whatever the acks (default: each "
                             "session reports again once acked)")
    parser.add_argument("--tick-ms", type=float, default=10.0,
                        help="open loop: each game server sends the reports due every this many ms")
    parser.add_argument("--processes", type=int, default=0,
                        help="hub processes behind HAProxy (0: one process, no balancer)")
    parser.add_argument("--profile", metavar="PATH", help="run the server under cProfile, stats to PATH")
    parser.add_argument("--json", metavar="PATH", help="also write the figures to this file")
    args = parser.parse_args()
    admin_dsn = os.environ.get("DATABASE_URL")
    if not admin_dsn:
        raise SystemExit("set DATABASE_URL to a PostgreSQL server where the bench may create a database")
    if args.profile and args.processes:
        raise SystemExit("--profile runs one process: leave out --processes")
    with tempfile.TemporaryDirectory(prefix="hub-bench-rewards-") as tmp:
        async with fresh_database(admin_dsn, "bench_rewards") as dsn, \
                hubs(dsn, args.processes, Path(tmp), args.profile) as (url, hub_pids):
            game_id, token, session_ids = await setup(dsn, args.sessions)
            stats = await drive(url, token, session_ids, args.game_servers, args.warmup, args.duration, hub_pids,
                                args.batch, args.rate, args.tick_ms / 1000)
            result = await check(dsn, stats.acked_total)
    ms = [v * 1000 for v in stats.latencies]
    p50, p99 = (statistics.median(ms), percentile(ms, 0.99)) if ms else (None, None)
    rate = stats.accepted / args.duration
    where = f"{args.processes} processes behind HAProxy" if args.processes else "one process"
    where += ", report_rewards (batched)" if args.batch else ", report_reward (one per call)"
    where += f", open loop at {args.rate:,.0f} rewards/s, a {args.tick_ms:g} ms tick" if args.rate else ", closed loop"
    print(f"sessions: {args.sessions}, game-server connections: {args.game_servers}, {where}, "
          f"window: {args.duration:.1f} s after {args.warmup:.1f} s warm-up, "
          f"redis: {'yes' if os.environ.get('REDIS_URL') else 'no'}")
    print(f"accepted rewards/s: {rate:,.0f}")
    if ms:
        print(f"ack latency ms: p50 {p50:.1f}, p99 {p99:.1f}, max {max(ms):.1f}")
    print(f"CPU in the window: hubs {stats.hub_cpu / args.duration:.0%} of a core "
          f"({stats.hub_cpu / max(stats.accepted, 1) * 1e6:,.0f} us per reward), "
          f"this driver {stats.driver_cpu / args.duration:.0%}; load average {os.getloadavg()[0]:.1f}")
    print(f"errors: {stats.errors or 'none'}")
    print(f"database: {result['rewards']} rewards for {stats.acked_total} acks, sums "
          f"{'consistent' if result['consistent'] else 'INCONSISTENT'} (rewards = balances = ledger = sessions)")
    # One outbox row per reward (published to the game's and the session's channel).
    lag = result["backlog"] / max(rate, 1e-9)
    print(f"outbox: {result['backlog']} events waiting when the load stopped ({lag:.2f} s of ingest; target "
          f"< 1 s: {'met' if lag < 1 else 'MISSED'}); the relay then published {result['drain_rate']:,.0f} "
          f"events/s ({result['left']} left after the wait{': the relay is STUCK' if result['left'] else ''})")
    met = rate >= TARGET_REWARDS_PER_S and p99 is not None and p99 < TARGET_ACK_P99_MS
    print(f"target >= {TARGET_REWARDS_PER_S:,}/s with ack p99 < {TARGET_ACK_P99_MS:g} ms: {'met' if met else 'MISSED'}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "bench": "rewards", "sessions": args.sessions, "game_servers": args.game_servers,
            "processes": max(args.processes, 1), "balancer": bool(args.processes), "batch": args.batch,
            "open_loop_rate": args.rate,
            "accepted_per_s": rate,
            "ack_p50_ms": p50, "ack_p99_ms": p99,
            "hub_cpu_per_s": stats.hub_cpu / args.duration, "outbox_backlog": result["backlog"],
            "errors": stats.errors, "consistent": result["consistent"], "load_average": os.getloadavg()[0]}, indent=1))
    if not result["consistent"] or result["left"]:
        sys.exit(1)


if __name__ == "__main__":
    asyncio.run(main())
