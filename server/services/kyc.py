"""KYC rules: document submissions, administrators' decisions, and the verified-only gate.

- A user submits one identity document (PDF, PNG or JPEG, recognised by its first bytes, at
  most KYC_MAX_BYTES) with its type. It is encrypted with its own key (AES-256-GCM bound to the
  submission id), the ciphertext goes to the blob store and the key is stored only wrapped under
  MASTER_KEY. A user has at most one Pending submission, and an Approved user submits no more
  (the automatic check would set them back to Pending). Both are checked under the user's row
  lock, so two concurrent submissions cannot both pass.
- The database's automatic check (`verify_kyc_automatically()`) runs on insert; its verdict is
  read back, so a submission it rejects is answered and announced as Rejected.
- An administrator approves or rejects a Pending submission once: the submission's row lock
  orders concurrent decisions and the second one finds it decided (`conflict`). The decision is
  a `kyc_approvals` row; the `apply_kyc_approval()` trigger updates the submission and the user.
- Every change of a user's `kyc_status` is announced on `user:<id>` as `kyc_status_changed`
  through the outbox, in the transaction that makes it.
- `require_verified` is the gate of verified-only actions (publishing a DataPod for sale).
"""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg
import structlog
from cryptography.exceptions import InvalidTag

from db import kyc as queries
from db import outbox
from server.adapters.blobs import BlobStore
from server.core.crypto import decrypt_dataset, encrypt_dataset, unwrap_key, wrap_key
from server.core.errors import (
    Conflict,
    ErrorCode,
    Forbidden,
    HubError,
    InvalidPayload,
    KycRequired,
    NotFound,
    Unavailable,
)
from server.core.jsonutil import iso
from server.realtime.hub import user_channel

log = structlog.get_logger(__name__)

PENDING, APPROVED, REJECTED = queries.PENDING, queries.APPROVED, queries.REJECTED
# The types the automatic check accepts (verify_kyc_automatically(); document_type is VARCHAR(10)).
DOCUMENT_TYPES = ("passport", "id_card", "license")
STATUS_CHANGED = "kyc_status_changed"
MAX_OWN_SUBMISSIONS = 50  # how many of their submissions a user is shown, newest first

