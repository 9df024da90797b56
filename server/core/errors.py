"""Error codes and the one mapping from exceptions to the protocol's error object."""

from __future__ import annotations

import enum
from typing import Any


class ErrorCode(str, enum.Enum):
    """The protocol's error codes (ARCHITECTURE.md), each with its HTTP status."""

    INVALID_PAYLOAD = "invalid_payload"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    CONFLICT = "conflict"
    KYC_REQUIRED = "kyc_required"
    RATE_LIMITED = "rate_limited"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    UNAVAILABLE = "unavailable"
    INTERNAL_ERROR = "internal_error"

    @property
    def http_status(self) -> int:
        """HTTP status that REST responses use for this code."""
        return _HTTP_STATUS[self]


_HTTP_STATUS = {
    ErrorCode.INVALID_PAYLOAD: 400,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.CONFLICT: 409,
    ErrorCode.KYC_REQUIRED: 403,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.PAYLOAD_TOO_LARGE: 413,
    ErrorCode.UNAVAILABLE: 503,
    ErrorCode.INTERNAL_ERROR: 500,
}


class HubError(Exception):
    """A domain error that reaches the client as an error envelope."""

    code = ErrorCode.INTERNAL_ERROR

    def __init__(self, message: str, *, field: str | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.extra = extra

    def to_error(self) -> dict[str, Any]:
        """The `error` object of the envelope."""
        error: dict[str, Any] = {"code": self.code.value, "message": self.message}
        if self.field is not None:
            error["field"] = self.field
        error.update(self.extra)
        return error


class InvalidPayload(HubError):
    code = ErrorCode.INVALID_PAYLOAD


class Unauthorized(HubError):
    code = ErrorCode.UNAUTHORIZED


class Forbidden(HubError):
    code = ErrorCode.FORBIDDEN


class NotFound(HubError):
    code = ErrorCode.NOT_FOUND


class Conflict(HubError):
    code = ErrorCode.CONFLICT


class KycRequired(HubError):
    """The action is reserved for users whose KYC is Approved."""

    code = ErrorCode.KYC_REQUIRED


class RateLimited(HubError):
    code = ErrorCode.RATE_LIMITED

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message, retry_after=round(retry_after, 3))


class PayloadTooLarge(HubError):
    code = ErrorCode.PAYLOAD_TOO_LARGE


class Unavailable(HubError):
    code = ErrorCode.UNAVAILABLE


def error_from_exception(exc: BaseException) -> HubError:
    """Map any exception to a HubError; unknown ones become internal_error without details."""
    if isinstance(exc, HubError):
        return exc
    # Imported here so this module stays importable without the database driver loaded.
    import asyncpg

    if isinstance(exc, asyncpg.UniqueViolationError):
        return Conflict("already exists", field=_constraint_field(exc))
    if isinstance(exc, asyncpg.ForeignKeyViolationError):
        return NotFound("a referenced record does not exist", field=_constraint_field(exc))
    if isinstance(exc, asyncpg.CheckViolationError):
        return InvalidPayload("a value is out of its allowed range", field=_constraint_field(exc))
    if isinstance(exc, (asyncpg.CharacterNotInRepertoireError, asyncpg.UntranslatableCharacterError)):
        # Input no schema saw (a query string, a form field) with a NUL the database cannot store.
        return InvalidPayload("text must not contain NUL characters")
    if isinstance(exc, (asyncpg.PostgresConnectionError, asyncpg.CannotConnectNowError,
                        ConnectionError, OSError)):
        return Unavailable("a backing service is unavailable, retry shortly")
    return HubError("internal error")


def _constraint_field(exc: Any) -> str | None:
    """Best-effort column name for a constraint violation (never the offending value)."""
    column = getattr(exc, "column_name", None)
    if column:
        return column
    detail = getattr(exc, "detail", None) or ""
    if detail.startswith("Key (") and ")=" in detail:
        return detail[5:detail.index(")=")]
    return getattr(exc, "constraint_name", None)
