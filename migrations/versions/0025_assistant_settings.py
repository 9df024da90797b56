"""Per-conversation model and system prompt, automatic titles, usage by conversation (issue 20).

- `ai_conversations.model`: the model its answers use (NULL: `AI_MODEL`); `system_prompt`: the
  user's instructions for it, sent after the platform's system prompt; `title_auto`: the title was
  given by the server (a heuristic, or the model), so a better automatic title may replace it; a
  title the user gave (at creation or by renaming) is never replaced.
- `ai_usage` also records the prompt/completion split and the conversation (no foreign key: usage
  outlives its conversation, as the daily quota must), and `kind`: `answer` rows are kept by the
  trigger on `ai_messages`, `title` rows are written for the model call that titles a conversation.

Revision ID: 0025
Revises: 0024
"""
from alembic import op

revision = "0025"
down_revision = "0024"
branch_labels = None
depends_on = None

_USAGE_RECORD = """CREATE OR REPLACE FUNCTION ai_usage_record() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP = 'INSERT' THEN
            INSERT INTO ai_usage (message_id, user_id, tokens{columns})
                 SELECT NEW.id, c.user_id, coalesce(NEW.tokens, 0){values}
                   FROM ai_conversations c
                  WHERE c.id = NEW.conversation_id AND c.user_id IS NOT NULL;
        ELSE
            UPDATE ai_usage SET tokens = coalesce(NEW.tokens, 0){updates} WHERE message_id = NEW.id;
        END IF;
        RETURN NULL;
    END $$"""

UPGRADE: list[str] = [
    """ALTER TABLE ai_conversations
        ADD COLUMN model VARCHAR(200),
        ADD COLUMN system_prompt TEXT,
        ADD COLUMN title_auto BOOLEAN NOT NULL DEFAULT false""",
    """ALTER TABLE ai_usage
        ADD COLUMN conversation_id UUID,
        ADD COLUMN prompt_tokens INTEGER NOT NULL DEFAULT 0
            CONSTRAINT ai_usage_prompt_tokens_check CHECK (prompt_tokens >= 0),
        ADD COLUMN completion_tokens INTEGER NOT NULL DEFAULT 0
            CONSTRAINT ai_usage_completion_tokens_check CHECK (completion_tokens >= 0),
        ADD COLUMN kind VARCHAR(10) NOT NULL DEFAULT 'answer'
            CONSTRAINT ai_usage_kind_check CHECK (kind IN ('answer', 'title'))""",
    """UPDATE ai_usage u SET conversation_id = m.conversation_id, prompt_tokens = coalesce(m.prompt_tokens, 0),
              completion_tokens = coalesce(m.completion_tokens, 0)
         FROM ai_messages m WHERE m.id = u.message_id""",
    _USAGE_RECORD.format(
        columns=", conversation_id, prompt_tokens, completion_tokens",
        values=", NEW.conversation_id, coalesce(NEW.prompt_tokens, 0), coalesce(NEW.completion_tokens, 0)",
        updates=(", prompt_tokens = coalesce(NEW.prompt_tokens, 0),"
                 " completion_tokens = coalesce(NEW.completion_tokens, 0)")),
]

DOWNGRADE: list[str] = [
    _USAGE_RECORD.format(columns="", values="", updates=""),
    """ALTER TABLE ai_usage DROP COLUMN kind, DROP COLUMN completion_tokens, DROP COLUMN prompt_tokens,
        DROP COLUMN conversation_id""",
    "ALTER TABLE ai_conversations DROP COLUMN title_auto, DROP COLUMN system_prompt, DROP COLUMN model",
]


def upgrade() -> None:
    for statement in UPGRADE:
        op.execute(statement)


def downgrade() -> None:
    for statement in DOWNGRADE:
        op.execute(statement)
