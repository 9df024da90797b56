"""A leaner Engine.IO server for aiohttp: one task per websocket connection, writes straight to it.

python-engineio runs each websocket connection with a writer task parked on an `asyncio.Queue`, a
reader task re-created (with a `wait_for` timer) for every message and a task sleeping until each
ping, and keeps the request's whole WSGI-style environ for as long as the connection lives: most
of the ~30 KiB an idle connection costs. `LeanEngineServer` keeps the Engine.IO protocol (handshake,
upgrade from polling, ping/pong, close) and the library's API (`send`, `disconnect`, sessions, the
queue for polling clients) and changes only how a websocket connection is run:

- the connection runs in aiohttp's request-handler task, which only reads; it has no task of its
  own;
- everything sent on the websocket, the library's packets and the fan-out manager's broadcast frames
  alike, goes through one `FrameWriter`: frames wait per connection until the end of the loop
  iteration and then go out in one `transport.write`, so a connection gets frames in the order they
  were sent, and a server that falls behind makes fewer, larger writes instead of queueing;
- while a connection's transport is paused (the client is not reading and the kernel's buffer is
  full), its frames wait whole in the connection's own backlog instead of the transport, and go out
  when the transport resumes; a backlog past a bound is handed to `FrameWriter.on_backlog` (the
  fan-out manager evicts the client, telling it why), so a slow client cannot grow the server's
  memory without bound. What the transport holds always ends with a whole frame, so a connection
  can be ended cleanly at any time: `FrameWriter.close` drops or writes the backlog, then a last
  message and a close frame, and closes the TCP connection once the client has read them;
- pings are a timer handle instead of a sleeping task;
- once the websocket is open, the environ is cut down to a few keys (`aiohttp.request`, which
  holds every header, stays);
- permessage-deflate is declined during the handshake, as Node socket.io does by default: aiohttp
  would keep ~100 KiB of zlib state per connection and compress every frame per recipient.

Polling clients are served by python-engineio unchanged; one that upgrades to websocket moves onto
this path when the upgrade completes.

`LeanEngineServer` and `SocketServer` also hold python-engineio and python-socketio to the letter of
the Engine.IO v4 and Socket.IO v5 specifications where the libraries are lenient (see docs/protocol.md,
"Transport conformance"): exact heartbeat milliseconds, 400 for a missing or unknown `EIO` or
`transport` and for any other method, `ok` for a POST, a session closed on a second concurrent GET
or POST, on a malformed packet or on a GET whose PONG is overdue, one websocket per session,
`{"message": "Invalid namespace"}` for an unknown namespace, and a connection closed when its first
packet is not a CONNECT, when no CONNECT comes within `connect_timeout` or when a packet breaks the
Socket.IO format. Browsers are held to their origin on every transport: an `Origin` outside the
allowed list (with none configured: other than the request's own scheme and host) is refused; a
request without one (not a browser) is not.

`LeanEngineServer.close_all` ends every connection at once for a graceful shutdown: Engine.IO CLOSE
to each client and, on a websocket, a close frame (1001 going away) and the TCP close, instead of
leaving the websockets open until aiohttp's shutdown timeout cancels their handlers.
"""

from __future__ import annotations

import asyncio
import struct
import time
from typing import Any, Callable

import engineio
import socketio
import structlog
from aiohttp import WSCloseCode, WSMsgType, web
from aiohttp.web import WebSocketResponse
from engineio import exceptions as eio_exceptions
from engineio import packet as eio_packet
from engineio.async_socket import AsyncSocket
from socketio import packet as sio_packet

log = structlog.get_logger(__name__)

OP_TEXT, OP_BINARY, OP_CLOSE = 0x1, 0x2, 0x8
DEFAULT_MAX_UNSENT_BYTES = 1024 * 1024
# How long a closing connection may go without the client reading any of its last bytes before the
# TCP connection is aborted (a client that never reads again would otherwise pin them forever).
DEFAULT_CLOSE_GRACE_SECONDS = 5.0
SLOW_CONSUMER_REASON = "slow consumer"
SHUTDOWN_REASON = "server shutting down"
# What a connection's environ keeps once its websocket is open; the request has the rest.
KEPT_ENVIRON_KEYS = ("REQUEST_METHOD", "PATH_INFO", "QUERY_STRING", "REMOTE_ADDR", "aiohttp.request")
EIO_VERSION = "4"
# Engine.IO's record separator between the packets of one polling payload.
PAYLOAD_SEPARATOR = "\x1e"
PROTOCOL_ERROR_REASON = "protocol error"
# As Node socket.io's connectTimeout: how long a connection may stay without a namespace.
DEFAULT_CONNECT_TIMEOUT = 45.0
INVALID_NAMESPACE = {"message": "Invalid namespace"}
# Binary attachments one packet may announce, as Node's socket.io-parser (`maxAttachments`): each is
# held until the packet is whole, so an unbounded count would let a client pile them up.
MAX_ATTACHMENTS = 10


