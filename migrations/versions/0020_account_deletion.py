"""Account deletion (issue 18): a deleted account is an anonymised users row, not a removed one.

Deleting the row would cascade into `balance_ledger`, `mining_rewards`, `pool_allocations`... and
break `chain verify`, so the row stays under its id with `account_kind` 'deleted' (0018):
- `deleted_at`: when it was deleted; set exactly for 'deleted' rows.
- A deleted row keeps its `wallet_address` (it names the account in the chain's history and stays
  reserved, so nobody registers it again) without its `wallet_public_key`, so nothing can be signed
  for it any more: the wallet pair check allows exactly that case.
- `users_deleted_scrubbed_check`: a deleted row holds no credentials, email or keys (a backstop for
  writers other than server/services/account_deletion.py).

Downgrade drops deleted rows' wallet addresses (the old pair check wants both or neither); the rows
stay 'deleted'.

Revision ID: 0020
Revises: 0019
"""
from alembic import op

revision = "0020"
down_revision = "0019"
branch_labels = None
depends_on = None

UPGRADE = [
    """ALTER TABLE users
         ADD COLUMN deleted_at TIMESTAMPTZ,
         ADD CONSTRAINT users_deleted_at_check CHECK ((account_kind = 'deleted') = (deleted_at IS NOT NULL)),
         DROP CONSTRAINT users_wallet_pair_check,
         ADD CONSTRAINT users_wallet_pair_check CHECK ((wallet_public_key IS NULL) = (wallet_address IS NULL)
                                                       OR (account_kind = 'deleted' AND wallet_public_key IS NULL)),
         ADD CONSTRAINT users_deleted_scrubbed_check CHECK (account_kind <> 'deleted' OR (
             email IS NULL AND password_hash IS NULL AND google_id IS NULL AND wallet_public_key IS NULL
             AND x25519_public_key IS NULL AND sui_address IS NULL AND salt IS NULL))""",
]

DOWNGRADE = [
    "ALTER TABLE users DROP CONSTRAINT users_deleted_scrubbed_check, DROP CONSTRAINT users_wallet_pair_check",
    "UPDATE users SET wallet_address = NULL WHERE account_kind = 'deleted' AND wallet_public_key IS NULL",
    """ALTER TABLE users
         ADD CONSTRAINT users_wallet_pair_check CHECK ((wallet_public_key IS NULL) = (wallet_address IS NULL)),
         DROP CONSTRAINT users_deleted_at_check,
         DROP COLUMN deleted_at""",
]


def upgrade() -> None:
    for statement in UPGRADE:
        op.execute(statement)


def downgrade() -> None:
    for statement in DOWNGRADE:
        op.execute(statement)
