"""hub_abort(reason): end a statement with an error whose message is `reason` (issue 21).

A reward batch books in one statement outside a transaction block (db/games.py, book_batch),
so its locks on the reward pool and the game owner's balance last only as long as the statement.
When a check inside it fails (a session moved since it was read, the pool ran short, an account
is gone), the statement must end with nothing written: plain SQL cannot raise, so it calls this.

Revision ID: 0028
Revises: 0027
"""
from alembic import op

revision = "0028"
down_revision = "0027"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""CREATE FUNCTION hub_abort(reason text) RETURNS boolean LANGUAGE plpgsql AS $$
                  BEGIN
                      RAISE EXCEPTION USING MESSAGE = reason;  -- SQLSTATE P0001, asyncpg's RaiseError
                  END $$""")


def downgrade() -> None:
    op.execute("DROP FUNCTION hub_abort(text)")
