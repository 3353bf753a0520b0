"""growth report: user_activity rollup, covering indexes for invites and clicks, links.sent_at

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-26 07:05:00

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import store.types

# revision identifiers, used by Alembic.
revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table("links", schema=None) as batch_op:
        batch_op.add_column(sa.Column("sent_at", store.types.UTCDateTime(timezone=True), nullable=True))
    op.create_table(
        "user_activity",
        sa.Column("user_id", sa.String(length=64), nullable=False),
        sa.Column("last_ts", store.types.UTCDateTime(timezone=True), nullable=False),
        sa.Column("last_signup_ts", store.types.UTCDateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("user_id"),
    )
    with op.batch_alter_table("user_activity", schema=None) as batch_op:
        batch_op.create_index("ix_user_activity_last", ["last_ts", "last_signup_ts"], unique=False)
    # Backfill from the events already stored.
    op.execute(
        "INSERT INTO user_activity (user_id, last_ts, last_signup_ts) "
        "SELECT user_id, max(ts), max(CASE WHEN type = 'signup' THEN ts END) FROM events GROUP BY user_id"
    )
    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.drop_index("ix_events_type_ts")
        batch_op.create_index("ix_events_type_ts", ["type", "ts", "user_id"], unique=False)
    with op.batch_alter_table("link_clicks", schema=None) as batch_op:
        batch_op.drop_index("ix_clicks_time")
        batch_op.create_index(
            "ix_clicks_time", ["clicked_at", "nonce", "visitor", "unique_click"], unique=False
        )


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table("link_clicks", schema=None) as batch_op:
        batch_op.drop_index("ix_clicks_time")
        batch_op.create_index("ix_clicks_time", ["clicked_at"], unique=False)
    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.drop_index("ix_events_type_ts")
        batch_op.create_index("ix_events_type_ts", ["type", "ts"], unique=False)
    with op.batch_alter_table("user_activity", schema=None) as batch_op:
        batch_op.drop_index("ix_user_activity_last")
    op.drop_table("user_activity")
    with op.batch_alter_table("links", schema=None) as batch_op:
        batch_op.drop_column("sent_at")
