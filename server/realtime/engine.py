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
            # does not cancel a handler whose client left: the None ends the poll now, or it
            # would linger that long and hold graceful shutdown for its whole timeout.
            self._queue.put_nowait(None)

    async def _upgrade_websocket(self, environ: dict) -> WebSocketResponse:
        """Open the websocket, complete the upgrade if polling came first, then read until it ends.

        One method on purpose: engineio spreads this over a driver object and three coroutines,
        and every coroutine frame in the await chain is memory an idle connection keeps.
        """
        if self.upgraded:
            raise OSError("Socket has been upgraded already")
        response = WebSocketResponse(max_msg_size=self.server.max_http_buffer_size, compress=False)
        await response.prepare(environ["aiohttp.request"])
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
                    await self.receive(eio_packet.Packet(encoded_packet=msg.data))
                except eio_exceptions.UnknownPacketError:
                    pass
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


class LeanEngineServer(engineio.AsyncServer):
    """python-engineio's server, running websocket connections as `LeanSocket`s on aiohttp."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.frames = FrameWriter()
        # LeanSocket runs websockets on aiohttp's WebSocketResponse itself.
        self.lean = self.async_mode == "aiohttp"

    async def _handle_connect(self, environ: dict, transport: str, jsonp_index: Any = None) -> Any:
        # python-engineio 4.15's AsyncServer._handle_connect (pinned in pyproject.toml), with one
        # change: the socket class. The library names AsyncSocket directly there.
        if self.start_service_task:
            self.start_service_task = False
            self.service_task_handle = self.start_background_task(self._service_task)

        sid = self.generate_id()
        s = LeanSocket(self, sid) if self.lean else AsyncSocket(self, sid)
        self.sockets[sid] = s

        pkt = eio_packet.Packet(eio_packet.OPEN, {
            "sid": sid,
            "upgrades": self._upgrades(sid, transport),
            "pingTimeout": int(self.ping_timeout * 1000),
            "pingInterval": int(self.ping_interval + self.ping_interval_grace_period) * 1000,
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


class SocketServer(socketio.AsyncServer):
    """python-socketio's server on `LeanEngineServer`."""

    def _engineio_server_class(self) -> type:
        return LeanEngineServer


SIO: web.AppKey[socketio.AsyncServer] = web.AppKey("sio", socketio.AsyncServer)


__all__ = ["DEFAULT_CLOSE_GRACE_SECONDS", "OP_BINARY", "OP_CLOSE", "OP_TEXT", "SHUTDOWN_REASON",
           "SLOW_CONSUMER_REASON", "FrameWriter", "LeanEngineServer", "LeanSocket", "Link", "SocketServer",
           "close_frame", "packet_frame", "ws_frame"]
