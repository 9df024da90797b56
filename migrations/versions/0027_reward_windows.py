"""Reward windows by index probes: a session's rewards indexed by time and running total (issue 21).

A reward batch reads each session's last minute as two running totals (db/games.py,
read_batch_facts): the latest, and the one at the last reward before the window. Rewards of one
batch share a time, so each probe orders by (created_at, session_total); with the total in the
index that order is the index's own, where (session_id, created_at) left a sort to set up per
session (6 ms of a 7 ms statement). The new index replaces the old one, which it also serves.

Revision ID: 0027
Revises: 0026
"""
from alembic import op

revision = "0027"
down_revision = "0026"
branch_labels = None
depends_on = None

UPGRADE: list[str] = [
    "CREATE INDEX idx_game_rewards_session_time_total ON game_rewards (session_id, created_at, session_total)",
    "DROP INDEX idx_game_rewards_session_time",
]

DOWNGRADE: list[str] = [
    "CREATE INDEX idx_game_rewards_session_time ON game_rewards (session_id, created_at)",
    "DROP INDEX idx_game_rewards_session_time_total",
]


def upgrade() -> None:
    for statement in UPGRADE:
        op.execute(statement)


def downgrade() -> None:
    for statement in DOWNGRADE:
        op.execute(statement)
