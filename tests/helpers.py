"""Small helpers shared by tests: accounts and Socket.IO clients."""

from __future__ import annotations

import asyncio
import inspect
import socket
import uuid
from typing import Any

import socketio

from server.core import jsonutil


async def raw_socketio_websocket(session, url: str, **ws_options: Any) -> tuple[Any, str, str]:
    """A websocket doing the Engine.IO and Socket.IO handshakes by hand: (ws, Engine.IO sid, sid)."""
    ws = await session.ws_connect(url.replace("http", "ws", 1) + "/socket.io/?EIO=4&transport=websocket",
                                  **ws_options)
    opened = await ws.receive_str(timeout=5)
    assert opened.startswith("0{"), opened
    await ws.send_str("40")
    connected = await ws.receive_str(timeout=5)
    assert connected.startswith("40{"), connected
    return ws, jsonutil.loads(opened[1:])["sid"], jsonutil.loads(connected[2:])["sid"]


async def register(client, username: str | None = None, password: str = "correct horse battery") -> dict:
    """Register a user through the real API; returns the envelope's data (token, user)."""
    username = username or f"u{uuid.uuid4().hex[:10]}"
    response = await client.post("/api/v1/auth/register", json={
        "username": username, "email": f"{username}@example.org", "password": password})
    body = await response.json()
    assert response.status == 201, body
    return body["data"]


async def register_seller(client, username: str | None = None) -> dict:
    """Register a user whose KYC is Approved, so they may publish DataPods for sale."""
    from db import kyc as kyc_queries
    from db.pool import POOL

    account = await register(client, username)
    async with client.app[POOL].acquire() as conn:
        await kyc_queries.set_user_status(conn, uuid.UUID(account["user"]["id"]), kyc_queries.APPROVED)
    account["user"]["kyc_status"] = kyc_queries.APPROVED
    return account


async def wait_until(predicate, timeout: float = 15.0, interval: float = 0.01) -> None:
    """Poll a condition (a plain or async function) until it holds; TimeoutError after `timeout` s."""
    async def poll():
        while True:
            result = predicate()
            if inspect.isawaitable(result):
                result = await result
            if result:
                return
            await asyncio.sleep(interval)
    await asyncio.wait_for(poll(), timeout)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_url(client) -> str:
    """The http:// base URL of an aiohttp test client's server."""
    return str(client.make_url("/")).rstrip("/")


class SocketClient:
    """A python-socketio client that records events and connection errors."""

    def __init__(self) -> None:
        self.sio = socketio.AsyncClient(reconnection=False)
        self.events: list[tuple[str, str, Any]] = []
        self.connect_errors: list[Any] = []

        @self.sio.on("*", namespace="*")
        async def catch_all(event, namespace, data=None):
            self.events.append((namespace, event, data))

        @self.sio.on("connect_error", namespace="*")
        async def connect_error(namespace, data=None):
            self.connect_errors.append(data)

    async def connect(self, url: str, namespace: str, token: str | None = None) -> None:
        """Connect over websocket to one namespace."""
        await self.sio.connect(url, namespaces=[namespace], transports=["websocket"],
                               auth={"token": token} if token else None, wait_timeout=5)

    async def call(self, namespace: str, event: str, payload: Any = None) -> dict:
        """Emit with an ack and return the envelope."""
        return await self.sio.call(event, payload, namespace=namespace, timeout=5)

    async def wait_for(self, event: str, timeout: float = 5.0) -> Any:
        """Wait until an event arrives; return its data."""
        async def poll():
            while True:
                for _, name, data in self.events:
                    if name == event:
                        return data
                await asyncio.sleep(0.01)
        return await asyncio.wait_for(poll(), timeout)

    async def close(self) -> None:
        """Disconnect if connected."""
        if self.sio.connected:
            await self.sio.disconnect()
