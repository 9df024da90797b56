"""Conversation search, sharing and feedback (issue 20).

- Search: GIN indexes on the full-text vectors of conversation titles and message contents. The
  queries (db/assistant_history.py) repeat these exact expressions, 'simple' config included, or
  the planner cannot use them. 'simple' (no stemming, no stop words) because conversations are in
  any language. Contents are cut at 100,000 characters: a tsvector over 1 MB is an error, which
  in an index expression would refuse the message itself.
- `ai_conversation_shares`: at most one read-only link per conversation; only the SHA-256 of its
  token is stored, so the table does not hold working links. Revoking deletes the row.
- `ai_message_feedback`: one rating per user per answer (`up`/`down`, an optional comment),
  updated in place.
Both go with their conversation (ON DELETE CASCADE), so deleting a conversation, or an account
(which deletes the user's conversations), removes them.

Revision ID: 0024
Revises: 0023
"""
from alembic import op

revision = "0024"
down_revision = "0023"
branch_labels = None
depends_on = None

UPGRADE: list[str] = [
    """CREATE INDEX idx_ai_conversations_title_fts ON ai_conversations
       USING gin (to_tsvector('simple', coalesce(title, '')))""",
    """CREATE INDEX idx_ai_messages_content_fts ON ai_messages
       USING gin (to_tsvector('simple', left(content, 100000)))""",
    """CREATE TABLE ai_conversation_shares (
        conversation_id UUID PRIMARY KEY REFERENCES ai_conversations(id) ON DELETE CASCADE,
        token_hash      BYTEA NOT NULL UNIQUE
                        CONSTRAINT ai_conversation_shares_token_hash_check CHECK (length(token_hash) = 32),
        created_at      TIMESTAMPTZ NOT NULL DEFAULT now())""",
    """CREATE TABLE ai_message_feedback (
        id         UUID PRIMARY KEY DEFAULT gen_random_uuid(),
        message_id UUID NOT NULL REFERENCES ai_messages(id) ON DELETE CASCADE,
        user_id    UUID NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        rating     VARCHAR(4) NOT NULL CONSTRAINT ai_message_feedback_rating_check CHECK (rating IN ('up', 'down')),
        comment    TEXT CONSTRAINT ai_message_feedback_comment_check CHECK (char_length(comment) <= 1000),
        created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
        updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
        CONSTRAINT ai_message_feedback_once UNIQUE (message_id, user_id))""",
    # The administrators' list: newest first, paged by (updated_at, id).
    "CREATE INDEX idx_ai_message_feedback_recent ON ai_message_feedback (updated_at DESC, id DESC)",
    "CREATE INDEX idx_ai_message_feedback_user ON ai_message_feedback (user_id)",
    """CREATE TRIGGER ai_message_feedback_set_updated_at BEFORE UPDATE ON ai_message_feedback
        FOR EACH ROW EXECUTE FUNCTION set_updated_at()""",
]

DOWNGRADE: list[str] = [
    "DROP TABLE ai_message_feedback",
    "DROP TABLE ai_conversation_shares",
    "DROP INDEX idx_ai_messages_content_fts",
    "DROP INDEX idx_ai_conversations_title_fts",
]


def upgrade() -> None:
    for statement in UPGRADE:
        op.execute(statement)


def downgrade() -> None:
    for statement in DOWNGRADE:
        op.execute(statement)
