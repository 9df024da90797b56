"""Queries on purchases, their durable jobs, payment receipts, download logs, reviews and buyers' keys.

Each function takes the connection first; the caller owns the transaction. Every status change is a
compare-and-set (`UPDATE ... WHERE status = <expected> RETURNING`), so it happens at most once.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from decimal import Decimal
from typing import Any

import asyncpg

from server.core.jsonutil import iso

JOBS_NOTIFY_CHANNEL = "hub_purchase_jobs"
ACTIVE_STATUSES = ("pending_payment", "processing", "completed")


@dataclasses.dataclass(frozen=True, slots=True)
class PodForSale:
    """What buying and delivering a DataPod needs."""

    id: uuid.UUID
    seller_id: uuid.UUID
    title: str
    price_sui: Decimal
    published: bool
    wrapped_key: str
    encryption_key_hash: str
    encryption_iv: str
    walrus_blob_id: str
    file_type: str | None
    file_size: int | None
    data_hash: str | None


@dataclasses.dataclass(frozen=True, slots=True)
class Purchase:
    """A purchase with its DataPod's title and seller and its escrow status."""

    id: uuid.UUID
    buyer_id: uuid.UUID
    datapod_id: uuid.UUID
    seller_id: uuid.UUID
    datapod_title: str
    payment_tx_digest: str
    amount_sui: Decimal
    status: str
    decryption_key: str | None
    decryption_iv: str | None
    encrypted_blob_id: str | None
    created_at: dt.datetime
    completed_at: dt.datetime | None
    updated_at: dt.datetime
    escrow_status: str | None
    step: str | None
    reviewed: bool
    # The buyer-history fields of the seed's query (category, seller name, the buyer's own review).
    category: str | None
    seller_name: str | None
    datapod_rating: Decimal
    review_rating: int | None
    review_comment: str | None
    review_updated_at: dt.datetime | None
    price_paid: Decimal | None  # what the payment receipt says was paid; None before verification
    escrow_settled_at: dt.datetime | None

    def to_public(self) -> dict[str, Any]:
        """The buyer's view (the key envelope is served by its own route)."""
        review = None if self.review_rating is None else {
            "rating": self.review_rating, "comment": self.review_comment, "updated_at": iso(self.review_updated_at)}
        return {"id": str(self.id), "datapod_id": str(self.datapod_id), "seller_id": str(self.seller_id),
                "datapod_title": self.datapod_title, "category": self.category, "seller_name": self.seller_name,
                "datapod_rating": self.datapod_rating, "payment_tx_digest": self.payment_tx_digest,
                "amount_sui": self.amount_sui, "price_paid": self.price_paid, "status": self.status,
                "escrow_status": self.escrow_status, "escrow_settled": self.escrow_settled_at is not None,
                "step": self.step, "key_ready": self.decryption_key is not None, "reviewed": self.reviewed,
                "review": review, "created_at": self.created_at.isoformat(),
                "completed_at": iso(self.completed_at)}


@dataclasses.dataclass(frozen=True, slots=True)
class Job:
    """A claimed purchase job."""

    purchase_id: uuid.UUID
    step: str
    attempts: int
    locked_by: str | None


@dataclasses.dataclass(frozen=True, slots=True)
class Review:
    """A buyer's review of a DataPod they bought."""

    id: uuid.UUID
    purchase_id: uuid.UUID
    buyer_id: uuid.UUID
    datapod_id: uuid.UUID
    rating: int
    comment: str | None
    created_at: dt.datetime

    def to_public(self) -> dict[str, Any]:
        """The review as the API shows it."""
        return {"id": str(self.id), "purchase_id": str(self.purchase_id), "datapod_id": str(self.datapod_id),
                "buyer_id": str(self.buyer_id), "rating": self.rating, "comment": self.comment,
                "created_at": self.created_at.isoformat()}


_POD_COLUMNS = """id, seller_id, title, price_sui, published, wrapped_key, encryption_key_hash, encryption_iv,
    walrus_blob_id,
    file_type, file_size, data_hash"""

