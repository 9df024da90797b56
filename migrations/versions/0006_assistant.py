"""AI assistant: branching messages, generation status, usage, tool calls, idempotent sends.

- `ai_messages.parent_id` makes a conversation a tree: editing a message or regenerating an answer
  adds a sibling; `ai_conversations.current_leaf_id` names the branch the user is on.
- `status` follows a generation: streaming -> complete | stopped | failed | interrupted; `seq` is
  the number of deltas the saved `content` holds (resume after a restart starts from there).
- `tokens` of an assistant message is prompt + completion tokens of its generation (null for
  user messages, whose text is counted in the next prompt); `tokens_estimated` says they were
  counted locally because the endpoint sent no usage. A trigger keeps
  `ai_conversations.total_tokens` equal to the sum of its messages' `tokens`.
- `client_msg_id` is unique per conversation, so resending a message creates nothing twice.

Revision ID: 0006
Revises: 0005
"""
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

UPGRADE = [
    """ALTER TABLE ai_messages
        ADD COLUMN parent_id UUID REFERENCES ai_messages(id) ON DELETE CASCADE,
        ADD COLUMN status VARCHAR(20) NOT NULL DEFAULT 'complete'
            CONSTRAINT ai_messages_status_check
            CHECK (status IN ('streaming', 'complete', 'stopped', 'failed', 'interrupted')),
        ADD COLUMN model VARCHAR(100),
        ADD COLUMN finish_reason VARCHAR(40),
        ADD COLUMN prompt_tokens INTEGER CONSTRAINT ai_messages_prompt_tokens_check CHECK (prompt_tokens >= 0),
        ADD COLUMN completion_tokens INTEGER
            CONSTRAINT ai_messages_completion_tokens_check CHECK (completion_tokens >= 0),
        ADD COLUMN tokens_estimated BOOLEAN NOT NULL DEFAULT false,
        ADD COLUMN tool_calls JSONB,
        ADD COLUMN error JSONB,
        ADD COLUMN client_msg_id VARCHAR(100),
        ADD COLUMN seq INTEGER NOT NULL DEFAULT 0,
        ADD COLUMN stop_requested BOOLEAN NOT NULL DEFAULT false,
        ADD COLUMN updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
        ADD CONSTRAINT ai_messages_client_msg_key UNIQUE (conversation_id, client_msg_id)""",
    "CREATE INDEX idx_messages_parent ON ai_messages (parent_id)",
    # Live generations: the per-user limit and the sweep of abandoned ones read only these.
    "CREATE INDEX idx_messages_streaming ON ai_messages (conversation_id) WHERE status = 'streaming'",
    """CREATE TRIGGER ai_messages_set_updated_at BEFORE UPDATE ON ai_messages
        FOR EACH ROW EXECUTE FUNCTION set_updated_at()""",
    """ALTER TABLE ai_conversations
        ADD COLUMN current_leaf_id UUID REFERENCES ai_messages(id) ON DELETE SET NULL""",
    # Existing history was linear: chain each message to the one before it.
    """UPDATE ai_messages m SET parent_id = p.prev
         FROM (SELECT id, lag(id) OVER (PARTITION BY conversation_id ORDER BY created_at, id) AS prev
                 FROM ai_messages) p
        WHERE m.id = p.id AND p.prev IS NOT NULL""",
    """UPDATE ai_conversations c SET current_leaf_id = (
           SELECT id FROM ai_messages m WHERE m.conversation_id = c.id
            ORDER BY created_at DESC, id DESC LIMIT 1)""",
    """CREATE FUNCTION ai_messages_total_tokens() RETURNS trigger LANGUAGE plpgsql AS $$
       BEGIN
           IF TG_OP <> 'INSERT' AND OLD.tokens IS NOT NULL THEN
               UPDATE ai_conversations SET total_tokens = total_tokens - OLD.tokens
                WHERE id = OLD.conversation_id;
           END IF;
           IF TG_OP <> 'DELETE' AND NEW.tokens IS NOT NULL THEN
               UPDATE ai_conversations SET total_tokens = total_tokens + NEW.tokens
                WHERE id = NEW.conversation_id;
           END IF;
           RETURN NULL;
       END
       $$""",
    """CREATE TRIGGER ai_messages_total_tokens
        AFTER INSERT OR DELETE OR UPDATE OF tokens, conversation_id ON ai_messages
        FOR EACH ROW EXECUTE FUNCTION ai_messages_total_tokens()""",
    """UPDATE ai_conversations c SET total_tokens = coalesce(
           (SELECT sum(tokens) FROM ai_messages m WHERE m.conversation_id = c.id), 0)""",
]

DOWNGRADE = [
    "DROP TRIGGER ai_messages_total_tokens ON ai_messages",
    "DROP FUNCTION ai_messages_total_tokens()",
    "ALTER TABLE ai_conversations DROP COLUMN current_leaf_id",
    "DROP TRIGGER ai_messages_set_updated_at ON ai_messages",
    """ALTER TABLE ai_messages
        DROP CONSTRAINT ai_messages_client_msg_key,
        DROP COLUMN parent_id, DROP COLUMN status, DROP COLUMN model, DROP COLUMN finish_reason,
        DROP COLUMN prompt_tokens, DROP COLUMN completion_tokens, DROP COLUMN tokens_estimated,
        DROP COLUMN tool_calls, DROP COLUMN error, DROP COLUMN client_msg_id, DROP COLUMN seq,
        DROP COLUMN stop_requested, DROP COLUMN updated_at""",
]


def upgrade() -> None:
    for statement in UPGRADE:
        op.execute(statement)


def downgrade() -> None:
    for statement in DOWNGRADE:
        op.execute(statement)
