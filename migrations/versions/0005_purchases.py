"""Purchases: durable purchase jobs, payment receipts (a digest pays once, forever) and buyers'
X25519 public keys for client-side decryption.

Revision ID: 0005
Revises: 0004
"""
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # One job per purchase moves it through its steps; a worker claims it with FOR UPDATE SKIP
    # LOCKED and holds a lease (locked_by, locked_until) that every step's commit re-checks, so a
    # crashed worker's job is resumed once the lease ends and two workers never run one step twice.
    op.execute("""
        CREATE TABLE purchase_jobs (
            purchase_id  UUID PRIMARY KEY REFERENCES purchases(id) ON DELETE CASCADE,
            step         VARCHAR(20) NOT NULL DEFAULT 'verify'
                         CONSTRAINT purchase_jobs_step_check CHECK (step IN ('verify', 'wrap', 'hold', 'complete')),
            attempts     INTEGER NOT NULL DEFAULT 0 CONSTRAINT purchase_jobs_attempts_check CHECK (attempts >= 0),
            run_after    TIMESTAMPTZ NOT NULL DEFAULT now(),
            locked_by    VARCHAR(64),
            locked_until TIMESTAMPTZ,
            last_error   TEXT,
            created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
            updated_at   TIMESTAMPTZ NOT NULL DEFAULT now()
        )""")
    op.execute("CREATE INDEX idx_purchase_jobs_run_after ON purchase_jobs (run_after)")
    op.execute("""CREATE TRIGGER purchase_jobs_set_updated_at BEFORE UPDATE ON purchase_jobs
                  FOR EACH ROW EXECUTE FUNCTION set_updated_at()""")
    # purchases.payment_tx_digest is unique, but a failed purchase may be retried with another digest
    # (unique_buyer_datapod keeps one row per buyer and pod), which would free the old one. A
    # verified payment is recorded here and never deleted, so it can never pay twice.
    op.execute("""
        CREATE TABLE payment_receipts (
            payment_tx_digest VARCHAR(100) PRIMARY KEY,
            purchase_id       UUID REFERENCES purchases(id) ON DELETE SET NULL,
            chain             VARCHAR(10) NOT NULL CONSTRAINT payment_receipts_chain_check CHECK (chain IN ('kvp', 'sui')),
            sender            TEXT,
            receiver          TEXT,
            amount_sui        NUMERIC(20,9) NOT NULL CONSTRAINT payment_receipts_amount_check CHECK (amount_sui >= 0),
            verified_at       TIMESTAMPTZ NOT NULL DEFAULT now()
        )""")
    op.execute("CREATE INDEX idx_payment_receipts_purchase ON payment_receipts (purchase_id)")
    op.execute("""ALTER TABLE users ADD COLUMN x25519_public_key BYTEA
                  CONSTRAINT users_x25519_public_key_check CHECK (octet_length(x25519_public_key) = 32)""")
    op.execute("COMMENT ON COLUMN users.x25519_public_key IS "
               "'Raw X25519 public key; purchases wrap the dataset key to it for client-side decryption'")
    # The escrow auto-release sweep looks for holding escrows by age.
    op.execute("CREATE INDEX idx_escrow_holding_created ON escrow_transactions (created_at) WHERE status = 'holding'")


def downgrade() -> None:
    op.execute("DROP INDEX idx_escrow_holding_created")
    op.execute("ALTER TABLE users DROP COLUMN x25519_public_key")
    op.execute("DROP TABLE payment_receipts")
    op.execute("DROP TABLE purchase_jobs")