def ws_frame(payload: bytes, opcode: int) -> bytes:
    """One unmasked, final websocket frame (RFC 6455 §5.2) as a server sends it."""
    first = 0x80 | opcode
    size = len(payload)
    if size < 126:
        header = struct.pack("!BB", first, size)
    elif size < 65536:
        header = struct.pack("!BBH", first, 126, size)
    else:
        header = struct.pack("!BBQ", first, 127, size)
    return header + payload


def close_frame(code: int, reason: str) -> bytes:
    """A websocket close frame (RFC 6455 §5.5.1): the status code, then the reason in UTF-8."""
    return ws_frame(struct.pack("!H", code) + reason.encode(), OP_CLOSE)


def packet_frame(pkt: eio_packet.Packet) -> bytes:
    """An Engine.IO packet as a websocket frame: text as "<type><data>", binary as raw bytes."""
    encoded = pkt.encode()
    if isinstance(encoded, str):
        return ws_frame(encoded.encode(), OP_TEXT)
    return ws_frame(bytes(encoded), OP_BINARY)


def decode_packet(encoded: str | bytes) -> eio_packet.Packet:
    """A client's Engine.IO packet; ValueError if it is none (engineio takes any digit for a type)."""
    pkt = eio_packet.Packet(encoded_packet=encoded)
    if not eio_packet.OPEN <= pkt.packet_type <= eio_packet.NOOP:
        raise ValueError(f"no packet type {pkt.packet_type}")
    return pkt


class Link:
    """One open websocket: its transport, the frames waiting for this iteration's write, and the
    frames held back while the client is not reading."""

    __slots__ = ("sock", "transport", "protocol", "pending", "backlog", "backlog_bytes", "namespace")

    def __init__(self, sock: LeanSocket, response: WebSocketResponse) -> None:
        self.sock = sock
        writer = response._writer
        self.transport = writer.transport
        self.protocol = writer.protocol
        # One frame is kept as bytes, several as a list: a broadcast then allocates no object the
        # cyclic GC tracks per recipient, so fan-out alone never sets off a collection.
        self.pending: bytes | list[bytes] | None = None
        # Whole frames held back while the transport is paused; None while frames go straight out.
        self.backlog: list[bytes] | None = None
        self.backlog_bytes = 0
        # The namespace of the last broadcast queued here, for an eviction notice.
        self.namespace = "/"

    def take_pending(self) -> bytes:
        """The frames waiting for this iteration's write, as one buffer, and forget them."""
        pending, self.pending = self.pending, None
        if pending is None:
            return b""
        return pending if type(pending) is bytes else b"".join(pending)

    def take_backlog(self) -> list[bytes]:
        """The frames held back, and forget them: from here on frames go straight out again."""
        backlog, self.backlog, self.backlog_bytes = self.backlog, None, 0
        return backlog or []

    @property
    def unsent_bytes(self) -> int:
        """What the client has not been sent yet: the backlog and the transport's buffer."""
        return self.backlog_bytes + self.transport.get_write_buffer_size()


BacklogHook = Callable[[Link], None]


