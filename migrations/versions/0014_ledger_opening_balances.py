"""Ledger opening balances: from here on, every balance equals the sum of its ledger rows.

Before this revision, sealed transfers, mining rewards and pool grants moved `users.total_balance`
without a `balance_ledger` row. For every user whose balance differs from the sum of their ledger
deltas, one 'opening_balance' row books the difference (reference 'migration-0014:<user id>', as
(reason, reference) is unique), with the balance as `balance_after`. `chain verify` then checks
that each user's rows chain from their opening row on; rows booked before it are covered by the
sum only. `users.total_balance >= 0` is already a CHECK (users_total_balance_check, 0001).

Downgrade removes these rows; balances are not touched either way.

Revision ID: 0014
Revises: 0013
"""
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None

UPGRADE = [
    """INSERT INTO balance_ledger (user_id, delta, balance_after, reason, reference)
       SELECT u.id, u.total_balance - coalesce(l.total, 0), u.total_balance, 'opening_balance',
              'migration-0014:' || u.id::text
         FROM users u
         LEFT JOIN (SELECT user_id, sum(delta) AS total FROM balance_ledger GROUP BY user_id) l
                ON l.user_id = u.id
        WHERE u.total_balance <> coalesce(l.total, 0)
        ORDER BY u.id""",
]

DOWNGRADE = [
    "DELETE FROM balance_ledger WHERE reason = 'opening_balance' AND reference LIKE 'migration-0014:%'",
]


def upgrade() -> None:
    for statement in UPGRADE:
        op.execute(statement)


def downgrade() -> None:
    for statement in DOWNGRADE:
        op.execute(statement)