_PURCHASE_SELECT = """
    SELECT p.id, p.buyer_id, p.datapod_id, d.seller_id, d.title AS datapod_title, p.payment_tx_digest,
           p.amount_sui, p.status, p.decryption_key, p.decryption_iv, p.encrypted_blob_id, p.created_at,
           p.completed_at, p.updated_at, e.status AS escrow_status, j.step, r.id IS NOT NULL AS reviewed,
           d.category, coalesce(s.name, s.username) AS seller_name, d.average_rating AS datapod_rating,
           r.rating AS review_rating, r.comment AS review_comment, r.updated_at AS review_updated_at,
           pr.amount_sui AS price_paid, e.settled_at AS escrow_settled_at
      FROM purchases p
      JOIN datapods d ON d.id = p.datapod_id
      LEFT JOIN users s ON s.id = d.seller_id
      LEFT JOIN escrow_transactions e ON e.purchase_id = p.id
      LEFT JOIN purchase_jobs j ON j.purchase_id = p.id
      LEFT JOIN reviews r ON r.purchase_id = p.id
      -- Only this purchase's receipt for its current digest: a retried purchase's old payment is not it.
      LEFT JOIN payment_receipts pr ON pr.payment_tx_digest = p.payment_tx_digest AND pr.purchase_id = p.id"""


def _purchase(row: asyncpg.Record | None) -> Purchase | None:
    return None if row is None else Purchase(**dict(row))


async def get_pod(conn: asyncpg.Connection, datapod_id: uuid.UUID, *, share_lock: bool = False) -> PodForSale | None:
    """A DataPod as purchases need it (FOR SHARE when `share_lock`: a delete or a new version waits)."""
    row = await conn.fetchrow(f"SELECT {_POD_COLUMNS} FROM datapods WHERE id = $1"
                              + (" FOR SHARE" if share_lock else ""), datapod_id)
    return None if row is None else PodForSale(**dict(row))


async def digest_already_paid(conn: asyncpg.Connection, digest: str) -> bool:
    """Whether a verified payment already used this digest (ever, for any purchase)."""
    return await conn.fetchval("SELECT EXISTS (SELECT 1 FROM payment_receipts WHERE payment_tx_digest = $1)",
                               digest)


async def release_unpaid_digest(conn: asyncpg.Connection, digest: str) -> int:
    """Free a digest held by failed purchases it never paid for (someone else's payment submitted
    first by another user must not block its real payer); returns how many rows let go of it."""
    # The column is NOT NULL UNIQUE, so the row keeps a marker that can never be a real digest.
    return int((await conn.execute(
        """UPDATE purchases SET payment_tx_digest = 'released:' || id::text
           WHERE payment_tx_digest = $1 AND status = 'failed'
             AND NOT EXISTS (SELECT 1 FROM payment_receipts r WHERE r.payment_tx_digest = $1)""",
        digest)).split()[-1])


async def create_purchase(conn: asyncpg.Connection, buyer_id: uuid.UUID, pod: PodForSale,
                          digest: str) -> uuid.UUID | None:
    """Insert a pending purchase, or restart the buyer's failed or refunded one for this pod.

    Returns None when the buyer already has an active purchase of the pod. A digest used by another
    purchase raises UniqueViolationError (purchases_payment_tx_digest_key).
    """
    # unique_buyer_datapod keeps one row per buyer and pod (docs/schema.md), so a retry reuses it.
    return await conn.fetchval(
        """INSERT INTO purchases (buyer_id, datapod_id, payment_tx_digest, amount_sui)
           VALUES ($1, $2, $3, $4)
           ON CONFLICT ON CONSTRAINT unique_buyer_datapod DO UPDATE
              SET payment_tx_digest = EXCLUDED.payment_tx_digest, amount_sui = EXCLUDED.amount_sui,
                  status = 'pending_payment', created_at = now(), completed_at = NULL,
                  decryption_key = NULL, decryption_iv = NULL, encrypted_blob_id = NULL
            WHERE purchases.status IN ('failed', 'refunded')
           RETURNING id""",
        buyer_id, pod.id, digest, pod.price_sui)


async def get_purchase(conn: asyncpg.Connection, purchase_id: uuid.UUID) -> Purchase | None:
    """A purchase by id (callers check ownership)."""
    return _purchase(await conn.fetchrow(f"{_PURCHASE_SELECT} WHERE p.id = $1", purchase_id))


