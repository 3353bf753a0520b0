"""conversions

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26 05:57:25.805965

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import store.types

# revision identifiers, used by Alembic.
revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table(
        "conversions",
        sa.Column("user_id", sa.String(length=64), nullable=False),
        sa.Column("referrer_id", sa.String(length=64), nullable=False),
        sa.Column("nonce", sa.String(length=32), nullable=False),
        sa.Column("source", sa.String(length=32), nullable=False),
        sa.Column("model", sa.String(length=16), nullable=False),
        sa.Column("touched_at", store.types.UTCDateTime(timezone=True), nullable=False),
        sa.Column("signup_at", store.types.UTCDateTime(timezone=True), nullable=False),
        sa.Column("signup_event_id", sa.String(length=64), nullable=False),
        sa.Column("activated_at", store.types.UTCDateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("user_id"),
    )
    with op.batch_alter_table("conversions", schema=None) as batch_op:
        batch_op.create_index("ix_conversions_referrer", ["referrer_id", "signup_at"], unique=False)
        batch_op.create_index("ix_conversions_signup", ["signup_at"], unique=False)


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table("conversions", schema=None) as batch_op:
        batch_op.drop_index("ix_conversions_signup")
        batch_op.drop_index("ix_conversions_referrer")

    op.drop_table("conversions")
