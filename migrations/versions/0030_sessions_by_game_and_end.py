"""Game sessions indexed by (game_id, session_end): a period's leaderboard reads the game's sessions
not ended before the period, not all of them (issue 21).

A leaderboard over a period summed every reward of the game in it, at each refresh (every 2 s
while rewards come in): 100 ms at 50,000 rewards, growing all day. It now takes each session's
running total less the one before the period (db/games.py, leaderboard), for the sessions still
open or ended within the period; this index finds those. It serves game_id alone too, so it
replaces idx_game_sessions_game.

Revision ID: 0030
Revises: 0029
"""
from alembic import op

revision = "0030"
down_revision = "0029"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("CREATE INDEX idx_game_sessions_game_end ON game_sessions (game_id, session_end)")
    op.execute("DROP INDEX idx_game_sessions_game")


def downgrade() -> None:
    op.execute("CREATE INDEX idx_game_sessions_game ON game_sessions (game_id)")
    op.execute("DROP INDEX idx_game_sessions_game_end")
