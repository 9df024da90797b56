"""Transactional outbox: events written with the state change they announce, relayed after commit.

Revision ID: 0003
Revises: 0002
"""
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
        CREATE TABLE event_outbox (
            id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            channel VARCHAR(200) NOT NULL,
            type VARCHAR(64) NOT NULL,
            data JSONB NOT NULL,
            created_at TIMESTAMPTZ NOT NULL DEFAULT now()
        )""")
    op.execute("COMMENT ON TABLE event_outbox IS "
               "'Events committed with their state change, waiting for the relay to publish them'")


def downgrade() -> None:
    op.execute("DROP TABLE event_outbox")
