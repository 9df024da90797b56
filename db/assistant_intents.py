"""Read-only marketplace queries behind the retrieval-only assistant's intents
(server/services/assistant_intents.py).

Marketplace lists read published DataPods only. Sales are completed purchases (the status the
`purchase_count` trigger counts). Rows come from the schema the upload profiled
(`schema.row_count`), sizes from `file_size` (bytes of the plain dataset).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from decimal import Decimal
from typing import Any

import asyncpg

from db.marketplace import SCHEMA_COLUMNS_EXPR
from server.core.money import plain_decimal

# row_count as a number, NULL when an old or odd schema lacks it (never a cast error).
ROWS_EXPR = ("(CASE WHEN jsonb_typeof(d.schema -> 'row_count') = 'number' "
             "THEN (d.schema ->> 'row_count')::numeric END)")

# Sort keys: the expression each orders by (a whitelist: never interpolate client text into SQL).
SORTS = {"price": "d.price_sui", "rating": "d.average_rating", "sales": "d.purchase_count",
         "newest": "d.created_at", "rows": ROWS_EXPR, "size": "d.file_size"}

_FACTS = f"""d.id, d.title, d.category, d.price_sui, d.average_rating, d.purchase_count,
             {ROWS_EXPR}::bigint AS row_count, d.file_size, d.created_at,
             ARRAY(SELECT jsonb_path_query(d.schema, 'lax $.columns[*].name') #>> '{{}}') AS columns"""


@dataclasses.dataclass(frozen=True, slots=True)
class PodFacts:
    """A published DataPod with what the intents sort, filter and show."""

    id: uuid.UUID
    title: str
    category: str | None
    price_sui: Decimal
    average_rating: Decimal
    purchase_count: int
    row_count: int | None
    file_size: int | None
    created_at: dt.datetime
    columns: list[str]

    def to_public(self) -> dict[str, Any]:
        """The JSON view a tool result carries (its `datapod_id` makes clients show a card)."""
        return {"datapod_id": str(self.id), "title": self.title, "category": self.category,
                "price_sui": plain_decimal(self.price_sui), "average_rating": plain_decimal(self.average_rating),
                "purchase_count": self.purchase_count, "row_count": self.row_count, "file_size": self.file_size,
                "created_at": self.created_at.isoformat(), "columns": self.columns}


@dataclasses.dataclass(frozen=True, slots=True)
class SaleLine:
    """A seller's completed sales of one DataPod over a period."""

    datapod_id: uuid.UUID
    title: str
    sales: int
    revenue_sui: Decimal
    last_sale_at: dt.datetime

    def to_public(self) -> dict[str, Any]:
        """The JSON view."""
        return {"datapod_id": str(self.datapod_id), "title": self.title, "sales": self.sales,
                "revenue_sui": plain_decimal(self.revenue_sui), "last_sale_at": self.last_sale_at.isoformat()}


def _facts(row: asyncpg.Record) -> PodFacts:
    return PodFacts(**{**row, "columns": list(row["columns"])})


async def category_names(conn: asyncpg.Connection) -> list[str]:
    """The categories of published DataPods."""
    rows = await conn.fetch(
        "SELECT DISTINCT category FROM datapods WHERE published AND category IS NOT NULL ORDER BY category")
    return [row["category"] for row in rows]


async def rank_datapods(conn: asyncpg.Connection, *, sort: str, descending: bool, limit: int,
                        category: str | None = None, min_price: Decimal | None = None, min_inclusive: bool = True,
                        max_price: Decimal | None = None, max_inclusive: bool = True, column: str | None = None,
                        ids: list[uuid.UUID] | None = None) -> list[PodFacts]:
    """Published DataPods ordered by one of SORTS (unknown values last), optionally filtered."""
    direction = "DESC" if descending else "ASC"
    rows = await conn.fetch(
        f"""SELECT {_FACTS} FROM datapods d
             WHERE d.published
               AND ($1::text IS NULL OR lower(d.category) = lower($1))
               AND ($2::numeric IS NULL OR d.price_sui > $2 OR ($3 AND d.price_sui = $2))
               AND ($4::numeric IS NULL OR d.price_sui < $4 OR ($5 AND d.price_sui = $4))
               AND ($6::text IS NULL OR {SCHEMA_COLUMNS_EXPR} @> jsonb_build_array(
                                            jsonb_build_object('name', lower($6::text))))
               AND ($7::uuid[] IS NULL OR d.id = ANY($7::uuid[]))
             ORDER BY {SORTS[sort]} {direction} NULLS LAST, d.title, d.id
             LIMIT $8""",
        category, min_price, min_inclusive, max_price, max_inclusive, column, ids, limit)
    return [_facts(row) for row in rows]


async def datapods_by_id(conn: asyncpg.Connection, ids: list[uuid.UUID]) -> list[PodFacts]:
    """Published DataPods by id, in the order given (ids not published are left out)."""
    rows = await conn.fetch(f"SELECT {_FACTS} FROM datapods d WHERE d.published AND d.id = ANY($1::uuid[])", ids)
    found = {row["id"]: _facts(row) for row in rows}
    return [found[i] for i in dict.fromkeys(ids) if i in found]


async def find_by_title(conn: asyncpg.Connection, words: list[str], min_hits: int) -> PodFacts | None:
    """The published DataPod whose title contains the most of `words` (at least `min_hits`; shorter
    titles win ties, as the closer match)."""
    row = await conn.fetchrow(
        f"""SELECT {_FACTS}, h.hits FROM datapods d,
                   LATERAL (SELECT count(*) AS hits FROM unnest($1::text[]) w
                             WHERE strpos(lower(d.title), w) > 0) h
             WHERE d.published AND h.hits >= $2
             ORDER BY h.hits DESC, length(d.title), d.id LIMIT 1""", words, min_hits)
    if row is None:
        return None
    return _facts({k: v for k, v in row.items() if k != "hits"})


async def seller_sales(conn: asyncpg.Connection, seller_id: uuid.UUID,
                       since: dt.datetime | None) -> list[SaleLine]:
    """The seller's completed sales since `since` (all time when None), per DataPod, most sold first."""
    rows = await conn.fetch(
        """SELECT d.id AS datapod_id, d.title, count(*) AS sales, sum(p.amount_sui) AS revenue_sui,
                  max(p.completed_at) AS last_sale_at
             FROM purchases p JOIN datapods d ON d.id = p.datapod_id
            WHERE d.seller_id = $1 AND p.status = 'completed'
              AND ($2::timestamptz IS NULL OR p.completed_at >= $2)
            GROUP BY d.id, d.title
            ORDER BY count(*) DESC, sum(p.amount_sui) DESC, d.title, d.id""", seller_id, since)
    return [SaleLine(**row) for row in rows]
