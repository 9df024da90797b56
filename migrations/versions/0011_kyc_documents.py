"""KYC: how a submission's identity document is stored (encrypted in the blob store).

- `kyc_submissions.document_path` holds the blob id of the encrypted document (as
  `datapods.walrus_blob_id`). The document is encrypted with its own random 256-bit key
  (AES-256-GCM, associated data `kyc:<kyc_id>`); `document_iv` is the nonce (hex) and
  `document_key` the key wrapped under MASTER_KEY, never the key itself.
- `document_media_type` is what the bytes are (detected by content: PDF, PNG or JPEG) and
  `document_size` their plaintext length.
- All four stay NULL for rows written the seed's way (plain SQL, no upload); the key and its
  nonce come together.

Revision ID: 0011
Revises: 0010
"""
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

UPGRADE = [
    """ALTER TABLE kyc_submissions
        ADD COLUMN document_media_type VARCHAR(32)
            CONSTRAINT kyc_submissions_media_type_check
            CHECK (document_media_type IN ('application/pdf', 'image/png', 'image/jpeg')),
        ADD COLUMN document_size BIGINT CONSTRAINT kyc_submissions_document_size_check CHECK (document_size >= 0),
        ADD COLUMN document_iv TEXT CONSTRAINT kyc_submissions_document_iv_check CHECK (document_iv ~ '^[0-9a-f]{24}$'),
        ADD COLUMN document_key TEXT,
        ADD CONSTRAINT kyc_submissions_document_key_check CHECK ((document_iv IS NULL) = (document_key IS NULL))""",
]

DOWNGRADE = [
    """ALTER TABLE kyc_submissions DROP CONSTRAINT kyc_submissions_document_key_check,
        DROP COLUMN document_key, DROP COLUMN document_iv, DROP COLUMN document_size,
        DROP COLUMN document_media_type""",
]


def upgrade() -> None:
    for statement in UPGRADE:
        op.execute(statement)


def downgrade() -> None:
    for statement in DOWNGRADE:
        op.execute(statement)
