"""Shutdown within its deadline (issue 15): a real server process with websocket and polling clients,
and a second node on the same Redis, gets SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
import uuid

import aiohttp

from server.app import create_app
from server.core import jsonutil
from tests.helpers import free_port, raw_socketio_websocket, server_url

SHUTDOWN_TIMEOUT = 10.0
NAMESPACE = "/marketplace"
SHUTDOWN_NOTICE = f'42{NAMESPACE},["server_shutdown",{{"reconnect":true}}]'
ENGINEIO_CLOSE = "1"
POLLING_SEPARATOR = "\x1e"


async def start_node(env: dict[str, str]) -> tuple[asyncio.subprocess.Process, str]:
    """`python -m server serve` with this environment, once /readyz answers 200: (process, base URL)."""
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "server", "serve", "--no-demo-data", env={**os.environ, **env, "PORT": str(port)},
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as http:
        for _ in range(300):
            try:
                async with http.get(base + "/readyz") as response:
                    if response.status == 200:
                        return proc, base
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    proc.kill()
    raise AssertionError("the server did not become ready")


async def websocket_on_namespace(session: aiohttp.ClientSession, base: str) -> aiohttp.ClientWebSocketResponse:
    """A raw websocket connected to NAMESPACE (besides "/")."""
    ws, _, _ = await raw_socketio_websocket(session, base)
    await ws.send_str(f"40{NAMESPACE},")
    assert (await ws.receive_str(timeout=5)).startswith(f"40{NAMESPACE},{{")
    return ws


async def polling_on_namespace(session: aiohttp.ClientSession, base: str) -> str:
    """A raw long-polling Engine.IO connection on NAMESPACE: the URL to poll."""
    url = base + "/socket.io/?EIO=4&transport=polling"
    async with session.get(url) as response:
        sid = jsonutil.loads((await response.text())[1:])["sid"]
    url += f"&sid={sid}"
    async with session.post(url, data=f"40{NAMESPACE},") as response:
        assert response.status == 200
    async with session.get(url) as response:
        assert (await response.text()).startswith(f"40{NAMESPACE},{{")
    return url


async def until_closed(ws: aiohttp.ClientWebSocketResponse) -> tuple[list[str], aiohttp.WSMessage, float]:
    """Read to the end: (texts, the message that ended it, when it came)."""
    texts = []
    while True:
        msg = await ws.receive(timeout=2 * SHUTDOWN_TIMEOUT)
        if msg.type != aiohttp.WSMsgType.TEXT:
            return texts, msg, time.monotonic()
        texts.append(msg.data)


async def test_sigterm_closes_every_connection_at_once_and_exits_within_the_timeout(
        db_dsn, tmp_path, redis_url, settings, aiohttp_client, sockets):
    prefix = f"shutdown-{uuid.uuid4().hex[:8]}:"
    proc, base = await start_node({
        "DATABASE_URL": db_dsn, "REDIS_URL": redis_url, "REDIS_PREFIX": prefix, "DATA_DIR": str(tmp_path),
        "JWT_SECRET": "j" * 43, "MASTER_KEY": "m" * 43, "SHUTDOWN_TIMEOUT": str(SHUTDOWN_TIMEOUT)})
    # Another node on the same Redis, whose client must not be told to leave.
    other = await aiohttp_client(create_app(settings.replace(redis_url=redis_url, redis_prefix=prefix,
                                                             master_key="m" * 43)))  # one cluster, one key
    bystander = sockets()
    await bystander.connect(server_url(other), NAMESPACE)
    try:
        async with aiohttp.ClientSession() as session:
            websockets = [await websocket_on_namespace(session, base) for _ in range(3)]
            poll_url = await polling_on_namespace(session, base)
            readers = [asyncio.create_task(until_closed(ws)) for ws in websockets]

            async def long_poll() -> list[str]:
                async with session.get(poll_url) as response:
                    return (await response.text()).split(POLLING_SEPARATOR)
            poll = asyncio.create_task(long_poll())
            await asyncio.sleep(0.2)  # the long-poll is waiting on the server

            sent = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 2 * SHUTDOWN_TIMEOUT) == 0
            exited = time.monotonic() - sent
            for texts, last, when in await asyncio.gather(*readers):
                assert texts == [SHUTDOWN_NOTICE, ENGINEIO_CLOSE]
                assert (last.type, last.data, last.extra) == (aiohttp.WSMsgType.CLOSE, 1001, "server shutting down")
                # Closed in the first step of the shutdown, not when aiohttp gives up on the handler.
                assert when - sent < SHUTDOWN_TIMEOUT / 4
            assert await poll == [SHUTDOWN_NOTICE, ENGINEIO_CLOSE]
        assert exited < SHUTDOWN_TIMEOUT

        # Anything the stopped node published reached the other node before this presence notice.
        channel = f"datapod:{uuid.uuid4()}"
        assert (await bystander.call(NAMESPACE, "subscribe", {"channel": channel}))["ok"] is True
        await bystander.wait_for("presence_changed")
        assert [name for _, name, _ in bystander.events] == ["presence_changed"]
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
