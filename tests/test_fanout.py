"""The fan-out fast path (server/realtime/fanout.py) over real sockets: ordering, targeting, binary, polling,
Redis across two servers, and slow-consumer eviction. Correctness only, nothing is timed."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import uuid
from typing import Any, AsyncIterator

import aiohttp
import pytest
import socketio
from aiohttp import web
from socketio.async_pubsub_manager import AsyncPubSubManager

from server.core import jsonutil
from server.realtime.engine import SocketServer
from server.realtime.fanout import (
    SEND_QUEUE_OVERFLOWED_DATA,
    SEND_QUEUE_OVERFLOWED_EVENT,
    FanoutManager,
    FanoutMixin,
    RedisFanoutManager,
    create_client_manager,
)
from tests.helpers import raw_socketio_websocket, wait_until

# Slow consumers are told apart by timing (close_grace, kernel buffers): `make test` runs these alone.
pytestmark = pytest.mark.serial

NAMESPACES = ("/", "/other")


class Hub:
    """A bare Socket.IO server on a real aiohttp server; every connection joins room "all"."""

    def __init__(self, sio: socketio.AsyncServer, url: str) -> None:
        self.sio = sio
        self.url = url


async def start_hub(aiohttp_server, manager: socketio.AsyncManager) -> Hub:
    sio = SocketServer(async_mode="aiohttp", client_manager=manager, json=jsonutil,
                       logger=False, engineio_logger=False)
    for namespace in NAMESPACES:
        def handlers(ns: str) -> None:
            @sio.on("connect", namespace=ns)
            async def connect(sid, environ, auth=None):
                await sio.enter_room(sid, "all", namespace=ns)

            @sio.on("join", namespace=ns)
            async def join(sid, room):
                await sio.enter_room(sid, room, namespace=ns)
                return True
        handlers(namespace)
    app = web.Application()
    sio.attach(app, socketio_path="socket.io")
    server = await aiohttp_server(app)
    return Hub(sio, str(server.make_url("/")).rstrip("/"))


class Recorder:
    """A python-socketio client recording (namespace, event, args) in arrival order."""

    def __init__(self) -> None:
        self.sio = socketio.AsyncClient(reconnection=False)
        self.events: list[tuple[str, str, Any]] = []

        @self.sio.on("*", namespace="*")
        async def catch_all(event, namespace, *args):
            self.events.append((namespace, event, args[0] if len(args) == 1 else args))

    async def connect(self, url: str, namespaces=("/",), transports=("websocket",)) -> None:
        await self.sio.connect(url, namespaces=list(namespaces), transports=list(transports),
                               wait_timeout=5)

    def sid(self, namespace: str = "/") -> str:
        return self.sio.get_sid(namespace)

    def data(self, event: str, namespace: str = "/") -> list[Any]:
        return [d for ns, e, d in self.events if e == event and ns == namespace]

    async def join(self, room: str, namespace: str = "/") -> None:
        assert await self.sio.call("join", room, namespace=namespace, timeout=5) is True

    async def wait_count(self, event: str, count: int, namespace: str = "/", timeout: float = 10) -> None:
        async def poll():
            while len(self.data(event, namespace)) < count:
                await asyncio.sleep(0.01)
        await asyncio.wait_for(poll(), timeout)

    async def close(self) -> None:
        if self.sio.connected:
            await self.sio.disconnect()


@pytest.fixture
async def recorders():
    made: list[Recorder] = []

    def make() -> Recorder:
        made.append(Recorder())
        return made[-1]

    yield make
    await asyncio.gather(*(r.close() for r in made))


async def drain(hub: Hub, *clients: Recorder, namespace: str = "/") -> None:
    """Wait until every client has everything sent before: a marker event sent last arrives last."""
    marker = uuid.uuid4().hex
    await hub.sio.emit("marker", marker, namespace=namespace)
    for client in clients:
        async def poll(c=client):
            while marker not in c.data("marker", namespace):
                await asyncio.sleep(0.01)
        await asyncio.wait_for(poll(), 10)


@pytest.fixture
async def hub(aiohttp_server):
    return await start_hub(aiohttp_server, FanoutManager())


def test_factory_and_mro(redis_url):
    assert isinstance(create_client_manager(None), FanoutManager)
    redis_manager = create_client_manager(redis_url)
    assert isinstance(redis_manager, RedisFanoutManager)
    mro = type(redis_manager).__mro__
    # Publishing stays in the pub/sub manager; local delivery lands in the fast path.
    assert mro.index(AsyncPubSubManager) < mro.index(FanoutMixin) < mro.index(socketio.AsyncManager)


async def test_every_recipient_gets_every_event_in_order(hub, recorders):
    clients = [recorders() for _ in range(12)]
    # Half over websocket only, half starting on polling and upgrading (the library's default).
    await asyncio.gather(*(c.connect(hub.url, transports=("websocket",) if i % 2 else
                                     ("polling", "websocket")) for i, c in enumerate(clients)))
    first = clients[0]
    expected: list[int] = []
    acks = []
    for seq in range(300):
        if seq % 10 == 3:
            # A single-target emit with a callback takes the library's path; it must stay in order.
            await hub.sio.emit("seq", {"seq": seq}, to=first.sid(), callback=lambda *a: acks.append(a))
        elif seq % 10 == 7:
            await hub.sio.emit("seq", ({"seq": seq}, b"\x00bin" * 4), room="all")
        else:
            await hub.sio.emit("seq", {"seq": seq}, room="all")
        expected.append(seq)
        if seq % 50 == 0:
            await asyncio.sleep(0)
    await drain(hub, *clients)
    for i, client in enumerate(clients):
        got = [d[0]["seq"] if isinstance(d, tuple) else d["seq"] for d in client.data("seq")]
        assert got == (expected if client is first else [s for s in expected if s % 10 != 3]), i
        assert all(d[1] == b"\x00bin" * 4 for d in client.data("seq") if isinstance(d, tuple))
    assert len(acks) == 30


async def test_skip_sid_and_single_target(hub, recorders):
    a, b, c = recorders(), recorders(), recorders()
    await asyncio.gather(a.connect(hub.url), b.connect(hub.url), c.connect(hub.url))
    await hub.sio.emit("news", "not for a", room="all", skip_sid=a.sid())
    await hub.sio.emit("news", "not for a or b", room="all", skip_sid=[a.sid(), b.sid()])
    await hub.sio.emit("news", "only b", to=b.sid())
    await drain(hub, a, b, c)
    assert a.data("news") == []
    assert b.data("news") == ["not for a", "only b"]
    assert c.data("news") == ["not for a", "not for a or b"]


async def test_rooms(hub, recorders):
    a, b, both, none = recorders(), recorders(), recorders(), recorders()
    await asyncio.gather(*(x.connect(hub.url) for x in (a, b, both, none)))
    await asyncio.gather(a.join("ra"), b.join("rb"), both.join("ra"), both.join("rb"))
    await hub.sio.emit("msg", "to ra", room="ra")
    await hub.sio.emit("msg", "to rb", room="rb")
    await hub.sio.emit("msg", "to ra and rb", room=["ra", "rb"])
    await hub.sio.emit("msg", "to nobody", room="empty-room")
    await drain(hub, a, b, both, none)
    assert a.data("msg") == ["to ra", "to ra and rb"]
    assert b.data("msg") == ["to rb", "to ra and rb"]
    assert both.data("msg") == ["to ra", "to rb", "to ra and rb"]  # once, though in both rooms
    assert none.data("msg") == []


async def test_two_namespaces(hub, recorders):
    both, root_only = recorders(), recorders()
    await both.connect(hub.url, namespaces=NAMESPACES)
    await root_only.connect(hub.url)
    await hub.sio.emit("ns", "root", namespace="/")
    await hub.sio.emit("ns", "other", namespace="/other")
    await hub.sio.emit("ns", "other room", room="all", namespace="/other")
    await drain(hub, both, root_only, namespace="/")
    await drain(hub, both, namespace="/other")
    assert both.data("ns", "/") == ["root"]
    assert both.data("ns", "/other") == ["other", "other room"]
    assert root_only.data("ns", "/") == ["root"]
    assert root_only.data("ns", "/other") == []


async def close_polling(hub: Hub, client: Recorder) -> None:
    """Close a polling client from the server: a client-side close leaves the server's long-poll
    GET waiting for the ping interval (library behaviour), which would slow the teardown."""
    await hub.sio.eio.disconnect(hub.sio.manager.eio_sid_from_sid(client.sid(), "/"))


async def test_binary_payloads(hub, recorders):
    ws, polling = recorders(), recorders()
    await ws.connect(hub.url)
    await polling.connect(hub.url, transports=("polling",))
    blob = bytes(range(256)) * 3
    await hub.sio.emit("blob", {"name": "x", "parts": [blob, {"inner": b"\xff\x00"}]}, room="all")
    await hub.sio.emit("blob", (blob, "text", b""), room="all")
    await drain(hub, ws, polling)
    for client in (ws, polling):
        first, second = client.data("blob")
        assert first == {"name": "x", "parts": [blob, {"inner": b"\xff\x00"}]}
        assert second == (blob, "text", b"")
    await close_polling(hub, polling)


async def test_polling_client_gets_broadcasts(hub, recorders):
    polling, ws = recorders(), recorders()
    await polling.connect(hub.url, transports=("polling",))
    await ws.connect(hub.url)
    assert hub.sio.eio.sockets[hub.sio.manager.eio_sid_from_sid(polling.sid(), "/")].upgraded is False
    for seq in range(50):
        await hub.sio.emit("seq", seq, room="all")
        if seq % 10 == 9:
            # python-engineio's client refuses a poll response of more than 16 packets
            # (Payload.max_decode_packets); the JS client has no such limit.
            await polling.wait_count("seq", seq + 1)
    await hub.sio.emit("seq", "skip", room="all", skip_sid=polling.sid())
    await drain(hub, polling, ws)
    assert polling.data("seq") == list(range(50))
    assert ws.data("seq") == [*range(50), "skip"]
    await close_polling(hub, polling)


async def test_redis_variant_delivers_across_two_servers(aiohttp_server, redis_url, recorders):
    channel = f"fanout-test-{uuid.uuid4().hex}"
    hub_a = await start_hub(aiohttp_server, RedisFanoutManager(redis_url, channel=channel))
    hub_b = await start_hub(aiohttp_server, RedisFanoutManager(redis_url, channel=channel))
    on_a, on_b, skipped = recorders(), recorders(), recorders()
    await asyncio.gather(on_a.connect(hub_a.url), on_b.connect(hub_b.url), skipped.connect(hub_b.url))

    async def until_subscribed():
        # Each manager subscribes in a background task started by its first connection.
        while not (on_a.data("hello") and on_b.data("hello")):
            await hub_a.sio.emit("hello", "a", room="all")
            await hub_b.sio.emit("hello", "b", room="all")
            await asyncio.sleep(0.05)
    await asyncio.wait_for(until_subscribed(), 10)

    # Order holds per publishing node (a remote node's events arrive later than local ones).
    for seq in range(10):
        await hub_a.sio.emit("seq", seq, room="all", skip_sid=skipped.sid() if seq == 5 else None)
    await asyncio.gather(on_a.wait_count("seq", 10), on_b.wait_count("seq", 10),
                         skipped.wait_count("seq", 9))
    for seq in range(10, 20):
        await hub_b.sio.emit("seq", seq, room="all")
    await asyncio.gather(on_a.wait_count("seq", 20), on_b.wait_count("seq", 20),
                         skipped.wait_count("seq", 19))
    assert on_a.data("seq") == list(range(20))
    assert on_b.data("seq") == list(range(20))
    assert skipped.data("seq") == [s for s in range(20) if s != 5]
    blob = b"\x01\x02" * 100
    await hub_a.sio.emit("blob", {"b": blob}, room="all")
    await on_b.wait_count("blob", 1)
    assert on_b.data("blob") == [{"b": blob}]
    for h in (hub_a, hub_b):
        await h.sio.shutdown()


async def test_slow_websocket_client_is_told_and_disconnected(aiohttp_server, recorders):
    overflowed: list[str] = []
    manager = FanoutManager(max_queued_bytes=256 * 1024, max_queued_packets=10_000,
                            on_overflow=overflowed.append)
    hub = await start_hub(aiohttp_server, manager)
    fast = recorders()
    await fast.connect(hub.url)
    async with aiohttp.ClientSession() as session:
        slow, _, slow_sid = await raw_socketio_websocket(session, hub.url, autoping=False)
        assert len(hub.sio.eio.sockets) == 2
        chunk = "x" * 64 * 1024
        sent = 0
        # The slow client reads nothing more, so kernel buffers fill, then the transport's.
        while not overflowed and sent < 2000:
            await hub.sio.emit("big", {"seq": sent, "pad": chunk}, room="all")
            sent += 1
            if sent % 20 == 0:
                await asyncio.sleep(0.01)
        assert overflowed == ["/"]

        async def disconnected():
            # Socket.IO forgets it at once; its TCP connection closes once its bytes are read.
            while hub.sio.manager.is_connected(slow_sid, "/"):
                await asyncio.sleep(0.01)
        await asyncio.wait_for(disconnected(), 5)
        await hub.sio.emit("after", "still here", room="all")

        # The client resumes reading: the last event before the close is the overflow notice.
        last_text = None
        while True:
            msg = await slow.receive(timeout=10)
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
            last_text = msg.data
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING)
        assert last_text is not None
        assert jsonutil.loads(last_text[2:]) == [SEND_QUEUE_OVERFLOWED_EVENT, SEND_QUEUE_OVERFLOWED_DATA]
        assert last_text.startswith("42")

        async def gone():
            while len(hub.sio.eio.sockets) != 1:
                await asyncio.sleep(0.01)
        await asyncio.wait_for(gone(), 10)

    await fast.wait_count("after", 1)
    assert [d["seq"] for d in fast.data("big")] == list(range(sent))
    assert fast.data("after") == ["still here"]
    assert fast.data(SEND_QUEUE_OVERFLOWED_EVENT) == []


async def test_slow_polling_client_is_told_and_disconnected(aiohttp_server, recorders):
    overflowed: list[str] = []
    manager = FanoutManager(max_queued_packets=20, on_overflow=overflowed.append, close_grace=0.2)
    hub = await start_hub(aiohttp_server, manager)
    fast = recorders()
    await fast.connect(hub.url)
    base = hub.url + "/socket.io/?EIO=4&transport=polling"
    async with aiohttp.ClientSession() as session:
        async with session.get(base) as response:
            opened = await response.text()
        sid = jsonutil.loads(opened[1:])["sid"]
        async with session.post(f"{base}&sid={sid}", data="40") as response:
            assert response.status == 200
        async with session.get(f"{base}&sid={sid}") as response:
            assert (await response.text()).startswith("40{")
        # The client stops polling: the broadcasts pile up in its Engine.IO queue.
        for seq in range(30):
            await hub.sio.emit("seq", seq, room="all")
        assert overflowed == ["/"]
        async with session.get(f"{base}&sid={sid}") as response:
            packets = (await response.text()).split("\x1e")  # the EIO4 polling separator
    assert packets[:20] == [f'42["seq",{seq}]' for seq in range(20)]
    assert jsonutil.loads(packets[20][2:]) == [SEND_QUEUE_OVERFLOWED_EVENT, SEND_QUEUE_OVERFLOWED_DATA]
    assert packets[21] == "1"  # Engine.IO CLOSE: the client reconnects

    async def disconnected():
        # Closed after the grace period: only the fast client is left in the room.
        while len(hub.sio.manager.rooms["/"]["all"]) != 1:
            await asyncio.sleep(0.01)
    await asyncio.wait_for(disconnected(), 5)
    await fast.wait_count("seq", 30)
    assert fast.data("seq") == list(range(30))


async def test_permessage_deflate_declined_and_library_sends_keep_order(aiohttp_server):
    hub = await start_hub(aiohttp_server, FanoutManager())
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(hub.url.replace("http", "ws") +
                                      "/socket.io/?EIO=4&transport=websocket", compress=15)
        assert "Sec-WebSocket-Extensions" not in ws._response.headers
        assert (await ws.receive_str(timeout=5)).startswith("0{")
        await ws.send_str("40")
        sid = jsonutil.loads((await ws.receive_str(timeout=5))[2:])["sid"]
        for seq in range(30):
            if seq % 3 == 0:
                # The library's path (an ack id per recipient) goes through LeanSocket.send, the
                # broadcasts in between through the fan-out manager: one stream, in order.
                await hub.sio.emit("seq", seq, to=sid, callback=lambda *a: None)
            else:
                await hub.sio.emit("seq", seq, room="all")
        got = []
        while len(got) < 30:
            text = await ws.receive_str(timeout=5)
            if text == "2":  # an Engine.IO ping
                continue
            assert text.startswith("42")
            got.append(jsonutil.loads(text[2:].lstrip("0123456789"))[1])
        assert got == list(range(30))
        await ws.close()


# Loopback sockets buffer megabytes; a client across a network, a few dozen KiB.
NETWORK_SOCKET_BUFFER = 64 * 1024


def small_buffer_socket(addr_info) -> socket.socket:
    """A client socket with a receive buffer like a real network's (set before connect)."""
    family, type_, proto, _, _ = addr_info
    sock = socket.socket(family, type_, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, NETWORK_SOCKET_BUFFER)
    return sock


