"""Queries of the seller's side: figures summarised from the rows, charts by bucket, payouts, versions,
page views, resealing buyers' keys for a new version, and deletion.

Every figure is an aggregate of the rows it names (purchases, escrow_transactions, download_logs,
datapod_views, reviews), computed when asked: there is no counter to drift. Each function takes
the connection first so the caller owns the transaction.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from decimal import Decimal
from typing import Any

import asyncpg

from server.core.jsonutil import iso

CONVERSION_QUANTUM = Decimal("0.0001")


@dataclasses.dataclass(frozen=True, slots=True)
class Figures:
    """A seller's figures over some of their DataPods (one, or all of them)."""

    sales: int
    revenue_gross: Decimal
    platform_fee: Decimal
    revenue_net: Decimal
    escrow_held_count: int
    escrow_held: Decimal
    escrow_released_count: int
    escrow_released: Decimal
    escrow_released_unsettled: Decimal
    escrow_refunded_count: int
    escrow_refunded: Decimal
    payouts_count: int
    payouts_net: Decimal
    downloads: int
    unique_downloaders: int
    views: int
    reviews: int
    average_rating: Decimal | None

    @property
    def conversion(self) -> Decimal | None:
        """Sales per page view (None before the first view)."""
        if not self.views:
            return None
        return (Decimal(self.sales) / Decimal(self.views)).quantize(CONVERSION_QUANTUM)

    def to_public(self) -> dict[str, Any]:
        """The JSON view: every figure, and the conversion."""
        return {**dataclasses.asdict(self), "conversion": self.conversion}


FIGURE_FIELDS = tuple(field.name for field in dataclasses.fields(Figures))


@dataclasses.dataclass(frozen=True, slots=True)
class PodFigures:
    """One of the seller's DataPods with its figures."""

    id: uuid.UUID
    title: str
    category: str | None
    price_sui: Decimal
    published: bool
    deleted_at: dt.datetime | None
    version: int
    created_at: dt.datetime
    figures: Figures

    def to_public(self) -> dict[str, Any]:
        """The JSON view."""
        return {"datapod_id": str(self.id), "title": self.title, "category": self.category,
                "price_sui": self.price_sui, "published": self.published, "deleted_at": iso(self.deleted_at),
                "version": self.version, "created_at": self.created_at.isoformat(), **self.figures.to_public()}


@dataclasses.dataclass(frozen=True, slots=True)
class Bucket:
    """The figures of one day or week (UTC) of a chart."""

    start: dt.datetime
    sales: int
    revenue_gross: Decimal
    platform_fee: Decimal
    revenue_net: Decimal
    escrow_released: Decimal
    downloads: int
    unique_downloaders: int
    views: int
    reviews: int
    average_rating: Decimal | None
    cumulative_rating: Decimal | None

    def to_public(self) -> dict[str, Any]:
        """The JSON view (`start` is the bucket's first instant, UTC)."""
        view = dataclasses.asdict(self)
        view["start"] = self.start.replace(tzinfo=dt.timezone.utc).isoformat()
        view["conversion"] = ((Decimal(self.sales) / Decimal(self.views)).quantize(CONVERSION_QUANTUM)
                              if self.views else None)
        return view


@dataclasses.dataclass(frozen=True, slots=True)
class Payout:
    """A released escrow whose payout to the seller is sealed on the chain."""

    escrow_id: uuid.UUID
    purchase_id: uuid.UUID
    datapod_id: uuid.UUID
    datapod_title: str
    amount: Decimal
    fee: Decimal
    net: Decimal
    settlement_tx_hash: str | None
    fee_tx_hash: str | None
    released_at: dt.datetime | None
    settled_at: dt.datetime

    def to_public(self) -> dict[str, Any]:
        """The JSON view."""
        return {"escrow_id": str(self.escrow_id), "purchase_id": str(self.purchase_id),
                "datapod_id": str(self.datapod_id), "datapod_title": self.datapod_title, "amount": self.amount,
                "fee": self.fee, "net": self.net, "settlement_tx_hash": self.settlement_tx_hash,
                "fee_tx_hash": self.fee_tx_hash, "released_at": iso(self.released_at),
                "settled_at": self.settled_at.isoformat()}


