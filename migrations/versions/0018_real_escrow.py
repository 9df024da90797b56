"""Real escrow on the KVP chain: server-controlled wallets, disputes, settlement transfers, a step log.

- `users.account_kind`: 'person' (everyone who signs in), 'system' (a wallet the server controls:
  the escrow and the platform's fee account; no credentials, never signs in) or 'deleted' (an
  anonymised account, issue 18). Only persons need a password or a Google id, and an email.
- `system_wallets`: the server's own wallets by name, each a users row with its Ed25519 private key
  wrapped under MASTER_KEY (AAD "system-wallet:<name>"), rewrapped by `rotate-master-key`.
- `escrow_transactions`: 'disputed' joins the seed's statuses; the settlement transfers (to the
  seller or back to the buyer, and the platform fee) are recorded by hash, with the dispute and
  its resolution; `settled_at` is set once the settlement transfers are sealed in a block.
- `escrow_steps`: one row per step of an escrow (paid, holding, confirmed, disputed, released,
  refunded, settled), with who did it and the transfer it made.

Revision ID: 0018
Revises: 0017
"""
from alembic import op

revision = "0018"
down_revision = "0017"
branch_labels = None
depends_on = None

UPGRADE = [
    """ALTER TABLE users
         ADD COLUMN account_kind VARCHAR(10) NOT NULL DEFAULT 'person'
             CONSTRAINT users_account_kind_check CHECK (account_kind IN ('person', 'system', 'deleted')),
         DROP CONSTRAINT users_credentials_check,
         ADD CONSTRAINT users_credentials_check
             CHECK (account_kind <> 'person' OR password_hash IS NOT NULL OR google_id IS NOT NULL),
         ALTER COLUMN email DROP NOT NULL,
         ADD CONSTRAINT users_email_check CHECK (account_kind <> 'person' OR email IS NOT NULL)""",
    """CREATE TABLE system_wallets (
         name                VARCHAR(32) PRIMARY KEY,
         user_id             UUID NOT NULL UNIQUE REFERENCES users(id) ON DELETE RESTRICT,
         wrapped_private_key TEXT NOT NULL,
         created_at          TIMESTAMPTZ NOT NULL DEFAULT now())""",
    """ALTER TABLE escrow_transactions
         DROP CONSTRAINT check_escrow_status,
         ADD CONSTRAINT check_escrow_status CHECK (status IN ('holding', 'disputed', 'released', 'refunded')),
         ADD COLUMN fee_amount NUMERIC(20,9) NOT NULL DEFAULT 0
             CONSTRAINT escrow_fee_amount_check CHECK (fee_amount >= 0 AND fee_amount <= amount_sui),
         ADD COLUMN settlement_tx_hash VARCHAR(128),
         ADD COLUMN fee_tx_hash VARCHAR(128),
         ADD COLUMN settled_at TIMESTAMPTZ,
         ADD COLUMN disputed_at TIMESTAMPTZ,
         ADD COLUMN dispute_reason VARCHAR(1000),
         ADD COLUMN resolved_by UUID REFERENCES users(id) ON DELETE SET NULL,
         ADD COLUMN resolution_note VARCHAR(1000),
         ADD CONSTRAINT escrow_dispute_check CHECK ((disputed_at IS NULL) = (dispute_reason IS NULL))""",
    # Escrows decided before this migration moved no money: nothing is left to pay out.
    "UPDATE escrow_transactions SET settled_at = coalesce(released_at, now()) WHERE status IN ('released', 'refunded')",
    # The dispute queue and the settlement sweep read these.
    "CREATE INDEX idx_escrow_disputed ON escrow_transactions (disputed_at) WHERE status = 'disputed'",
    """CREATE INDEX idx_escrow_unsettled ON escrow_transactions (released_at)
         WHERE status IN ('released', 'refunded') AND settled_at IS NULL""",
    """CREATE TABLE escrow_steps (
         id          BIGSERIAL PRIMARY KEY,
         escrow_id   UUID NOT NULL REFERENCES escrow_transactions(id) ON DELETE CASCADE,
         purchase_id UUID NOT NULL,
         step        VARCHAR(12) NOT NULL
             CONSTRAINT escrow_steps_step_check CHECK (step IN ('holding', 'confirmed', 'disputed', 'released',
                                                                'refunded', 'settled', 'reissued')),
         actor_id    UUID REFERENCES users(id) ON DELETE SET NULL,
         tx_hash     VARCHAR(128),
         amount      NUMERIC(20,9),
         reason      VARCHAR(1000),
         created_at  TIMESTAMPTZ NOT NULL DEFAULT now())""",
    "CREATE INDEX idx_escrow_steps_purchase ON escrow_steps (purchase_id, id)",
]

DOWNGRADE = [
    "DROP TABLE escrow_steps",
    "DROP INDEX idx_escrow_unsettled",
    "DROP INDEX idx_escrow_disputed",
    "UPDATE escrow_transactions SET status = 'holding' WHERE status = 'disputed'",
    """ALTER TABLE escrow_transactions
         DROP CONSTRAINT escrow_dispute_check, DROP COLUMN resolution_note, DROP COLUMN resolved_by,
         DROP COLUMN dispute_reason, DROP COLUMN disputed_at, DROP COLUMN settled_at, DROP COLUMN fee_tx_hash,
         DROP COLUMN settlement_tx_hash, DROP COLUMN fee_amount,
         DROP CONSTRAINT check_escrow_status,
         ADD CONSTRAINT check_escrow_status CHECK (status IN ('holding', 'released', 'refunded'))""",
    "DROP TABLE system_wallets",
    # A password hash no password verifies against, and an address no mail reaches: the seed's
    # constraints want them.
    """UPDATE users SET password_hash = '!' WHERE account_kind <> 'person' AND password_hash IS NULL
          AND google_id IS NULL""",
    "UPDATE users SET email = account_kind || '-' || id::text || '@invalid.invalid' WHERE email IS NULL",
    """ALTER TABLE users DROP CONSTRAINT users_email_check, ALTER COLUMN email SET NOT NULL,
         DROP CONSTRAINT users_credentials_check,
         ADD CONSTRAINT users_credentials_check CHECK (password_hash IS NOT NULL OR google_id IS NOT NULL),
         DROP COLUMN account_kind""",
]


def upgrade() -> None:
    for statement in UPGRADE:
        op.execute(statement)


def downgrade() -> None:
    for statement in DOWNGRADE:
        op.execute(statement)