async def list_purchases(conn: asyncpg.Connection, buyer_id: uuid.UUID, *, limit: int,
                         before: tuple[dt.datetime, uuid.UUID] | None = None,
                         status: str | None = None,
                         datapod_id: uuid.UUID | None = None, category: str | None = None,
                         since: dt.datetime | None = None, until: dt.datetime | None = None) -> list[Purchase]:
    """The buyer's purchases (filtered by status, DataPod, category, and created in [since, until)),
    newest first, keyset-paginated by (created_at, id)."""
    rows = await conn.fetch(
        f"""{_PURCHASE_SELECT}
            WHERE p.buyer_id = $1
              AND ($2::timestamptz IS NULL OR (p.created_at, p.id) < ($2, $3::uuid))
              AND ($4::text IS NULL OR p.status = $4)
              AND ($6::uuid IS NULL OR p.datapod_id = $6)
              AND ($7::text IS NULL OR d.category = $7)
              AND ($8::timestamptz IS NULL OR p.created_at >= $8)
              AND ($9::timestamptz IS NULL OR p.created_at < $9)
            ORDER BY p.created_at DESC, p.id DESC LIMIT $5""",
        buyer_id, before[0] if before else None, before[1] if before else None, status, limit,
        datapod_id, category, since, until)
    return [_purchase(row) for row in rows]  # type: ignore[misc]


async def lock_purchase(conn: asyncpg.Connection, purchase_id: uuid.UUID) -> Purchase | None:
    """The purchase row locked until the transaction ends (serialises refunds with completion)."""
    await conn.execute("SELECT 1 FROM purchases WHERE id = $1 FOR UPDATE", purchase_id)
    return await get_purchase(conn, purchase_id)


async def set_status(conn: asyncpg.Connection, purchase_id: uuid.UUID, expected: tuple[str, ...],
                     new: str) -> bool:
    """Compare-and-set the purchase status; False when it was not in an expected status."""
    completed = "now()" if new == "completed" else "completed_at"
    row = await conn.fetchrow(
        f"""UPDATE purchases SET status = $3, completed_at = {completed}
            WHERE id = $1 AND status = ANY($2::text[]) RETURNING id""",
        purchase_id, list(expected), new)
    return row is not None


async def set_key(conn: asyncpg.Connection, purchase_id: uuid.UUID, *, decryption_key: str,
                  decryption_iv: str, encrypted_blob_id: str) -> bool:
    """Store the buyer's wrapped key while the purchase is processing."""
    row = await conn.fetchrow(
        """UPDATE purchases SET decryption_key = $2, decryption_iv = $3, encrypted_blob_id = $4
           WHERE id = $1 AND status = 'processing' RETURNING id""",
        purchase_id, decryption_key, decryption_iv, encrypted_blob_id)
    return row is not None


async def record_receipt(conn: asyncpg.Connection, *, digest: str, purchase_id: uuid.UUID, chain: str,
                         sender: str | None, receiver: str | None, amount_sui: Decimal) -> bool:
    """Record a verified payment; False when the digest already paid for something."""
    row = await conn.fetchrow(
        """INSERT INTO payment_receipts (payment_tx_digest, purchase_id, chain, sender, receiver, amount_sui)
           VALUES ($1, $2, $3, $4, $5, $6)
           ON CONFLICT (payment_tx_digest) DO NOTHING RETURNING payment_tx_digest""",
        digest, purchase_id, chain, sender, receiver, amount_sui)
    return row is not None


async def receipt_amount(conn: asyncpg.Connection, purchase_id: uuid.UUID, digest: str) -> Decimal | None:
    """What this purchase's own receipt for the digest says was paid; None when there is none."""
    return await conn.fetchval(
        "SELECT amount_sui FROM payment_receipts WHERE payment_tx_digest = $1 AND purchase_id = $2",
        digest, purchase_id)


# --- jobs ---------------------------------------------------------------------------------------

async def enqueue_job(conn: asyncpg.Connection, purchase_id: uuid.UUID) -> None:
    """Start (or restart) the purchase's job at its first step and wake a worker at commit."""
    await conn.execute(
        """WITH job AS (
               INSERT INTO purchase_jobs (purchase_id) VALUES ($1)
               ON CONFLICT (purchase_id) DO UPDATE
                  SET step = 'verify', attempts = 0, run_after = now(), locked_by = NULL,
                      locked_until = NULL, last_error = NULL
               RETURNING purchase_id)
           SELECT pg_notify($2, '') FROM job""",
        purchase_id, JOBS_NOTIFY_CHANNEL)


