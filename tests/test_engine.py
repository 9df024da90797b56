"""The lean Engine.IO server (server/realtime/engine.py) over real sockets: one task per idle websocket, no
queue kept, pings from a timer, a silent client dropped, the environ trimmed, upgrades from polling
moving onto the direct path, server-side disconnects, broadcasts that leave the cyclic GC alone, and
long-polls answered when their socket closes."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import aiohttp
import socketio
from aiohttp import web

from server.realtime.engine import KEPT_ENVIRON_KEYS, LeanSocket, SocketServer
from server.realtime.fanout import FanoutManager
from tests.helpers import raw_socketio_websocket, wait_until

# The tasks aiohttp itself keeps per open connection (its protocol loop and the request handler).
AIOHTTP_TASKS = {"RequestHandler.start", "RequestHandler._handle_request"}


async def serve(aiohttp_server, sio: socketio.AsyncServer) -> str:
    app = web.Application()
    sio.attach(app, socketio_path="socket.io")
    server = await aiohttp_server(app)
    return str(server.make_url("/")).rstrip("/")


def task_names() -> list[str]:
    return [getattr(t.get_coro(), "__qualname__", "?") for t in asyncio.all_tasks()]


async def idle_tasks_per_connection(aiohttp_server, sio: socketio.AsyncServer) -> set[str]:
    """The kinds of task that 10 idle websocket connections add to the server's loop."""
    url = await serve(aiohttp_server, sio)
    before = set(task_names())
    async with aiohttp.ClientSession() as session:
        clients = [await raw_socketio_websocket(session, url) for _ in range(10)]
        await asyncio.sleep(0.1)
        added = [name for name in task_names() if name not in before]
        for ws, _, _ in clients:
            await ws.close()
    return {name for name in added if added.count(name) >= 10}


async def test_an_idle_websocket_costs_only_aiohttp_tasks(aiohttp_server):
    lean = SocketServer(async_mode="aiohttp", client_manager=FanoutManager(), logger=False,
                        engineio_logger=False)
    assert await idle_tasks_per_connection(aiohttp_server, lean) == AIOHTTP_TASKS
    # python-engineio's own socket adds a writer, a reader per message and a sleeping ping task.
    bare = socketio.AsyncServer(async_mode="aiohttp", logger=False, engineio_logger=False)
    assert await idle_tasks_per_connection(aiohttp_server, bare) > AIOHTTP_TASKS


async def test_open_websocket_keeps_no_queue_and_a_trimmed_environ(aiohttp_server):
    sio = SocketServer(async_mode="aiohttp", logger=False, engineio_logger=False)
    seen: dict[str, Any] = {}

    @sio.on("connect")
    async def connect(sid, environ, auth=None):
        seen["environ"] = environ

    url = await serve(aiohttp_server, sio)
    async with aiohttp.ClientSession(headers={"X-Client-Build": "1234"}) as session:
        ws, eio_sid, _ = await raw_socketio_websocket(session, url)
        sock = sio.eio.sockets[eio_sid]
        assert isinstance(sock, LeanSocket) and sock.link is not None
        assert sock._queue is None
        environ = seen["environ"]
        assert set(environ) <= set(KEPT_ENVIRON_KEYS) and "QUERY_STRING" in environ
        # Every header is still there, on the request.
        assert environ["aiohttp.request"].headers["X-Client-Build"] == "1234"
        await ws.close()


async def test_pings_keep_a_client_and_silence_drops_it(aiohttp_server):
    sio = SocketServer(async_mode="aiohttp", ping_interval=0.2, ping_timeout=0.3, logger=False,
                       engineio_logger=False)
    url = await serve(aiohttp_server, sio)
    async with aiohttp.ClientSession() as session:
        ws, eio_sid, _ = await raw_socketio_websocket(session, url)
        pings = 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 1.2
        while loop.time() < deadline:
            try:
                text = await ws.receive_str(timeout=deadline - loop.time())
            except asyncio.TimeoutError:
                break
            assert text == "2"
            pings += 1
            await ws.send_str("3")
        assert pings >= 4
        assert eio_sid in sio.eio.sockets

        # Stop answering: past ping_timeout the server drops the socket, and once nothing has come
        # for ping_interval + ping_timeout it closes the websocket (as python-engineio does).
        while True:
            msg = await ws.receive(timeout=5)
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
            assert msg.data == "2"
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)

        await wait_until(lambda: eio_sid not in sio.eio.sockets, timeout=5)


