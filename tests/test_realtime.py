"""The realtime core over real sockets: subscribe and replay, recovery, authorisation, limits,
several nodes on one Redis, presence, the outbox and the REST fallback (faults: test_realtime_faults.py)."""

from __future__ import annotations

import asyncio
import json
import uuid

import asyncpg
import pytest

from db import outbox
from db.pool import POOL, init_connection
from server.app import create_app
from server.realtime.engine import SIO
from server.realtime.hub import REALTIME, publish
from tests.helpers import SocketClient, register, server_url, wait_until


async def connect(client, sockets, namespace: str = "/marketplace", token: str | None = None) -> SocketClient:
    sock = sockets()
    await sock.connect(server_url(client), namespace, token=token)
    return sock


def received(sock: SocketClient, event_type: str) -> list[dict]:
    return [data for _, name, data in sock.events if name == event_type]


async def test_subscribe_acks_latest_id_then_live_events_arrive(client, sockets):
    sock = await connect(client, sockets)
    first = await publish(client.app, "market", "datapod_published", {"n": 0})
    ack = await sock.call("/marketplace", "subscribe", {"channel": "market"})
    assert ack == {"ok": True, "data": {"channel": "market", "latest_id": first.id, "latest_offset": 1,
                                        "epoch": first.epoch, "history_gap": False,
                                        "events": [], "has_more": False, "presence": None}}
    event = await publish(client.app, "market", "datapod_sold", {"datapod_id": "x", "purchase_count": 3})
    await wait_until(lambda: received(sock, "datapod_sold"))
    wire = received(sock, "datapod_sold")[0]
    assert wire == {"id": event.id, "channel": "market", "type": "datapod_sold",
                    "data": {"datapod_id": "x", "purchase_count": 3}, "ts": event.ts,
                    "offset": 2, "epoch": first.epoch}
    assert (await sock.call("/marketplace", "unsubscribe", {"channel": "market"}))["ok"] is True
    await publish(client.app, "market", "datapod_sold", {"after": "unsubscribe"})
    await asyncio.sleep(0.2)
    assert len(received(sock, "datapod_sold")) == 1


async def test_reconnect_with_since_recovers_exactly_the_missed_events(client, sockets):
    sock = await connect(client, sockets)
    ack = await sock.call("/marketplace", "subscribe", {"channel": "market"})
    seen = await publish(client.app, "market", "datapod_updated", {"n": 0})
    await wait_until(lambda: received(sock, "datapod_updated"))
    await sock.close()
    missed = [await publish(client.app, "market", "datapod_updated", {"n": n}) for n in range(1, 6)]
    again = await connect(client, sockets)
    ack = await again.call("/marketplace", "subscribe", {"channel": "market", "since": seen.id})
    assert ack["data"]["history_gap"] is False
    assert [e["id"] for e in ack["data"]["events"]] == [e.id for e in missed]
    assert [e["data"]["n"] for e in ack["data"]["events"]] == [1, 2, 3, 4, 5]
    assert ack["data"]["latest_id"] == missed[-1].id
    assert [e["offset"] for e in ack["data"]["events"]] == [seen.offset + n for n in range(1, 6)]
    live = await publish(client.app, "market", "datapod_updated", {"n": 6})
    await wait_until(lambda: received(again, "datapod_updated"))
    assert [e["id"] for e in received(again, "datapod_updated")] == [live.id]


async def test_since_older_than_the_history_reports_a_gap(aiohttp_client, settings, sockets):
    client = await aiohttp_client(create_app(settings.replace(history_cap=3)))
    old = await publish(client.app, "chain:blocks", "block_added", {"height": 0})
    kept = [await publish(client.app, "chain:blocks", "block_added", {"height": h}) for h in range(1, 5)]
    sock = await connect(client, sockets, "/chain")
    ack = await sock.call("/chain", "subscribe", {"channel": "chain:blocks", "since": old.id})
    assert ack["data"]["history_gap"] is True
    assert [e["id"] for e in ack["data"]["events"]] == [e.id for e in kept[-3:]]
    fine = await sock.call("/chain", "subscribe", {"channel": "chain:blocks", "since": kept[-3].id})
    assert fine["data"]["history_gap"] is False


