"""The official socket.io-client (Node) against the hub: auth, subscribe, ack, live, recovery."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any, Callable

import pytest

from server.realtime.hub import publish
from tests.helpers import register, server_url

NODE_DIR = Path(__file__).parent / "node"


class NodeClient:
    """tests/node/interop.mjs as a subprocess: JSON commands in, JSON lines out."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    @classmethod
    async def start(cls) -> "NodeClient":
        node = shutil.which("node")
        assert node, "Node.js is required for the interop test (see README)"
        assert (NODE_DIR / "node_modules" / "socket.io-client").is_dir(), \
            "run `make test` (it installs tests/node with npm ci)"
        process = await asyncio.create_subprocess_exec(
            node, str(NODE_DIR / "interop.mjs"), stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE)
        return cls(process)

    async def send(self, **command: Any) -> None:
        self.process.stdin.write(json.dumps(command).encode() + b"\n")
        await self.process.stdin.drain()

    async def expect(self, predicate: Callable[[dict], bool], timeout: float = 10.0) -> dict:
        async def read() -> dict:
            while True:
                line = await self.process.stdout.readline()
                if not line:
                    raise AssertionError("the node client exited")
                message = json.loads(line)
                if predicate(message):
                    return message
        return await asyncio.wait_for(read(), timeout)

    async def close(self) -> None:
        if self.process.returncode is None:
            self.process.stdin.close()
            try:
                await asyncio.wait_for(self.process.wait(), 5)
            except asyncio.TimeoutError:
                self.process.kill()
                await self.process.wait()


@pytest.fixture
async def node_client():
    client = await NodeClient.start()
    yield client
    await client.close()


async def test_official_client_connects_subscribes_and_recovers(client, node_client):
    user = await register(client)
    channel = f"user:{user['user']['id']}"
    url = server_url(client)

    await node_client.send(cmd="connect", url=url, namespace="/purchases", token="not a token")
    refused = await node_client.expect(lambda m: "connect_error" in m)
    assert refused["connect_error"]["data"]["code"] == "unauthorized"

    await node_client.send(cmd="connect", url=url, namespace="/purchases", token=user["token"])
    await node_client.expect(lambda m: "connected" in m)
    await node_client.send(cmd="subscribe", channel=channel)
    ack = (await node_client.expect(lambda m: "ack" in m))["ack"]
    assert ack["ok"] is True and ack["data"]["channel"] == channel

    seen = await publish(client.app, channel, "purchase_progressed", {"step": "payment_verifying", "percent": 10})
    live = await node_client.expect(lambda m: m.get("event") == "purchase_progressed")
    assert live["data"] == seen.to_wire()

    await node_client.send(cmd="disconnect")
    await node_client.expect(lambda m: "disconnected" in m)
    missed = [await publish(client.app, channel, "purchase_progressed", {"percent": p}) for p in (40, 70, 100)]

    await node_client.send(cmd="connect", url=url, namespace="/purchases", token=user["token"])
    await node_client.expect(lambda m: "connected" in m)
    await node_client.send(cmd="subscribe", channel=channel, since=seen.id)
    ack = (await node_client.expect(lambda m: "ack" in m))["ack"]
    assert ack["data"]["history_gap"] is False
    assert [e["id"] for e in ack["data"]["events"]] == [e.id for e in missed]
    assert [e["data"]["percent"] for e in ack["data"]["events"]] == [40, 70, 100]

    forbidden_channel = "user:00000000-0000-0000-0000-000000000000"
    await node_client.send(cmd="subscribe", channel=forbidden_channel)
    refused_ack = (await node_client.expect(lambda m: "ack" in m))["ack"]
    assert refused_ack == {"ok": False, "error": {"code": "forbidden", "field": "channel",
                                                  "message": f"you may not watch '{forbidden_channel}'"}}
