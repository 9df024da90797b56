"""Queries of the marketplace: DataPods (insert, publish, update, search with keyset pages), seller analytics, reviews.

Each function takes the connection first so the caller owns the transaction.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import re
import uuid
from decimal import Decimal
from typing import Any

import asyncpg


@dataclasses.dataclass(frozen=True, slots=True)
class SealedDataset:
    """An encrypted dataset in the blob store: everything its datapods row records."""

    pod_id: uuid.UUID
    blob_id: str
    storage_size: int
    file_size: int
    file_type: str
    data_hash: str
    key_hash: str
    iv_hex: str
    wrapped_key: str
    schema: dict[str, Any]
    sample: list[dict[str, Any]]


# Sort keys: the column each orders by (a whitelist: never interpolate client text into SQL).
SORT_COLUMNS = {"newest": "d.created_at", "price": "d.price_sui", "rating": "d.average_rating",
                "sales": "d.purchase_count"}
SORT_FIELDS = {"newest": "created_at", "price": "price_sui", "rating": "average_rating",
               "sales": "purchase_count"}


@dataclasses.dataclass(frozen=True, slots=True)
class DatapodSummary:
    """A DataPod as listings show it."""

    id: uuid.UUID
    seller_id: uuid.UUID | None
    seller_username: str | None
    seller_name: str | None
    seller_rating: Decimal | None
    title: str
    description: str | None
    category: str | None
    price_sui: Decimal
    file_type: str | None
    file_size: int | None
    published: bool
    purchase_count: int
    average_rating: Decimal
    tags: list[str]
    row_count: int | None
    created_at: dt.datetime
    updated_at: dt.datetime

    def to_public(self) -> dict[str, Any]:
        """The JSON view of a listing entry."""
        return {"id": str(self.id), "title": self.title, "description": self.description,
                "category": self.category, "price_sui": self.price_sui, "tags": self.tags,
                "file_type": self.file_type, "file_size": self.file_size, "row_count": self.row_count,
                "published": self.published, "purchase_count": self.purchase_count,
                "average_rating": self.average_rating,
                "seller": {"id": str(self.seller_id) if self.seller_id else None,
                           "username": self.seller_username, "name": self.seller_name,
                           "average_rating": self.seller_rating},
                "created_at": self.created_at.isoformat(), "updated_at": self.updated_at.isoformat()}


@dataclasses.dataclass(frozen=True, slots=True)
class Datapod(DatapodSummary):
    """A DataPod with its dataset description (never its key)."""

    data_hash: str | None
    walrus_blob_id: str
    walrus_storage_size: int | None
    encryption_key_hash: str
    schema: dict[str, Any] | None
    sample_data: list[dict[str, Any]] | None
    review_count: int

    def to_public(self) -> dict[str, Any]:
        """The JSON view of one pod: the listing fields plus schema, sample, hashes and review count."""
        view = DatapodSummary.to_public(self)
        view.update({"review_count": self.review_count, "data_hash": self.data_hash,
                     "walrus_blob_id": self.walrus_blob_id, "walrus_storage_size": self.walrus_storage_size,
                     "encryption_key_hash": self.encryption_key_hash,
                     "schema": self.schema, "sample_data": self.sample_data})
        return view


@dataclasses.dataclass(frozen=True, slots=True)
class DatapodAccess:
    """What permission checks need, read under a row lock."""

    id: uuid.UUID
    seller_id: uuid.UUID | None
    category: str | None
    published: bool


@dataclasses.dataclass(frozen=True, slots=True)
class SellerStats:
    """The seed's seller analytics."""

    total_datapods: int
    published_datapods: int
    total_sales: int
    total_revenue: Decimal
    average_rating: Decimal

    def to_public(self) -> dict[str, Any]:
        """The JSON view."""
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True, slots=True)
class Review:
    """A buyer's review of a DataPod."""

    id: uuid.UUID
    datapod_id: uuid.UUID
    buyer_id: uuid.UUID
    buyer_username: str | None
    rating: int
    comment: str | None
    created_at: dt.datetime

    def to_public(self) -> dict[str, Any]:
        """The JSON view."""
        return {"id": str(self.id), "datapod_id": str(self.datapod_id),
                "buyer": {"id": str(self.buyer_id), "username": self.buyer_username},
                "rating": self.rating, "comment": self.comment, "created_at": self.created_at.isoformat()}


