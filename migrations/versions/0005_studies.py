"""studies: selection studies and their rounds

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "studies",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(200)),
        sa.Column("architecture", sa.String(32)),
        sa.Column("request", sa.JSON, nullable=False),
        sa.Column("merge_job_id", sa.Integer, sa.ForeignKey("jobs.id", ondelete="SET NULL")),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("updated_at", sa.DateTime, nullable=False),
    )
    op.create_table(
        "study_rounds",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("study_id", sa.Integer, sa.ForeignKey("studies.id", ondelete="CASCADE"), nullable=False,
                  index=True),
        sa.Column("number", sa.Integer, nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("preview_id", sa.Integer, sa.ForeignKey("previews.id", ondelete="SET NULL")),
        sa.Column("columns", sa.JSON, nullable=False),
        sa.Column("base", sa.JSON),
        sa.Column("picks", sa.JSON),
        sa.Column("picked_at", sa.DateTime),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.UniqueConstraint("study_id", "number"),
    )


def downgrade() -> None:
    op.drop_table("study_rounds")
    op.drop_table("studies")
