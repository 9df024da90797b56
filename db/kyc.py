"""Queries of KYC: submissions, decisions (`kyc_approvals`), a user's `kyc_status`.

Each function takes the connection first; the caller owns the transaction. The database does
part of the work in triggers (migrations/versions/0001_initial_schema.py):
`verify_kyc_automatically()` checks every new Pending submission and `apply_kyc_approval()`
applies an administrator's decision to the submission and its user. The rules (one pending
submission per user, a decision once) live in server/services/kyc.py.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from typing import Any

import asyncpg

from server.core.jsonutil import iso

PENDING, APPROVED, REJECTED = "Pending", "Approved", "Rejected"


@dataclasses.dataclass(frozen=True, slots=True)
class Submission:
    """A KYC submission with its latest decision (never the document or its key)."""

    id: int
    user_id: uuid.UUID
    username: str
    document_type: str | None
    media_type: str | None
    size: int | None
    status: str
    submitted_at: dt.datetime
    reviewed_by: int | None
    decided_at: dt.datetime | None
    remarks: str | None

    def to_public(self) -> dict[str, Any]:
        """The API's view (its owner's and the administrators')."""
        return {"id": self.id, "user": {"id": str(self.user_id), "username": self.username},
                "document_type": self.document_type, "media_type": self.media_type, "size": self.size,
                "status": self.status, "submitted_at": iso(self.submitted_at), "reviewed_by": self.reviewed_by,
                "decided_at": iso(self.decided_at), "remarks": self.remarks}


@dataclasses.dataclass(frozen=True, slots=True)
class StoredDocument:
    """Where a submission's encrypted document is and what unlocks it."""

    kyc_id: int
    blob_id: str | None
    media_type: str | None
    iv_hex: str | None
    wrapped_key: str | None


@dataclasses.dataclass(frozen=True, slots=True)
class LockedSubmission:
    """What a decision checks under the submission's row lock."""

    id: int
    user_id: uuid.UUID
    status: str


_SUBMISSION = """SELECT s.kyc_id AS id, s.user_id, u.username, s.document_type, s.document_media_type AS media_type,
           s.document_size AS size, s.status, s.submitted_at, s.reviewed_by,
           d.approved_at AS decided_at, d.remarks
      FROM kyc_submissions s
      JOIN users u ON u.id = s.user_id
      LEFT JOIN LATERAL (SELECT a.approved_at, a.remarks FROM kyc_approvals a
                          WHERE a.kyc_id = s.kyc_id ORDER BY a.approval_id DESC LIMIT 1) d ON true"""


async def lock_user_status(conn: asyncpg.Connection, user_id: uuid.UUID) -> str | None:
    """The user's kyc_status, their row locked until the transaction ends (None: no such user)."""
    # NO KEY UPDATE: serialises this user's submissions without blocking rows that reference the user.
    return await conn.fetchval("SELECT kyc_status FROM users WHERE id = $1 FOR NO KEY UPDATE", user_id)


async def get_user_status(conn: asyncpg.Connection, user_id: uuid.UUID) -> str | None:
    """The user's kyc_status (None: no such user)."""
    return await conn.fetchval("SELECT kyc_status FROM users WHERE id = $1", user_id)


async def set_user_status(conn: asyncpg.Connection, user_id: uuid.UUID, status: str) -> None:
    """Set a user's kyc_status outright (demo data and test fixtures; the API decides through submissions)."""
    await conn.execute("UPDATE users SET kyc_status = $2 WHERE id = $1", user_id, status)


async def pending_id(conn: asyncpg.Connection, user_id: uuid.UUID) -> int | None:
    """The id of the user's submission waiting for a decision, if any."""
    return await conn.fetchval(
        "SELECT kyc_id FROM kyc_submissions WHERE user_id = $1 AND status = 'Pending' ORDER BY kyc_id LIMIT 1",
        user_id)


async def next_id(conn: asyncpg.Connection) -> int:
    """A fresh kyc_id, taken before the insert so the document's encryption can be bound to it."""
    return await conn.fetchval("SELECT nextval(pg_get_serial_sequence('kyc_submissions', 'kyc_id'))")


async def insert_submission(conn: asyncpg.Connection, *, kyc_id: int, user_id: uuid.UUID, document_type: str,
                            blob_id: str, media_type: str, size: int, iv_hex: str, wrapped_key: str) -> Submission:
    """Insert a Pending submission (the automatic check runs on insert) and return it as checked."""
    await conn.execute(
        """INSERT INTO kyc_submissions (kyc_id, user_id, document_type, document_path, document_media_type,
               document_size, document_iv, document_key, status)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'Pending')""",
        kyc_id, user_id, document_type, blob_id, media_type, size, iv_hex, wrapped_key)
    return await get_submission(conn, kyc_id)  # type: ignore[return-value]


async def get_submission(conn: asyncpg.Connection, kyc_id: int) -> Submission | None:
    """A submission by id."""
    row = await conn.fetchrow(f"{_SUBMISSION} WHERE s.kyc_id = $1", kyc_id)
    return Submission(**dict(row)) if row else None


async def list_for_user(conn: asyncpg.Connection, user_id: uuid.UUID, limit: int) -> list[Submission]:
    """A user's submissions, newest first."""
    rows = await conn.fetch(f"{_SUBMISSION} WHERE s.user_id = $1 ORDER BY s.kyc_id DESC LIMIT $2", user_id, limit)
    return [Submission(**dict(row)) for row in rows]


async def list_by_status(conn: asyncpg.Connection, status: str, after_id: int | None, limit: int) -> list[Submission]:
    """Submissions of one status, oldest first (a review queue), after an id."""
    rows = await conn.fetch(
        f"""{_SUBMISSION} WHERE s.status = $1 AND ($2::int IS NULL OR s.kyc_id > $2)
             ORDER BY s.kyc_id LIMIT $3""", status, after_id, limit)
    return [Submission(**dict(row)) for row in rows]


async def get_document(conn: asyncpg.Connection, kyc_id: int) -> StoredDocument | None:
    """Where a submission's document is stored and its wrapped key."""
    row = await conn.fetchrow(
        """SELECT kyc_id, document_path AS blob_id, document_media_type AS media_type, document_iv AS iv_hex,
                  document_key AS wrapped_key
             FROM kyc_submissions WHERE kyc_id = $1""", kyc_id)
    return StoredDocument(**dict(row)) if row else None


async def lock_submission(conn: asyncpg.Connection, kyc_id: int) -> LockedSubmission | None:
    """A submission's owner and status, locked until the transaction ends."""
    row = await conn.fetchrow(
        "SELECT kyc_id AS id, user_id, status FROM kyc_submissions WHERE kyc_id = $1 FOR UPDATE", kyc_id)
    return LockedSubmission(**dict(row)) if row else None


async def admin_id(conn: asyncpg.Connection, user_id: uuid.UUID) -> int | None:
    """The `admin` row of a user, if they are an administrator."""
    return await conn.fetchval("SELECT admin_id FROM admin WHERE user_id = $1", user_id)


async def insert_decision(conn: asyncpg.Connection, *, kyc_id: int, admin_id: int, user_id: uuid.UUID,
                          status: str, remarks: str | None) -> None:
    """Record an administrator's decision; the apply_kyc_approval trigger updates the submission and user."""
    await conn.execute(
        "INSERT INTO kyc_approvals (kyc_id, admin_id, user_id, status, remarks) VALUES ($1, $2, $3, $4, $5)",
        kyc_id, admin_id, user_id, status, remarks)