@dataclasses.dataclass(frozen=True, slots=True)
class SearchFilter:
    """A search: filters, order and the keyset position after which the page starts."""

    category: str | None = None
    min_price: Decimal | None = None
    max_price: Decimal | None = None
    q: str | None = None
    seller_id: uuid.UUID | None = None
    published_only: bool = True
    sort: str = "newest"
    descending: bool = True
    after: tuple[Any, uuid.UUID] | None = None
    limit: int = 20
    column: str | None = None
    column_type: str | None = None
    fuzzy: bool = False  # q by trigram word similarity on the title instead of full text (needs pg_trgm)


_SUMMARY_COLUMNS = """d.id, d.seller_id, u.username AS seller_username, u.name AS seller_name,
    u.average_rating AS seller_rating, d.title, d.description, d.category, d.price_sui, d.file_type,
    d.file_size, d.published, d.purchase_count, d.average_rating,
    coalesce(ARRAY(SELECT jsonb_array_elements_text(d.schema -> 'tags')), '{}') AS tags,
    (d.schema ->> 'row_count')::bigint AS row_count, d.created_at, d.updated_at"""
_DETAIL_COLUMNS = _SUMMARY_COLUMNS + """, d.data_hash, d.walrus_blob_id, d.walrus_storage_size,
    d.encryption_key_hash, d.schema - 'tags' AS schema, d.sample_data,
    (SELECT count(*) FROM reviews r WHERE r.datapod_id = d.id) AS review_count"""


def _summary(row: asyncpg.Record, extra: tuple[str, ...] = ()) -> DatapodSummary:
    """A listing entry from a row, leaving out the `extra` columns a query added (a score, a position)."""
    return DatapodSummary(**{key: value for key, value in row.items() if key not in extra})


def _detail(row: asyncpg.Record | None) -> Datapod | None:
    return None if row is None else Datapod(**dict(row))


async def insert_datapod(conn: asyncpg.Connection, sealed: SealedDataset, *, seller_id: uuid.UUID, title: str,
                         description: str | None, category: str | None, price_sui: Decimal,
                         tags: list[str], published: bool = False) -> Datapod:
    """Record a sealed dataset as a DataPod (a draft unless `published`)."""
    # No tags column in the schema yet: they live in the schema document until a migration adds one.
    schema = {**sealed.schema, "tags": tags}
    await conn.execute(
        """INSERT INTO datapods (id, seller_id, title, description, category, price_sui, walrus_blob_id,
               walrus_storage_size, encryption_key_hash, encryption_iv, wrapped_key, file_type, file_size,
               data_hash, schema, sample_data, published)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)""",
        sealed.pod_id, seller_id, title, description, category, price_sui, sealed.blob_id, sealed.storage_size,
        sealed.key_hash, sealed.iv_hex, sealed.wrapped_key, sealed.file_type, sealed.file_size,
        sealed.data_hash, schema, sealed.sample, published)
    return await get_datapod(conn, sealed.pod_id)  # type: ignore[return-value]


async def get_datapod(conn: asyncpg.Connection, datapod_id: uuid.UUID) -> Datapod | None:
    """One DataPod by id, whatever its state."""
    return _detail(await conn.fetchrow(
        f"""SELECT {_DETAIL_COLUMNS} FROM datapods d LEFT JOIN users u ON u.id = d.seller_id
            WHERE d.id = $1 AND d.deleted_at IS NULL""",  # a deleted pod is gone from the market (db/seller.py)
        datapod_id))


async def lock_datapod(conn: asyncpg.Connection, datapod_id: uuid.UUID) -> DatapodAccess | None:
    """Owner, category and state of a DataPod, locked until the transaction ends."""
    row = await conn.fetchrow(
        "SELECT id, seller_id, category, published FROM datapods WHERE id = $1 AND deleted_at IS NULL FOR UPDATE",
        datapod_id)
    return None if row is None else DatapodAccess(**dict(row))


