"""score_entries: an index for one user's total on one subject's board (the boards' cache is set from it)

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-26 11:45:00

"""

from collections.abc import Sequence

from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0009"
down_revision: str | Sequence[str] | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table("score_entries", schema=None) as batch_op:
        batch_op.create_index("ix_scores_user_subject", ["user_id", "subject", "ts", "points"], unique=False)


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table("score_entries", schema=None) as batch_op:
        batch_op.drop_index("ix_scores_user_subject")
