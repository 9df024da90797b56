"""Search at scale: market indexes for every sort, within a category too, and text in a category (issue 21).

At a million DataPods a search that orders by one column and filters on others either walks an
index in the page's order (fast when many pods match) or finds the matches first and sorts them
(fast when few do); db/marketplace.py tries the first within a bounded window, then the second.
These indexes give both ways something to walk:

- the market in each sort's order, and the same within a category, all partial on what the market
  shows (published, not deleted), so a window of a category is read in order from its first row;
- full text and title trigrams together with the category (btree_gin), so "these words in this
  category" is answered inside one index instead of by ANDing two bitmaps of 100,000 rows each.

btree_gin, like pg_trgm (0023), is a trusted contrib extension that may be missing or not
creatable: then the two GIN indexes are skipped with a notice and search stays correct, only
slower for rare words in a large category.

Revision ID: 0026
Revises: 0025
"""
from alembic import op

revision = "0026"
down_revision = "0025"
branch_labels = None
depends_on = None

_MARKET = "WHERE published AND deleted_at IS NULL"

UPGRADE: list[str] = [
    # `sort=sales` had no index at all (a full sort of the market); the other global sorts use
    # idx_datapods_published_recent, idx_datapods_price and idx_datapods_rating (0001).
    f"CREATE INDEX idx_datapods_market_sales ON datapods (purchase_count DESC, id DESC) {_MARKET}",
    f"CREATE INDEX idx_datapods_market_category_newest ON datapods (category, created_at DESC, id DESC) {_MARKET}",
    f"CREATE INDEX idx_datapods_market_category_price ON datapods (category, price_sui, id) {_MARKET}",
    f"CREATE INDEX idx_datapods_market_category_rating ON datapods (category, average_rating DESC, id DESC) {_MARKET}",
    f"CREATE INDEX idx_datapods_market_category_sales ON datapods (category, purchase_count DESC, id DESC) {_MARKET}",
    # fastupdate off, as for idx_datapods_search: uploads are rare, searches constant.
    f"""DO $$
    BEGIN
        IF NOT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'btree_gin') THEN
            RAISE NOTICE 'btree_gin is not available: no category+text indexes for DataPod search';
            RETURN;
        END IF;
        BEGIN
            CREATE EXTENSION IF NOT EXISTS btree_gin;
        EXCEPTION WHEN insufficient_privilege THEN
            RAISE NOTICE 'btree_gin cannot be created by this role: no category+text indexes for DataPod search';
            RETURN;
        END;
        CREATE INDEX IF NOT EXISTS idx_datapods_search_by_category ON datapods
            USING gin (category, search_vector) WITH (fastupdate = off) {_MARKET};
        IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'pg_trgm') THEN
            CREATE INDEX IF NOT EXISTS idx_datapods_title_trgm_by_category ON datapods
                USING gin (category, title gin_trgm_ops) WITH (fastupdate = off) {_MARKET};
        END IF;
    END $$""",
]

DOWNGRADE: list[str] = [
    "DROP INDEX IF EXISTS idx_datapods_title_trgm_by_category",
    "DROP INDEX IF EXISTS idx_datapods_search_by_category",
    """DO $$
    BEGIN
        DROP EXTENSION IF EXISTS btree_gin;
    EXCEPTION WHEN dependent_objects_still_exist THEN
        RAISE NOTICE 'btree_gin is still in use: kept';
    END $$""",
    "DROP INDEX IF EXISTS idx_datapods_market_category_sales",
    "DROP INDEX IF EXISTS idx_datapods_market_category_rating",
    "DROP INDEX IF EXISTS idx_datapods_market_category_price",
    "DROP INDEX IF EXISTS idx_datapods_market_category_newest",
    "DROP INDEX IF EXISTS idx_datapods_market_sales",
]


def upgrade() -> None:
    for statement in UPGRADE:
        op.execute(statement)


def downgrade() -> None:
    for statement in DOWNGRADE:
        op.execute(statement)