@dataclasses.dataclass(frozen=True, slots=True)
class Version:
    """One version of a DataPod's dataset file (the key itself is never kept for old versions)."""

    version: int
    walrus_blob_id: str
    walrus_storage_size: int | None
    encryption_key_hash: str
    data_hash: str | None
    file_type: str | None
    file_size: int | None
    created_at: dt.datetime

    def to_public(self) -> dict[str, Any]:
        """The JSON view."""
        return {**dataclasses.asdict(self), "created_at": self.created_at.isoformat()}


@dataclasses.dataclass(frozen=True, slots=True)
class OwnedPod:
    """What the seller's changes need of a DataPod, read under its row lock."""

    id: uuid.UUID
    seller_id: uuid.UUID | None
    title: str
    category: str | None
    published: bool
    deleted_at: dt.datetime | None
    schema: dict[str, Any] | None


@dataclasses.dataclass(frozen=True, slots=True)
class KeyHolder:
    """A purchase whose sealed key must follow its DataPod's current key."""

    purchase_id: uuid.UUID
    buyer_id: uuid.UUID


# --- figures ------------------------------------------------------------------------------------

# The figures of the pods in CTE `pods` (one column, `id`): each line is one aggregate over its rows.
# Sales are completed purchases; what they earned is what their escrows hold or paid (the amount
# actually paid in), less the platform fee recorded when the payout was made.
_FIGURES = """
    (SELECT count(*) FROM purchases p WHERE p.datapod_id IN (SELECT id FROM pods) AND p.status = 'completed')
        AS sales,
    (SELECT coalesce(sum(coalesce(e.amount_sui, p.amount_sui)), 0) FROM purchases p
       LEFT JOIN escrow_transactions e ON e.purchase_id = p.id
      WHERE p.datapod_id IN (SELECT id FROM pods) AND p.status = 'completed') AS revenue_gross,
    (SELECT coalesce(sum(e.fee_amount), 0) FROM purchases p JOIN escrow_transactions e ON e.purchase_id = p.id
      WHERE p.datapod_id IN (SELECT id FROM pods) AND p.status = 'completed') AS platform_fee,
    esc.escrow_held_count, esc.escrow_held, esc.escrow_released_count, esc.escrow_released,
    esc.escrow_released_unsettled, esc.escrow_refunded_count, esc.escrow_refunded, esc.payouts_count,
    esc.payouts_net,
    (SELECT count(*) FROM download_logs l WHERE l.datapod_id IN (SELECT id FROM pods)) AS downloads,
    (SELECT count(DISTINCT l.buyer_id) FROM download_logs l WHERE l.datapod_id IN (SELECT id FROM pods))
        AS unique_downloaders,
    (SELECT coalesce(sum(v.views), 0)::bigint FROM datapod_views v WHERE v.datapod_id IN (SELECT id FROM pods))
        AS views,
    (SELECT count(*) FROM reviews r WHERE r.datapod_id IN (SELECT id FROM pods)) AS reviews,
    (SELECT round(avg(r.rating), 2) FROM reviews r WHERE r.datapod_id IN (SELECT id FROM pods)) AS average_rating
"""
_ESCROW = """
    SELECT count(*) FILTER (WHERE e.status IN ('holding', 'disputed')) AS escrow_held_count,
           coalesce(sum(e.amount_sui) FILTER (WHERE e.status IN ('holding', 'disputed')), 0) AS escrow_held,
           count(*) FILTER (WHERE e.status = 'released') AS escrow_released_count,
           coalesce(sum(e.amount_sui) FILTER (WHERE e.status = 'released'), 0) AS escrow_released,
           coalesce(sum(e.amount_sui) FILTER (WHERE e.status = 'released' AND e.settled_at IS NULL), 0)
               AS escrow_released_unsettled,
           count(*) FILTER (WHERE e.status = 'refunded') AS escrow_refunded_count,
           coalesce(sum(e.amount_sui) FILTER (WHERE e.status = 'refunded'), 0) AS escrow_refunded,
           count(*) FILTER (WHERE e.status = 'released' AND e.settled_at IS NOT NULL) AS payouts_count,
           coalesce(sum(e.amount_sui - e.fee_amount)
                    FILTER (WHERE e.status = 'released' AND e.settled_at IS NOT NULL), 0) AS payouts_net
      FROM escrow_transactions e JOIN purchases p ON p.id = e.purchase_id
     WHERE p.datapod_id IN (SELECT id FROM pods)"""


def _figures(row: asyncpg.Record) -> Figures:
    values = {name: row[name] for name in FIGURE_FIELDS if name != "revenue_net"}
    return Figures(revenue_net=values["revenue_gross"] - values["platform_fee"], **values)


