"""An outbox event may go to several channels: `also_channels` beside `channel` (issue 21).

Every game reward is published on its game's channel and on its session's, with the same data.
Queued as two rows, its JSON was encoded, parsed, stored, deleted and decoded twice, and the
outbox rows were half of what a reward batch inserted. One row per event now names every channel
it goes to; the relay publishes it to each, in the order named.

Revision ID: 0029
Revises: 0028
"""
from alembic import op

revision = "0029"
down_revision = "0028"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE event_outbox ADD COLUMN also_channels VARCHAR(200)[] NOT NULL DEFAULT '{}'")
    op.execute("COMMENT ON COLUMN event_outbox.also_channels IS "
               "'More channels the event goes to, after channel and with the same data'")


def downgrade() -> None:
    # Events still waiting keep every channel: a row per extra channel, queued after every row now
    # waiting, in the order of their events (so each channel's events keep their order).
    op.execute("""INSERT INTO event_outbox (channel, type, data, created_at)
                  SELECT extra.channel, o.type, o.data, o.created_at
                    FROM event_outbox o, unnest(o.also_channels) WITH ORDINALITY AS extra(channel, n)
                   ORDER BY o.id, extra.n""")
    op.execute("ALTER TABLE event_outbox DROP COLUMN also_channels")
