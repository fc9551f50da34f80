"""models: CRC32 and BLAKE3 (the other hashes Civitai lists), the lineage recorded in the file,
and indexes for finding a model by any of its hashes; artifacts: the lineage their metadata records

Rows hashed before this revision keep NULL crc32, blake3 and lineage: registering the same path
again (or a scan) hashes such a model once more, and until then the API shows null; its lineage
is read from the stored header metadata meanwhile. An older artifact's lineage is read from its
metadata (complete in its row) when asked for.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

INDEXED = ("autov3", "legacy_hash", "crc32", "blake3")


def upgrade() -> None:
    op.add_column("models", sa.Column("crc32", sa.String(8)))
    op.add_column("models", sa.Column("blake3", sa.String(64)))
    op.add_column("models", sa.Column("lineage", sa.JSON))
    op.add_column("artifacts", sa.Column("lineage", sa.JSON))
    for column in INDEXED:
        op.create_index(f"ix_models_{column}", "models", [column])


def downgrade() -> None:
    for column in INDEXED:
        op.drop_index(f"ix_models_{column}", "models")
    with op.batch_alter_table("artifacts") as batch:
        batch.drop_column("lineage")
    with op.batch_alter_table("models") as batch:
        batch.drop_column("lineage")
        batch.drop_column("blake3")
        batch.drop_column("crc32")
