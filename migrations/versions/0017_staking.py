"""Staking, the first `defi` product: what a stake remembers to pay rewards lazily and to lock up.

- `opened_height`: the chain's tip when the stake was opened; rewards accrue from the next block.
- `unlock_height`: the first tip height at which it may be unstaked (opened_height + lock-up).
- `paid_height`: the last block its rewards were paid to (starts at opened_height); a claim pays
  rate x amount x (tip - paid_height) and moves it to the tip, compared and set under the row lock.
- `reward_rate`: the fraction of the stake paid per sealed block, fixed when the stake is opened.
- `rewards_paid`, `closed_at`: totals for the history.
- `request_id`: the client's optional idempotency key, unique per user.
The columns are NULL for the products left for later (lending, liquidity). A user's stakes are paged
newest first by `(user_id, product, id)`, which also serves every `user_id` look-up, so `idx_defi_user`
goes.

Revision ID: 0017
Revises: 0016
"""
from alembic import op

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None

UPGRADE = [
    """ALTER TABLE defi
         ADD COLUMN opened_height INTEGER CONSTRAINT defi_opened_height_check CHECK (opened_height >= 0),
         ADD COLUMN unlock_height INTEGER,
         ADD COLUMN paid_height   INTEGER,
         ADD COLUMN reward_rate   NUMERIC(20,12) CONSTRAINT defi_reward_rate_check CHECK (reward_rate >= 0),
         ADD COLUMN rewards_paid  NUMERIC(20,8) NOT NULL DEFAULT 0
                                  CONSTRAINT defi_rewards_paid_check CHECK (rewards_paid >= 0),
         ADD COLUMN closed_at     TIMESTAMPTZ,
         ADD COLUMN request_id    UUID,
         ADD CONSTRAINT defi_heights_check CHECK (unlock_height >= opened_height AND paid_height >= opened_height)""",
    "CREATE UNIQUE INDEX defi_user_request_key ON defi (user_id, request_id) WHERE request_id IS NOT NULL",
    "CREATE INDEX idx_defi_user_product_order ON defi (user_id, product, id)",
    "DROP INDEX idx_defi_user",
]

DOWNGRADE = [
    "CREATE INDEX idx_defi_user ON defi (user_id)",
    "DROP INDEX idx_defi_user_product_order",
    "DROP INDEX defi_user_request_key",
    """ALTER TABLE defi DROP CONSTRAINT defi_heights_check, DROP COLUMN request_id, DROP COLUMN closed_at,
         DROP COLUMN rewards_paid, DROP COLUMN reward_rate, DROP COLUMN paid_height, DROP COLUMN unlock_height,
         DROP COLUMN opened_height""",
]


def upgrade() -> None:
    for statement in UPGRADE:
        op.execute(statement)


def downgrade() -> None:
    for statement in DOWNGRADE:
        op.execute(statement)
