"""PostgreSQL's CPU per reward for booking reward batches, without the hub, the sockets or the load.

    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres .venv/bin/python bench/reward_statements.py
    .venv/bin/python bench/reward_statements.py --batch 80 --ddl "DROP TRIGGER users_set_updated_at ON users"

A fresh database on the DATABASE_URL server, set up as bench/rewards.py sets it up (500 players,
one game, one active session each). One connection books batches of `--batch` rewards for distinct
sessions with `games.book_rewards` (the read, then the one-statement booking) and a second one
drains the outbox after each batch, as the relay does. After `--warmup` batches, it prints each
backend's CPU (from /proc/<pid>/stat, so PostgreSQL must run on this machine) per reward booked,
then the same for the batch's read alone (`read_batch`, with nothing booked meanwhile).

bench/rewards.py measures the whole path under load, where every process competes for the same
cores; this isolates what PostgreSQL spends, so a change to a statement shows in a minute. Each
`--ddl` runs before the measurement (e.g. to see what a trigger, a foreign key or an index costs).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from decimal import Decimal
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import asyncpg  # noqa: E402

from bench.cluster import fresh_database  # noqa: E402
from bench.rewards import setup  # noqa: E402
from db import games as queries  # noqa: E402
from db import migrate, outbox  # noqa: E402
from db.pool import init_connection  # noqa: E402
from server.core.settings import Settings  # noqa: E402
from server.services import games  # noqa: E402


def backend_cpu(pid: int) -> float:
    """CPU seconds a local PostgreSQL backend has used."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def connect(dsn: str) -> tuple[asyncpg.Connection, int]:
    conn = await asyncpg.connect(dsn)
    await init_connection(conn)
    return conn, await conn.fetchval("SELECT pg_backend_pid()")


async def measure(dsn: str, args: argparse.Namespace) -> None:
    await asyncio.to_thread(migrate.upgrade, dsn)
    game_id, _, sessions = await setup(dsn, args.sessions)
    (booker, booker_pid), (relay, relay_pid) = await connect(dsn), await connect(dsn)
    for ddl in args.ddl:
        await booker.execute(ddl)
    seqs = dict.fromkeys(sessions, 0)
    # As the hub books: a session's activity time is written once per step, so most updates are HOT.
    step = games.activity_step(Settings().game_session_idle_seconds)
    span = len(sessions) - len(sessions) % args.batch

    def next_batch(number: int) -> list[games.RewardReport]:
        start = number * args.batch % span
        reports = []
        for session_id in sessions[start:start + args.batch]:
            seqs[session_id] += 1
            reports.append(games.RewardReport(game_id=game_id, session_id=session_id, seq=seqs[session_id],
                                              reward_type="coin", value=Decimal("1.25")))
        return reports

    async def book(batches: int) -> int:
        booked = 0
        for number in range(batches):
            booked += (await games.book_rewards(booker, next_batch(number), activity_step=step))[1]
            async with relay.transaction():
                await outbox.take_batch(relay, 1000)
        return booked

    await book(args.warmup)
    before, relay_before = backend_cpu(booker_pid), backend_cpu(relay_pid)
    booked = await book(args.batches)
    booking, relaying = backend_cpu(booker_pid) - before, backend_cpu(relay_pid) - relay_before
    before = backend_cpu(booker_pid)
    for number in range(args.batches):
        await queries.read_batch(booker, ((r.session_id, r.seq) for r in next_batch(number)), games.GAMING_POOL)
    reading = backend_cpu(booker_pid) - before
    print(f"{booked} rewards in batches of {args.batch}, {args.sessions} sessions"
          + (f", after: {'; '.join(args.ddl)}" if args.ddl else ""))
    print(f"PostgreSQL CPU per reward: booking {1e6 * booking / booked:.0f} us (the read included), "
          f"the relay's deletes {1e6 * relaying / booked:.0f} us; the read alone {1e6 * reading / booked:.0f} us")
    await booker.close()
    await relay.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sessions", type=int, default=500)
    parser.add_argument("--batch", type=int, default=80, help="rewards per batch (distinct sessions)")
    parser.add_argument("--batches", type=int, default=400, help="measured batches")
    parser.add_argument("--warmup", type=int, default=100, help="batches before measuring")
    parser.add_argument("--ddl", action="append", default=[], help="a statement to run first (repeatable)")
    args = parser.parse_args()
    if args.batch > args.sessions:
        parser.error("--batch must not exceed --sessions")
    admin_dsn = os.environ.get("DATABASE_URL")
    if not admin_dsn:
        sys.exit("set DATABASE_URL to a PostgreSQL server on this machine where the bench may create a database")
    async with fresh_database(admin_dsn, "bench_reward_statements") as dsn:
        await measure(dsn, args)


if __name__ == "__main__":
    asyncio.run(main())
