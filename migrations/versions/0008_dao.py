"""DAO: proposals get a creator, a deadline and a stored result; votes are signed by the wallet key.

- `proposals.deadline`: voting ends then. Existing rows (and inserts that give none, like the
  demo data) get now() + 7 days. `creator_id` is the signed-in creator; `closed_at` and `result`
  ('Passed' or 'Rejected') are set when the proposal closes, and only then (a trigger fills them
  when a status change to 'Closed' gives none).
- Title (1..200 characters) and description (1..5000) are bounded in the database too.
- `votes.signature`: the voter's Ed25519 signature of the canonical vote bytes (docs/protocol.md,
  "DAO"), so every vote stays verifiable against the wallet's registered key. The API always
  writes it; it may be NULL only for rows inserted the seed's way (plain SQL). `voter_id` is the
  signed-in user who cast it. `proposal_id` becomes NOT NULL. `votes_one_per_wallet`
  (UNIQUE (proposal_id, voter_wallet), from 0001) keeps one vote per wallet per proposal.

Revision ID: 0008
Revises: 0007
"""
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

UPGRADE = [
    """ALTER TABLE proposals
        ADD COLUMN creator_id UUID REFERENCES users(id) ON DELETE SET NULL,
        ADD COLUMN deadline TIMESTAMPTZ NOT NULL DEFAULT now() + interval '7 days',
        ADD COLUMN closed_at TIMESTAMPTZ,
        ADD COLUMN result VARCHAR(20)
            CONSTRAINT proposals_result_check CHECK (result IN ('Passed', 'Rejected'))""",
    # Proposals closed before this revision get the result their votes give (Yes must outnumber No).
    """UPDATE proposals p SET closed_at = p.updated_at,
              result = CASE WHEN (SELECT count(*) FILTER (WHERE v.vote_option = 'Yes')
                                       > count(*) FILTER (WHERE v.vote_option = 'No')
                                    FROM votes v WHERE v.proposal_id = p.proposal_id)
                            THEN 'Passed' ELSE 'Rejected' END
        WHERE p.status = 'Closed'""",
    """ALTER TABLE proposals
        ADD CONSTRAINT proposals_closed_check
            CHECK ((status = 'Closed') = (closed_at IS NOT NULL AND result IS NOT NULL)),
        ADD CONSTRAINT proposals_title_length_check CHECK (char_length(title) BETWEEN 1 AND 200),
        ADD CONSTRAINT proposals_description_length_check CHECK (char_length(description) BETWEEN 1 AND 5000)""",
    # Whoever closes a proposal (the API, an administrator's SQL), it gets its closing time and the
    # result of its votes unless given; reopening clears both.
    """CREATE FUNCTION proposals_fill_result() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF NEW.status = 'Closed' AND (TG_OP = 'INSERT' OR OLD.status <> 'Closed') THEN
            NEW.closed_at := coalesce(NEW.closed_at, now());
            IF NEW.result IS NULL THEN
                SELECT CASE WHEN count(*) FILTER (WHERE v.vote_option = 'Yes')
                                 > count(*) FILTER (WHERE v.vote_option = 'No')
                            THEN 'Passed' ELSE 'Rejected' END
                  INTO NEW.result FROM votes v WHERE v.proposal_id = NEW.proposal_id;
            END IF;
        ELSIF NEW.status = 'Open' THEN
            NEW.closed_at := NULL;
            NEW.result := NULL;
        END IF;
        RETURN NEW;
    END $$""",
    """CREATE TRIGGER proposals_fill_result BEFORE INSERT OR UPDATE OF status ON proposals
        FOR EACH ROW EXECUTE FUNCTION proposals_fill_result()""",
    "CREATE INDEX idx_proposals_open_deadline ON proposals (deadline) WHERE status = 'Open'",
    "CREATE INDEX idx_proposals_creator ON proposals (creator_id)",
    """ALTER TABLE votes
        ALTER COLUMN proposal_id SET NOT NULL,
        ADD COLUMN voter_id UUID REFERENCES users(id) ON DELETE SET NULL,
        ADD COLUMN signature TEXT
            CONSTRAINT votes_signature_check CHECK (signature ~ '^[0-9a-f]{128}$')""",
    "CREATE INDEX idx_votes_voter ON votes (voter_id)",
]

DOWNGRADE = [
    "DROP INDEX idx_votes_voter",
    "ALTER TABLE votes DROP COLUMN signature, DROP COLUMN voter_id, ALTER COLUMN proposal_id DROP NOT NULL",
    "DROP INDEX idx_proposals_creator",
    "DROP INDEX idx_proposals_open_deadline",
    "DROP TRIGGER proposals_fill_result ON proposals",
    "DROP FUNCTION proposals_fill_result()",
    """ALTER TABLE proposals DROP CONSTRAINT proposals_description_length_check,
        DROP CONSTRAINT proposals_title_length_check, DROP CONSTRAINT proposals_closed_check,
        DROP COLUMN result, DROP COLUMN closed_at, DROP COLUMN deadline, DROP COLUMN creator_id""",
]


def upgrade() -> None:
    for statement in UPGRADE:
        op.execute(statement)


def downgrade() -> None:
    for statement in DOWNGRADE:
        op.execute(statement)