async def seller_figures(conn: asyncpg.Connection, seller_id: uuid.UUID) -> Figures:
    """The figures of all of the seller's DataPods, deleted ones included (their money was real)."""
    row = await conn.fetchrow(
        f"""WITH pods AS (SELECT id FROM datapods WHERE seller_id = $1), esc AS ({_ESCROW})
            SELECT {_FIGURES} FROM esc""", seller_id)
    return _figures(row)


_POD_COLUMNS = """d.id, d.title, d.category, d.price_sui, d.published, d.deleted_at, d.created_at,
    (SELECT coalesce(max(v.version), 1) FROM datapod_versions v WHERE v.datapod_id = d.id) AS version"""


def _pod_figures(row: asyncpg.Record) -> PodFigures:
    return PodFigures(id=row["id"], title=row["title"], category=row["category"], price_sui=row["price_sui"],
                      published=row["published"], deleted_at=row["deleted_at"], version=row["version"],
                      created_at=row["created_at"], figures=_figures(row))


async def pod_figures(conn: asyncpg.Connection, seller_id: uuid.UUID, *,
                      after: tuple[dt.datetime, uuid.UUID] | None, limit: int,
                      datapod_id: uuid.UUID | None = None) -> list[PodFigures]:
    """The seller's DataPods (newest first, keyset after `after`, or just `datapod_id`) with their figures."""
    rows = await conn.fetch(
        f"""SELECT {_POD_COLUMNS}, f.*
              FROM datapods d
             CROSS JOIN LATERAL (
                   WITH pods AS (SELECT d.id), esc AS ({_ESCROW}) SELECT {_FIGURES} FROM esc) f
             WHERE d.seller_id = $1 AND ($2::uuid IS NULL OR d.id = $2)
               AND ($3::timestamptz IS NULL OR (d.created_at, d.id) < ($3, $4::uuid))
             ORDER BY d.created_at DESC, d.id DESC LIMIT $5""",
        seller_id, datapod_id, after[0] if after else None, after[1] if after else None, limit)
    return [_pod_figures(row) for row in rows]


async def series(conn: asyncpg.Connection, seller_id: uuid.UUID, *, bucket: str, start: dt.datetime,
                 end: dt.datetime, step: dt.timedelta, datapod_id: uuid.UUID | None = None) -> list[Bucket]:
    """The seller's figures per `bucket` ('day' or 'week', UTC) from `start` up to `end` (naive UTC, whole
    buckets), over all their pods or one: each event counts in the bucket of its own time."""
    rows = await conn.fetch(
        """WITH pods AS (SELECT id FROM datapods WHERE seller_id = $1 AND ($5::uuid IS NULL OR id = $5)),
                buckets AS (SELECT generate_series($3::timestamp, $4::timestamp - $6::interval, $6::interval) AS b),
                sold AS (
                    SELECT date_trunc($2, p.completed_at AT TIME ZONE 'UTC') AS b, count(*) AS sales,
                           sum(coalesce(e.amount_sui, p.amount_sui)) AS gross, sum(coalesce(e.fee_amount, 0)) AS fee
                      FROM purchases p LEFT JOIN escrow_transactions e ON e.purchase_id = p.id
                     WHERE p.datapod_id IN (SELECT id FROM pods) AND p.status = 'completed'
                       AND p.completed_at >= $3::timestamp AT TIME ZONE 'UTC'
                       AND p.completed_at < $4::timestamp AT TIME ZONE 'UTC'
                     GROUP BY 1),
                released AS (
                    SELECT date_trunc($2, e.released_at AT TIME ZONE 'UTC') AS b, sum(e.amount_sui) AS amount
                      FROM escrow_transactions e JOIN purchases p ON p.id = e.purchase_id
                     WHERE p.datapod_id IN (SELECT id FROM pods) AND e.status = 'released'
                       AND e.released_at >= $3::timestamp AT TIME ZONE 'UTC'
                       AND e.released_at < $4::timestamp AT TIME ZONE 'UTC'
                     GROUP BY 1),
                fetched AS (
                    SELECT date_trunc($2, l.downloaded_at AT TIME ZONE 'UTC') AS b, count(*) AS downloads,
                           count(DISTINCT l.buyer_id) AS downloaders
                      FROM download_logs l
                     WHERE l.datapod_id IN (SELECT id FROM pods)
                       AND l.downloaded_at >= $3::timestamp AT TIME ZONE 'UTC'
                       AND l.downloaded_at < $4::timestamp AT TIME ZONE 'UTC'
                     GROUP BY 1),
                seen AS (
                    SELECT date_trunc($2, v.day::timestamp) AS b, sum(v.views)::bigint AS views
                      FROM datapod_views v
                     WHERE v.datapod_id IN (SELECT id FROM pods)
                       AND v.day >= ($3::timestamp)::date AND v.day < ($4::timestamp)::date
                     GROUP BY 1),
                rated AS (
                    SELECT date_trunc($2, r.created_at AT TIME ZONE 'UTC') AS b, count(*) AS reviews,
                           round(avg(r.rating), 2) AS rating
                      FROM reviews r
                     WHERE r.datapod_id IN (SELECT id FROM pods)
                       AND r.created_at >= $3::timestamp AT TIME ZONE 'UTC'
                       AND r.created_at < $4::timestamp AT TIME ZONE 'UTC'
                     GROUP BY 1)
           SELECT k.b AS start, coalesce(s.sales, 0) AS sales, coalesce(s.gross, 0) AS revenue_gross,
                  coalesce(s.fee, 0) AS platform_fee, coalesce(s.gross - s.fee, 0) AS revenue_net,
                  coalesce(x.amount, 0) AS escrow_released, coalesce(f.downloads, 0) AS downloads,
                  coalesce(f.downloaders, 0) AS unique_downloaders, coalesce(w.views, 0) AS views,
                  coalesce(r.reviews, 0) AS reviews, r.rating AS average_rating,
                  (SELECT round(avg(a.rating), 2) FROM reviews a
                    WHERE a.datapod_id IN (SELECT id FROM pods)
                      AND a.created_at < (k.b + $6::interval) AT TIME ZONE 'UTC') AS cumulative_rating
             FROM buckets k
             LEFT JOIN sold s ON s.b = k.b LEFT JOIN released x ON x.b = k.b LEFT JOIN fetched f ON f.b = k.b
             LEFT JOIN seen w ON w.b = k.b LEFT JOIN rated r ON r.b = k.b
            ORDER BY k.b""",
        seller_id, bucket, start, end, datapod_id, step)
    return [Bucket(**dict(row)) for row in rows]


