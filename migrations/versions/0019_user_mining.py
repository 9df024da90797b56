"""Users mine: mining sessions, proof-of-work shares, and one reward row per miner per block.

- `mining_sessions`: a user's mining from one device type ('Mobile' or 'Node'). At most one open
  session per user (`mining_sessions_one_open`, partial unique on user_id WHERE ended_at IS NULL):
  a second concurrent start fails there even when two race. `unpaid_shares` (Node) and
  `unpaid_seconds` (Mobile) are the work done since the last sealed block; sealing pays them and
  sets them back to 0 (`idx_mining_sessions_unpaid` finds them). `shares` and `active_seconds`
  are the session's totals.
- `mining_shares`: every accepted share; `share_hash` is unique, so the same (challenge, nonce)
  is accepted once. `(session_id, created_at)` serves the per-session rate limit.
- `mining_days`: Mobile seconds credited per user per UTC day (the daily cap).
- `mining_rewards`: one row per miner per block (`mining_rewards_block_miner_key` on the miner's
  account, `miner_wallet`, replaces the one-row-per-block `mining_rewards_block_key` of 0004), with
  the work it was paid for. Keyed on the account rather than user_id so that the key's index is no
  candidate for the by-user queries, which idx_mining_rewards_user_order serves.

Revision ID: 0019
Revises: 0018
"""
from alembic import op

revision = "0019"
down_revision = "0018"
branch_labels = None
depends_on = None

UPGRADE = [
    """CREATE TABLE mining_sessions (
         id                BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
         user_id           UUID NOT NULL REFERENCES users(id) ON DELETE CASCADE,
         device_type       VARCHAR(10) NOT NULL
                           CONSTRAINT mining_sessions_device_type_check CHECK (device_type IN ('Mobile', 'Node')),
         started_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
         last_heartbeat_at TIMESTAMPTZ NOT NULL DEFAULT now(),
         ended_at          TIMESTAMPTZ,
         end_reason        VARCHAR(10)
                           CONSTRAINT mining_sessions_end_reason_check CHECK (end_reason IN ('stopped', 'expired')),
         shares            INTEGER NOT NULL DEFAULT 0 CONSTRAINT mining_sessions_shares_check CHECK (shares >= 0),
         active_seconds    INTEGER NOT NULL DEFAULT 0
                           CONSTRAINT mining_sessions_active_seconds_check CHECK (active_seconds >= 0),
         unpaid_shares     INTEGER NOT NULL DEFAULT 0
                           CONSTRAINT mining_sessions_unpaid_shares_check CHECK (unpaid_shares >= 0),
         unpaid_seconds    INTEGER NOT NULL DEFAULT 0
                           CONSTRAINT mining_sessions_unpaid_seconds_check CHECK (unpaid_seconds >= 0),
         CONSTRAINT mining_sessions_ended_check CHECK ((ended_at IS NULL) = (end_reason IS NULL))
       )""",
    "CREATE UNIQUE INDEX mining_sessions_one_open ON mining_sessions (user_id) WHERE ended_at IS NULL",
    "CREATE INDEX idx_mining_sessions_user_order ON mining_sessions (user_id, id)",
    "CREATE INDEX idx_mining_sessions_unpaid ON mining_sessions (id) WHERE unpaid_shares > 0 OR unpaid_seconds > 0",
    """CREATE TABLE mining_shares (
         id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
         session_id  BIGINT NOT NULL REFERENCES mining_sessions(id) ON DELETE CASCADE,
         user_id     UUID NOT NULL REFERENCES users(id) ON DELETE CASCADE,
         height      INTEGER NOT NULL,
         challenge   CHAR(64) NOT NULL,
         nonce       BIGINT NOT NULL CONSTRAINT mining_shares_nonce_check CHECK (nonce >= 0),
         share_hash  CHAR(64) NOT NULL CONSTRAINT mining_shares_hash_key UNIQUE,
         difficulty  SMALLINT NOT NULL,
         created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
       )""",
    "CREATE INDEX idx_mining_shares_session_time ON mining_shares (session_id, created_at)",
    """CREATE TABLE mining_days (
         user_id  UUID NOT NULL REFERENCES users(id) ON DELETE CASCADE,
         day      DATE NOT NULL,
         seconds  INTEGER NOT NULL DEFAULT 0 CONSTRAINT mining_days_seconds_check CHECK (seconds >= 0),
         PRIMARY KEY (user_id, day)
       )""",
    """ALTER TABLE mining_rewards
         ADD COLUMN shares         INTEGER NOT NULL DEFAULT 0
                                   CONSTRAINT mining_rewards_shares_check CHECK (shares >= 0),
         ADD COLUMN mobile_seconds INTEGER NOT NULL DEFAULT 0
                                   CONSTRAINT mining_rewards_mobile_seconds_check CHECK (mobile_seconds >= 0),
         DROP CONSTRAINT mining_rewards_block_key,
         ADD CONSTRAINT mining_rewards_block_miner_key UNIQUE (block_id, miner_wallet)""",
]

DOWNGRADE = [
    # Fails if a block paid several miners: those rows cannot fit the old one-row-per-block key.
    """ALTER TABLE mining_rewards DROP CONSTRAINT mining_rewards_block_miner_key,
         ADD CONSTRAINT mining_rewards_block_key UNIQUE (block_id),
         DROP COLUMN mobile_seconds, DROP COLUMN shares""",
    "DROP TABLE mining_days",
    "DROP TABLE mining_shares",
    "DROP TABLE mining_sessions",
]


def upgrade() -> None:
    for statement in UPGRADE:
        op.execute(statement)


def downgrade() -> None:
    for statement in DOWNGRADE:
        op.execute(statement)
