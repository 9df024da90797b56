"""The protocol envelope shared by Socket.IO acks and REST bodies."""

from __future__ import annotations

from typing import Any

from server.core.errors import HubError


def ok(data: Any = None) -> dict[str, Any]:
    """A success envelope."""
    return {"ok": True, "data": {} if data is None else data}


def error_envelope(error: HubError) -> dict[str, Any]:
    """The one function that builds an error result."""
    return {"ok": False, "error": error.to_error()}
