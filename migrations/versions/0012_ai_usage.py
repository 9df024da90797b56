"""Assistant usage that outlives conversations: the per-minute limit and the daily token quota.

The limits used to be summed from `ai_messages`, so deleting a conversation gave its answers'
tokens (and the minute's starts) back. `ai_usage` holds one row per assistant answer, written by a
trigger on `ai_messages` (on insert, and again whenever its `tokens` change) and with no foreign
key to the message, so it stays when the conversation goes. Messages of a conversation without an
owner (written the seed's way) are not counted. Existing answers are copied in.

Revision ID: 0012
Revises: 0011
"""
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

UPGRADE = [
    """CREATE TABLE ai_usage (
        message_id UUID PRIMARY KEY,
        user_id    UUID NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        started_at TIMESTAMPTZ NOT NULL DEFAULT now(),
        tokens     INTEGER NOT NULL DEFAULT 0 CONSTRAINT ai_usage_tokens_check CHECK (tokens >= 0))""",
    "CREATE INDEX ai_usage_user_started_idx ON ai_usage (user_id, started_at)",
    """CREATE FUNCTION ai_usage_record() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP = 'INSERT' THEN
            INSERT INTO ai_usage (message_id, user_id, tokens)
                 SELECT NEW.id, c.user_id, coalesce(NEW.tokens, 0)
                   FROM ai_conversations c
                  WHERE c.id = NEW.conversation_id AND c.user_id IS NOT NULL;
        ELSE
            UPDATE ai_usage SET tokens = coalesce(NEW.tokens, 0) WHERE message_id = NEW.id;
        END IF;
        RETURN NULL;
    END $$""",
    """CREATE TRIGGER ai_messages_usage AFTER INSERT OR UPDATE OF tokens ON ai_messages
        FOR EACH ROW WHEN (NEW.role = 'assistant') EXECUTE FUNCTION ai_usage_record()""",
    """INSERT INTO ai_usage (message_id, user_id, started_at, tokens)
        SELECT m.id, c.user_id, m.created_at, coalesce(m.tokens, 0)
          FROM ai_messages m JOIN ai_conversations c ON c.id = m.conversation_id
         WHERE m.role = 'assistant' AND c.user_id IS NOT NULL""",
]

DOWNGRADE = [
    "DROP TRIGGER ai_messages_usage ON ai_messages",
    "DROP FUNCTION ai_usage_record()",
    "DROP TABLE ai_usage",
]


def upgrade() -> None:
    for statement in UPGRADE:
        op.execute(statement)


def downgrade() -> None:
    for statement in DOWNGRADE:
        op.execute(statement)
