"""Event bus throughput: publish and replay, in memory and on Redis. Prints figures, asserts nothing.

    .venv/bin/python bench/bus.py [--events 5000] [--concurrency 32] [--redis-url redis://...]

Without --redis-url, REDIS_URL is used; when neither is set only the memory mode runs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server.realtime.history import EventBus, HistoryStore, MemoryHistory, RedisHistory
from server.realtime.redis import connect_redis  # noqa: E402

PAYLOAD = {"datapod_id": "3f1c2a9e-0000-4000-8000-000000000000", "price": "12.500000000",
           "status": "listed", "tags": ["csv", "weather"]}


async def _nothing(event) -> None:
    return None


async def publish_rate(history: HistoryStore, channel: str, events: int, concurrency: int) -> float:
    """Events per second published by `concurrency` tasks sharing `events`."""
    bus = EventBus(history, _nothing)
    per_task = events // concurrency

    async def worker() -> None:
        for _ in range(per_task):
            await bus.publish(channel, "datapod_listed", PAYLOAD)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return per_task * concurrency / (time.perf_counter() - start)


async def replay_rate(history: HistoryStore, channel: str, rounds: int) -> float:
    """Events per second replayed in pages of 1000 from the oldest retained event."""
    first = await history.read_after(channel, "0-0", 1)
    since = first.events[0].id
    start, total = time.perf_counter(), 0
    for _ in range(rounds):
        page = await history.read_after(channel, since, 1000)
        total += len(page.events)
    return total / (time.perf_counter() - start)


async def run_mode(name: str, history: HistoryStore, events: int, concurrency: int) -> None:
    channel = f"bench:{uuid.uuid4().hex[:8]}"
    sequential = await publish_rate(history, channel, events, 1)
    concurrent = await publish_rate(history, channel, events, concurrency)
    replay = await replay_rate(history, channel, 20)
    print(f"{name:<7} publish 1 task: {sequential:>9,.0f} ev/s   "
          f"{concurrency} tasks: {concurrent:>9,.0f} ev/s   replay: {replay:>10,.0f} ev/s")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL"))
    args = parser.parse_args()
    print(f"events per run: {args.events}, history cap: 10000, payload: {len(str(PAYLOAD))} chars")
    await run_mode("memory", MemoryHistory(10_000, 3600), args.events, args.concurrency)
    if not args.redis_url:
        print("redis   skipped (no --redis-url or REDIS_URL)")
        return
    redis = connect_redis(args.redis_url)
    prefix = f"bench:{uuid.uuid4().hex}:"
    try:
        await run_mode("redis", RedisHistory(redis, prefix, 10_000, 600), args.events,
                       args.concurrency)
    finally:
        keys = [key async for key in redis.scan_iter(match=prefix + "*")]
        if keys:
            await redis.delete(*keys)
        await redis.aclose()


if __name__ == "__main__":
    asyncio.run(main())