async def set_published(conn: asyncpg.Connection, datapod_id: uuid.UUID, published: bool) -> Datapod:
    """Publish or unpublish a DataPod."""
    await conn.execute("UPDATE datapods SET published = $2 WHERE id = $1", datapod_id, published)
    return await get_datapod(conn, datapod_id)  # type: ignore[return-value]


async def update_datapod(conn: asyncpg.Connection, datapod_id: uuid.UUID, *, title: str | None = None,
                         description: str | None = None, price_sui: Decimal | None = None,
                         category: str | None = None, tags: list[str] | None = None) -> Datapod:
    """Change a DataPod's title, description, price, category or tags (None keeps the value)."""
    await conn.execute(
        """UPDATE datapods SET title = coalesce($2, title), description = coalesce($3, description),
                               price_sui = coalesce($4, price_sui), category = coalesce($5, category),
                               schema = CASE WHEN $6::jsonb IS NULL THEN schema
                                             ELSE jsonb_set(coalesce(schema, '{}'), '{tags}', $6::jsonb) END
           WHERE id = $1""",
        datapod_id, title, description, price_sui, category, tags)
    return await get_datapod(conn, datapod_id)  # type: ignore[return-value]


# The expression idx_datapods_schema_columns indexes (migration 0023): repeat it exactly, or the planner
# cannot use the index.
SCHEMA_COLUMNS_EXPR = "lower((d.schema -> 'columns')::text)::jsonb"

# Lowest strict_word_similarity(q, title) a fuzzy match needs. pg_trgm's default (0.5) sits exactly
# on a one-letter typo in a short word ("wether" / "weather" score 0.5); 0.4 still keeps "leather"
# (0.25) out. Strict word similarity compares whole words, so long titles do not dilute the match.
WORD_SIMILARITY_THRESHOLD = 0.4

# Price bands of the facets: (key, lowest price, highest price); the CASE in facets_sql follows them.
PRICE_BANDS = (("free", Decimal(0), Decimal(0)), ("under_1", Decimal(0), Decimal(1)),
               ("1_to_5", Decimal(1), Decimal(5)), ("5_to_20", Decimal(5), Decimal(20)),
               ("20_plus", Decimal(20), None))
_PRICE_BAND_SQL = """CASE WHEN d.price_sui = 0 THEN 'free' WHEN d.price_sui < 1 THEN 'under_1'
    WHEN d.price_sui < 5 THEN '1_to_5' WHEN d.price_sui < 20 THEN '5_to_20' ELSE '20_plus' END"""


def _filter_conditions(search: SearchFilter, param: Any) -> list[str]:
    """The WHERE fragments of a search's filters (not its cursor), with values bound through `param`."""
    return _market_conditions(search, param) + _other_conditions(search, param)


def _market_conditions(search: SearchFilter, param: Any) -> list[str]:
    """The filters a market index holds in its order: visible, published, in the category."""
    conditions = ["d.deleted_at IS NULL"]  # deleted pods leave the seller's list too (db/seller.py)
    if search.published_only:
        conditions.append("d.published")
    if search.category is not None:
        conditions.append(f"d.category = {param(search.category)}")
    return conditions


def _price_conditions(search: SearchFilter, param: Any) -> list[str]:
    conditions = []
    if search.min_price is not None:
        conditions.append(f"d.price_sui >= {param(search.min_price)}")
    if search.max_price is not None:
        conditions.append(f"d.price_sui <= {param(search.max_price)}")
    return conditions