class FrameWriter:
    """Frames for open websockets, written once per loop iteration: one write per connection."""

    def __init__(self, max_unsent_bytes: int = DEFAULT_MAX_UNSENT_BYTES,
                 on_backlog: BacklogHook | None = None,
                 close_grace: float = DEFAULT_CLOSE_GRACE_SECONDS) -> None:
        self.max_unsent_bytes = max_unsent_bytes
        self.on_backlog = on_backlog or self._close_slow_consumer
        self.close_grace = close_grace
        self._dirty: list[Link] = []
        self._scheduled = False
        self._drainers: set[asyncio.Task] = set()

    def write(self, link: Link, frame: bytes) -> None:
        """Queue a frame for the link; it goes out at the end of this loop iteration."""
        pending = link.pending
        if pending is None:
            link.pending = frame
            self._dirty.append(link)
            if not self._scheduled:
                self._scheduled = True
                asyncio.get_running_loop().call_soon(self.flush)
        elif type(pending) is bytes:
            link.pending = [pending, frame]
        else:
            pending.append(frame)

    def flush(self) -> None:
        """Write every link's queued frames in one write (one syscall) each."""
        self._scheduled = False
        dirty, self._dirty = self._dirty, []
        for link in dirty:
            data = link.take_pending()
            transport = link.transport
            if not data or transport.is_closing():
                continue
            # Paused means the kernel's buffer is full too: the client is not keeping up.
            if link.protocol._paused:
                self._hold(link, data)
                continue
            if link.backlog is not None:  # resumed since: the backlog goes first
                data = b"".join([*link.take_backlog(), data])
            transport.write(data)

    def _hold(self, link: Link, data: bytes) -> None:
        """Keep whole frames for a client that is not reading; past the bound, hand it to on_backlog."""
        if link.backlog is None:
            link.backlog = []
            task = asyncio.ensure_future(self._write_backlog_when_drained(link))
            self._drainers.add(task)
            task.add_done_callback(self._drainers.discard)
        link.backlog.append(data)
        link.backlog_bytes += len(data)
        if link.backlog_bytes > self.max_unsent_bytes:
            self.on_backlog(link)

    async def _write_backlog_when_drained(self, link: Link) -> None:
        """Write the link's backlog in one write once the transport takes writes again."""
        while link.backlog is not None and not link.transport.is_closing():
            if not link.protocol._paused:
                link.transport.write(b"".join(link.take_backlog()))
                return
            try:
                # aiohttp's drain waiter: resolved by resume_writing, or when the connection is lost.
                await link.protocol._drain_helper()
            except ConnectionError:
                break
        link.take_backlog()

    def close(self, link: Link, last: bytes, *, drop_unsent: bool = False, grace: float | None = None) -> None:
        """Write `last` (whole frames ending with a close frame), then close the TCP connection.

        `last` follows the link's unsent frames, or with `drop_unsent` replaces those not in the
        transport yet; either way it follows only whole frames. The connection closes once the
        client has read everything; one that reads nothing for `grace` seconds is cut off.
        """
        unsent = link.take_backlog()
        unsent.append(link.take_pending())
        transport = link.transport
        if transport.is_closing():
            return
        transport.write(last if drop_unsent else b"".join([*unsent, last]))
        transport.close()
        grace = self.close_grace if grace is None else grace
        asyncio.get_running_loop().call_later(grace, self._abort_if_stalled, transport,
                                              transport.get_write_buffer_size(), grace)

    def _abort_if_stalled(self, transport: asyncio.Transport, unread: int, grace: float) -> None:
        """Abort a closing transport whose client read nothing in the last `grace` seconds."""
        left = transport.get_write_buffer_size()
        if not left:
            return  # all handed to the kernel: the close completes on its own
        if left < unread:
            asyncio.get_running_loop().call_later(grace, self._abort_if_stalled, transport, left, grace)
            return
        log.warning("websocket_close_aborted", unsent_bytes=left)
        transport.abort()

    def _close_slow_consumer(self, link: Link) -> None:
        log.warning("websocket_slow_consumer_closed", sid=link.sock.sid, unsent_bytes=link.unsent_bytes)
        self.close(link, close_frame(WSCloseCode.TRY_AGAIN_LATER, SLOW_CONSUMER_REASON), drop_unsent=True)


