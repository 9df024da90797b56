"""Storage API: cloud files get an owner.

- `cloud.owner_id`: the user who registered the file through the API (`ON DELETE CASCADE`, like
  the user's peers and seeders). The file, its mirrors and its trackers are that user's: only they
  read, change or delete them, and only they add peers and seeders to it. Rows without an owner
  (inserted the seed's way, plain SQL) are not served by the API.
- `idx_cloud_owner (owner_id, id)` serves the owner's paged file list.

Revision ID: 0010
Revises: 0009
"""
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

UPGRADE = [
    "ALTER TABLE cloud ADD COLUMN owner_id UUID REFERENCES users(id) ON DELETE CASCADE",
    "CREATE INDEX idx_cloud_owner ON cloud (owner_id, id)",
]

DOWNGRADE = [
    "DROP INDEX idx_cloud_owner",
    "ALTER TABLE cloud DROP COLUMN owner_id",
]


def upgrade() -> None:
    for statement in UPGRADE:
        op.execute(statement)


def downgrade() -> None:
    for statement in DOWNGRADE:
        op.execute(statement)
