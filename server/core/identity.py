"""Who a request or socket acts as, once its token has been checked."""

from __future__ import annotations

import dataclasses
import uuid


@dataclasses.dataclass(frozen=True, slots=True)
class Identity:
    """Who a request or socket acts as."""

    user_id: uuid.UUID
    session_id: int
    is_admin: bool = False
    expires_at: float | None = None  # when the token that proved it ends (Unix time)