def _other_conditions(search: SearchFilter, param: Any, *, price: bool = True) -> list[str]:
    """The filters no market index orders by: seller, price band (unless `price` is False), text, columns."""
    conditions: list[str] = []
    if search.seller_id is not None:
        conditions.append(f"d.seller_id = {param(search.seller_id)}")
    if price:
        conditions += _price_conditions(search, param)
    if search.q is not None and search.fuzzy:
        conditions.append(f"{param(search.q)} <<% d.title")  # strict word similarity: idx_datapods_title_trgm
    elif search.q is not None:
        conditions.append(f"d.search_vector @@ plainto_tsquery('english', {param(search.q)})")
    # Name and type together describe one column; containment on the lowercased list uses the GIN index.
    wanted = []
    if search.column is not None:
        wanted.append(f"'name', lower({param(search.column)}::text)")
    if search.column_type is not None:
        wanted.append(f"'type', {param(search.column_type)}::text")
    if search.column is not None and _JSON_VERBATIM.fullmatch(search.column):
        # Where no index answers (a window, a sample), first the cheap half of the check: the name in
        # quotes in the lowercased text. Reparsing that text as JSON is what costs (4 us a row).
        conditions.append(f"strpos(lower((d.schema -> 'columns')::text), "
                          f"'\"' || lower({param(search.column)}::text) || '\"') > 0")
    if wanted:
        conditions.append(f"{SCHEMA_COLUMNS_EXPR} @> jsonb_build_array(jsonb_build_object({', '.join(wanted)}))")
    return conditions


# A name JSON writes as it is (no quote, backslash or control character to escape): then the
# lowercased JSON text of the columns holds it, quoted, whenever a column has that name.
_JSON_VERBATIM = re.compile(r'[^"\\\x00-\x1f]*')


def _binder(params: list[Any]) -> Any:
    def param(value: Any) -> str:
        params.append(value)
        return f"${len(params)}"
    return param


def _order(search: SearchFilter) -> tuple[str, str, str]:
    """The sort column, its direction and the keyset comparison that continues after a position."""
    direction, comparison = ("DESC", "<") if search.descending else ("ASC", ">")
    return SORT_COLUMNS[search.sort], direction, comparison


def _cursor_condition(search: SearchFilter, param: Any) -> list[str]:
    if search.after is None:
        return []
    column, _, comparison = _order(search)
    value, last_id = search.after
    return [f"({column}, d.id) {comparison} ({param(value)}, {param(last_id)})"]


# How many market rows a search reads in its page's order before it finds the matches first instead
# (issue 21). Reading the market in order and filtering finds a page after limit / density rows:
# fast when many pods match, ruinous when few do (a rare word, or words the category never has:
# the whole market, 0.4 to 4 s at a million pods). Finding the matches first and sorting them
# costs the other way round. So a search reads a first window in order; when it found some matches
# but not the page, the next window goes on after it, as long as their density says the rest of
# the page needs (SEARCH_WINDOW_MAX rows in all); when it found none, or the windows still fall
# short, the matches are sparse and the rest of the page is found matches first, after the
# windows, with few rows to sort.
SEARCH_WINDOW_FIRST = 250
SEARCH_WINDOW_MAX = 4000
SEARCH_WINDOW_MARGIN = 1.5  # widen to 1.5 times what the density seen asks for: a page, not most of one


def search_sql(search: SearchFilter) -> tuple[str, list[Any]]:
    """The search as "matches first, then sort": every filter through its index, the page off the top.

    A seller's own listing runs it alone (a seller's pods are few); the market runs it when the
    window (window_sql) did not fill the page. Separate so tests can EXPLAIN it.
    """
    params: list[Any] = []
    param = _binder(params)
    conditions = _filter_conditions(search, param) + _cursor_condition(search, param)
    column, direction, _ = _order(search)
    # MATERIALIZED: the matches are gathered by the filters' indexes (a bitmap), never by walking
    # the sort's index, and only the page's rows are read back whole.
    sql = (f"WITH matched AS MATERIALIZED (SELECT d.id, {column} AS position FROM datapods d "
           f"WHERE {' AND '.join(conditions)}) "
           f"SELECT {_SUMMARY_COLUMNS} FROM (SELECT id, position FROM matched "
           f"ORDER BY position {direction}, id {direction} LIMIT {param(search.limit)}) top "
           f"JOIN datapods d ON d.id = top.id LEFT JOIN users u ON u.id = d.seller_id "
           f"ORDER BY top.position {direction}, top.id {direction}")
    return sql, params


