"""DataPod versions and seller figures (issue 19).

Revision ID: 0021
Revises: 0020
"""
from alembic import op

revision = "0021"
down_revision = "0020"
branch_labels = None
depends_on = None

UPGRADE: list[str] = [
    # A deleted DataPod that was ever bought stays as a row (its buyers keep access), hidden everywhere else.
    "ALTER TABLE datapods ADD COLUMN deleted_at TIMESTAMPTZ",
    """CREATE TABLE datapod_versions (
        datapod_id          UUID NOT NULL REFERENCES datapods(id) ON DELETE CASCADE,
        version             INTEGER NOT NULL CONSTRAINT datapod_versions_version_check CHECK (version >= 1),
        walrus_blob_id      VARCHAR(255) NOT NULL,
        walrus_storage_size BIGINT,
        encryption_key_hash VARCHAR(64) NOT NULL,
        data_hash           VARCHAR(64),
        file_type           VARCHAR(100),
        file_size           BIGINT,
        created_at          TIMESTAMPTZ NOT NULL DEFAULT now(),
        PRIMARY KEY (datapod_id, version)
    )""",
    # The history is written by the database itself whenever a pod gets a (new) blob, so it can never
    # disagree with the pod's current columns, whoever inserts or updates them.
    """CREATE FUNCTION record_datapod_version() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP = 'UPDATE' AND OLD.walrus_blob_id = NEW.walrus_blob_id THEN
            RETURN NULL;
        END IF;
        INSERT INTO datapod_versions (datapod_id, version, walrus_blob_id, walrus_storage_size,
                                      encryption_key_hash, data_hash, file_type, file_size)
        SELECT NEW.id, coalesce(max(v.version), 0) + 1, NEW.walrus_blob_id, NEW.walrus_storage_size,
               NEW.encryption_key_hash, NEW.data_hash, NEW.file_type, NEW.file_size
          FROM datapod_versions v WHERE v.datapod_id = NEW.id;
        RETURN NULL;
    END
    $$""",
    """CREATE TRIGGER datapods_record_version AFTER INSERT OR UPDATE OF walrus_blob_id ON datapods
        FOR EACH ROW EXECUTE FUNCTION record_datapod_version()""",
    """INSERT INTO datapod_versions (datapod_id, version, walrus_blob_id, walrus_storage_size, encryption_key_hash,
                                     data_hash, file_type, file_size, created_at)
       SELECT id, 1, walrus_blob_id, walrus_storage_size, encryption_key_hash, data_hash, file_type, file_size,
              created_at FROM datapods""",
    # Page views by day (the seller's "views" figure): a counter, not a log of who looked.
    """CREATE TABLE datapod_views (
        datapod_id UUID NOT NULL REFERENCES datapods(id) ON DELETE CASCADE,
        day        DATE NOT NULL,
        views      BIGINT NOT NULL DEFAULT 0 CONSTRAINT datapod_views_views_check CHECK (views >= 0),
        PRIMARY KEY (datapod_id, day)
    )""",
]

DOWNGRADE: list[str] = [
    "DROP TABLE datapod_views",
    "DROP TRIGGER datapods_record_version ON datapods",
    "DROP FUNCTION record_datapod_version()",
    "DROP TABLE datapod_versions",
    "ALTER TABLE datapods DROP COLUMN deleted_at",
]


def upgrade() -> None:
    for statement in UPGRADE:
        op.execute(statement)


def downgrade() -> None:
    for statement in DOWNGRADE:
        op.execute(statement)