class LeanSocket(AsyncSocket):
    """An Engine.IO socket whose websocket is run by one reading task and the server's FrameWriter."""

    link: Link | None = None
    _ping_timer: asyncio.TimerHandle | None = None
    _queue: asyncio.Queue | None = None
    # A long-poll GET, and a POST, in progress: Engine.IO allows one of each at a time.
    polling = False
    posting = False

    @property
    def queue(self) -> asyncio.Queue:
        """engineio's packet queue, created when needed: an open websocket does without one."""
        if self._queue is None:
            self._queue = self.server.create_queue()
        return self._queue

    @queue.setter
    def queue(self, value: asyncio.Queue) -> None:
        self._queue = value

    def schedule_ping(self) -> None:
        """Ping after the interval, from a timer (engineio starts a task per ping)."""
        if self.last_ping:
            self.last_ping = None
            self._ping_timer = asyncio.get_running_loop().call_later(
                self.server.ping_interval, self._ping)

    def _ping(self) -> None:
        self._ping_timer = None
        if not self.closing and not self.closed:
            self.last_ping = time.time()
            self.send_nowait(eio_packet.Packet(eio_packet.PING))

    def send_nowait(self, pkt: eio_packet.Packet) -> None:
        """Send on the open websocket, or queue for the polling transport until there is one."""
        link = self.link
        if link is None:
            self.queue.put_nowait(pkt)
        elif not link.transport.is_closing():
            self.server.frames.write(link, packet_frame(pkt))

    async def send(self, pkt: eio_packet.Packet) -> None:
        """Send a packet to the client (nothing if it stopped answering pings)."""
        if await self.check_ping_timeout():
            self.send_nowait(pkt)

    async def close(self, wait: bool = True, abort: bool = False, reason: Any = None) -> None:
        """Close as engineio does, stop pinging, and answer a long-poll still waiting."""
        if self._ping_timer is not None:
            self._ping_timer.cancel()
            self._ping_timer = None
        was_open = not self.closed and not self.closing
        await super().close(wait=wait, abort=abort, reason=reason)
        if was_open and self._queue is not None:
            # engineio leaves a pending GET waiting for ping_interval + ping_timeout, and aiohttp
            # does not cancel a handler whose client left: this ends the poll now, or it would
            # linger that long and hold graceful shutdown for its whole timeout. With nothing
            # else to send the poll gets a NOOP, as Engine.IO ends a poll cleanly (an empty body
            # is no packet at all); the None ends it after what is queued.
            self._queue.put_nowait(eio_packet.Packet(eio_packet.NOOP) if self._queue.empty() else None)

    async def fail(self, why: str) -> eio_exceptions.EngineIOError:
        """Close the session for breaking the protocol; returns the error for the request to raise.

        A polling client gets CLOSE on its pending or next GET; a websocket gets CLOSE and a close
        frame (1002 protocol error), and its TCP connection is closed.
        """
        self.server.logger.info("%s: closing the session: %s", self.sid, why)
        link = self.link
        if link is not None:
            self.server.frames.close(link, packet_frame(eio_packet.Packet(eio_packet.CLOSE))
                                     + close_frame(WSCloseCode.PROTOCOL_ERROR, PROTOCOL_ERROR_REASON))
        await self.close(wait=False, abort=link is not None, reason=self.server.reason.TRANSPORT_ERROR)
        return eio_exceptions.EngineIOError(why)

    async def handle_get_request(self, environ: dict) -> Any:
        """A websocket upgrade, or a long-poll; a second long-poll at once closes the session."""
        connection = environ.get("HTTP_CONNECTION", "").lower()
        if "upgrade" in connection and environ.get("HTTP_UPGRADE", "").lower() in self.upgrade_protocols:
            return await super().handle_get_request(environ)
        if self.polling:
            raise await self.fail("a second long-poll while one is pending")
        if not await self.check_ping_timeout():
            # Its PONG is overdue: engineio would hand it what is queued until its sweep comes by.
            raise eio_exceptions.EngineIOError("ping timeout")
        self.polling = True
        try:
            return await super().handle_get_request(environ)
        finally:
            self.polling = False

    async def handle_post_request(self, environ: dict) -> None:
        """Take a POST's packets; a second POST at once or a malformed packet closes the session.

        engineio answers `ok` to a payload it cannot decode (and drops it), and to one of more
        than 16 packets, which a browser client sends when it has that many queued; and it takes
        whatever part of the body has arrived for the whole of it.
        """
        if self.posting:
            raise await self._fail_post("a second POST while one is in progress")
        self.posting = True
        try:
            length = int(environ.get("CONTENT_LENGTH", "0"))
            if length > self.server.max_http_buffer_size:
                raise eio_exceptions.ContentTooLongError()
            try:
                # engineio's read(length) returns what has arrived so far: part of a larger body.
                body = await environ["wsgi.input"].readexactly(length)
            except asyncio.IncompleteReadError:
                raise await self._fail_post("a body cut short") from None
            try:
                encoded = body.decode().split(PAYLOAD_SEPARATOR) if body else []
                packets = [decode_packet(part) for part in encoded]
            except ValueError:
                raise await self._fail_post("a malformed packet") from None
            for pkt in packets:
                if self.closed:
                    break
                try:
                    await self.receive(pkt)
                except eio_exceptions.UnknownPacketError:
                    raise await self._fail_post("an unexpected packet type") from None
        finally:
            self.posting = False

    async def _fail_post(self, why: str) -> eio_exceptions.EngineIOError:
        error = await self.fail(why)
        # engineio answers 400 to the error only while the sid is still listed (it has no answer
        # otherwise: a 500), and unlists it then.
        self.server.sockets.setdefault(self.sid, self)
        return error

    async def _upgrade_websocket(self, environ: dict) -> WebSocketResponse | dict:
        """Open the websocket, complete the upgrade if polling came first, then read until it ends.

        One method on purpose: engineio spreads this over a driver object and three coroutines,
        and every coroutine frame in the await chain is memory an idle connection keeps.
        """
        if self.upgraded or self.upgrading:
            # One websocket per session: a second one is refused before its handshake, and the
            # session carries on over the first.
            self.server.logger.info("%s: refused a second websocket", self.sid)
            return self.server._bad_request("The session has a websocket already")
        response = WebSocketResponse(max_msg_size=self.server.max_http_buffer_size, compress=False)
        # Claimed before the first await, so that a websocket racing this one is refused.
        self.upgrading = self.connected
        try:
            await response.prepare(environ["aiohttp.request"])
        except BaseException:
            self.upgrading = False
            raise
        # The same dict is held by socketio (`get_environ`) and by the frames of this request.
        kept = {key: environ[key] for key in KEPT_ENVIRON_KEYS if key in environ}
        environ.clear()
        environ.update(kept)
        if self.connected:
            if not await self._complete_upgrade(response):
                return response
        else:
            self.connected = True
            self.upgraded = True
        self._open_link(response)
        idle_limit = self.server.ping_interval + self.server.ping_timeout
        try:
            while True:
                try:
                    msg = await response.receive(timeout=idle_limit)
                except (asyncio.TimeoutError, OSError):
                    break
                if msg.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
                    break
                try:
                    pkt = decode_packet(msg.data)
                except ValueError:
                    await self.fail("a malformed packet")
                    break
                try:
                    await self.receive(pkt)
                except eio_exceptions.UnknownPacketError:
                    await self.fail("an unexpected packet type")
                    break
                except eio_exceptions.SocketIsClosedError:
                    break
                except Exception:  # noqa: BLE001 - as engineio: log, keep the connection
                    self.server.logger.exception("Unknown receive error")
        finally:
            # Also when aiohttp cancels this task because the client went away: engineio's loop
            # swallows that cancellation so that its caller forgets the socket; this one lets it
            # propagate and forgets the socket here.
            self.link = None
            await self.close(wait=False, abort=True, reason=self.server.reason.TRANSPORT_CLOSE)
            self.server.sockets.pop(self.sid, None)
            await response.close()
        return response

    def _open_link(self, response: WebSocketResponse) -> None:
        """Send what was queued (the OPEN packet, packets sent during an upgrade), drop the queue."""
        link = Link(self, response)
        queue = self.queue
        while not queue.empty():
            pkt = queue.get_nowait()
            queue.task_done()
            if pkt is not None:
                self.server.frames.write(link, packet_frame(pkt))
        self._queue = None
        # From here on packets go straight onto the websocket.
        self.link = link

    async def _complete_upgrade(self, response: WebSocketResponse) -> bool:
        """engineio's polling-to-websocket handshake: ping "probe", pong "probe", then UPGRADE."""
        self.upgrading = True  # holds packets in the queue until the websocket takes over
        try:
            probe = await response.receive()
            if probe.type != WSMsgType.TEXT or probe.data != "2probe":
                self.server.logger.info("%s: Failed websocket upgrade, no PING packet", self.sid)
                return False
            await response.send_str(eio_packet.Packet(eio_packet.PONG, data="probe").encode())
            self.queue.put_nowait(eio_packet.Packet(eio_packet.NOOP))  # ends the pending poll
            upgrade = await response.receive()
            if upgrade.type != WSMsgType.TEXT or upgrade.data != str(eio_packet.UPGRADE):
                self.server.logger.info("%s: Failed websocket upgrade, expected UPGRADE packet",
                                        self.sid)
                return False
        except OSError:
            return False
        finally:
            self.upgrading = False
        self.upgraded = True
        return True