async def payouts(conn: asyncpg.Connection, seller_id: uuid.UUID, *,
                  before: tuple[dt.datetime, uuid.UUID] | None, limit: int) -> list[Payout]:
    """The seller's settled payouts, newest first, keyset-paginated by (settled_at, escrow id)."""
    rows = await conn.fetch(
        """SELECT e.id AS escrow_id, e.purchase_id, p.datapod_id, d.title AS datapod_title, e.amount_sui AS amount,
                  e.fee_amount AS fee, e.amount_sui - e.fee_amount AS net, e.settlement_tx_hash, e.fee_tx_hash,
                  e.released_at, e.settled_at
             FROM escrow_transactions e JOIN purchases p ON p.id = e.purchase_id
             JOIN datapods d ON d.id = p.datapod_id
            WHERE d.seller_id = $1 AND e.status = 'released' AND e.settled_at IS NOT NULL
              AND ($2::timestamptz IS NULL OR (e.settled_at, e.id) < ($2, $3::uuid))
            ORDER BY e.settled_at DESC, e.id DESC LIMIT $4""",
        seller_id, before[0] if before else None, before[1] if before else None, limit)
    return [Payout(**dict(row)) for row in rows]


# --- views ----------------------------------------------------------------------------------------

async def count_view(conn: asyncpg.Connection, datapod_id: uuid.UUID) -> None:
    """One more page view of the DataPod today (UTC)."""
    await conn.execute(
        """INSERT INTO datapod_views (datapod_id, day, views) VALUES ($1, (now() AT TIME ZONE 'UTC')::date, 1)
           ON CONFLICT (datapod_id, day) DO UPDATE SET views = datapod_views.views + 1""", datapod_id)


# --- changes ----------------------------------------------------------------------------------------

async def lock_pod(conn: asyncpg.Connection, datapod_id: uuid.UUID) -> OwnedPod | None:
    """The DataPod locked until the transaction ends (deleted ones too: the caller decides)."""
    row = await conn.fetchrow(
        """SELECT id, seller_id, title, category, published, deleted_at, schema FROM datapods
            WHERE id = $1 FOR UPDATE""", datapod_id)
    return None if row is None else OwnedPod(**dict(row))