@contextlib.asynccontextmanager
async def network_client(aiohttp_server, manager: socketio.AsyncManager) -> AsyncIterator[tuple[Hub, Any, str]]:
    """A hub and one raw websocket client whose socket buffers, on both ends, are a network's size."""
    hub = await start_hub(aiohttp_server, manager)
    connector = aiohttp.TCPConnector(socket_factory=small_buffer_socket)
    async with aiohttp.ClientSession(connector=connector) as session:
        ws, eio_sid, _ = await raw_socketio_websocket(session, hub.url, autoping=False)
        server_socket = hub.sio.eio.sockets[eio_sid].link.transport.get_extra_info("socket")
        server_socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, NETWORK_SOCKET_BUFFER)
        yield hub, ws, eio_sid


async def test_a_client_that_falls_behind_for_a_while_gets_every_frame_in_order(aiohttp_server):
    # While it does not read, its frames wait whole in its backlog; they go out when it reads again.
    overflowed: list[str] = []
    async with network_client(aiohttp_server, FanoutManager(on_overflow=overflowed.append)) as (hub, ws, eio_sid):
        link = hub.sio.eio.sockets[eio_sid].link
        pad = "x" * 16 * 1024
        sent = 0
        while not link.backlog_bytes:
            await hub.sio.emit("seq", {"seq": sent, "pad": pad}, room="all")
            sent += 1
            await asyncio.sleep(0)
        for _ in range(20):  # more while it is held back, still within the bound
            await hub.sio.emit("seq", {"seq": sent, "pad": pad}, room="all")
            sent += 1
        got = []
        while len(got) < sent:
            got.append(jsonutil.loads((await ws.receive_str(timeout=5))[2:])[1]["seq"])
        await ws.close()
    assert got == list(range(sent))
    assert overflowed == []


