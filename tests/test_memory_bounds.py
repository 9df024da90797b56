"""Memory a node keeps does not grow with the requests it serves: caches forget, labels stay few, the heap
gives its free pages back."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from aiohttp import web

from db.pool import POOL
from server.app import create_app
from server.core.cache import ExpiringCache
from server.core.memory import HEAP_TRIM_SUPPORTED, trim_heap
from server.core.metrics import METRICS
from server.services.auth import AUTH
from tests.helpers import register, server_url

# TTLs of half a second and the process's RSS: `make test` runs these alone, after the parallel pass.
pytestmark = pytest.mark.serial

SESSION_TTL = 0.5
BATCH = 30


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


async def _new_session_tokens(app: web.Application, user_id: uuid.UUID, count: int) -> list[str]:
    """Sign the same user in `count` times (each sign-in is a new session), without argon2 each time."""
    async with app[POOL].acquire() as conn:
        return [(await app[AUTH].start_session(conn, user_id, ip_address=None, device_info=None)).token
                for _ in range(count)]


async def test_session_cache_forgets_sessions_checked_longer_ago_than_its_ttl(settings, aiohttp_client):
    client = await aiohttp_client(create_app(settings.replace(session_cache_ttl=SESSION_TTL)))
    user_id = uuid.UUID((await register(client))["user"]["id"])
    cache = client.app[AUTH].sessions
    for batch in range(3):
        for token in await _new_session_tokens(client.app, user_id, BATCH):
            response = await client.get("/api/v1/me", headers=bearer(token))
            assert response.status == 200
        # The sign-ins of earlier batches have expired; only this batch's may still be cached.
        assert len(cache) <= BATCH, f"batch {batch}: {len(cache)} sessions cached"
        await asyncio.sleep(SESSION_TTL * 1.2)


def test_expiring_cache_drops_expired_entries_and_the_oldest_past_its_bound():
    now = [0.0]
    cache: ExpiringCache[int, str] = ExpiringCache(10.0, 3, clock=lambda: now[0])
    for key in range(3):
        cache.put(key, f"v{key}")
    cache.put(3, "v3")  # full: the oldest goes
    assert [cache.get(key) for key in range(4)] == [None, "v1", "v2", "v3"]
    now[0] = 5.0
    cache.put(1, "v1 again")  # a put renews the entry (until 15.0): 2 is now the oldest
    now[0] = 10.5
    cache.put(4, "v4")  # 2 and 3 expired at 10.0 and are dropped
    assert len(cache) == 2 and (cache.get(1), cache.get(4)) == ("v1 again", "v4")
    now[0] = 16.0
    assert (cache.get(1), cache.get(4)) == (None, "v4")


async def test_metric_label_sets_do_not_grow_with_distinct_paths_and_events(client, sockets):
    """Labels are route templates and known event names, never what a caller typed."""
    def label_sets() -> set[tuple[str, tuple]]:
        return {(sample.name, tuple(sorted(sample.labels.items())))
                for family in client.app[METRICS].registry.collect() for sample in family.samples}

    async def traffic(tag: str) -> None:
        for n in range(20):
            await client.get(f"/api/v1/no-such-route-{tag}-{n}")
            await client.get(f"/api/v1/transactions/{tag}{n:060d}")
        sock = sockets()
        await sock.connect(server_url(client), "/chain")
        for n in range(20):
            await sock.call("/chain", f"no_such_event_{tag}_{n}", {})
        await sock.close()

    await traffic("a")
    before = label_sets()
    await traffic("b")
    assert label_sets() == before


@pytest.mark.skipif(not HEAP_TRIM_SUPPORTED, reason="malloc_trim is glibc's")
def test_trim_heap_returns_free_pages_that_live_blocks_pin():
    def rss() -> int:
        with open(f"/proc/{os.getpid()}/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))

    # 64 KiB blocks come from the heap (below the mmap threshold); a small block after each one
    # stays alive, so the freed space is not at the heap's top and glibc keeps it without a trim.
    freed, pinned = [], []
    for _ in range(1000):
        freed.append(bytes(64 * 1024))
        pinned.append(bytearray(600))
    filled = rss()
    del freed
    trim_heap()
    assert rss() < filled - 32 * 2**20
    del pinned


GC_PROBE = """
import gc, weakref
from server.core.memory import FULL_COLLECTION_AFTER, tune_garbage_collector
import server.app  # what `serve` has loaded when it tunes

tune_garbage_collector()
print(gc.get_freeze_count(), gc.get_threshold() == (700, 10, FULL_COLLECTION_AFTER))

class Node:
    pass

# A cycle that lived long enough to reach the oldest generation, then became garbage.
cycle = Node()
cycle.self = cycle
collected = []
weakref.finalize(cycle, collected.append, True)
gc.collect(1)
gc.collect(1)
del cycle
kept = []
for allocated in range(1, 20_000_001):
    kept.append([])
    if collected:
        break
print(allocated if collected else None)
"""


def test_the_server_freezes_its_startup_heap_and_still_runs_full_collections():
    # In a process of its own: the probe changes the collector of the process it runs in.
    run = subprocess.run([sys.executable, "-c", GC_PROBE], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parent.parent)
    assert run.returncode == 0, run.stderr
    frozen, thresholds, allocated = run.stdout.split()
    assert int(frozen) > 50_000 and thresholds == "True"
    # Old cyclic garbage waits for a full collection: after about 700 * 10 * 100 new objects, not never.
    assert allocated != "None" and 700 * 10 * 10 < int(allocated) < 700 * 10 * 100 * 3
