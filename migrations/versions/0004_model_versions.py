"""models: the inode and change time of the file version that was hashed

Size and mtime alone miss an in-place rewrite whose mtime was set back; a merge compares the file
it opens with every recorded field before trusting the recorded sha256.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("models", sa.Column("inode", sa.BigInteger))
    op.add_column("models", sa.Column("ctime_ns", sa.BigInteger))


def downgrade() -> None:
    with op.batch_alter_table("models") as batch:
        batch.drop_column("ctime_ns")
        batch.drop_column("inode")
