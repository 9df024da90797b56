"""Earn-to-play: registered games with a reward policy and a hashed game token, sessions owned by
users, rewards idempotent by (session_id, seq), and a balance ledger.

- `games.token_hash` is the SHA-256 of the game server's token (the token is shown once).
  `status`: games registered by a developer wait as 'pending' until an administrator activates
  them, because a game server's reports mint balance.
- The reward policy caps one reward, the rewards of a session in any 60 s, and a session's total.
- `game_rewards (session_id, seq)` is unique: a replayed report finds its row instead of paying
  twice; `session_total` is the session's running total after it, so a replay gets the same ack.
- `balance_ledger`: one row per balance change with the balance after it; `(reason, reference)`
  is unique, so one reward (or any other move) is booked at most once.

Revision ID: 0007
Revises: 0006
"""
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

UPGRADE = [
    """ALTER TABLE games
        ADD COLUMN owner_id UUID REFERENCES users(id) ON DELETE SET NULL,
        ADD COLUMN status VARCHAR(12) NOT NULL DEFAULT 'active'
            CONSTRAINT games_status_check CHECK (status IN ('pending', 'active', 'suspended')),
        ADD COLUMN token_hash CHAR(64) CONSTRAINT games_token_hash_key UNIQUE,
        ADD COLUMN max_reward_per_event NUMERIC(20,8) NOT NULL DEFAULT 100
            CONSTRAINT games_max_reward_per_event_check CHECK (max_reward_per_event > 0),
        ADD COLUMN max_reward_per_minute NUMERIC(20,8) NOT NULL DEFAULT 1000
            CONSTRAINT games_max_reward_per_minute_check CHECK (max_reward_per_minute > 0),
        ADD COLUMN max_reward_per_session NUMERIC(20,8) NOT NULL DEFAULT 10000
            CONSTRAINT games_max_reward_per_session_check CHECK (max_reward_per_session > 0),
        ADD COLUMN reward_types TEXT[],
        ADD COLUMN updated_at TIMESTAMPTZ NOT NULL DEFAULT now()""",
    "CREATE INDEX idx_games_owner ON games (owner_id)",
    """CREATE TRIGGER games_set_updated_at BEFORE UPDATE ON games
        FOR EACH ROW EXECUTE FUNCTION set_updated_at()""",
    """ALTER TABLE game_sessions
        ADD COLUMN user_id UUID REFERENCES users(id) ON DELETE CASCADE,
        ADD COLUMN reward_count INTEGER NOT NULL DEFAULT 0
            CONSTRAINT game_sessions_reward_count_check CHECK (reward_count >= 0),
        ADD COLUMN last_activity_at TIMESTAMPTZ NOT NULL DEFAULT now(),
        ALTER COLUMN session_start SET DEFAULT now()""",
    "CREATE INDEX idx_game_sessions_user ON game_sessions (user_id)",
    # player_wallet can change under a user (a wallet registered later), the user cannot.
    """CREATE UNIQUE INDEX game_sessions_one_active_user ON game_sessions (game_id, user_id)
        WHERE status = 'Active'""",
    # The idle sweeper's scan.
    "CREATE INDEX idx_game_sessions_idle ON game_sessions (last_activity_at) WHERE status = 'Active'",
    """ALTER TABLE game_rewards
        ADD COLUMN session_id INTEGER REFERENCES game_sessions(session_id) ON DELETE CASCADE,
        ADD COLUMN seq BIGINT CONSTRAINT game_rewards_seq_check CHECK (seq >= 0),
        ADD COLUMN session_total NUMERIC(20,8)
            CONSTRAINT game_rewards_session_total_check CHECK (session_total >= 0),
        ADD CONSTRAINT game_rewards_session_seq_key UNIQUE (session_id, seq),
        ADD CONSTRAINT game_rewards_session_seq_pair_check CHECK ((session_id IS NULL) = (seq IS NULL))""",
    # Leaderboards over a period; it also serves game_id lookups, so the old index goes.
    "CREATE INDEX idx_game_rewards_game_time ON game_rewards (game_id, created_at)",
    "DROP INDEX idx_game_rewards_game",
    # The per-minute policy window of a session.
    "CREATE INDEX idx_game_rewards_session_time ON game_rewards (session_id, created_at)",
    """CREATE TABLE balance_ledger (
        entry_id      BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        user_id       UUID NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        delta         NUMERIC(20,8) NOT NULL CONSTRAINT balance_ledger_delta_check CHECK (delta <> 0),
        balance_after NUMERIC(20,8) NOT NULL CONSTRAINT balance_ledger_balance_after_check CHECK (balance_after >= 0),
        reason        VARCHAR(40) NOT NULL,
        reference     VARCHAR(100) NOT NULL,
        created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
        CONSTRAINT balance_ledger_reason_reference_key UNIQUE (reason, reference)
    )""",
    "CREATE INDEX idx_balance_ledger_user ON balance_ledger (user_id, entry_id)",
    "COMMENT ON TABLE balance_ledger IS 'One row per change of users.total_balance, booked once per (reason, reference)'",
]

DOWNGRADE = [
    "DROP TABLE balance_ledger",
    "DROP INDEX idx_game_rewards_session_time",
    "CREATE INDEX idx_game_rewards_game ON game_rewards (game_id)",
    "DROP INDEX idx_game_rewards_game_time",
    """ALTER TABLE game_rewards DROP CONSTRAINT game_rewards_session_seq_pair_check,
        DROP CONSTRAINT game_rewards_session_seq_key, DROP COLUMN session_total, DROP COLUMN seq,
        DROP COLUMN session_id""",
    "DROP INDEX idx_game_sessions_idle",
    "DROP INDEX game_sessions_one_active_user",
    "DROP INDEX idx_game_sessions_user",
    """ALTER TABLE game_sessions ALTER COLUMN session_start DROP DEFAULT, DROP COLUMN last_activity_at,
        DROP COLUMN reward_count, DROP COLUMN user_id""",
    "DROP TRIGGER games_set_updated_at ON games",
    "DROP INDEX idx_games_owner",
    """ALTER TABLE games DROP COLUMN updated_at, DROP COLUMN reward_types, DROP COLUMN max_reward_per_session,
        DROP COLUMN max_reward_per_minute, DROP COLUMN max_reward_per_event, DROP COLUMN token_hash,
        DROP COLUMN status, DROP COLUMN owner_id""",
]


def upgrade() -> None:
    for statement in UPGRADE:
        op.execute(statement)


def downgrade() -> None:
    for statement in DOWNGRADE:
        op.execute(statement)