def _window_range(search: SearchFilter, param: Any) -> list[str]:
    """The conditions a window's market index walks: market, category, cursor, and price when it sorts by it."""
    by_price = search.sort == "price"  # a price band is a range of the price index itself
    return (_market_conditions(search, param) + (_price_conditions(search, param) if by_price else [])
            + _cursor_condition(search, param))


def window_sql(search: SearchFilter, rows: int = SEARCH_WINDOW_FIRST) -> tuple[str, list[Any]]:
    """The market search as "read in order, filter": the first `rows` market rows after the cursor
    in the page's order (by a market index), of which the page takes those matching the other filters.

    Each row says whether it `matched`; the window's last row comes too, matched or not, as its
    `position` tells (1 to `rows`): without it the market ran out within the window. The page is
    exact when it is full or the market ran out: every row beyond the window comes after those in it.
    """
    params: list[Any] = []
    param = _binder(params)
    inner = _window_range(search, param)
    matched = " AND ".join(_other_conditions(search, param, price=search.sort != "price")) or "true"
    column, direction, _ = _order(search)
    window = param(rows)
    order = f"{column} {direction}, d.id {direction}"
    # The LIMIT inside keeps the other filters out of the index walk: it reads `rows` rows at most,
    # in order, and stops at the page; sellers are joined to the page's rows only.
    sql = (f"SELECT {_SUMMARY_COLUMNS}, d.matched, d.position FROM ("
           f"SELECT d.*, {matched} AS matched FROM ("
           f"SELECT d.*, row_number() OVER (ORDER BY {order}) AS position FROM datapods d "
           f"WHERE {' AND '.join(inner)} ORDER BY {order} LIMIT {window}) d "
           f"WHERE ({matched}) OR d.position = {window} ORDER BY {order} LIMIT {param(search.limit)} + 1) d "
           f"LEFT JOIN users u ON u.id = d.seller_id ORDER BY {order}")
    return sql, params


async def search_datapods(conn: asyncpg.Connection, search: SearchFilter) -> list[DatapodSummary]:
    """One page of DataPods matching the filter, in its order, starting after `search.after`."""
    found: list[DatapodSummary] = []
    wanted = search.limit
    if search.published_only:
        rows, read = SEARCH_WINDOW_FIRST, 0
        while True:
            sql, params = window_sql(dataclasses.replace(search, limit=wanted - len(found)), rows)
            window = await conn.fetch(sql, *params)
            found += [_summary(row, ("matched", "position")) for row in window if row["matched"]]
            end = next((row for row in window if row["position"] == rows), None)
            if len(found) >= wanted or end is None:  # a full page, or the market ran out
                return found[:wanted]
            # Go on after the window's last row: for the rest of the page, in a wider window
            # when its matches were dense enough, else matches first.
            read += rows
            search = dataclasses.replace(search, after=(end[SORT_FIELDS[search.sort]], end["id"]))
            if not found or read >= SEARCH_WINDOW_MAX:
                break
            rows = min(SEARCH_WINDOW_MAX - read, math.ceil(read * (wanted - len(found)) / len(found)
                                                          * SEARCH_WINDOW_MARGIN))
        search = dataclasses.replace(search, limit=wanted - len(found))
    sql, params = search_sql(search)
    return found + [_summary(row) for row in await conn.fetch(sql, *params)]


async def trigram_available(conn: asyncpg.Connection) -> bool:
    """Whether pg_trgm is installed in this database (migration 0023 installs it when it can)."""
    return await conn.fetchval("SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'pg_trgm')")


async def set_similarity_threshold(conn: asyncpg.Connection) -> None:
    """Apply WORD_SIMILARITY_THRESHOLD to fuzzy queries until the caller's transaction ends."""
    await conn.execute("SELECT set_config('pg_trgm.strict_word_similarity_threshold', $1, true)",
                       str(WORD_SIMILARITY_THRESHOLD))


