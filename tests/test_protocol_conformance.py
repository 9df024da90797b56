"""The raw Engine.IO v4 and Socket.IO v5 protocols against our server (server/realtime/engine.py), over
real HTTP and websockets: each case is a MUST of the specifications (github.com/socketio/engine.io-protocol,
github.com/socketio/socket.io-protocol) or of their conformance suites that python-engineio or
python-socketio get wrong, and the origin check on every transport (issue 16, F4)."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from server.core import jsonutil
from server.realtime.engine import SocketServer
from tests.helpers import server_url, wait_until

EVIL = "http://evil.example"


def make_server(**options: Any) -> SocketServer:
    """A Socket.IO server with a `/chat` namespace that echoes `echo` events and counts `count` ones."""
    sio = SocketServer(async_mode="aiohttp", logger=False, engineio_logger=False, **options)
    sio.counted = []

    @sio.on("echo", namespace="/chat")
    async def echo(sid, *args):
        return list(args)

    @sio.on("count", namespace="/chat")
    async def count(sid, n):
        sio.counted.append(n)

    @sio.on("connect", namespace="/chat")
    async def connect(sid, environ, auth=None):
        return True

    return sio


async def serve(aiohttp_server, sio: SocketServer) -> str:
    """Serve `sio` on a real socket; its /socket.io/ URL."""
    app = web.Application()
    sio.attach(app, socketio_path="socket.io")
    server = await aiohttp_server(app)
    return str(server.make_url("/socket.io/"))


@pytest.fixture
async def endpoint(aiohttp_server):
    """(the /socket.io/ URL, the server) with a 0.3 s ping interval and a 0.2 s ping timeout."""
    sio = make_server(ping_interval=0.3, ping_timeout=0.2)
    return await serve(aiohttp_server, sio), sio


@pytest.fixture
async def http():
    """An aiohttp client session."""
    async with aiohttp.ClientSession() as session:
        yield session


async def call(http, method: str, url: str, query: str, **options: Any) -> tuple[int, str, Any]:
    """One HTTP request: (status, body, headers)."""
    async with http.request(method, f"{url}?{query}", **options) as response:
        return response.status, await response.text(), response.headers


async def open_polling(http, url: str, **options: Any) -> str:
    """A polling session's sid, from the OPEN packet."""
    status, body, _ = await call(http, "GET", url, "EIO=4&transport=polling", **options)
    assert status == 200 and body.startswith("0{"), body
    return jsonutil.loads(body[1:])["sid"]


async def open_websocket(http, url: str, query: str = "EIO=4&transport=websocket", **options: Any):
    """A websocket after its OPEN packet (which is returned too)."""
    ws = await http.ws_connect(url.replace("http", "ws", 1) + "?" + query, **options)
    if "sid=" in query:
        return ws, None
    opened = await ws.receive_str(timeout=5)
    assert opened.startswith("0{"), opened
    return ws, jsonutil.loads(opened[1:])


async def closed_by_server(ws) -> list[str]:
    """The text frames the server sent before it closed the websocket (fails if it stays open)."""
    texts = []
    while True:
        msg = await ws.receive(timeout=5)
        if msg.type != aiohttp.WSMsgType.TEXT:
            assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING), msg
            return texts
        if msg.data != "2":  # pings may interleave
            texts.append(msg.data)


async def upgrade(http, url: str, sid: str):
    """Upgrade a polling session to websocket (probe, then UPGRADE)."""
    ws, _ = await open_websocket(http, url, f"EIO=4&transport=websocket&sid={sid}")
    await ws.send_str("2probe")
    assert await ws.receive_str(timeout=5) == "3probe"
    await ws.send_str("5")
    return ws


# --- Engine.IO: handshake ---------------------------------------------------------------------------