async def wake_payment_checks(conn: asyncpg.Connection, tx_hashes: list[str]) -> int:
    """Jobs waiting out a backoff to verify one of these payments run now, and a worker is woken:
    their transactions were just sealed (or rejected) in a block. How many were woken."""
    woken = await conn.fetchval(
        """WITH woken AS (
               UPDATE purchase_jobs j SET run_after = now()
                 FROM purchases p
                WHERE p.id = j.purchase_id AND p.payment_tx_digest = ANY($1::text[])
                  AND j.step = 'verify' AND j.run_after > now() AND j.locked_by IS NULL
               RETURNING 1)
           SELECT count(*) FROM woken""",
        tx_hashes)
    if woken:
        await conn.execute("SELECT pg_notify($1, '')", JOBS_NOTIFY_CHANNEL)
    return woken


async def claim_job(conn: asyncpg.Connection, worker_id: str, lease_seconds: float,
                    purchase_id: uuid.UUID | None = None) -> Job | None:
    """Lease the oldest runnable job (SKIP LOCKED: concurrent workers never claim the same one)."""
    row = await conn.fetchrow(
        """UPDATE purchase_jobs j
              SET locked_by = $1, locked_until = now() + make_interval(secs => $2), attempts = j.attempts + 1
            WHERE j.purchase_id = (
                  SELECT purchase_id FROM purchase_jobs
                   WHERE run_after <= now() AND (locked_until IS NULL OR locked_until < now())
                     AND ($3::uuid IS NULL OR purchase_id = $3)
                   ORDER BY run_after LIMIT 1
                   FOR UPDATE SKIP LOCKED)
           RETURNING j.purchase_id, j.step, j.attempts, j.locked_by""",
        worker_id, lease_seconds, purchase_id)
    return None if row is None else Job(**dict(row))


async def hold_job(conn: asyncpg.Connection, purchase_id: uuid.UUID, worker_id: str, step: str | None,
                   lease_seconds: float) -> bool:
    """Extend our unexpired lease (at `step`, or any step when None) and lock the row; False if we lost it.

    A step calls it inside its transaction before committing; the running step's heartbeat calls
    it on its own (step None) to keep the lease while the step is busy outside the database.
    """
    row = await conn.fetchrow(
        """UPDATE purchase_jobs SET locked_until = now() + make_interval(secs => $4)
            WHERE purchase_id = $1 AND locked_by = $2 AND ($3::text IS NULL OR step = $3)
              AND locked_until >= now()
           RETURNING purchase_id""",
        purchase_id, worker_id, step, lease_seconds)
    return row is not None


async def advance_job(conn: asyncpg.Connection, purchase_id: uuid.UUID, step: str) -> None:
    """Move a held job to its next step."""
    await conn.execute("UPDATE purchase_jobs SET step = $2, attempts = 0, last_error = NULL WHERE purchase_id = $1",
                       purchase_id, step)


async def retry_job(conn: asyncpg.Connection, purchase_id: uuid.UUID, worker_id: str, delay: float,
                    error: str) -> None:
    """Release our lease and run the job again after `delay` seconds."""
    await conn.execute(
        """UPDATE purchase_jobs SET run_after = now() + make_interval(secs => $3), locked_by = NULL,
                  locked_until = NULL, last_error = $4
            WHERE purchase_id = $1 AND locked_by = $2""",
        purchase_id, worker_id, delay, error[:1000])


async def job_attempts(conn: asyncpg.Connection, purchase_id: uuid.UUID, worker_id: str | None = None) -> int | None:
    """How many times the job was claimed; None when there is no job (or, given a worker, not its lease)."""
    return await conn.fetchval(
        "SELECT attempts FROM purchase_jobs WHERE purchase_id = $1 AND ($2::text IS NULL OR locked_by = $2)",
        purchase_id, worker_id)


async def finish_job(conn: asyncpg.Connection, purchase_id: uuid.UUID) -> None:
    """Forget a job that reached its end."""
    await conn.execute("DELETE FROM purchase_jobs WHERE purchase_id = $1", purchase_id)


# --- downloads, reviews, buyer keys ---------------------------------------------------------------

async def log_download(conn: asyncpg.Connection, purchase: Purchase) -> None:
    """One download_logs row per download."""
    await conn.execute("INSERT INTO download_logs (purchase_id, buyer_id, datapod_id) VALUES ($1, $2, $3)",
                       purchase.id, purchase.buyer_id, purchase.datapod_id)


