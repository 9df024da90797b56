"""REST fallback for every channel: history with long-poll, and Server-Sent Events."""

from __future__ import annotations

import structlog
from aiohttp import web

from server.core import jsonutil
from server.core.errors import InvalidPayload
from server.core.identity import Identity
from server.core.settings import SETTINGS
from server.edge.rest import endpoint, ok_response, optional_identity, session_lives
from server.edge.schemas import obj, string
from server.realtime.history import EPOCH_PATTERN, Event, check_epoch
from server.realtime.hub import FIRST_ID, HISTORY_GAP_EVENT, REALTIME, SIGNED_OUT_EVENT
from server.realtime.redis import REDIS

log = structlog.get_logger(__name__)
routes = web.RouteTableDef()

CROSS_NODE_POLL_SECONDS = 1.0
CHANNEL_QUERY = {"channel": string(1, 200)}
SINCE = string(1, 41)
HISTORY_QUERY = obj({**CHANNEL_QUERY, "since": SINCE, "epoch": {"type": "string", "pattern": f"^{EPOCH_PATTERN}$"},
                     "wait": {"type": "number", "minimum": 0}}, required=("channel",))
STREAM_QUERY = obj({**CHANNEL_QUERY, "since": SINCE}, required=("channel",))
SSE_KEEPALIVE_SECONDS = 15.0


def _wait_seconds(request: web.Request) -> float:
    raw = request.query.get("wait")
    limit = request.app[SETTINGS].long_poll_timeout
    if raw is None:
        return limit
    try:
        value = float(raw)
    except ValueError:
        raise InvalidPayload("wait must be a number of seconds", field="wait") from None
    if not 0 <= value <= limit:
        raise InvalidPayload(f"wait must be between 0 and {limit:g} seconds", field="wait")
    return value


def _poll_interval(request: web.Request) -> float | None:
    return CROSS_NODE_POLL_SECONDS if request.app[REDIS] is not None else None


async def _authorised_channel(request: web.Request) -> tuple[str, Identity | None]:
    channel = request.query.get("channel", "")
    identity = await optional_identity(request)
    await request.app[REALTIME].authorise(request.app, identity, channel)
    return channel, identity


@routes.get("/api/v1/events")
@endpoint(query=HISTORY_QUERY)
async def handle_events(request: web.Request) -> web.Response:
    """A channel's history after `since` (all of it without `since`); waits up to `wait` s for news."""
    channel, _ = await _authorised_channel(request)
    realtime = request.app[REALTIME]
    since = request.query.get("since")
    if since is None:
        result = await realtime.replay(channel, FIRST_ID)
    else:
        result = await realtime.wait_after(channel, since, _wait_seconds(request), _poll_interval(request),
                                           check_epoch(request.query.get("epoch")))
    return ok_response({"channel": channel, "events": result.wire,
                        "latest_id": result.latest_id, "latest_offset": result.latest_offset,
                        "epoch": result.epoch, "history_gap": result.gap, "has_more": result.has_more})


def _sse(event_type: str, data: object, event_id: str | None = None) -> bytes:
    head = f"id: {event_id}\n" if event_id else ""
    return f"{head}event: {event_type}\n".encode() + b"data: " + jsonutil.dumpb(data) + b"\n\n"


def _sse_event(event: Event) -> bytes:
    return _sse(event.type, event.to_wire(), event.id)


@routes.get("/api/v1/events/stream")
@endpoint(query=STREAM_QUERY)
async def handle_event_stream(request: web.Request) -> web.StreamResponse:
    """Server-Sent Events for one channel; resumes after `Last-Event-ID` (or `since`)."""
    channel, identity = await _authorised_channel(request)
    realtime = request.app[REALTIME]
    since = request.headers.get("Last-Event-ID") or request.query.get("since")
    if since is None:
        since = await realtime.bus.latest_id(channel)  # live from now; None: channel still empty
    else:
        await realtime.replay(channel, since)  # refuse a malformed id before the stream starts
    response = web.StreamResponse(headers={
        "Content-Type": "text/event-stream", "Cache-Control": "no-cache",
        "X-Accel-Buffering": "no"})  # proxies such as nginx must not buffer the stream
    await response.prepare(request)
    await response.write(b"retry: 2000\n\n")
    try:
        while True:
            result = await realtime.wait_after(channel, since, SSE_KEEPALIVE_SECONDS, _poll_interval(request))
            if identity is not None and not await session_lives(request):
                # Signed out, revoked or expired since the stream began: nothing more goes out.
                await response.write(_sse(SIGNED_OUT_EVENT, {"channel": channel}))
                return response
            if result.gap:
                await response.write(_sse(HISTORY_GAP_EVENT, {"channel": channel, "latest_id": result.latest_id}))
            for event in result.events:
                await response.write(_sse_event(event))
            if result.events:
                since = result.events[-1].id
            elif result.gap:
                since = result.latest_id
            else:
                await response.write(b": keepalive\n\n")
    except ConnectionResetError:
        log.info("event_stream_closed", channel=channel)
    return response