async def test_open_packet_advertises_the_heartbeat_in_exact_milliseconds(endpoint, http):
    url, _ = endpoint
    status, body, _ = await call(http, "GET", url, "EIO=4&transport=polling")
    opened = jsonutil.loads(body[1:])
    assert set(opened) == {"sid", "upgrades", "pingInterval", "pingTimeout", "maxPayload"}
    assert (opened["pingInterval"], opened["pingTimeout"]) == (300, 200)  # was 0 and 200
    assert opened["upgrades"] == ["websocket"]
    ws, opened = await open_websocket(http, url)
    assert (opened["pingInterval"], opened["pingTimeout"], opened["upgrades"]) == (300, 200, [])
    await ws.close()


async def test_a_missing_or_unknown_transport_is_400(endpoint, http):
    url, _ = endpoint
    assert (await call(http, "GET", url, "EIO=4"))[0] == 400  # engineio took it for polling: 200
    assert (await call(http, "GET", url, "EIO=4&transport=abc"))[0] == 400
    sid = await open_polling(http, url)
    assert (await call(http, "POST", url, f"EIO=4&sid={sid}", data="3"))[0] == 400
    assert (await call(http, "POST", url, f"EIO=4&transport=websocket&sid={sid}", data="3"))[0] == 400


async def test_a_missing_or_unknown_eio_version_is_400_on_every_request(endpoint, http):
    url, _ = endpoint
    assert (await call(http, "GET", url, "transport=polling"))[0] == 400
    assert (await call(http, "GET", url, "EIO=abc&transport=polling"))[0] == 400
    sid = await open_polling(http, url)
    # engineio checked the version on the handshake only
    assert (await call(http, "GET", url, f"transport=polling&sid={sid}"))[0] == 400
    assert (await call(http, "POST", url, f"EIO=3&transport=polling&sid={sid}", data="3"))[0] == 400
    for query in ("transport=websocket", "EIO=abc&transport=websocket", "EIO=4"):
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(url.replace("http", "ws", 1) + "?" + query)
        assert refused.value.status == 400


async def test_an_unsupported_method_is_400(endpoint, http):
    url, _ = endpoint
    for method in ("PUT", "DELETE", "PATCH"):
        status, _, _ = await call(http, method, url, "EIO=4&transport=polling")
        assert status == 400, method  # was 405
    assert (await call(http, "POST", url, "EIO=4&transport=polling"))[0] == 400  # POST without a session


# --- Engine.IO: polling -----------------------------------------------------------------------------

async def test_a_post_is_answered_lowercase_ok(endpoint, http):
    url, _ = endpoint
    sid = await open_polling(http, url)
    status, body, _ = await call(http, "POST", url, f"EIO=4&transport=polling&sid={sid}", data="40/chat,")
    assert (status, body) == (200, "ok")  # was "OK"
    status, body, _ = await call(http, "GET", url, f"EIO=4&transport=polling&sid={sid}")
    assert status == 200 and body.startswith("40/chat,{")


async def test_a_second_concurrent_long_poll_closes_the_session(aiohttp_server, http):
    url = await serve(aiohttp_server, make_server(ping_interval=20, ping_timeout=20))
    sid = await open_polling(http, url)
    query = f"EIO=4&transport=polling&sid={sid}"
    first = asyncio.ensure_future(call(http, "GET", url, query))
    await asyncio.sleep(0.2)
    second = await call(http, "GET", url, query + "&t=burst")
    assert second[0] == 400
    status, body, _ = await asyncio.wait_for(first, 5)
    assert (status, body) == (200, "1")  # the pending poll is answered CLOSE at once
    assert (await call(http, "GET", url, query))[0] == 400  # the session is gone