async def test_upgrade_from_polling_moves_onto_the_direct_path(aiohttp_server):
    sio = SocketServer(async_mode="aiohttp", client_manager=FanoutManager(), logger=False,
                       engineio_logger=False)
    url = await serve(aiohttp_server, sio)
    client = socketio.AsyncClient(reconnection=False)
    got: list[Any] = []
    gone = asyncio.Event()
    client.on("seq", got.append)
    client.on("disconnect", lambda *args: gone.set())
    await client.connect(url, transports=["polling", "websocket"], wait_timeout=5)
    eio_sid = sio.manager.eio_sid_from_sid(client.get_sid(), "/")

    await wait_until(lambda: sio.eio.sockets[eio_sid].link is not None, timeout=5)
    assert client.transport() == "websocket"
    for seq in range(20):
        await sio.emit("seq", seq)
    await sio.disconnect(client.get_sid())
    await asyncio.wait_for(gone.wait(), 5)
    assert got == list(range(20))

    await wait_until(lambda: eio_sid not in sio.eio.sockets, timeout=5)
    await client.disconnect()


async def test_a_broadcast_allocates_nothing_the_gc_tracks_per_recipient(aiohttp_server):
    # Python's cyclic GC runs when tracked allocations outnumber frees by 700; a list per recipient
    # made every broadcast to a big room set off a collection (and, in turn, full ones: 50 ms
    # pauses with 1,000 connections).
    sio = SocketServer(async_mode="aiohttp", client_manager=FanoutManager(), logger=False,
                       engineio_logger=False)
    url = await serve(aiohttp_server, sio)
    recipients = 200
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        clients = [await raw_socketio_websocket(session, url) for _ in range(recipients)]
        gc.collect()
        gc.disable()
        try:
            before = gc.get_count()[0]
            # Nothing is written until the loop iteration ends, so every frame is still held here.
            await sio.emit("tick", {"n": 1})
            held = gc.get_count()[0] - before
        finally:
            gc.enable()
        assert held < recipients // 4, held
        await sio.emit("tick", {"n": 2})  # a second frame in the same iteration: written after
        for ws, _, _ in clients:
            assert await ws.receive_str(timeout=5) == '42["tick",{"n":1}]'
            assert await ws.receive_str(timeout=5) == '42["tick",{"n":2}]'
            await ws.close()


def handler_tasks() -> int:
    """How many aiohttp request handlers are running (a long-poll is one until it is answered)."""
    return task_names().count("RequestHandler._handle_request")


async def test_a_polling_client_that_leaves_releases_its_long_poll(aiohttp_server):
    # aiohttp does not cancel a handler whose client went away, so a GET left waiting for
    # packets would linger for ping_interval + ping_timeout and hold graceful shutdown as long.
    sio = SocketServer(async_mode="aiohttp", client_manager=FanoutManager(), logger=False,
                       engineio_logger=False, ping_interval=20, ping_timeout=20)
    url = await serve(aiohttp_server, sio)
    baseline = handler_tasks()
    client = socketio.AsyncClient(reconnection=False)
    await client.connect(url, transports=["polling"], wait_timeout=5)
    eio_sid = sio.manager.eio_sid_from_sid(client.get_sid(), "/")
    await wait_until(lambda: handler_tasks() > baseline, timeout=5)  # the client's long-poll
    # The client's disconnect returns once its pending GET is answered: unreleased, that is only
    # when the next ping goes out, 20 s on.
    await asyncio.wait_for(client.disconnect(), 5)

    await wait_until(lambda: eio_sid not in sio.eio.sockets, timeout=5)
    await wait_until(lambda: handler_tasks() == baseline, timeout=5)
