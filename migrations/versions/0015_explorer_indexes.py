"""Explorer indexes: every explorer list is a keyset page its own index serves, filter and order.

- An address's history: `(sender, transaction_id)` and `(receiver, transaction_id)`, one per
  direction, merged newest first (transactions name addresses as text; the `sender_id` and
  `receiver_id` indexes serve user ids).
- A block's transactions in block order: `(block_id, transaction_id)`, which also serves every
  `block_id` look-up, so `idx_transactions_block (block_id)` goes.
- Mining rewards by block, `(block_id, reward_id)` (a block pays several miners once users mine),
  and by user, `(user_id, reward_id) INCLUDE (amount)`, which also sums a user's rewards from the
  index alone and replaces `idx_mining_rewards_user (user_id)`.
- Burned blocks, newest first: a partial index on `block_id WHERE burned`.
- `balance_ledger (user_id, entry_id)` (0007) already serves a user's ledger page.

Revision ID: 0015
Revises: 0014
"""
from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None

UPGRADE = [
    "CREATE INDEX idx_transactions_sender_history ON transactions (sender, transaction_id)",
    "CREATE INDEX idx_transactions_receiver_history ON transactions (receiver, transaction_id)",
    "CREATE INDEX idx_transactions_block_order ON transactions (block_id, transaction_id)",
    "DROP INDEX idx_transactions_block",
    "CREATE INDEX idx_mining_rewards_block_order ON mining_rewards (block_id, reward_id)",
    "CREATE INDEX idx_mining_rewards_user_order ON mining_rewards (user_id, reward_id) INCLUDE (amount)",
    "DROP INDEX idx_mining_rewards_user",
    "CREATE INDEX idx_blocks_burned ON blocks (block_id) WHERE burned",
]

DOWNGRADE = [
    "DROP INDEX idx_blocks_burned",
    "CREATE INDEX idx_mining_rewards_user ON mining_rewards (user_id)",
    "DROP INDEX idx_mining_rewards_user_order",
    "DROP INDEX idx_mining_rewards_block_order",
    "CREATE INDEX idx_transactions_block ON transactions (block_id)",
    "DROP INDEX idx_transactions_block_order",
    "DROP INDEX idx_transactions_receiver_history",
    "DROP INDEX idx_transactions_sender_history",
]


def upgrade() -> None:
    for statement in UPGRADE:
        op.execute(statement)


def downgrade() -> None:
    for statement in DOWNGRADE:
        op.execute(statement)