async def log_link_download(conn: asyncpg.Connection, purchase: Purchase, link_issued_at: dt.datetime) -> bool:
    """A download_logs row unless the purchase already has one since the link was issued (one per link);
    whether it was written. Run in a transaction: the purchase row lock makes racing requests take turns."""
    await conn.execute("SELECT 1 FROM purchases WHERE id = $1 FOR UPDATE", purchase.id)
    row = await conn.fetchrow(
        """INSERT INTO download_logs (purchase_id, buyer_id, datapod_id)
           SELECT $1, $2, $3
            WHERE NOT EXISTS (SELECT 1 FROM download_logs WHERE purchase_id = $1 AND downloaded_at >= $4)
           RETURNING id""",
        purchase.id, purchase.buyer_id, purchase.datapod_id, link_issued_at)
    return row is not None


async def add_review(conn: asyncpg.Connection, purchase: Purchase, rating: int, comment: str | None) -> Review:
    """Insert the purchase's review; a second one raises UniqueViolationError."""
    row = await conn.fetchrow(
        """INSERT INTO reviews (purchase_id, buyer_id, datapod_id, rating, comment)
           VALUES ($1, $2, $3, $4, $5)
           RETURNING id, purchase_id, buyer_id, datapod_id, rating, comment, created_at""",
        purchase.id, purchase.buyer_id, purchase.datapod_id, rating, comment)
    return Review(**dict(row))


async def get_review(conn: asyncpg.Connection, purchase_id: uuid.UUID) -> Review | None:
    """The purchase's review, if any."""
    row = await conn.fetchrow(
        "SELECT id, purchase_id, buyer_id, datapod_id, rating, comment, created_at FROM reviews WHERE purchase_id = $1",
        purchase_id)
    return None if row is None else Review(**dict(row))


async def update_review(conn: asyncpg.Connection, purchase_id: uuid.UUID, *, rating: int | None,
                        comment: str | None, set_comment: bool) -> Review | None:
    """Change the review's rating (when given) and comment (when `set_comment`; None clears it); None
    when the purchase has no review. The rating triggers recompute the pod's and the seller's averages."""
    row = await conn.fetchrow(
        """UPDATE reviews SET rating = coalesce($2, rating),
                              comment = CASE WHEN $4 THEN $3 ELSE comment END
            WHERE purchase_id = $1
           RETURNING id, purchase_id, buyer_id, datapod_id, rating, comment, created_at""",
        purchase_id, rating, comment, set_comment)
    return None if row is None else Review(**dict(row))


async def delete_review(conn: asyncpg.Connection, purchase_id: uuid.UUID) -> Review | None:
    """Delete the purchase's review (the triggers recompute the averages); None when there was none."""
    row = await conn.fetchrow(
        """DELETE FROM reviews WHERE purchase_id = $1
           RETURNING id, purchase_id, buyer_id, datapod_id, rating, comment, created_at""", purchase_id)
    return None if row is None else Review(**dict(row))


async def datapod_rating(conn: asyncpg.Connection, datapod_id: uuid.UUID) -> tuple[Decimal, int]:
    """The pod's average rating (maintained by the review triggers) and its review count."""
    row = await conn.fetchrow(
        """SELECT d.average_rating, (SELECT count(*) FROM reviews r WHERE r.datapod_id = d.id) AS reviews
           FROM datapods d WHERE d.id = $1""", datapod_id)
    return row["average_rating"], row["reviews"]


async def purchase_count(conn: asyncpg.Connection, datapod_id: uuid.UUID) -> int:
    """The pod's completed-purchase counter (maintained by the purchase-count trigger)."""
    return await conn.fetchval("SELECT purchase_count FROM datapods WHERE id = $1", datapod_id)


async def set_x25519_key(conn: asyncpg.Connection, user_id: uuid.UUID, public_key: bytes | None) -> None:
    """Register (or clear) the user's X25519 public key."""
    await conn.execute("UPDATE users SET x25519_public_key = $2 WHERE id = $1", user_id, public_key)


async def get_x25519_key(conn: asyncpg.Connection, user_id: uuid.UUID) -> bytes | None:
    """The user's registered X25519 public key, if any."""
    return await conn.fetchval("SELECT x25519_public_key FROM users WHERE id = $1", user_id)


async def sui_addresses(conn: asyncpg.Connection, *user_ids: uuid.UUID) -> dict[uuid.UUID, str | None]:
    """Users' Sui addresses by id."""
    rows = await conn.fetch("SELECT id, sui_address FROM users WHERE id = ANY($1::uuid[])", list(user_ids))
    return {row["id"]: row["sui_address"] for row in rows}
