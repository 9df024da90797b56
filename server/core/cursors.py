"""Keyset cursors for lists ordered by (timestamp, id): opaque base64url text of the last row's position."""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import uuid

from server.core import jsonutil
from server.core.errors import InvalidPayload


def encode_time_cursor(at: dt.datetime, row_id: uuid.UUID) -> str:
    """The cursor after the row at (at, row_id)."""
    raw = jsonutil.dumpb([at.isoformat(), str(row_id)])
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def decode_time_cursor(cursor: str) -> tuple[dt.datetime, uuid.UUID]:
    """The position in a cursor from `encode_time_cursor`; invalid_payload for anything else."""
    try:
        at, row_id = jsonutil.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        return dt.datetime.fromisoformat(at), uuid.UUID(row_id)
    except (ValueError, TypeError, binascii.Error):
        raise InvalidPayload("not a cursor from this list", field="cursor") from None
