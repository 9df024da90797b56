"""Event bus throughput: publish and replay, in memory and on Redis. Prints figures, asserts nothing.

    .venv/bin/python bench/bus.py [--events 20000] [--concurrency 32] [--redis-url redis://...]

Without --redis-url, REDIS_URL is used; when neither is set only the memory mode runs.

On Redis each published event costs what it costs in the server: the history append (a Lua
script) and the copy for the other nodes (a pub/sub PUBLISH through the real client manager).
Three ways to publish are measured: one task publishing in a loop, `--concurrency` tasks at once,
and `publish_many` in the outbox relay's batches (`RELAY_BATCH`, 1,000). Each runs batched (the
server's form) and unbatched (one round trip per event, the form before batching) in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Awaitable, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server.core import jsonutil  # noqa: E402
from server.realtime.fanout import RedisFanoutManager  # noqa: E402
from server.realtime.history import (  # noqa: E402
    Event,
    EventBus,
    HistoryStore,
    MemoryHistory,
    RedisHistory,
    _normalise,
    new_epoch,
)
from server.realtime.outbox import RELAY_BATCH  # noqa: E402
from server.realtime.redis import connect_redis  # noqa: E402

PAYLOAD = {"datapod_id": "3f1c2a9e-0000-4000-8000-000000000000", "price": "12.500000000",
           "status": "listed", "tags": ["csv", "weather"]}

Deliver = Callable[[Event], Awaitable[None]]


async def _nothing(event: Event) -> None:
    return None


async def publish_one_by_one(bus: EventBus, channel: str, events: int, concurrency: int) -> int:
    """Publish `events` one call at a time from `concurrency` tasks; returns how many were published."""
    per_task = events // concurrency

    async def worker() -> None:
        for _ in range(per_task):
            await bus.publish(channel, "datapod_listed", PAYLOAD)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return per_task * concurrency


async def publish_in_batches(bus: EventBus, channel: str, events: int) -> int:
    """Publish `events` with `publish_many` in the relay's batches, one batch at a time."""
    batch = [(channel, "datapod_listed", PAYLOAD)] * RELAY_BATCH
    rounds = max(1, events // RELAY_BATCH)
    for _ in range(rounds):
        await bus.publish_many(batch)
    return rounds * RELAY_BATCH


async def replay_rate(history: HistoryStore, channel: str, rounds: int) -> float:
    """Events per second replayed in pages of 1000 from the oldest retained event."""
    first = await history.read_after(channel, "0-0", 1)
    since = first.events[0].id
    start, total = time.perf_counter(), 0
    for _ in range(rounds):
        page = await history.read_after(channel, since, 1000)
        total += len(page.events)
    return total / (time.perf_counter() - start)


async def measure(history: HistoryStore, deliver: Deliver, flush: Callable[[], Awaitable[None]],
                  events: int, concurrency: int) -> dict[str, float]:
    """The three publish rates (each until what is queued for other nodes has left) and the replay rate."""
    bus = EventBus(history, deliver)
    channel = f"bench:{uuid.uuid4().hex[:8]}"
    figures: dict[str, float] = {}
    for name, run in (("1 task", lambda: publish_one_by_one(bus, channel, events, 1)),
                      (f"{concurrency} tasks", lambda: publish_one_by_one(bus, channel, events, concurrency)),
                      ("publish_many", lambda: publish_in_batches(bus, channel, events))):
        start = time.perf_counter()
        published = await run()
        await flush()
        figures[name] = published / (time.perf_counter() - start)
    figures["replay"] = await replay_rate(history, channel, 20)
    return figures


def show(name: str, figures: dict[str, float], reference: dict[str, float] | None = None) -> None:
    cells = []
    for key, value in figures.items():
        ratio = f" ({value / reference[key]:.1f}x)" if reference and reference.get(key) else ""
        cells.append(f"{key}: {value:>9,.0f}{ratio}")
    print(f"{name:<18} " + "   ".join(cells) + "   ev/s")


async def _nowhere() -> None:
    return None


async def redis_modes(url: str, events: int, concurrency: int) -> None:
    redis = connect_redis(url)
    prefix = f"bench:{uuid.uuid4().hex}:"
    manager = RedisFanoutManager(url, channel=f"{prefix}socketio")

    async def to_other_nodes(event: Event) -> None:
        # What the hub's delivery hands the client manager for the other nodes (local delivery aside).
        await manager._publish({"method": "emit", "event": event.type, "data": event.to_wire(),
                                "namespace": "/", "room": f"channel:{event.channel}", "host_id": manager.host_id})

    try:
        unbatched = await measure(UnbatchedRedisHistory(redis, prefix, 10_000, 600),
                                  _direct_publish(redis, manager), _nowhere, events, concurrency)
        show("redis unbatched", unbatched)
        batched = await measure(RedisHistory(redis, prefix, 10_000, 600), to_other_nodes, manager.flush,
                                events, concurrency)
        show("redis batched", batched, unbatched)
    finally:
        keys = [key async for key in redis.scan_iter(match=prefix + "*")]
        if keys:
            await redis.delete(*keys)
        await redis.aclose()
        await manager._publisher.aclose()


class UnbatchedRedisHistory(RedisHistory):
    """The form before batching: a script call per event, a round trip per `append` (concurrent
    appends in parallel over the pool), and `append_many` as one pipeline of per-event calls."""

    async def append(self, channel: str, type: str, data: dict[str, Any]) -> Event:
        """Store one event with its own script call and round trip."""
        raw, payload = _normalise(data)
        [reply] = await self._append_batch([(channel, type, raw)])
        return self._stored(channel, type, payload, reply)

    async def append_many(self, events: list[tuple[str, str, dict[str, Any]]]) -> list[Event]:
        """Store events with a script call each, in one pipelined round trip."""
        prepared = [(channel, type, *_normalise(data)) for channel, type, data in events]
        async with self.redis.pipeline(transaction=False) as pipe:
            for channel, type, raw, _ in prepared:
                await self._append(keys=[self.key(channel), self.meta_key(channel)],
                                   args=[self._trim, self.cap, int(self.ttl * 1000), new_epoch(),
                                         *self.peer_channels, b"%s\n%s" % (type.encode(), raw)],
                                   client=pipe)
            replies = await pipe.execute()
        return [self._stored(channel, type, payload, reply[0])
                for reply, (channel, type, _, payload) in zip(replies, prepared)]


def _direct_publish(redis: Any, manager: RedisFanoutManager) -> Deliver:
    """The unbatched cross-node copy: one awaited PUBLISH per event, as before batching."""
    async def deliver(event: Event) -> None:
        await redis.publish(manager.channel, jsonutil.dumpb(
            {"method": "emit", "event": event.type, "data": event.to_wire(), "namespace": "/",
             "room": f"channel:{event.channel}", "host_id": manager.host_id}))
    return deliver


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL"))
    args = parser.parse_args()
    print(f"events per run: {args.events}, history cap: 10000, payload: {len(str(PAYLOAD))} chars, "
          f"publish_many batch: {RELAY_BATCH}")
    show("memory", await measure(MemoryHistory(10_000, 3600), _nothing, _nowhere, args.events, args.concurrency))
    if not args.redis_url:
        print("redis              skipped (no --redis-url or REDIS_URL)")
        return
    await redis_modes(args.redis_url, args.events, args.concurrency)


if __name__ == "__main__":
    asyncio.run(main())
