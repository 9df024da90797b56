"""A lean Socket.IO client for the benchmark drivers: one websocket, one namespace, text frames only.

It speaks Engine.IO 4 / Socket.IO 5 itself (open, namespace connect with auth, acked emits, pings)
and leaves each event frame to `on_event` undecoded. python-socketio's `AsyncClient` costs about
3 ms of CPU per message received: on a 2-core machine the driver became the bottleneck of the
benchmarks it drove, and their figures measured it rather than the hub.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp


class LeanSocket:
    """One connection to one namespace; subclasses override `on_event` to see event frames."""

    def __init__(self, namespace: str) -> None:
        self.connect_prefix = f"40{namespace},"
        self.event_prefix = f"42{namespace},"
        self.ack_prefix = f"43{namespace},"
        self.refused_prefix = f"44{namespace},"
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.acks: dict[int, asyncio.Future] = {}
        self.next_ack = 0
        self.reader: asyncio.Task | None = None

    async def open(self, http: aiohttp.ClientSession, url: str, auth: dict[str, Any]) -> None:
        """Connect the websocket and the namespace with `auth`; raise SystemExit when refused."""
        ws = self.ws = await http.ws_connect(url.replace("http", "ws", 1) + "/socket.io/?EIO=4&transport=websocket",
                                             autoping=False, max_msg_size=0)
        opened = await ws.receive_str(timeout=30)
        if not opened.startswith("0"):
            raise SystemExit(f"unexpected Engine.IO open: {opened[:100]}")
        await ws.send_str(self.connect_prefix + json.dumps(auth))
        while True:
            reply = await ws.receive_str(timeout=30)
            if reply.startswith(self.connect_prefix):
                break
            if reply.startswith(self.refused_prefix):
                raise SystemExit(f"the namespace refused the connection: {reply}")
        self.reader = asyncio.create_task(self._read())

    def on_event(self, frame: str) -> None:
        """An event frame as received (`42<namespace>,[...]`), called in order; nothing by default."""

    async def _read(self) -> None:
        assert self.ws is not None
        async for message in self.ws:
            if message.type != aiohttp.WSMsgType.TEXT:
                break
            frame = message.data
            if frame.startswith(self.event_prefix):
                self.on_event(frame)
            elif frame == "2":  # Engine.IO ping
                await self.ws.send_str("3")
            elif frame.startswith(self.ack_prefix):
                body = frame[len(self.ack_prefix):]
                bracket = body.index("[")
                future = self.acks.pop(int(body[:bracket]), None)
                if future is not None and not future.done():
                    future.set_result(json.loads(body[bracket:])[0])
        for future in self.acks.values():  # the connection closed under them
            if not future.done():
                future.set_exception(ConnectionError("the connection closed"))

    async def call(self, event: str, data: Any, timeout: float = 60) -> dict[str, Any]:
        """An acked emit; the ack's envelope."""
        assert self.ws is not None
        self.next_ack += 1
        future = self.acks[self.next_ack] = asyncio.get_running_loop().create_future()
        await self.ws.send_str(f"{self.event_prefix}{self.next_ack}{json.dumps([event, data])}")
        return await asyncio.wait_for(future, timeout)

    async def close(self) -> None:
        """Close the websocket and wait for the reader."""
        if self.ws is not None:
            await self.ws.close()
        if self.reader is not None:
            await asyncio.gather(self.reader, return_exceptions=True)
