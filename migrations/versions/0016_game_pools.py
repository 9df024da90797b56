"""Game pools: every game reward, and its owner's revenue share, is drawn from a reward pool.

- `game_rewards.pool_id` names the pool a reward was drawn from (NULL for rewards booked before
  this migration, which drew from no pool) and `game_rewards.owner_share` the game owner's revenue
  share paid on it, drawn from the same pool. `chain verify` checks each pool's `allocated_tokens`
  against its allocations, mining rewards and these draws (`reward_value + owner_share`), so the
  partial index on `pool_id` serves that sum.
- Pool allocations are listed newest first by user and by pool: `(user_id, id)` and `(pool_id, id)`
  serve those keyset pages and every look-up the single-column indexes served, which go.

Revision ID: 0016
Revises: 0015
"""
from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None

UPGRADE = [
    """ALTER TABLE game_rewards
        ADD COLUMN pool_id INTEGER REFERENCES reward_pools(pool_id) ON DELETE SET NULL,
        ADD COLUMN owner_share NUMERIC(20,8) NOT NULL DEFAULT 0
            CONSTRAINT game_rewards_owner_share_check CHECK (owner_share >= 0)""",
    "CREATE INDEX idx_game_rewards_pool ON game_rewards (pool_id) WHERE pool_id IS NOT NULL",
    "CREATE INDEX idx_pool_allocations_user_order ON pool_allocations (user_id, id)",
    "DROP INDEX idx_pool_allocations_user",
    "CREATE INDEX idx_pool_allocations_pool_order ON pool_allocations (pool_id, id)",
    "DROP INDEX idx_pool_allocations_pool",
]

DOWNGRADE = [
    "CREATE INDEX idx_pool_allocations_pool ON pool_allocations (pool_id)",
    "DROP INDEX idx_pool_allocations_pool_order",
    "CREATE INDEX idx_pool_allocations_user ON pool_allocations (user_id)",
    "DROP INDEX idx_pool_allocations_user_order",
    "DROP INDEX idx_game_rewards_pool",
    "ALTER TABLE game_rewards DROP CONSTRAINT game_rewards_owner_share_check, DROP COLUMN owner_share, "
    "DROP COLUMN pool_id",
]


def upgrade() -> None:
    for statement in UPGRADE:
        op.execute(statement)


def downgrade() -> None:
    for statement in DOWNGRADE:
        op.execute(statement)
