"""User mining: verified shares per second, and the block-close (seal) time with many miners.

    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres .venv/bin/python bench/mining.py
    .venv/bin/python bench/mining.py --miners 1000 --mobile 100 --shares 5 --blocks 3 --connections 20

Workload: a fresh database on the DATABASE_URL server, migrated to head, with `--miners` users each
holding an open mining session (`--mobile` of them Mobile, the rest Node) and a funded `mining` pool.
For each of `--blocks` blocks:

- every Node miner solves `--shares` real proof-of-work shares on its session's challenge
  (client side, at `--difficulty` bits; not timed), then all shares are submitted concurrently
  through `server.services.mining.submit_share` over a pool of `--connections` connections: the
  server path recomputes each hash, checks the challenge, the difficulty, the per-session rate and
  uniqueness, and records it. Verified shares/s = accepted shares / wall time;
- every Mobile miner sends one heartbeat 30 s (pretended) after its previous one;
- the block is sealed (`seal_block`: take the work, split the reward, one `mining_rewards` and one
  ledger row per miner, the pool draw and the outbox events, in one transaction). Its wall time
  is the block-close time.

At the end `chain verify` must pass and every miner must have been paid each block. The driver runs
in this process (no Socket.IO transport: the figure is the service and PostgreSQL path), so on a
small machine it competes with PostgreSQL for the same cores; read the figures as a floor.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import asyncpg  # noqa: E402
from rewards import admin, with_database  # noqa: E402 - bench/rewards.py, beside this script

from db import migrate  # noqa: E402
from db.pool import init_connection  # noqa: E402
from server.services import mining  # noqa: E402
from server.services.chain import SealConfig, seal_block, verify_chain  # noqa: E402


async def setup(pool: asyncpg.Pool, miners: int, mobile: int, config: mining.MiningConfig) -> list[tuple]:
    """Users, the mining pool, and one open session per miner: [(user_id, device_type)]."""
    ids = [uuid.uuid4() for _ in range(miners)]
    async with pool.acquire() as conn:
        await conn.execute(
            """INSERT INTO users (id, username, email, password_hash)
               SELECT id, 'miner_' || n, 'miner_' || n || '@example.org', 'not-a-login'
                 FROM unnest($1::uuid[]) WITH ORDINALITY AS t(id, n)""", ids)
        await conn.execute("INSERT INTO reward_pools (pool_name, total_tokens) VALUES ('mining', 99999999999)")
    devices = [(uid, mining.queries.MOBILE if i < mobile else mining.queries.NODE) for i, uid in enumerate(ids)]

    async def start(uid: uuid.UUID, device: str) -> None:
        async with pool.acquire() as conn:
            await mining.start(conn, uid, device, config)
    await asyncio.gather(*(start(uid, device) for uid, device in devices))
    return devices


async def one_block(pool: asyncpg.Pool, devices: list[tuple], shares: int, config: mining.MiningConfig,
                    seal: SealConfig) -> tuple[int, float, float, int]:
    """(accepted shares, share seconds, seal seconds, miners paid) for one block."""
    async with pool.acquire() as conn:
        tip = await mining.queries.chain_tip(conn)
        sessions = {row["user_id"]: row["id"] for row in await conn.fetch(
            "SELECT user_id, id FROM mining_sessions WHERE ended_at IS NULL")}
    work = []
    for uid, device in devices:
        if device == mining.queries.NODE:
            challenge, start_at = mining.challenge_for(tip.hash, sessions[uid]), 0
            for _ in range(shares):
                nonce, _digest = mining.solve(challenge, config.share_difficulty, start_at)
                work.append((uid, challenge, nonce))
                start_at = nonce + 1
    accepted = 0

    async def submit(uid: uuid.UUID, challenge: str, nonce: int) -> None:
        nonlocal accepted
        async with pool.acquire() as conn:
            await mining.submit_share(conn, uid, challenge, nonce, config)
        accepted += 1

    started = time.perf_counter()
    await asyncio.gather(*(submit(*item) for item in work))
    share_seconds = time.perf_counter() - started
    mobiles = [uid for uid, device in devices if device == mining.queries.MOBILE]
    if mobiles:
        async with pool.acquire() as conn:
            await conn.execute("UPDATE mining_sessions SET last_heartbeat_at = last_heartbeat_at - interval '30 s' "
                               "WHERE ended_at IS NULL AND device_type = 'Mobile'")

        async def beat(uid: uuid.UUID) -> None:
            async with pool.acquire() as conn:
                await mining.heartbeat(conn, uid, config)
        await asyncio.gather(*(beat(uid) for uid in mobiles))
    async with pool.acquire() as conn:
        started = time.perf_counter()
        sealed = await seal_block(conn, seal)
        seal_seconds = time.perf_counter() - started
        paid = await conn.fetchval("SELECT count(*) FROM mining_rewards WHERE block_id = $1", sealed.block.height)
    return accepted, share_seconds, seal_seconds, paid


async def run(args: argparse.Namespace, dsn: str) -> None:
    config = mining.MiningConfig(share_difficulty=args.difficulty, shares_per_minute=10**6, session_timeout=3600,
                                 stale_grace=3600.0, mobile_seconds_per_day=86_400)
    seal = SealConfig(difficulty=args.block_difficulty, mobile_second_weight=config.mobile_second_weight)
    pool = await asyncpg.create_pool(dsn, min_size=args.connections, max_size=args.connections,
                                     init=init_connection)
    try:
        devices = await setup(pool, args.miners, args.mobile, config)
        rates, seals = [], []
        for block in range(1, args.blocks + 1):
            accepted, share_seconds, seal_seconds, paid = await one_block(pool, devices, args.shares, config, seal)
            rates.append(accepted / share_seconds)
            seals.append(seal_seconds)
            print(f"block {block}: {accepted} shares verified in {share_seconds:.2f} s "
                  f"({accepted / share_seconds:,.0f} shares/s); sealed in {seal_seconds * 1000:.0f} ms, "
                  f"{paid} miners paid")
            assert paid == args.miners, f"{paid} of {args.miners} miners were paid"
        async with pool.acquire() as conn:
            report = await verify_chain(conn)
            total = await conn.fetchval("SELECT sum(amount) FROM mining_rewards")
            drawn = await conn.fetchval("SELECT allocated_tokens FROM reward_pools WHERE pool_name = 'mining'")
    finally:
        await pool.close()
    assert report.ok, report.problems
    assert total == drawn, (total, drawn)
    print(f"\n{args.miners} miners ({args.miners - args.mobile} Node x {args.shares} shares at "
          f"{args.difficulty} bits, {args.mobile} Mobile), {args.connections} connections, {os.cpu_count()} CPUs")
    print(f"verified shares/s: median {statistics.median(rates):,.0f}, best {max(rates):,.0f}")
    print(f"block close (seal) time: median {statistics.median(seals) * 1000:.0f} ms, "
          f"worst {max(seals) * 1000:.0f} ms (block PoW at {args.block_difficulty} bits included)")
    print(f"chain verify: ok; rewards paid {total} = drawn from the pool {drawn}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--miners", type=int, default=1000)
    parser.add_argument("--mobile", type=int, default=100, help="how many of the miners are Mobile")
    parser.add_argument("--shares", type=int, default=5, help="shares per Node miner per block")
    parser.add_argument("--blocks", type=int, default=3)
    parser.add_argument("--difficulty", type=int, default=8, help="share difficulty in bits")
    parser.add_argument("--block-difficulty", type=int, default=8, help="block proof of work in bits")
    parser.add_argument("--connections", type=int, default=20)
    args = parser.parse_args()
    admin_dsn = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    name = f"bench_mining_{uuid.uuid4().hex[:8]}"
    asyncio.run(admin(admin_dsn, f'CREATE DATABASE "{name}"'))
    dsn = with_database(admin_dsn, name)
    try:
        migrate.upgrade(dsn)
        asyncio.run(run(args, dsn))
    finally:
        asyncio.run(admin(admin_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


if __name__ == "__main__":
    main()