async def test_channel_authorisation(client, sockets):
    alice, bob = await register(client), await register(client)
    sock = await connect(client, sockets, "/purchases", alice["token"])
    own = await sock.call("/purchases", "subscribe", {"channel": f"user:{alice['user']['id']}"})
    assert own["ok"] is True
    other = await sock.call("/purchases", "subscribe", {"channel": f"user:{bob['user']['id']}"})
    assert other["error"]["code"] == "forbidden" and other["error"]["field"] == "channel"
    unknown = await sock.call("/purchases", "subscribe", {"channel": "market"})
    assert unknown["error"]["code"] == "not_found"
    bad = await sock.call("/purchases", "subscribe", {"channel": f"user:{alice['user']['id']}", "since": "yesterday"})
    assert bad["error"]["code"] == "invalid_payload"
    # Bob's private events never reach Alice.
    await publish(client.app, f"user:{bob['user']['id']}", "purchase_progressed", {"percent": 10})
    mine = await publish(client.app, f"user:{alice['user']['id']}", "purchase_progressed", {"percent": 50})
    await wait_until(lambda: received(sock, "purchase_progressed"))
    await asyncio.sleep(0.1)
    assert [e["id"] for e in received(sock, "purchase_progressed")] == [mine.id]


async def test_conversation_channel_only_for_its_owner(client, sockets, db):
    alice, bob = await register(client), await register(client)
    conversation_id = await db.fetchval(
        "INSERT INTO ai_conversations (user_id, title) VALUES ($1, 'x') RETURNING id",
        uuid.UUID(alice["user"]["id"]))
    channel = f"conversation:{conversation_id}"
    alice_sock = await connect(client, sockets, "/assistant", alice["token"])
    bob_sock = await connect(client, sockets, "/assistant", bob["token"])
    assert (await alice_sock.call("/assistant", "subscribe", {"channel": channel}))["ok"] is True
    refused = await bob_sock.call("/assistant", "subscribe", {"channel": channel})
    assert refused["error"]["code"] == "forbidden"
    missing = await alice_sock.call("/assistant", "subscribe", {"channel": f"conversation:{uuid.uuid4()}"})
    assert missing["error"]["code"] == "forbidden"


async def test_rate_limit_triggers_then_recovers(aiohttp_client, settings, sockets):
    client = await aiohttp_client(create_app(settings.replace(event_rate=5, event_burst=5)))
    sock = await connect(client, sockets)
    replies = [await sock.call("/marketplace", "whoami") for _ in range(8)]
    assert [r["ok"] for r in replies[:5]] == [True] * 5
    limited = replies[5]
    assert limited["error"]["code"] == "rate_limited" and 0 < limited["error"]["retry_after"] <= 1
    await asyncio.sleep(limited["error"]["retry_after"] + 0.05)
    assert (await sock.call("/marketplace", "whoami"))["ok"] is True
    # Another connection was never limited.
    other = await connect(client, sockets)
    assert (await other.call("/marketplace", "whoami"))["ok"] is True
    metrics = await (await client.get("/metrics")).text()
    assert 'hub_rate_limited_total{namespace="/marketplace"} 3.0' in metrics


async def test_channel_and_connection_limits(aiohttp_client, settings, sockets):
    client = await aiohttp_client(create_app(settings.replace(
        max_channels_per_connection=2, max_connections_per_user=2)))
    sock = await connect(client, sockets)
    for category in ("a", "b"):
        assert (await sock.call("/marketplace", "subscribe", {"channel": f"market:category:{category}"}))["ok"]
    again = await sock.call("/marketplace", "subscribe", {"channel": "market:category:a"})
    assert again["ok"] is True  # re-subscribing is not a new channel
    third = await sock.call("/marketplace", "subscribe", {"channel": "market:category:c"})
    assert third["error"]["code"] == "conflict"
    await sock.call("/marketplace", "unsubscribe", {"channel": "market:category:a"})
    assert (await sock.call("/marketplace", "subscribe", {"channel": "market:category:c"}))["ok"]

    token = (await register(client))["token"]
    await connect(client, sockets, "/games", token)
    second = await connect(client, sockets, "/games", token)
    refused = sockets()
    with pytest.raises(Exception):
        await refused.connect(server_url(client), "/games", token=token)
    assert refused.connect_errors[-1]["data"]["code"] == "rate_limited"
    await second.close()
    await asyncio.sleep(0.1)
    await connect(client, sockets, "/games", token)  # a slot is free again


@pytest.fixture
async def two_nodes(aiohttp_client, settings, redis_url):
    """Two server processes' apps sharing one Redis and one database."""
    shared = settings.replace(redis_url=redis_url, redis_prefix=f"t{uuid.uuid4().hex[:12]}:")
    node_a = await aiohttp_client(create_app(shared))
    node_b = await aiohttp_client(create_app(shared))
    return node_a, node_b