# A document is what its first bytes say it is, whatever its name or declared content type.
_SIGNATURES = ((b"%PDF-", "application/pdf"), (b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"))
EXTENSIONS = {"application/pdf": "pdf", "image/png": "png", "image/jpeg": "jpg"}


class DocumentUnreadable(HubError):
    """A stored document does not decrypt (tampered, or another key): reported, never served."""

    code = ErrorCode.INTERNAL_ERROR


def media_type_of(head: bytes) -> str:
    """The document's media type from its first bytes; InvalidPayload unless PDF, PNG or JPEG."""
    for signature, media_type in _SIGNATURES:
        if head.startswith(signature):
            return media_type
    raise InvalidPayload("the document must be a PDF, PNG or JPEG file", field="file")


def associated_data(kyc_id: int) -> bytes:
    """What a submission's ciphertext and wrapped key are bound to."""
    return f"kyc:{kyc_id}".encode()


async def require_verified(conn: asyncpg.Connection, user_id: uuid.UUID) -> None:
    """Refuse (`kyc_required`) unless the user's KYC is Approved."""
    status = await queries.get_user_status(conn, user_id)
    if status != APPROVED:
        raise KycRequired("this action needs a verified identity: submit a document at POST /api/v1/me/kyc "
                          f"(your KYC status is {status})", kyc_status=status)


async def _announce(conn: asyncpg.Connection, submission: queries.Submission) -> None:
    await outbox.enqueue(conn, user_channel(submission.user_id), STATUS_CHANGED, {
        "kyc_status": submission.status, "kyc_id": submission.id, "remarks": submission.remarks,
        "decided_at": iso(submission.decided_at)})


async def submit(conn: asyncpg.Connection, blobs: BlobStore, master_key: bytes, user_id: uuid.UUID, *,
                 document_type: str, document: bytes) -> queries.Submission:
    """Store a checked document encrypted and insert its submission; refusals store nothing."""
    media_type = media_type_of(document)
    async with conn.transaction():
        before = await queries.lock_user_status(conn, user_id)
        if before is None:
            raise NotFound("no such user")
        if before == APPROVED:
            raise Conflict("your identity is already verified", field="kyc_status")
        waiting = await queries.pending_id(conn, user_id)
        if waiting is not None:
            raise Conflict(f"submission {waiting} is still waiting for a decision", field="kyc_id",
                           kyc_id=waiting)
        # Stored only once the checks above passed under the lock: a refused submission leaves no blob.
        kyc_id = await queries.next_id(conn)
        sealed = encrypt_dataset(document, associated_data(kyc_id))
        blob_id = await blobs.put(sealed.ciphertext)
        submission = await queries.insert_submission(
            conn, kyc_id=kyc_id, user_id=user_id, document_type=document_type, blob_id=blob_id,
            media_type=media_type, size=len(document), iv_hex=sealed.iv_hex,
            wrapped_key=wrap_key(master_key, sealed.key, associated_data(kyc_id)))
        if submission.status != before:
            await _announce(conn, submission)
    log.info("kyc_submitted", kyc_id=kyc_id, user_id=str(user_id), status=submission.status,
             media_type=media_type, size=len(document))
    return submission


async def decide(conn: asyncpg.Connection, admin_user_id: uuid.UUID, kyc_id: int, *, approve: bool,
                 remarks: str | None) -> queries.Submission:
    """An administrator's decision on a Pending submission, once; announced to its user."""
    async with conn.transaction():
        admin_id = await queries.admin_id(conn, admin_user_id)
        if admin_id is None:
            raise Forbidden("administrators only")
        locked = await queries.lock_submission(conn, kyc_id)
        if locked is None:
            raise NotFound("no such KYC submission", field="kyc_id")
        if locked.user_id == admin_user_id:
            raise Forbidden("an administrator may not decide their own submission", field="kyc_id")
        if locked.status != PENDING:
            raise Conflict(f"the submission was already decided: {locked.status}", field="kyc_id",
                           status=locked.status)
        await queries.insert_decision(conn, kyc_id=kyc_id, admin_id=admin_id, user_id=locked.user_id,
                                      status=APPROVED if approve else REJECTED, remarks=remarks)
        submission = await queries.get_submission(conn, kyc_id)
        await _announce(conn, submission)  # type: ignore[arg-type]
    log.info("kyc_decided", kyc_id=kyc_id, admin_id=admin_id, status=submission.status)  # type: ignore[union-attr]
    return submission  # type: ignore[return-value]


async def own_status(conn: asyncpg.Connection, user_id: uuid.UUID) -> dict[str, Any]:
    """A user's KYC status and their own submissions, newest first."""
    status = await queries.get_user_status(conn, user_id)
    if status is None:
        raise NotFound("no such user")
    submissions = await queries.list_for_user(conn, user_id, MAX_OWN_SUBMISSIONS)
    return {"kyc_status": status, "verified": status == APPROVED,
            "submissions": [submission.to_public() for submission in submissions]}


async def list_submissions(conn: asyncpg.Connection, status: str, after_id: int | None, limit: int) -> dict[str, Any]:
    """Submissions of one status, oldest first (a review queue), and the id the next page starts after."""
    found = await queries.list_by_status(conn, status, after_id, limit)
    next_after = found[-1].id if len(found) == limit else None
    return {"submissions": [submission.to_public() for submission in found], "next_after_id": next_after}


async def read_document(conn: asyncpg.Connection, blobs: BlobStore, master_key: bytes, kyc_id: int, *,
                        admin_user_id: uuid.UUID) -> tuple[str, bytes]:
    """A submission's document, decrypted and authenticated, for an administrator (every read is logged)."""
    stored = await queries.get_document(conn, kyc_id)
    if stored is None:
        raise NotFound("no such KYC submission", field="kyc_id")
    if stored.blob_id is None or stored.wrapped_key is None or stored.iv_hex is None:
        raise NotFound("this submission has no stored document", field="kyc_id")
    try:
        ciphertext = await blobs.get(stored.blob_id)
    except KeyError:
        raise Unavailable("the document's blob is not available right now") from None
    aad = associated_data(kyc_id)
    try:
        key = unwrap_key(master_key, stored.wrapped_key, aad)
        document = decrypt_dataset(ciphertext, key, bytes.fromhex(stored.iv_hex), aad)
    except (InvalidTag, ValueError) as exc:
        log.error("kyc_document_unreadable", kyc_id=kyc_id, error=type(exc).__name__)
        raise DocumentUnreadable("the stored document failed its integrity check; it was not served") from None
    media_type = stored.media_type or media_type_of(document)
    log.info("kyc_document_read", kyc_id=kyc_id, admin_user_id=str(admin_user_id), size=len(document))
    return media_type, document
