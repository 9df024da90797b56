"""Socket.IO over real websockets: authenticated connect, dispatcher validation, error acks."""

from __future__ import annotations

import jwt
import pytest
import socketio

from db import auth as auth_queries
from db.pool import POOL
from server.services.auth import AUTH
from tests.helpers import SocketClient, register, server_url, wait_until


@pytest.fixture
async def sock():
    client = SocketClient()
    yield client
    await client.close()


@pytest.mark.parametrize("namespace", ["/assistant", "/purchases"])
async def test_private_namespaces_refuse_anonymous_connections(client, sock, namespace):
    with pytest.raises(socketio.exceptions.ConnectionError):
        await sock.connect(server_url(client), namespace)
    assert sock.connect_errors[-1]["data"]["code"] == "unauthorized"


async def test_bad_token_is_refused_even_where_anonymous_is_allowed(client, sock):
    with pytest.raises(socketio.exceptions.ConnectionError):
        await sock.connect(server_url(client), "/marketplace", token="garbage")
    assert sock.connect_errors[-1] == {
        "message": "the token is invalid",
        "data": {"code": "unauthorized", "message": "the token is invalid"}}


async def test_revoked_session_cannot_connect(client, sock):
    token = (await register(client))["token"]
    await client.post("/api/v1/auth/logout", headers={"Authorization": f"Bearer {token}"})
    with pytest.raises(socketio.exceptions.ConnectionError):
        await sock.connect(server_url(client), "/purchases", token=token)
    assert sock.connect_errors[-1]["data"]["code"] == "unauthorized"


async def test_authenticated_and_anonymous_identities(client, sock):
    data = await register(client)
    await sock.connect(server_url(client), "/purchases", token=data["token"])
    assert await sock.call("/purchases", "whoami") == {
        "ok": True, "data": {"user_id": data["user"]["id"], "is_admin": False}}
    anonymous = SocketClient()
    try:
        await anonymous.connect(server_url(client), "/chain")
        assert (await anonymous.call("/chain", "whoami"))["data"]["user_id"] is None
    finally:
        await anonymous.close()


async def test_unknown_event_and_bad_payload_get_error_acks(client, sock):
    await sock.connect(server_url(client), "/marketplace")
    unknown = await sock.call("/marketplace", "launch_rockets", {})
    assert unknown["ok"] is False and unknown["error"]["code"] == "not_found"
    bad = await sock.call("/marketplace", "whoami", "a string")
    assert bad["ok"] is False and bad["error"]["code"] == "invalid_payload"
    # The connection survives errors.
    assert (await sock.call("/marketplace", "whoami"))["ok"] is True


async def test_oversized_socket_payload_is_refused(aiohttp_client, settings, sock):
    from server.app import create_app

    client = await aiohttp_client(create_app(settings.replace(max_payload_bytes=1024)))
    await sock.connect(server_url(client), "/marketplace")
    reply = await sock.call("/marketplace", "whoami", {"blob": "x" * 1500})
    assert reply["error"]["code"] == "payload_too_large"


async def test_logout_closes_the_open_sockets_of_that_session(client, sock):
    data = await register(client)
    await sock.connect(server_url(client), "/purchases", token=data["token"])
    assert (await sock.call("/purchases", "whoami"))["data"]["user_id"] == data["user"]["id"]
    await client.post("/api/v1/auth/logout", headers={"Authorization": f"Bearer {data['token']}"})
    assert await sock.wait_for("signed_out") == {"reason": "logged_out"}
    await wait_until(lambda: "/purchases" not in sock.sio.namespaces)


async def test_a_session_ended_behind_an_open_socket_stops_its_commands(client, sock):
    """Even when the end never reached the socket (no disconnect), its next command checks the session."""
    data = await register(client)
    await sock.connect(server_url(client), "/purchases", token=data["token"])
    session_id = jwt.decode(data["token"], options={"verify_signature": False})["sid"]
    async with client.app[POOL].acquire() as conn:
        await auth_queries.end_session(conn, session_id, "revoked")  # the database only: no notice sent
    client.app[AUTH].sessions.forget(session_id)
    reply = await sock.call("/purchases", "subscribe", {"channel": f"user:{data['user']['id']}"})
    assert reply["error"]["code"] == "unauthorized"
    assert "/purchases" in sock.sio.namespaces


async def test_metrics_count_connections_and_events(client, sock):
    await sock.connect(server_url(client), "/games")
    await sock.call("/games", "whoami")
    text = await (await client.get("/metrics")).text()
    assert 'hub_socket_connections{namespace="/games"} 1.0' in text
    assert 'hub_events_in_total{event="whoami",namespace="/games",outcome="ok"} 1.0' in text
    assert "hub_handler_seconds_bucket" in text
    assert 'hub_db_pool_connections{state="max"}' in text