def normalize_origin(origin: str) -> str:
    """An origin as browsers send it: `scheme://host[:port]`, lower case, no trailing slash."""
    return origin.strip().rstrip("/").lower()


def first_value(header: str | None) -> str | None:
    """The first of a comma-separated header's values (a proxy chain appends its own)."""
    return header.split(",", 1)[0].strip() if header else None


def own_origins(environ: dict) -> set[str]:
    """This server's own origins as the request names them: scheme and `Host`, and as a proxy forwarded them."""
    request = environ.get("aiohttp.request")
    scheme = request.scheme if request is not None else environ.get("wsgi.url_scheme", "http")
    host = environ.get("HTTP_HOST", "")
    origins = {normalize_origin(f"{scheme}://{host}")}
    forwarded_scheme = first_value(environ.get("HTTP_X_FORWARDED_PROTO"))
    forwarded_host = first_value(environ.get("HTTP_X_FORWARDED_HOST"))
    if forwarded_scheme or forwarded_host:
        origins.add(normalize_origin(f"{forwarded_scheme or scheme}://{forwarded_host or host}"))
    return origins


class LeanEngineServer(engineio.AsyncServer):
    """python-engineio's server, running websocket connections as `LeanSocket`s on aiohttp.

    `cors_allowed_origins` lists the origins whose pages may connect, on every transport: a
    request whose `Origin` is not listed is refused with 400, one without `Origin` (not a browser)
    is served. Empty or None means the page's own origin only (python-engineio would take `[]` as
    "check nothing"); `"*"` or a callable keep python-engineio's meaning.
    """

    def __init__(self, *args: Any, cors_allowed_origins: Any = None, node_name: str = "", **kwargs: Any) -> None:
        # A load balancer routes a polling request on its sid's prefix to the process that holds the
        # session (deploy/haproxy.cfg); that works for clients without a cookie jar too.
        self.sid_prefix = f"{node_name}." if node_name else ""
        self.allowed_origins: frozenset[str] = frozenset()
        if cors_allowed_origins is None or isinstance(cors_allowed_origins, str):
            cors_allowed_origins = [cors_allowed_origins] if cors_allowed_origins else []
        if not callable(cors_allowed_origins) and "*" not in cors_allowed_origins:
            self.allowed_origins = frozenset(normalize_origin(origin) for origin in cors_allowed_origins)
            cors_allowed_origins = self.origin_allowed
        super().__init__(*args, cors_allowed_origins=cors_allowed_origins, **kwargs)
        self.frames = FrameWriter()
        # LeanSocket runs websockets on aiohttp's WebSocketResponse itself.
        self.lean = self.async_mode == "aiohttp"

    def generate_id(self) -> str:
        """A new Engine.IO session id, prefixed with this process's node name when it has one."""
        return self.sid_prefix + super().generate_id()

    def origin_allowed(self, origin: str | None, environ: dict) -> bool:
        """Whether a browser page from `origin` may use this server (engineio asks for each request)."""
        if not origin:
            return False  # not a browser: nothing to allow (engineio serves such requests unchecked)
        origin = normalize_origin(origin)
        if self.allowed_origins:
            return origin in self.allowed_origins
        return origin in own_origins(environ)

    def attach(self, app: web.Application, engineio_path: str = "engine.io") -> None:
        """Route the endpoint as engineio does, and every other method too (400, not aiohttp's 405)."""
        super().attach(app, engineio_path)
        app.router.add_route("*", f"/{engineio_path.strip('/')}/", self.handle_request)

    async def handle_request(self, request: web.Request) -> web.StreamResponse:  # type: ignore[override]
        """Serve an Engine.IO request; refuse first what engineio would serve but the protocol forbids."""
        query = request.query
        transport = query.get("transport")
        problem = None
        if query.get("EIO") != EIO_VERSION:
            # engineio checks the version on the handshake only
            problem = "The client is using an unsupported version of the Engine.IO protocol"
        elif transport not in self.transports or (request.method == "POST" and transport != "polling"):
            # engineio takes a missing transport for polling
            problem = "Invalid transport"
        if problem is not None:
            environ = self._async["translate_request"](request)
            self._log_error_once(problem, "bad-query")
            return await self._make_response(self._bad_request(problem), environ)
        sid = query.get("sid")
        sock = self.sockets.get(sid) if sid else None
        if sock is not None and sock.closed:
            # A closed session is an unknown one (400); engineio's POST fails with a KeyError (500).
            del self.sockets[sid]
        return await super().handle_request(request)

    def _ok(self, packets: list | None = None, headers: list | None = None, jsonp_index: Any = None) -> dict:
        # Engine.IO answers a POST with `ok`; engineio says `OK`.
        response = super()._ok(packets, headers=headers, jsonp_index=jsonp_index)
        if packets is None:
            response["response"] = b"ok"
        return response

    def _method_not_found(self) -> dict:
        # Engine.IO answers an unsupported method with 400; engineio with 405.
        return self._bad_request("Method not allowed")

    async def _handle_connect(self, environ: dict, transport: str, jsonp_index: Any = None) -> Any:
        # python-engineio 4.15's AsyncServer._handle_connect (pinned in pyproject.toml), with two
        # changes: the socket class (the library names AsyncSocket directly there) and the
        # heartbeat's exact milliseconds.
        if self.start_service_task:
            self.start_service_task = False
            self.service_task_handle = self.start_background_task(self._service_task)

        sid = self.generate_id()
        s = LeanSocket(self, sid) if self.lean else AsyncSocket(self, sid)
        self.sockets[sid] = s

        pkt = eio_packet.Packet(eio_packet.OPEN, {
            "sid": sid,
            "upgrades": self._upgrades(sid, transport),
            # Milliseconds as set: engineio rounds the interval down to whole seconds (0 under 1 s).
            "pingTimeout": round(self.ping_timeout * 1000),
            "pingInterval": round((self.ping_interval + self.ping_interval_grace_period) * 1000),
            "maxPayload": self.max_http_buffer_size,
        })
        await s.send(pkt)

        ret = await self._trigger_event("connect", sid, environ, run_async=False)
        if ret is not None and ret is not True:
            del self.sockets[sid]
            self.logger.warning("Application rejected connection")
            return self._unauthorized(ret or None)

        s.schedule_ping()

        if transport == "websocket":
            ret = await s.handle_get_request(environ)
            if s.closed and sid in self.sockets:
                del self.sockets[sid]
            return ret
        s.connected = True
        headers = None
        if self.cookie:
            cookie = self.cookie if isinstance(self.cookie, dict) else {
                "name": self.cookie, "path": "/", "SameSite": "Lax"}
            headers = [("Set-Cookie", self._generate_sid_cookie(sid, cookie))]
        try:
            return self._ok(await s.poll(), headers=headers, jsonp_index=jsonp_index)
        except eio_exceptions.QueueEmpty:
            return self._bad_request()

    async def close_all(self, timeout: float, code: int = WSCloseCode.GOING_AWAY,
                        reason: str = SHUTDOWN_REASON) -> int:
        """Close every connection at once, then run the disconnect handlers (up to `timeout` s).

        Each client gets what was sent to it before, then Engine.IO CLOSE; a websocket also gets a
        close frame with `code` and `reason`, and its TCP connection is closed once that is read, or
        after `timeout` seconds with nothing read. Returns how many connections there were.
        """
        sockets = [sock for sock in self.sockets.values() if not sock.closing and not sock.closed]
        close_packet = eio_packet.Packet(eio_packet.CLOSE)
        last = packet_frame(close_packet) + close_frame(code, reason)
        for sock in sockets:
            link = getattr(sock, "link", None)
            if link is not None:
                self.frames.close(link, last, grace=timeout)
            else:
                # Answers the pending long-poll (if any) with what is queued, CLOSE last.
                sock.queue.put_nowait(close_packet)
        if sockets:
            # The CLOSE is out already: closing with abort=True runs the handlers without a second one.
            await asyncio.wait([asyncio.ensure_future(sock.close(wait=False, abort=True)) for sock in sockets],
                               timeout=timeout)
        return len(sockets)