async def test_a_second_concurrent_post_closes_the_session(endpoint, http):
    url, sio = endpoint
    sid = await open_polling(http, url)
    host, port = url.split("//")[1].split("/")[0].split(":")
    # A POST whose body has not all arrived yet is in progress while the second one comes.
    reader, writer = await asyncio.open_connection(host, int(port))
    body = b'40/chat,'
    writer.write(f"POST /socket.io/?EIO=4&transport=polling&sid={sid} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:3])
    await writer.drain()
    await asyncio.sleep(0.2)
    status, _, _ = await call(http, "POST", url, f"EIO=4&transport=polling&sid={sid}", data="3")
    assert status == 400
    writer.write(body[3:])
    await writer.drain()
    await reader.readline()
    writer.close()
    assert sid not in sio.eio.sockets or sio.eio.sockets[sid].closed
    assert (await call(http, "GET", url, f"EIO=4&transport=polling&sid={sid}"))[0] == 400


async def test_a_malformed_packet_in_a_post_closes_the_session(endpoint, http):
    url, _ = endpoint
    sid = await open_polling(http, url)
    query = f"EIO=4&transport=polling&sid={sid}"
    assert (await call(http, "POST", url, query, data="abc"))[0] == 400  # was 200 "OK", packet dropped
    assert (await call(http, "GET", url, query))[0] == 400
    sid = await open_polling(http, url)
    query = f"EIO=4&transport=polling&sid={sid}"
    assert (await call(http, "POST", url, query, data="9"))[0] == 400  # no such packet type
    assert (await call(http, "GET", url, query))[0] == 400


async def test_every_packet_of_a_long_payload_is_received(endpoint, http):
    # A browser sends every packet it has queued in one POST; engineio dropped payloads of more than 16.
    url, sio = endpoint
    sid = await open_polling(http, url)
    query = f"EIO=4&transport=polling&sid={sid}"
    assert (await call(http, "POST", url, query, data="40/chat,"))[0] == 200
    payload = "\x1e".join(f'42/chat,["count",{n}]' for n in range(40))
    assert (await call(http, "POST", url, query, data=payload))[:2] == (200, "ok")
    await wait_until(lambda: len(sio.counted) == 40, timeout=5)
    assert sio.counted == list(range(40))


async def test_a_polling_client_that_misses_its_pong_is_closed(endpoint, http):
    url, _ = endpoint
    sid = await open_polling(http, url)
    await asyncio.sleep(0.3 + 0.2 + 0.1)  # the ping went out at 0.3 s and was never fetched nor answered
    assert (await call(http, "GET", url, f"EIO=4&transport=polling&sid={sid}"))[0] == 400
    # One that answers keeps its session.
    sid = await open_polling(http, url)
    query = f"EIO=4&transport=polling&sid={sid}"
    for _ in range(3):
        assert (await call(http, "GET", url, query))[:2] == (200, "2")
        assert (await call(http, "POST", url, query, data="3"))[0] == 200


async def test_a_close_from_the_client_answers_the_pending_poll_with_noop(aiohttp_server, http):
    url = await serve(aiohttp_server, make_server(ping_interval=20, ping_timeout=20))
    sid = await open_polling(http, url)
    query = f"EIO=4&transport=polling&sid={sid}"
    poll = asyncio.ensure_future(call(http, "GET", url, query))
    await asyncio.sleep(0.2)
    assert (await call(http, "POST", url, query, data="1"))[0] == 200
    assert (await asyncio.wait_for(poll, 5))[:2] == (200, "6")  # was an empty body: no packet
    assert (await call(http, "GET", url, query))[0] == 400


async def test_a_request_for_a_closed_session_is_400(endpoint, http):
    url, _ = endpoint
    sid = await open_polling(http, url)
    query = f"EIO=4&transport=polling&sid={sid}"
    assert (await call(http, "POST", url, query, data="1"))[0] == 200  # the client closes
    assert (await call(http, "POST", url, query, data="3"))[0] == 400  # was a 500 (KeyError)
    assert (await call(http, "GET", url, query))[0] == 400
    assert (await call(http, "GET", url, "EIO=4&transport=polling&sid=unknown"))[0] == 400


# --- Engine.IO: websocket ---------------------------------------------------------------------------

async def test_a_second_websocket_for_a_session_is_refused_and_the_first_carries_on(endpoint, http):
    url, sio = endpoint
    sid = await open_polling(http, url)
    first, _ = await open_websocket(http, url, f"EIO=4&transport=websocket&sid={sid}")
    await first.send_str("2probe")
    assert await first.receive_str(timeout=5) == "3probe"
    # Mid-upgrade: engineio let a second websocket in, which then fought the first for the session.
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await http.ws_connect(url.replace("http", "ws", 1) + f"?EIO=4&transport=websocket&sid={sid}")
    assert refused.value.status == 400
    await first.send_str("5")
    await first.send_str("40/chat,")
    texts = []
    while not texts or not texts[-1].startswith("40/chat,"):
        texts.append(await first.receive_str(timeout=5))
    # And once upgraded, another is refused too.
    with pytest.raises(aiohttp.WSServerHandshakeError):
        await http.ws_connect(url.replace("http", "ws", 1) + f"?EIO=4&transport=websocket&sid={sid}")
    await first.send_str('42/chat,7["echo","hi"]')
    while (text := await first.receive_str(timeout=5)) == "2":
        await first.send_str("3")
    assert text == '43/chat,7[["hi"]]'
    await first.close()


async def test_a_malformed_or_unknown_packet_on_a_websocket_closes_it(endpoint, http):
    url, sio = endpoint
    for bad in ("abc", "9", "0"):
        ws, opened = await open_websocket(http, url)
        await ws.send_str(bad)
        assert await closed_by_server(ws) == ["1"], bad  # CLOSE, then the close frame
        assert ws.close_code == aiohttp.WSCloseCode.PROTOCOL_ERROR
        await wait_until(lambda: opened["sid"] not in sio.eio.sockets, timeout=5)


# --- Socket.IO -------------------------------------------------------------------------------------

async def test_connect_to_an_unknown_namespace_gets_invalid_namespace(endpoint, http):
    url, _ = endpoint
    ws, _ = await open_websocket(http, url)
    await ws.send_str("40/random")
    assert await ws.receive_str(timeout=5) == '44/random,{"message":"Invalid namespace"}'  # was "Unable to connect"
    await ws.send_str("40/chat,")
    assert (await ws.receive_str(timeout=5)).startswith("40/chat,{")  # the connection is still usable
    await ws.close()


async def test_a_first_packet_other_than_connect_closes_the_connection(endpoint, http):
    url, _ = endpoint
    ws, _ = await open_websocket(http, url)
    await ws.send_str('42/chat,["echo","hi"]')
    assert await closed_by_server(ws) == ["1"]


@pytest.mark.parametrize("bad", [
    "4abc",  # no packet type
    "49",  # an unknown packet type
    "44/chat,{}",  # CONNECT_ERROR is the server's
    '42/chat,{"a":1}',  # an EVENT payload that is not an array
    "42/chat,[]",  # an empty EVENT payload
    "42/chat,[1]",  # no event name
    '42/chat,abc["echo",1]',  # an invalid ack id
    '43/chat,1{"a":1}',  # an ACK payload that is not an array
    '4599-/chat,["echo",{"_placeholder":true,"num":0}]',  # more binary attachments than may be held
])
async def test_a_packet_that_breaks_the_format_closes_the_connection(endpoint, http, bad):
    url, _ = endpoint
    ws, _ = await open_websocket(http, url)
    await ws.send_str("40/chat,")
    assert (await ws.receive_str(timeout=5)).startswith("40/chat,{")
    await ws.send_str(bad)
    assert await closed_by_server(ws) == ["1"]


async def test_a_connection_that_joins_no_namespace_is_closed_after_connect_timeout(aiohttp_server, http):
    url = await serve(aiohttp_server, make_server(connect_timeout=0.3))
    ws, _ = await open_websocket(http, url)
    assert await closed_by_server(ws) == ["1"]
    joined, _ = await open_websocket(http, url)
    await joined.send_str("40/chat,")
    assert (await joined.receive_str(timeout=5)).startswith("40/chat,{")
    await asyncio.sleep(0.6)
    await joined.send_str('42/chat,1["echo","still here"]')
    assert await joined.receive_str(timeout=5) == '43/chat,1[["still here"]]'
    await joined.close()


# --- Origins (F4) ----------------------------------------------------------------------------------

async def assert_origin_refused_everywhere(http, url: str, origin: str) -> None:
    """A page from `origin` can neither open a session (polling or websocket) nor use one."""
    foreign = {"Origin": origin}
    assert (await call(http, "GET", url, "EIO=4&transport=polling", headers=foreign))[0] == 400
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await open_websocket(http, url, headers=foreign)
    assert refused.value.status == 400
    sid = await open_polling(http, url)  # a non-browser client's session, used from the foreign page
    query = f"EIO=4&transport=polling&sid={sid}"
    assert (await call(http, "POST", url, query, data="40/chat,", headers=foreign))[0] == 400
    assert (await call(http, "GET", url, query, headers=foreign))[0] == 400
    with pytest.raises(aiohttp.WSServerHandshakeError):
        await open_websocket(http, url, f"EIO=4&transport=websocket&sid={sid}", headers=foreign)


async def test_with_no_origins_configured_only_the_pages_own_origin_connects(aiohttp_server, http):
    # `[]` is what the app passes when CORS_ORIGINS is unset; python-engineio took it as "check nothing".
    url = await serve(aiohttp_server, make_server(cors_allowed_origins=[]))
    for origin in (EVIL, "null", url.replace("http://", "https://").split("/socket.io")[0]):
        await assert_origin_refused_everywhere(http, url, origin)
    own = url.split("/socket.io")[0]
    status, _, headers = await call(http, "GET", url, "EIO=4&transport=polling", headers={"Origin": own})
    assert status == 200 and headers["Access-Control-Allow-Origin"] == own
    ws, _ = await open_websocket(http, url, headers={"Origin": own})
    await ws.close()
    # A proxy in front names the origin the page has.
    behind_proxy = {"Origin": "https://hub.example", "X-Forwarded-Proto": "https", "X-Forwarded-Host": "hub.example"}
    assert (await call(http, "GET", url, "EIO=4&transport=polling", headers=behind_proxy))[0] == 200
    # No Origin at all: not a browser (python-socketio, Node, game servers).
    assert (await call(http, "GET", url, "EIO=4&transport=polling"))[0] == 200


async def test_configured_origins_are_the_only_ones_that_connect(aiohttp_server, http):
    url = await serve(aiohttp_server, make_server(cors_allowed_origins=["https://hub.example/"]))
    await assert_origin_refused_everywhere(http, url, EVIL)
    await assert_origin_refused_everywhere(http, url, url.split("/socket.io")[0])  # not listed
    status, _, headers = await call(http, "GET", url, "EIO=4&transport=polling",
                                    headers={"Origin": "https://hub.example"})
    assert status == 200 and headers["Access-Control-Allow-Origin"] == "https://hub.example"
    ws, _ = await open_websocket(http, url, headers={"Origin": "https://hub.example"})
    await ws.close()


async def test_the_app_refuses_foreign_origins_on_every_transport(client, http):
    # The real app with CORS_ORIGINS unset (issue 16, F4: any Origin used to connect).
    url = server_url(client) + "/socket.io/"
    for origin in (EVIL, "null"):
        foreign = {"Origin": origin}
        assert (await call(http, "GET", url, "EIO=4&transport=polling", headers=foreign))[0] == 400
        with pytest.raises(aiohttp.WSServerHandshakeError):
            await open_websocket(http, url, headers=foreign)
        sid = await open_polling(http, url)
        assert (await call(http, "POST", url, f"EIO=4&transport=polling&sid={sid}", data="40/chain,",
                           headers=foreign))[0] == 400
    own = {"Origin": server_url(client)}
    assert (await call(http, "GET", url, "EIO=4&transport=polling", headers=own))[0] == 200
    ws, _ = await open_websocket(http, url, headers=own)
    await ws.close()
