"""merge shards: one merge job split across workers

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("shards", sa.Integer))
    op.create_table(
        "merge_shards",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("job_id", sa.Integer, sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False, index=True),
        sa.Column("index", sa.Integer, nullable=False),
        sa.Column("first_key", sa.Integer, nullable=False),
        sa.Column("stop_key", sa.Integer, nullable=False),
        sa.Column("start", sa.BigInteger, nullable=False),
        sa.Column("end", sa.BigInteger, nullable=False),
        sa.Column("bytes_to_read", sa.BigInteger, nullable=False),
        sa.Column("sha256", sa.String(64)),
        # The columns of app.models.Leased, as the jobs table has them.
        sa.Column("status", sa.String(16), nullable=False, index=True),
        sa.Column("progress", sa.JSON),
        sa.Column("error", sa.JSON),
        sa.Column("cancel_requested", sa.Boolean, nullable=False),
        sa.Column("lease_owner", sa.String(128)),
        sa.Column("lease_expires_at", sa.DateTime, index=True),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False, index=True),
        sa.Column("dispatched_at", sa.DateTime),
        sa.Column("started_at", sa.DateTime),
        sa.Column("finished_at", sa.DateTime),
        sa.Column("updated_at", sa.DateTime, nullable=False),
        sa.UniqueConstraint("job_id", "index"),
    )


def downgrade() -> None:
    op.drop_table("merge_shards")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("shards")