async def test_event_published_on_one_node_reaches_clients_of_another(two_nodes, sockets):
    node_a, node_b = two_nodes
    sock = await connect(node_a, sockets, "/chain")
    await sock.call("/chain", "subscribe", {"channel": "chain:blocks"})
    event = await publish(node_b.app, "chain:blocks", "block_added", {"height": 7})
    await wait_until(lambda: received(sock, "block_added"))
    assert received(sock, "block_added") == [event.to_wire()]
    # History is shared too: a client of node B recovers what was published on node A.
    later = await publish(node_a.app, "chain:blocks", "block_added", {"height": 8})
    sock_b = await connect(node_b, sockets, "/chain")
    ack = await sock_b.call("/chain", "subscribe", {"channel": "chain:blocks", "since": event.id})
    assert [e["id"] for e in ack["data"]["events"]] == [later.id]


async def test_a_lone_node_sends_no_copy_for_other_nodes_and_a_node_that_joins_gets_the_next_event(
        aiohttp_client, settings, redis_url, sockets):
    shared = settings.replace(redis_url=redis_url, redis_prefix=f"t{uuid.uuid4().hex[:12]}:")
    node_a = await aiohttp_client(create_app(shared))
    sock_a = await connect(node_a, sockets, "/chain")
    await sock_a.call("/chain", "subscribe", {"channel": "chain:blocks"})
    copies = node_a.app[SIO].manager._outgoing  # the batches of copies for other nodes
    alone = await publish(node_a.app, "chain:blocks", "block_added", {"height": 1})
    await wait_until(lambda: received(sock_a, "block_added"))
    assert alone.peers_listen is False and copies.batches == 0
    node_b = await aiohttp_client(create_app(shared))
    sock_b = await connect(node_b, sockets, "/chain")
    await sock_b.call("/chain", "subscribe", {"channel": "chain:blocks"})
    joined = await publish(node_a.app, "chain:blocks", "block_added", {"height": 2})
    await wait_until(lambda: received(sock_b, "block_added"))
    assert joined.peers_listen is True and copies.batches >= 1
    assert received(sock_b, "block_added") == [joined.to_wire()]
    assert received(sock_a, "block_added") == [alone.to_wire(), joined.to_wire()]


async def test_presence_counts_watchers_across_nodes(two_nodes, sockets):
    node_a, node_b = two_nodes
    channel = f"datapod:{uuid.uuid4()}"
    first = await connect(node_a, sockets)
    assert (await first.call("/marketplace", "subscribe", {"channel": channel}))["data"]["presence"] == 1
    second = await connect(node_b, sockets)
    assert (await second.call("/marketplace", "subscribe", {"channel": channel}))["data"]["presence"] == 2
    await wait_until(lambda: any(e["data"]["count"] == 2 for e in received(first, "presence_changed")))
    await second.close()
    await wait_until(lambda: received(first, "presence_changed")[-1]["data"] ==
                     {"count": 1, "action": "left", "user_id": None})


class Rollback(Exception):
    pass


async def test_outbox_event_committed_before_a_crash_is_published_after_restart(settings, db_dsn, aiohttp_client):
    # The "crashed" process committed two events with their state changes and died before relaying;
    # a third was rolled back with its transaction and must never appear.
    conn = await asyncpg.connect(db_dsn)
    await init_connection(conn)
    try:
        for height in (42, 43):
            async with conn.transaction():
                await outbox.enqueue(conn, "chain:blocks", "block_added", {"height": height})
        with pytest.raises(Rollback):
            async with conn.transaction():
                await outbox.enqueue(conn, "chain:blocks", "block_added", {"height": 666})
                raise Rollback
    finally:
        await conn.close()
    client = await aiohttp_client(create_app(settings))
    realtime = client.app[REALTIME]

    async def heights() -> list[int]:
        return [e.data["height"] for e in (await realtime.replay("chain:blocks", "0-0")).events]

    async def pending() -> int:
        async with client.app[POOL].acquire() as conn:
            return await outbox.pending_count(conn)

    # The relay publishes, then deletes the rows and commits: wait for both.
    for _ in range(200):
        if len(await heights()) >= 2 and await pending() == 0:
            break
        await asyncio.sleep(0.05)
    assert await heights() == [42, 43]
    assert await pending() == 0
    async with client.app[POOL].acquire() as conn:
        # A commit while the relay runs is published too (it is woken by NOTIFY).
        async with conn.transaction():
            await outbox.enqueue(conn, "chain:blocks", "block_added", {"height": 44})
    for _ in range(200):
        if (await heights())[-1] == 44:
            break
        await asyncio.sleep(0.025)
    assert await heights() == [42, 43, 44]