async def get_pod(conn: asyncpg.Connection, datapod_id: uuid.UUID) -> OwnedPod | None:
    """The DataPod (no lock), for a check before a long upload."""
    row = await conn.fetchrow(
        "SELECT id, seller_id, title, category, published, deleted_at, schema FROM datapods WHERE id = $1",
        datapod_id)
    return None if row is None else OwnedPod(**dict(row))


async def purchases_in_flight(conn: asyncpg.Connection, datapod_id: uuid.UUID) -> int:
    """Purchases of the pod still being paid for (their key is sealed from the pod's current one)."""
    return await conn.fetchval(
        "SELECT count(*) FROM purchases WHERE datapod_id = $1 AND status IN ('pending_payment', 'processing')",
        datapod_id)


async def money_in_flight(conn: asyncpg.Connection, datapod_id: uuid.UUID) -> int:
    """Purchases of the pod being paid, or whose escrow holds, or has decided but not yet paid out, money."""
    return await conn.fetchval(
        """SELECT count(*) FROM purchases p LEFT JOIN escrow_transactions e ON e.purchase_id = p.id
            WHERE p.datapod_id = $1
              AND (p.status IN ('pending_payment', 'processing')
                   OR e.status IN ('holding', 'disputed')
                   OR (e.status IN ('released', 'refunded') AND e.settled_at IS NULL))""", datapod_id)


async def set_dataset(conn: asyncpg.Connection, datapod_id: uuid.UUID, *, blob_id: str, storage_size: int,
                      key_hash: str, iv_hex: str, wrapped_key: str, file_type: str, file_size: int,
                      data_hash: str, schema: dict[str, Any], sample: list[dict[str, Any]]) -> Version:
    """Point the DataPod at a new sealed dataset; the version trigger records it. Returns that version."""
    await conn.execute(
        """UPDATE datapods SET walrus_blob_id = $2, walrus_storage_size = $3, encryption_key_hash = $4,
                  encryption_iv = $5, wrapped_key = $6, file_type = $7, file_size = $8, data_hash = $9,
                  schema = $10, sample_data = $11
            WHERE id = $1""",
        datapod_id, blob_id, storage_size, key_hash, iv_hex, wrapped_key, file_type, file_size, data_hash, schema,
        sample)
    return (await versions(conn, datapod_id, limit=1))[0]


async def versions(conn: asyncpg.Connection, datapod_id: uuid.UUID, *, limit: int,
                   before: int | None = None) -> list[Version]:
    """The DataPod's versions, newest first, below version `before` when given."""
    rows = await conn.fetch(
        """SELECT version, walrus_blob_id, walrus_storage_size, encryption_key_hash, data_hash, file_type, file_size,
                  created_at
             FROM datapod_versions WHERE datapod_id = $1 AND ($2::int IS NULL OR version < $2)
            ORDER BY version DESC LIMIT $3""", datapod_id, before, limit)
    return [Version(**dict(row)) for row in rows]


async def key_holders(conn: asyncpg.Connection, datapod_id: uuid.UUID) -> list[KeyHolder]:
    """Purchases of the pod that hold a sealed key (completed ones: their buyers keep access)."""
    rows = await conn.fetch(
        """SELECT id AS purchase_id, buyer_id FROM purchases
            WHERE datapod_id = $1 AND status = 'completed' AND decryption_key IS NOT NULL
            ORDER BY id""", datapod_id)
    return [KeyHolder(**dict(row)) for row in rows]


async def reseal(conn: asyncpg.Connection, purchase_id: uuid.UUID, *, decryption_key: str, decryption_iv: str,
                 encrypted_blob_id: str) -> bool:
    """Replace a completed purchase's sealed key with one for the pod's new dataset key."""
    row = await conn.fetchrow(
        """UPDATE purchases SET decryption_key = $2, decryption_iv = $3, encrypted_blob_id = $4
            WHERE id = $1 AND status = 'completed' RETURNING id""",
        purchase_id, decryption_key, decryption_iv, encrypted_blob_id)
    return row is not None


async def soft_delete(conn: asyncpg.Connection, datapod_id: uuid.UUID) -> dt.datetime:
    """Withdraw the DataPod and mark it deleted; returns when."""
    return await conn.fetchval(
        "UPDATE datapods SET published = false, deleted_at = now() WHERE id = $1 RETURNING deleted_at", datapod_id)
