"""guardrails: audit log, loop controls, alerts; click IP hashes; conversion status

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-26 07:54:00.002532

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy import Text
from sqlalchemy.dialects import postgresql

import store.types

# revision identifiers, used by Alembic.
revision: str = "0008"
down_revision: str | Sequence[str] | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table(
        "alerts",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("metric", sa.String(length=40), nullable=False),
        sa.Column("scope", sa.String(length=96), nullable=False),
        sa.Column("level", sa.String(length=10), nullable=False),
        sa.Column("value", sa.Float(), nullable=False),
        sa.Column("threshold", sa.Float(), nullable=False),
        sa.Column("state", sa.String(length=10), nullable=False),
        sa.Column("action", sa.String(length=40), nullable=True),
        sa.Column("webhook_status", sa.String(length=16), nullable=True),
        sa.Column("created_at", store.types.UTCDateTime(timezone=True), nullable=False),
        sa.Column("resolved_at", store.types.UTCDateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("alerts", schema=None) as batch_op:
        batch_op.create_index("ix_alerts_open", ["state", "metric", "scope"], unique=False)

    op.create_table(
        "audit_log",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("actor", sa.String(length=64), nullable=False),
        sa.Column("action", sa.String(length=32), nullable=False),
        sa.Column("subject", sa.String(length=96), nullable=False),
        sa.Column(
            "details",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column("at", store.types.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("audit_log", schema=None) as batch_op:
        batch_op.create_index("ix_audit_log_subject", ["subject", "at"], unique=False)

    op.create_table(
        "loop_controls",
        sa.Column("loop", sa.String(length=24), nullable=False),
        sa.Column("paused", sa.Boolean(), nullable=False),
        sa.Column("reason", sa.String(length=200), nullable=True),
        sa.Column("paused_by", sa.String(length=64), nullable=True),
        sa.Column("changed_at", store.types.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("loop"),
    )
    with op.batch_alter_table("conversions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("status", sa.String(length=12), server_default="ok", nullable=False))
        batch_op.add_column(
            sa.Column(
                "fraud_reasons",
                sa.JSON().with_variant(postgresql.JSONB(astext_type=Text()), "postgresql"),
                server_default=sa.text("'[]'"),  # rows from before: no reasons
                nullable=False,
            )
        )

    with op.batch_alter_table("link_clicks", schema=None) as batch_op:
        batch_op.add_column(sa.Column("ip_hash", sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column("net_hash", sa.String(length=32), nullable=True))


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table("link_clicks", schema=None) as batch_op:
        batch_op.drop_column("net_hash")
        batch_op.drop_column("ip_hash")

    with op.batch_alter_table("conversions", schema=None) as batch_op:
        batch_op.drop_column("fraud_reasons")
        batch_op.drop_column("status")

    op.drop_table("loop_controls")
    with op.batch_alter_table("audit_log", schema=None) as batch_op:
        batch_op.drop_index("ix_audit_log_subject")

    op.drop_table("audit_log")
    with op.batch_alter_table("alerts", schema=None) as batch_op:
        batch_op.drop_index("ix_alerts_open")

    op.drop_table("alerts")
