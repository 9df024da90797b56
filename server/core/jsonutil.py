"""JSON through orjson; money (Decimal) travels as a string so no precision is lost."""

from __future__ import annotations

import datetime as dt
import uuid
from decimal import Decimal
from typing import Any

import orjson


def _default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return format(value, "f")  # str() would write a zero of NUMERIC(20,9) as "0E-9"
    if isinstance(value, uuid.UUID):  # asyncpg's own UUID subclass, which orjson does not know
        return str(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    raise TypeError(f"cannot serialise {type(value).__name__}")


def dumps(value: Any, **_ignored: Any) -> str:
    """Serialise to a str (python-socketio and aiohttp want str)."""
    return orjson.dumps(value, default=_default, option=orjson.OPT_NON_STR_KEYS).decode()


def dumpb(value: Any) -> bytes:
    """Serialise to bytes."""
    return orjson.dumps(value, default=_default, option=orjson.OPT_NON_STR_KEYS)


def loads(raw: str | bytes, **_ignored: Any) -> Any:
    """Parse JSON text."""
    return orjson.loads(raw)


def iso(value: dt.datetime | None) -> str | None:
    """A timestamp as ISO 8601 text for a JSON view; None stays None."""
    return value.isoformat() if value is not None else None
