"""The protocol envelope shared by Socket.IO acks and REST bodies."""

from __future__ import annotations

from typing import Any

from server.core.errors import HubError

# List pages, on every REST route and command that pages: at most MAX_PAGE items each,
# DEFAULT_PAGE when the client gives no `limit`.
MAX_PAGE = 100
DEFAULT_PAGE = 20
MAX_INTEGER_ID = 2**31 - 1  # PostgreSQL INTEGER: ids, heights and counts sent by clients stay below it

# Event names the Socket.IO libraries use for their own purposes (socket.io's RESERVED_EVENTS plus
# python-socketio's `disconnecting`): a client that emits one must not reach the server's connect
# or disconnect code, so the dispatcher refuses them before any handler.
RESERVED_EVENTS = frozenset({"connect", "connect_error", "disconnect", "disconnecting", "newListener",
                             "removeListener"})


def ok(data: Any = None) -> dict[str, Any]:
    """A success envelope."""
    return {"ok": True, "data": {} if data is None else data}


def error_envelope(error: HubError) -> dict[str, Any]:
    """The one function that builds an error result."""
    return {"ok": False, "error": error.to_error()}