@dataclasses.dataclass(frozen=True, slots=True)
class Facets:
    """How many DataPods a search's filters match, per category and per price band (exact, or estimated)."""

    total: int
    categories: dict[str | None, int]
    price_bands: dict[str, int]
    estimated: bool = False  # scaled up from a sample of the market: see FACET_SAMPLE_ROWS

    def to_public(self) -> dict[str, Any]:
        """The JSON view: categories by count (then name), every band in PRICE_BANDS' order, empty ones too."""
        categories = sorted(self.categories.items(), key=lambda item: (-item[1], item[0] or ""))
        return {"total": self.total,
                "categories": [{"category": name, "count": count} for name, count in categories],
                "price_bands": [{"band": key, "min_sui": low, "max_sui": high,
                                 "count": self.price_bands.get(key, 0)} for key, low, high in PRICE_BANDS],
                "estimated": self.estimated}


# Facets count every match, and at a million pods a filter matches tens of thousands of them: a
# fifth of a second to seconds to read (issue 21). So they first count a sample of about
# FACET_SAMPLE_ROWS rows of the table (whole pages, always the same ones while the table does not
# change, so answers do not flicker); with at least FACET_SAMPLE_MATCHES matches in it the sample's
# counts, scaled to the table, are the answer ("estimated": relative error about 1/sqrt(matches)).
# Fewer matches mean a small set (under a few thousand pods), counted exactly through the filters'
# indexes. A table of at most FACET_SAMPLE_ROWS rows is read whole: exact.
FACET_SAMPLE_ROWS = 10_000
FACET_SAMPLE_MATCHES = 20


def facets_sql(search: SearchFilter) -> tuple[str, list[Any]]:
    """The exact facets statement over the search's filters (its sort, cursor and limit do not apply)."""
    params: list[Any] = []
    conditions = _filter_conditions(search, _binder(params))
    where = " AND ".join(conditions) or "true"
    # One pass: grouping sets give per-category counts, per-band counts and the total together.
    sql = (f"SELECT f.category, f.band, count(*) AS count, GROUPING(f.category, f.band) AS level "
           f"FROM (SELECT d.category, {_PRICE_BAND_SQL} AS band FROM datapods d WHERE {where}) f "
           f"GROUP BY GROUPING SETS ((f.category), (f.band), ())")
    return sql, params


def facets_sample_sql(search: SearchFilter, rows: int = FACET_SAMPLE_ROWS) -> tuple[str, list[Any]]:
    """The facets over a sample of about `rows` rows of the table: matches per group, and per group
    the rows sampled (the total's row: the whole sample), the table's rows and the percentage read."""
    params: list[Any] = []
    conditions = _filter_conditions(search, _binder(params))
    # The estimate of the table's rows that ANALYZE (or VACUUM) keeps: -1 before the first one.
    percent = (f"(SELECT least(100, 100.0 * {_binder(params)(rows)} / greatest(c.reltuples, 1)) "
               f"FROM pg_class c WHERE c.oid = 'datapods'::regclass)")
    # The filters as a value, not a WHERE: every sampled row counts towards the sample's size.
    sql = (f"SELECT f.category, f.band, count(*) FILTER (WHERE f.hit) AS count, count(*) AS sampled, "
           f"GROUPING(f.category, f.band) AS level, "
           f"(SELECT greatest(c.reltuples, 0) FROM pg_class c WHERE c.oid = 'datapods'::regclass) AS table_rows, "
           f"{percent} AS percent "
           f"FROM (SELECT d.category, {_PRICE_BAND_SQL} AS band, ({' AND '.join(conditions)}) AS hit "
           f"FROM datapods d TABLESAMPLE SYSTEM ({percent}) REPEATABLE (0)) f "
           f"GROUP BY GROUPING SETS ((f.category), (f.band), ())")
    return sql, params


def _facets(rows: list[asyncpg.Record], scale: float = 1.0, estimated: bool = False) -> Facets:
    total, categories, bands = 0, {}, {}
    for row in rows:
        count = round(row["count"] * scale)
        if row["level"] == 1:  # grouped by category
            if count:
                categories[row["category"]] = count
        elif row["level"] == 2:  # grouped by band
            bands[row["band"]] = count
        else:
            total = count
    return Facets(total=total, categories=categories, price_bands=bands, estimated=estimated)


