"""Accounts: password reset tokens, mail outbox, profiles, suspension (issue 19).

- `users.bio` (a seller's profile text, at most 1000 characters); the avatar is the seed's
  `profile_image` (the API calls it `avatar_url` and accepts only https URLs).
- `users.suspended_at`, `suspension_reason`: an administrator's suspension. A suspended account's
  sessions end at once and it cannot sign in, refresh or use a token until unsuspended.
- `sessions.end_reason` gains 'password_changed', 'password_reset' and 'suspended'.
- `password_reset_tokens`: only the SHA-256 of each single-use token, with its expiry; `used_at` is
  set by compare-and-set, so a token works once.
- `mail_outbox`: mail waiting for the sender, retried with backoff. The body is sealed under
  MASTER_KEY (it carries the reset link, and the token must never rest in the database in clear),
  and scrubbed once sent or abandoned (after its retries, or once `expires_at` passed).
- `admin_actions`: who did what to whom (suspend, unsuspend, grant and revoke admin).

Revision ID: 0022
Revises: 0021
"""
from alembic import op

revision = "0022"
down_revision = "0021"
branch_labels = None
depends_on = None

UPGRADE: list[str] = [
    """ALTER TABLE users
         ADD COLUMN bio VARCHAR(1000),
         ADD COLUMN suspended_at TIMESTAMPTZ,
         ADD COLUMN suspension_reason VARCHAR(500),
         ADD CONSTRAINT users_suspension_check CHECK (suspended_at IS NOT NULL OR suspension_reason IS NULL)""",
    """ALTER TABLE sessions DROP CONSTRAINT sessions_end_reason_check,
         ADD CONSTRAINT sessions_end_reason_check CHECK (end_reason IN (
             'logged_out', 'revoked', 'refresh_reuse', 'password_changed', 'password_reset', 'suspended'))""",
    """CREATE TABLE password_reset_tokens (
         token_hash CHAR(64) PRIMARY KEY,
         user_id    UUID NOT NULL REFERENCES users(id) ON DELETE CASCADE,
         created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
         expires_at TIMESTAMPTZ NOT NULL,
         used_at    TIMESTAMPTZ,
         ip_address VARCHAR(45),
         CONSTRAINT password_reset_tokens_expiry_check CHECK (expires_at > created_at))""",
    "CREATE INDEX password_reset_tokens_user_idx ON password_reset_tokens (user_id)",
    """CREATE TABLE mail_outbox (
         mail_id         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
         recipient       VARCHAR(255) NOT NULL,
         subject         VARCHAR(255) NOT NULL,
         body_sealed     TEXT,
         created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
         expires_at      TIMESTAMPTZ,            -- not worth sending after this (a reset link is dead)
         attempts        INTEGER NOT NULL DEFAULT 0 CONSTRAINT mail_outbox_attempts_check CHECK (attempts >= 0),
         next_attempt_at TIMESTAMPTZ NOT NULL DEFAULT now(),
         sent_at         TIMESTAMPTZ,
         failed_at       TIMESTAMPTZ,
         last_error      VARCHAR(500),
         CONSTRAINT mail_outbox_done_check CHECK (sent_at IS NULL OR failed_at IS NULL),
         CONSTRAINT mail_outbox_scrubbed_check CHECK (sent_at IS NULL AND failed_at IS NULL OR body_sealed IS NULL))""",
    "CREATE INDEX mail_outbox_due_idx ON mail_outbox (next_attempt_at) WHERE sent_at IS NULL AND failed_at IS NULL",
    """CREATE TABLE admin_actions (
         action_id     BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
         admin_user_id UUID REFERENCES users(id) ON DELETE SET NULL,
         action        VARCHAR(20) NOT NULL CONSTRAINT admin_actions_action_check
                           CHECK (action IN ('suspend', 'unsuspend', 'grant_admin', 'revoke_admin')),
         target_user_id UUID REFERENCES users(id) ON DELETE SET NULL,
         reason        VARCHAR(500),
         created_at    TIMESTAMPTZ NOT NULL DEFAULT now())""",
    "CREATE INDEX admin_actions_target_idx ON admin_actions (target_user_id, created_at)",
    # Admin search by username or email prefix: text_pattern_ops serves LIKE 'prefix%'.
    "CREATE INDEX users_username_prefix_idx ON users (lower(username) text_pattern_ops)",
    "CREATE INDEX users_email_prefix_idx ON users (lower(email) text_pattern_ops)",
]

DOWNGRADE: list[str] = [
    "DROP INDEX users_email_prefix_idx",
    "DROP INDEX users_username_prefix_idx",
    "DROP TABLE admin_actions",
    "DROP TABLE mail_outbox",
    "DROP TABLE password_reset_tokens",
    """UPDATE sessions SET end_reason = 'revoked'
        WHERE end_reason IN ('password_changed', 'password_reset', 'suspended')""",
    """ALTER TABLE sessions DROP CONSTRAINT sessions_end_reason_check,
         ADD CONSTRAINT sessions_end_reason_check CHECK (end_reason IN ('logged_out', 'revoked', 'refresh_reuse'))""",
    """ALTER TABLE users DROP CONSTRAINT users_suspension_check,
         DROP COLUMN suspension_reason, DROP COLUMN suspended_at, DROP COLUMN bio""",
]


def upgrade() -> None:
    for statement in UPGRADE:
        op.execute(statement)


def downgrade() -> None:
    for statement in DOWNGRADE:
        op.execute(statement)