async def test_an_outbox_event_for_several_channels_is_stored_once_and_published_on_each_in_order(client):
    async with client.app[POOL].acquire() as conn:
        async with conn.transaction():
            await outbox.enqueue_many(conn, [(("game:1", "session:7"), "reward_earned", {"n": 1}),
                                             ("session:7", "session_ended", {"n": 2})])
            assert await conn.fetchval("SELECT count(*) FROM event_outbox") == 2
            assert await outbox.pending_count(conn) == 3
    realtime = client.app[REALTIME]

    async def published(channel: str) -> list[tuple[str, int]]:
        return [(e.type, e.data["n"]) for e in (await realtime.replay(channel, "0-0")).events]

    for _ in range(200):
        if len(await published("session:7")) == 2:
            break
        await asyncio.sleep(0.025)
    assert await published("game:1") == [("reward_earned", 1)]
    assert await published("session:7") == [("reward_earned", 1), ("session_ended", 2)]
    async with client.app[POOL].acquire() as conn:
        for channels in (("game:1", "session 7"), ()):
            with pytest.raises(ValueError):
                await outbox.enqueue_many(conn, [(channels, "reward_earned", {"n": 3})])


async def test_rest_history_and_long_poll(client):
    first = await publish(client.app, "market", "datapod_published", {"n": 1})
    everything = await (await client.get("/api/v1/events", params={"channel": "market"})).json()
    assert [e["id"] for e in everything["data"]["events"]] == [first.id]

    async def publish_later():
        await asyncio.sleep(0.3)
        return await publish(client.app, "market", "datapod_published", {"n": 2})

    started = asyncio.get_running_loop().time()
    later, response = await asyncio.gather(publish_later(), client.get(
        "/api/v1/events", params={"channel": "market", "since": first.id, "wait": "10"}))
    body = await response.json()
    assert [e["id"] for e in body["data"]["events"]] == [later.id]
    assert asyncio.get_running_loop().time() - started < 5  # woken by the publish, not the timeout

    quiet = await (await client.get("/api/v1/events", params={
        "channel": "market", "since": later.id, "wait": "0.2"})).json()
    assert quiet["data"]["events"] == [] and quiet["data"]["latest_id"] == later.id

    bad = await client.get("/api/v1/events", params={"channel": "market", "since": later.id, "wait": "999"})
    assert bad.status == 400 and (await bad.json())["error"]["field"] == "wait"


async def test_rest_private_channels_need_the_right_user(client):
    alice, bob = await register(client), await register(client)
    params = {"channel": f"user:{alice['user']['id']}"}
    anonymous = await client.get("/api/v1/events", params=params)
    assert anonymous.status == 401
    other = await client.get("/api/v1/events", params=params,
                             headers={"Authorization": f"Bearer {bob['token']}"})
    assert other.status == 403
    own = await client.get("/api/v1/events", params=params,
                           headers={"Authorization": f"Bearer {alice['token']}"})
    assert own.status == 200


async def read_sse(response, count: int) -> list[dict]:
    """The next `count` SSE messages (comments skipped) as {id, event, data} dicts."""
    messages, current = [], {}
    while len(messages) < count:
        line = (await asyncio.wait_for(response.content.readline(), 5)).decode().rstrip("\n")
        if not line:
            if "event" in current:
                messages.append(current)
            current = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(": ")
            current[name] = value
    return messages


async def test_server_sent_events_resume_after_last_event_id(client):
    events = [await publish(client.app, "chain:blocks", "block_added", {"height": h}) for h in range(3)]
    async with client.get("/api/v1/events/stream", params={"channel": "chain:blocks"},
                          headers={"Last-Event-ID": events[0].id}) as response:
        assert response.headers["Content-Type"] == "text/event-stream"
        replayed = await read_sse(response, 2)
        assert [m["id"] for m in replayed] == [e.id for e in events[1:]]
        assert replayed[0]["event"] == "block_added"
        live = await publish(client.app, "chain:blocks", "block_added", {"height": 3})
        message = (await read_sse(response, 1))[0]
        assert message["id"] == live.id
        assert message["data"] == json.dumps(live.to_wire(), separators=(",", ":"))