async def search_facets(conn: asyncpg.Connection, search: SearchFilter) -> Facets:
    """Counts per category and price band of the DataPods the search's filters match: exact for a
    small table or a small set of matches, otherwise estimated from a sample (FACET_SAMPLE_ROWS)."""
    sql, params = facets_sample_sql(search, FACET_SAMPLE_ROWS)
    rows = await conn.fetch(sql, *params)
    whole = next(row for row in rows if row["level"] == 3)  # the grand total: there even for no rows
    if whole["percent"] >= 100:  # the sample was the whole table
        return _facets(rows)
    if whole["count"] >= FACET_SAMPLE_MATCHES:
        return _facets(rows, scale=whole["table_rows"] / whole["sampled"], estimated=True)
    sql, params = facets_sql(search)
    return _facets(await conn.fetch(sql, *params))


# "More like this": the weights of the score (docs/protocol.md explains them).
SIMILAR_CATEGORY_WEIGHT = 3
SIMILAR_TAG_WEIGHT = 2
SIMILAR_COLUMN_WEIGHT = 1
SIMILAR_COLUMN_CAP = 5  # shared columns counted at most: generic names (id, date) are weak evidence
SIMILAR_TEXT_WEIGHT = 4

# Lowercased tag and column-name sets of a pod (lax paths: a missing or odd schema yields nothing).
_TAG_SET = "ARRAY(SELECT DISTINCT lower(t #>> '{{}}') FROM jsonb_path_query({pod}.schema, 'lax $.tags[*]') t)"
_COLUMN_SET = ("ARRAY(SELECT DISTINCT lower(c #>> '{{}}') "
               "FROM jsonb_path_query({pod}.schema, 'lax $.columns[*].name') c)")


def _shared(left: str, right: str) -> str:
    return f"cardinality(ARRAY(SELECT unnest({left}) INTERSECT SELECT unnest({right})))"


# A pod scores above 0 only if it shares the category, a column, a word (or a tag) with the source,
# so only such pods are scored (issue 21: scoring every published pod took 46 s at a million): the
# category's SIMILAR_CANDIDATES best sellers (its market index), and the pods sharing a word or a
# column name among the market's SIMILAR_WINDOW best sellers, at most twice SIMILAR_CANDIDATES.
# Not through the text and schema indexes: most pods share some common word ("daily", "data") or
# column ("date") with most others, and gathering every match cost 130 and 50 ms at a million. A
# catalogue smaller than the window (with fewer matches each way) is scored whole, as before; a
# large one by its best sellers. Tags have no index: a pod that shares only tags is a candidate
# through the category or the window, or not at all.
SIMILAR_CANDIDATES = 300
SIMILAR_WINDOW = 3000

