"""Datapods keep their dataset key wrapped under MASTER_KEY (never in plain text).

Revision ID: 0002
Revises: 0001
"""
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE datapods ADD COLUMN wrapped_key TEXT NOT NULL")
    op.execute("COMMENT ON COLUMN datapods.wrapped_key IS "
               "'AES-256-GCM dataset key wrapped under MASTER_KEY, bound to the pod id'")


def downgrade() -> None:
    op.execute("ALTER TABLE datapods DROP COLUMN wrapped_key")