def packet_problem(pkt: sio_packet.Packet) -> str | None:
    """What makes a client's Socket.IO packet invalid (as Node's socket.io-parser judges), or None."""
    kind, data = pkt.packet_type, pkt.data
    if kind == sio_packet.CONNECT:
        valid = data is None or isinstance(data, dict)
    elif kind == sio_packet.DISCONNECT:
        valid = data is None
    elif kind in (sio_packet.EVENT, sio_packet.BINARY_EVENT):
        # "The payload is mandatory and MUST be a non-empty array": the event's name, then arguments.
        valid = isinstance(data, list) and bool(data) and isinstance(data[0], str)
    elif kind in (sio_packet.ACK, sio_packet.BINARY_ACK):
        valid = isinstance(data, list) and pkt.id is not None
    else:  # CONNECT_ERROR is the server's to send; anything else is no packet type at all
        return f"packet type {kind!r} from a client"
    if pkt.attachment_count > MAX_ATTACHMENTS:
        return f"{pkt.attachment_count} binary attachments"
    return None if valid else f"an invalid payload for packet type {kind}"


class SocketServer(socketio.AsyncServer):
    """python-socketio's server on `LeanEngineServer`, held to the Socket.IO v5 protocol.

    A connection is closed when its first packet is not a CONNECT, when it has joined no namespace
    `connect_timeout` seconds after it opened, and on a packet that breaks the format; CONNECT to a
    namespace the server does not have gets `{"message": "Invalid namespace"}`.
    """

    def __init__(self, *args: Any, connect_timeout: float = DEFAULT_CONNECT_TIMEOUT, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.connect_timeout = connect_timeout
        self._closing_tasks: set[asyncio.Task] = set()

    def _engineio_server_class(self) -> type:
        return LeanEngineServer

    def _in_a_namespace(self, eio_sid: str, namespace: str | None = None) -> bool:
        """Whether the connection is in (or joining) `namespace`, or in any namespace."""
        manager = self.manager
        if namespace is not None and manager.sid_from_eio_sid(eio_sid, namespace) is not None:
            return True
        return any(manager.sid_from_eio_sid(eio_sid, name) is not None for name in manager.get_namespaces())

    async def close_connection(self, eio_sid: str, why: str) -> None:
        """Close a connection that broke the protocol (its Engine.IO session and transport)."""
        self.logger.info("closing %s: %s", eio_sid, why)
        sock = self.eio.sockets.get(eio_sid)
        if isinstance(sock, LeanSocket):
            await sock.fail(why)
        elif sock is not None:
            await self.eio.disconnect(eio_sid)

    async def _handle_eio_connect(self, eio_sid: str, environ: dict) -> None:
        await super()._handle_eio_connect(eio_sid, environ)
        asyncio.get_running_loop().call_later(self.connect_timeout, self._connect_timed_out, eio_sid)

    def _connect_timed_out(self, eio_sid: str) -> None:
        if eio_sid in self.eio.sockets and not self._in_a_namespace(eio_sid):
            task = asyncio.ensure_future(self.close_connection(eio_sid, "no namespace joined in time"))
            self._closing_tasks.add(task)
            task.add_done_callback(self._closing_tasks.discard)

    async def _handle_connect(self, eio_sid: str, namespace: str | None, data: Any) -> None:
        namespace = namespace or "/"
        if not (namespace in self.handlers or namespace in self.namespace_handlers
                or self.namespaces == "*" or namespace in self.namespaces):
            # python-socketio answers the string "Unable to connect"; Socket.IO v5 wants this object.
            await self._send_packet(eio_sid, self.packet_class(
                sio_packet.CONNECT_ERROR, data=INVALID_NAMESPACE, namespace=namespace))
            return
        await super()._handle_connect(eio_sid, namespace, data)

    async def _handle_eio_message(self, eio_sid: str, data: Any) -> None:
        # python-socketio's dispatch, with the checks it leaves out: it logs a packet it cannot
        # decode and keeps the connection, and takes any payload and a first packet of any type.
        pending = self._binary_packet.get(eio_sid)
        if pending is not None:
            if not isinstance(data, bytes):
                await self.close_connection(eio_sid, "text where a binary attachment was due")
                return
            try:
                complete = pending.add_attachment(data)
            except ValueError:
                await self.close_connection(eio_sid, "an unexpected binary attachment")
                return
            if complete:
                del self._binary_packet[eio_sid]
                await self._dispatch(eio_sid, pending)
            return
        try:
            pkt = self.packet_class(encoded_packet=data)
        except Exception:  # noqa: BLE001 - any failure to decode a client's bytes is its error
            await self.close_connection(eio_sid, "a packet that does not decode")
            return
        problem = packet_problem(pkt)
        if problem is None and pkt.packet_type != sio_packet.CONNECT \
                and not self._in_a_namespace(eio_sid, pkt.namespace or "/"):
            problem = "a packet before any CONNECT"
        if problem is not None:
            await self.close_connection(eio_sid, problem)
        elif pkt.attachment_count:
            self._binary_packet[eio_sid] = pkt
        else:
            await self._dispatch(eio_sid, pkt)

    async def _dispatch(self, eio_sid: str, pkt: sio_packet.Packet) -> None:
        """Hand a whole, valid packet to python-socketio's handler for its type."""
        kind = pkt.packet_type
        if kind == sio_packet.CONNECT:
            await self._handle_connect(eio_sid, pkt.namespace, pkt.data)
        elif kind == sio_packet.DISCONNECT:
            await self._handle_disconnect(eio_sid, pkt.namespace, self.reason.CLIENT_DISCONNECT)
        elif kind in (sio_packet.EVENT, sio_packet.BINARY_EVENT):
            await self._handle_event(eio_sid, pkt.namespace, pkt.id, pkt.data)
        else:
            await self._handle_ack(eio_sid, pkt.namespace, pkt.id, pkt.data)


SIO: web.AppKey[socketio.AsyncServer] = web.AppKey("sio", socketio.AsyncServer)


__all__ = ["DEFAULT_CLOSE_GRACE_SECONDS", "OP_BINARY", "OP_CLOSE", "OP_TEXT", "SHUTDOWN_REASON",
           "SLOW_CONSUMER_REASON", "FrameWriter", "LeanEngineServer", "LeanSocket", "Link", "SocketServer",
           "close_frame", "packet_frame", "ws_frame"]
