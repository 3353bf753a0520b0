"""users.opted_out_by (self, parent or admin) and user_tombstones (tokens of deleted users refused)

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07 23:40:00

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import store.types

# revision identifiers, used by Alembic.
revision: str = "0010"
down_revision: str | Sequence[str] | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table(
        "user_tombstones",
        sa.Column("key", sa.String(length=64), nullable=False),
        sa.Column("deleted_at", store.types.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("key"),
    )
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.add_column(sa.Column("opted_out_by", sa.String(length=8), nullable=True))
    # Opt-outs made before this revision: their maker is unknown, so only a parent or an admin lifts them.
    op.execute("UPDATE users SET opted_out_by = 'admin' WHERE opted_out")


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.drop_column("opted_out_by")
    op.drop_table("user_tombstones")