async def test_a_slow_reader_is_evicted_after_whole_frames_with_the_notice_and_a_close_frame(aiohttp_server):
    # The client reads, but slower than events come. The frames it has not been sent when it is
    # evicted are dropped: the notice takes their place, right behind whole frames, then the close
    # frame. A client that still reads is never cut off mid-frame (only one that reads nothing for
    # close_grace seconds), however long it takes to read what was already sent.
    overflowed: list[str] = []
    manager = FanoutManager(max_queued_packets=10_000, on_overflow=overflowed.append, close_grace=0.2)
    async with network_client(aiohttp_server, manager) as (hub, slow, _):
        async def read_slowly() -> tuple[list, aiohttp.WSMessage]:
            events = []
            while True:
                msg = await slow.receive(timeout=10)
                if msg.type != aiohttp.WSMsgType.TEXT:
                    return events, msg
                assert msg.data.startswith("42"), msg.data[:20]
                events.append(jsonutil.loads(msg.data[2:]))
                await asyncio.sleep(0.02)

        reader = asyncio.create_task(read_slowly())
        pad = "x" * 32 * 1024
        sent = 0
        while not overflowed:
            await hub.sio.emit("big", {"seq": sent, "pad": pad}, room="all")
            sent += 1
            if sent % 8 == 0:
                await asyncio.sleep(0)
        events, last = await reader
    assert events[-1] == [SEND_QUEUE_OVERFLOWED_EVENT, SEND_QUEUE_OVERFLOWED_DATA]
    seqs = [data["seq"] for _, data in events[:-1]]
    assert seqs == list(range(len(seqs))) and len(seqs) < sent
    assert (last.type, last.data, last.extra) == (aiohttp.WSMsgType.CLOSE, 1013, "slow consumer")


async def test_an_evicted_client_that_reads_nothing_is_cut_off_after_the_grace_period(aiohttp_server):
    # Its last frames cannot be delivered whole; they must not pin the server's memory either.
    overflowed: list[str] = []
    manager = FanoutManager(max_queued_packets=10_000, on_overflow=overflowed.append, close_grace=0.2)
    async with network_client(aiohttp_server, manager) as (hub, silent, eio_sid):
        transport = hub.sio.eio.sockets[eio_sid].link.transport
        pad = "x" * 32 * 1024
        while not overflowed:
            await hub.sio.emit("big", {"pad": pad}, room="all")
            await asyncio.sleep(0)
        assert transport.get_write_buffer_size() > 0
        # Aborted: the unsent bytes are freed and the connection's handler ends.
        await wait_until(lambda: transport.get_write_buffer_size() == 0, timeout=5)
        await wait_until(lambda: eio_sid not in hub.sio.eio.sockets, timeout=5)
        await silent.close()
