"""An escrow keeps the digest of the payment it was opened with (a fix found by the ledger's tests).

A refunded purchase can be bought again: its row is restarted in place with the new payment's
digest (unique_buyer_datapod keeps one row per buyer and DataPod), while its escrow stays refunded
and settled until the new payment opens it again. The escrow's checks read the payment through
the purchase, so in between they summed the old refund against the new payment (not yet sealed)
and reported the escrow wallet out by the refund. The escrow now records its own payment's digest
when it is opened or reopened; existing rows take their purchase's.

Revision ID: 0031
Revises: 0030
"""
from alembic import op

revision = "0031"
down_revision = "0030"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE escrow_transactions ADD COLUMN payment_tx_digest VARCHAR(100)")
    op.execute("""UPDATE escrow_transactions e SET payment_tx_digest = p.payment_tx_digest
                    FROM purchases p WHERE p.id = e.purchase_id""")
    op.execute("COMMENT ON COLUMN escrow_transactions.payment_tx_digest IS "
               "'The payment the escrow holds or paid back (its purchase may since have a new one)'")


def downgrade() -> None:
    op.execute("ALTER TABLE escrow_transactions DROP COLUMN payment_tx_digest")