SIMILAR_SQL = f"""
WITH src AS (
    SELECT s.id, s.category, {_TAG_SET.format(pod="s")} AS tags, {_COLUMN_SET.format(pod="s")} AS columns,
           tsvector_to_array(s.search_vector) AS words,
           -- Any of its lexemes (already normalised: quoted, not parsed again).
           (SELECT string_agg(quote_literal(w), ' | ') FROM unnest(tsvector_to_array(s.search_vector)) w)::tsquery
               AS any_word
      FROM datapods s WHERE s.id = $1
), candidate_ids AS (
    (SELECT d.id FROM src JOIN datapods d ON d.category = src.category
      WHERE d.published AND d.deleted_at IS NULL
      ORDER BY d.purchase_count DESC, d.id DESC LIMIT $3)
    UNION
    -- The window's column check is a cheap prefilter (the quoted name in the lowercased JSON text):
    -- candidates are scored exactly below, so a false match only costs its scoring.
    (SELECT popular.id FROM src JOIN (
         SELECT d.id, d.search_vector, lower((d.schema -> 'columns')::text) AS column_text
           FROM datapods d WHERE d.published AND d.deleted_at IS NULL
          ORDER BY d.purchase_count DESC, d.id DESC LIMIT $4) popular
       ON popular.search_vector @@ src.any_word
          OR EXISTS (SELECT 1 FROM unnest(src.columns) AS c(name)
                      WHERE strpos(popular.column_text, '"' || c.name || '"') > 0)
      LIMIT 2 * $3)
), candidates AS (
    SELECT d.id,
           (d.category IS NOT DISTINCT FROM src.category AND d.category IS NOT NULL) AS same_category,
           {_shared("src.tags", _TAG_SET.format(pod="d"))} AS shared_tags,
           {_shared("src.columns", _COLUMN_SET.format(pod="d"))} AS shared_columns,
           {_shared("src.words", "tsvector_to_array(d.search_vector)")} AS shared_words,
           cardinality(src.words) + cardinality(tsvector_to_array(d.search_vector)) AS word_total
      FROM candidate_ids JOIN datapods d ON d.id = candidate_ids.id CROSS JOIN src
     WHERE d.published AND d.id <> src.id
), scored AS (
    SELECT c.id,
           (CASE WHEN c.same_category THEN {SIMILAR_CATEGORY_WEIGHT} ELSE 0 END
            + {SIMILAR_TAG_WEIGHT} * c.shared_tags
            + {SIMILAR_COLUMN_WEIGHT} * least(c.shared_columns, {SIMILAR_COLUMN_CAP})
            + {SIMILAR_TEXT_WEIGHT} * CASE WHEN c.word_total > c.shared_words
                                           THEN c.shared_words::numeric / (c.word_total - c.shared_words)
                                           ELSE 0 END)::float8 AS score
      FROM candidates c
)
SELECT {_SUMMARY_COLUMNS}, sc.score
  FROM scored sc JOIN datapods d ON d.id = sc.id LEFT JOIN users u ON u.id = d.seller_id
 WHERE sc.score > 0
 ORDER BY sc.score DESC, d.purchase_count DESC, d.id
 LIMIT $2"""


async def similar_datapods(conn: asyncpg.Connection, datapod_id: uuid.UUID,
                           limit: int) -> list[tuple[DatapodSummary, float]]:
    """Published DataPods most like this one (itself excluded), best first, with their scores."""
    rows = await conn.fetch(SIMILAR_SQL, datapod_id, limit, SIMILAR_CANDIDATES, SIMILAR_WINDOW)
    return [(_summary(row, ("score",)), row["score"]) for row in rows]


async def seller_stats(conn: asyncpg.Connection, seller_id: uuid.UUID) -> SellerStats:
    """The seed's seller analytics; revenue counts what completed purchases actually paid."""
    row = await conn.fetchrow(
        """SELECT count(*) AS total_datapods,
                  count(*) FILTER (WHERE d.published) AS published_datapods,
                  coalesce(sum(d.purchase_count), 0) AS total_sales,
                  (SELECT coalesce(sum(p.amount_sui), 0) FROM purchases p JOIN datapods pd ON pd.id = p.datapod_id
                    WHERE pd.seller_id = $1 AND p.status = 'completed') AS total_revenue,
                  coalesce(round(avg(d.average_rating) FILTER (WHERE d.average_rating > 0), 2), 0)
                      AS average_rating
           FROM datapods d WHERE d.seller_id = $1""",
        seller_id)
    return SellerStats(**dict(row))


async def list_reviews(conn: asyncpg.Connection, datapod_id: uuid.UUID, *,
                       after: tuple[dt.datetime, uuid.UUID] | None, limit: int) -> list[Review]:
    """A DataPod's reviews, newest first, starting after `after` (created_at, id)."""
    rows = await conn.fetch(
        """SELECT r.id, r.datapod_id, r.buyer_id, u.username AS buyer_username, r.rating, r.comment, r.created_at
           FROM reviews r LEFT JOIN users u ON u.id = r.buyer_id
           WHERE r.datapod_id = $1 AND ($2::timestamptz IS NULL OR (r.created_at, r.id) < ($2, $3::uuid))
           ORDER BY r.created_at DESC, r.id DESC LIMIT $4""",
        datapod_id, after[0] if after else None, after[1] if after else None, limit)
    return [Review(**dict(row)) for row in rows]
