"""KVP chain: wallet keys on users, signed transactions (nonce, status), one reward per block.

Revision ID: 0004
Revises: 0003
"""
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A user's Ed25519 wallet key (raw 32 bytes, hex) and the address derived from it. Set once:
    # the address names the account in every transaction, so it must not change under them.
    op.execute("""ALTER TABLE users
        ADD COLUMN wallet_public_key TEXT
            CONSTRAINT users_wallet_public_key_key UNIQUE
            CONSTRAINT users_wallet_public_key_check CHECK (wallet_public_key ~ '^[0-9a-f]{64}$'),
        ADD COLUMN wallet_address TEXT
            CONSTRAINT users_wallet_address_key UNIQUE
            CONSTRAINT users_wallet_address_check CHECK (wallet_address ~ '^kvp1[0-9a-f]{40}$'),
        ADD CONSTRAINT users_wallet_pair_check CHECK ((wallet_public_key IS NULL) = (wallet_address IS NULL))""")
    # Signed transfers: the nonce makes (sender, nonce) unique, so a signed message cannot be
    # replayed; public_key keeps each row verifiable on its own; status tracks pending -> sealed.
    # Rows written the seed's way (no status given) are records of fact, hence 'confirmed'.
    op.execute("""ALTER TABLE transactions
        ADD COLUMN nonce BIGINT CONSTRAINT transactions_nonce_check CHECK (nonce >= 0),
        ADD COLUMN public_key TEXT,
        ADD COLUMN status VARCHAR(12) NOT NULL DEFAULT 'confirmed'
            CONSTRAINT transactions_status_check CHECK (status IN ('pending', 'confirmed', 'rejected')),
        ADD COLUMN error TEXT,
        ADD COLUMN confirmed_at TIMESTAMPTZ,
        ADD CONSTRAINT transactions_pending_unsealed_check CHECK (status <> 'pending' OR block_id IS NULL)""")
    op.execute("CREATE UNIQUE INDEX transactions_sender_nonce_key ON transactions (sender, nonce) "
               "WHERE nonce IS NOT NULL")
    op.execute("CREATE INDEX idx_transactions_pending ON transactions (sender, transaction_id) "
               "WHERE status = 'pending'")
    # A block pays its mining reward once.
    op.execute("ALTER TABLE mining_rewards ADD CONSTRAINT mining_rewards_block_key UNIQUE (block_id)")
    op.execute("DROP INDEX idx_mining_rewards_block")  # the unique index replaces it
    op.execute("""ALTER TABLE pool_allocations ADD CONSTRAINT pool_allocations_remaining_le_allocated_check
                  CHECK (remaining_amount <= allocated_amount)""")


def downgrade() -> None:
    op.execute("ALTER TABLE pool_allocations DROP CONSTRAINT pool_allocations_remaining_le_allocated_check")
    op.execute("CREATE INDEX idx_mining_rewards_block ON mining_rewards (block_id)")
    op.execute("ALTER TABLE mining_rewards DROP CONSTRAINT mining_rewards_block_key")
    op.execute("DROP INDEX idx_transactions_pending")
    op.execute("DROP INDEX transactions_sender_nonce_key")
    op.execute("""ALTER TABLE transactions DROP CONSTRAINT transactions_pending_unsealed_check,
        DROP COLUMN confirmed_at, DROP COLUMN error, DROP COLUMN status, DROP COLUMN public_key,
        DROP COLUMN nonce""")
    op.execute("""ALTER TABLE users DROP CONSTRAINT users_wallet_pair_check,
        DROP COLUMN wallet_address, DROP COLUMN wallet_public_key""")
