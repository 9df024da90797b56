"""The issue's probes, replayed from outside: reserved events, errors without acks, overflow, NUL
paths, malformed channels, oversized headers. Each answer must be a clear envelope, never a crash."""

from __future__ import annotations

import ast
import asyncio
from pathlib import Path

import pytest

from server.edge.schemas import compile_schema
from server.realtime.engine import SIO
from server.realtime.hub import REALTIME
from tests.helpers import register, server_url

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", ["connect", "disconnect", "connect_error", "disconnecting", "newListener"])
async def test_reserved_event_names_are_refused_with_an_ack(client, sockets, name):
    account = await register(client)
    sock = sockets()
    await sock.connect(server_url(client), "/purchases", token=account["token"])
    connections_before = client.app[REALTIME]._user_connections.copy()
    reply = await sock.call("/purchases", name, {"token": account["token"]})
    assert reply["ok"] is False and reply["error"]["code"] == "invalid_payload"
    assert reply["error"]["field"] == "event"
    # Nothing of connect or disconnect ran: the connection count and the socket are as they were.
    assert client.app[REALTIME]._user_connections == connections_before
    assert (await sock.call("/purchases", "whoami"))["data"]["user_id"] == account["user"]["id"]


async def test_reserved_connect_cannot_exceed_the_connection_limit(client, sockets):
    account = await register(client)
    limit = client.app[REALTIME].limits.max_connections_per_user
    sock = sockets()
    await sock.connect(server_url(client), "/chain", token=account["token"])
    for _ in range(limit + 5):
        await sock.call("/chain", "connect", {"token": account["token"]})
    user_id = account["user"]["id"]
    assert client.app[REALTIME]._user_connections[(user_id, "/chain")] == 1


async def test_internal_errors_get_an_ack(client, sockets, monkeypatch):
    chain = client.app[SIO].namespace_handlers["/chain"]

    async def broken(ctx, payload):
        raise RuntimeError("boom")

    broken.__hub_command__ = chain.on_whoami.__hub_command__
    monkeypatch.setattr(chain, "on_whoami", broken)
    sock = sockets()
    await sock.connect(server_url(client), "/chain")
    reply = await sock.call("/chain", "whoami")
    assert reply == {"ok": False, "error": {"code": "internal_error", "message": "internal error"}}


@pytest.mark.parametrize("packet", [
    '["blocks_since",{"since_height":1180591620717411303424}]',
    '["subscribe",{"channel":"chain:blocks","since_height":1180591620717411303424}]',
    '["blocks_since",{"since_height":5.0}]',
])
async def test_huge_or_fractional_integers_are_invalid_payloads(client, packet):
    # Raw frames: python-socketio's client in this process would encode with the server's orjson.
    async with client.session.ws_connect(client.make_url("/socket.io/?EIO=4&transport=websocket")) as ws:
        await ws.receive_str()  # OPEN
        await ws.send_str("40/chain,")
        assert (await ws.receive_str()).startswith("40/chain,")
        await ws.send_str(f"42/chain,9{packet}")
        reply = await asyncio.wait_for(ws.receive_str(), 5)
    assert reply.startswith("43/chain,9[") and '"invalid_payload"' in reply and '"since_height"' in reply


@pytest.mark.parametrize("query", ["before_height=99999999999999999999", "before_height=2147483648",
                                   "before_height=%D9%A3", "before_height=" + "9" * 5000])
async def test_out_of_range_query_integers_are_invalid_payloads(client, query):
    response = await client.get(f"/api/v1/blocks?{query}")
    body = await response.json()
    assert response.status == 400 and body["error"]["code"] == "invalid_payload"
    assert body["error"]["field"] == "before_height"


def test_every_integer_schema_has_a_maximum():
    with pytest.raises(ValueError, match="without a maximum"):
        compile_schema({"type": "object", "properties": {"n": {"type": "integer", "minimum": 0}}})


@pytest.mark.parametrize("path", ["/%00", "/static%00.js", "/a%01b", "/index.html%00"])
async def test_control_characters_in_a_path_are_not_found(client, path):
    response = await client.get(path)
    body = await response.json()
    assert response.status == 404 and body["error"]["code"] == "not_found"


@pytest.mark.parametrize("channel", ["dao:abc", "dao:99999999999999999999", "dao:2147483648", "dao:01",
                                     "game:-1", "datapod:not-a-uuid", "datapod:7A3F0D1E-0000-4000-8000-000000000000"])
async def test_malformed_channel_ids_are_refused(client, sockets, channel):
    account = await register(client)
    sock = sockets()
    namespace = "/chain" if channel.startswith("dao:") else "/games" if channel.startswith("game:") else "/marketplace"
    await sock.connect(server_url(client), namespace, token=account["token"])
    reply = await sock.call(namespace, "subscribe", {"channel": channel})
    assert reply["ok"] is False and reply["error"]["code"] == "not_found"


async def test_well_formed_channel_ids_still_subscribe(client, sockets):
    account = await register(client)
    sock = sockets()
    await sock.connect(server_url(client), "/chain", token=account["token"])
    assert (await sock.call("/chain", "subscribe", {"channel": "dao:2147483647"}))["ok"] is True


@pytest.mark.parametrize("size", [9_000, 70_000])
async def test_oversized_headers_get_the_envelope(client, size):
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(b"GET /api/v1/me HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + b"a" * size + b"\r\n\r\n")
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.split(b" ")[1] == b"431" and b"application/json" in head
    assert b'"code":"payload_too_large"' in body


async def test_garbage_instead_of_http_gets_the_envelope(client):
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(b"\x16\x03\x01\x02\x00 not http at all\r\n\r\n")
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    assert raw.split(b" ")[1] == b"400" and b'"code":"invalid_payload"' in raw


def test_no_log_call_passes_event_as_a_keyword():
    """structlog's first argument is the event: an `event=` keyword raises TypeError in the error path."""
    offenders = []
    for path in [*ROOT.glob("server/**/*.py"), *ROOT.glob("handlers/*.py"), *ROOT.glob("db/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "log"
                    and any(keyword.arg == "event" for keyword in node.keywords)):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []
