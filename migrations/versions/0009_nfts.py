"""NFTs and their marketplace: who minted an NFT, metadata and listing backstops.

- `nfts.minted_by`: the signed-in user who minted it (the per-user mint rate is counted on
  `(minted_by, created_at)`); `owner_wallet` changes hands, the minter does not.
- `nfts.metadata` must be a JSON object of at most 16 KiB (the API allows 8 KiB; this is the
  backstop for other writers).
- `marketplace_buyer_not_seller`: a wallet cannot buy its own listing.
- `idx_marketplace_available`: the page of open listings, newest first, without walking sold ones.

Revision ID: 0009
Revises: 0008
"""
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

UPGRADE = [
    """ALTER TABLE nfts
        ADD COLUMN minted_by UUID REFERENCES users(id) ON DELETE SET NULL,
        ADD CONSTRAINT nfts_metadata_object_check
            CHECK (jsonb_typeof(metadata) = 'object' AND octet_length(metadata::text) <= 16384)""",
    "CREATE INDEX idx_nfts_minted_by ON nfts (minted_by, created_at)",
    """ALTER TABLE marketplace
        ADD CONSTRAINT marketplace_buyer_not_seller CHECK (buyer_wallet IS NULL OR buyer_wallet <> seller_wallet)""",
    "CREATE INDEX idx_marketplace_available ON marketplace (listing_id) WHERE status = 'Available'",
]

DOWNGRADE = [
    "DROP INDEX idx_marketplace_available",
    "ALTER TABLE marketplace DROP CONSTRAINT marketplace_buyer_not_seller",
    "DROP INDEX idx_nfts_minted_by",
    "ALTER TABLE nfts DROP CONSTRAINT nfts_metadata_object_check, DROP COLUMN minted_by",
]


def upgrade() -> None:
    for statement in UPGRADE:
        op.execute(statement)


def downgrade() -> None:
    for statement in DOWNGRADE:
        op.execute(statement)
