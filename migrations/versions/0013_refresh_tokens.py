"""Refresh tokens: one rotating family per session (device), and why a session ended.

A sign-in now gives a short-lived access token and a refresh token. Each refresh spends its refresh
token and issues the next one of the same session (the family). A spent token presented again
means a copy is in someone else's hands, so the whole session ends (`end_reason` 'refresh_reuse'),
as the OAuth 2.0 security best current practice describes for rotating refresh tokens. Only the
SHA-256 of a refresh token is stored.

`sessions.expires_at` is now the end of the session (the last refresh token's expiry), not of one
access token.

Revision ID: 0013
Revises: 0012
"""
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

UPGRADE = [
    """ALTER TABLE sessions ADD COLUMN end_reason TEXT
        CONSTRAINT sessions_end_reason_check
        CHECK (end_reason IN ('logged_out', 'revoked', 'refresh_reuse'))""",
    """CREATE TABLE session_refresh_tokens (
        token_hash TEXT PRIMARY KEY,
        session_id INTEGER NOT NULL REFERENCES sessions(session_id) ON DELETE CASCADE,
        issued_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
        expires_at TIMESTAMPTZ NOT NULL,
        spent_at   TIMESTAMPTZ,
        CONSTRAINT session_refresh_tokens_spent_after_issue CHECK (spent_at IS NULL OR spent_at >= issued_at))""",
    "CREATE INDEX session_refresh_tokens_session_idx ON session_refresh_tokens (session_id)",
    # At most one live refresh token per session: two would fork the family.
    """CREATE UNIQUE INDEX session_refresh_tokens_one_live ON session_refresh_tokens (session_id)
        WHERE spent_at IS NULL""",
]

DOWNGRADE = [
    "DROP TABLE session_refresh_tokens",
    "ALTER TABLE sessions DROP COLUMN end_reason",
]


def upgrade() -> None:
    for statement in UPGRADE:
        op.execute(statement)


def downgrade() -> None:
    for statement in DOWNGRADE:
        op.execute(statement)
