"""loops: scheduler jobs, loop items and members, streaks, prompt decisions, consents, AI costs; rewards.ref

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-26 07:01:47.561672

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy import Text
from sqlalchemy.dialects import postgresql

import store.types

# revision identifiers, used by Alembic.
revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table(
        "ai_costs",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("day", sa.String(length=10), nullable=False),
        sa.Column("provider", sa.String(length=64), nullable=False),
        sa.Column("model", sa.String(length=64), nullable=False),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("completion_tokens", sa.Integer(), nullable=False),
        sa.Column("cost_usd", sa.Float(), nullable=False),
        sa.Column("created_at", store.types.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("ai_costs", schema=None) as batch_op:
        batch_op.create_index("ix_ai_costs_day", ["day"], unique=False)

    op.create_table(
        "consents",
        sa.Column("user_id", sa.String(length=64), nullable=False),
        sa.Column("parent_id", sa.String(length=64), nullable=False),
        sa.Column("method", sa.String(length=32), nullable=False),
        sa.Column("granted_at", store.types.UTCDateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", store.types.UTCDateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("user_id"),
    )
    op.create_table(
        "loop_items",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("loop", sa.String(length=24), nullable=False),
        sa.Column("owner_id", sa.String(length=64), nullable=False),
        sa.Column("other_id", sa.String(length=64), nullable=True),
        sa.Column("subject", sa.String(length=64), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column(
            "data", sa.JSON().with_variant(postgresql.JSONB(astext_type=Text()), "postgresql"), nullable=False
        ),
        sa.Column("created_at", store.types.UTCDateTime(timezone=True), nullable=False),
        sa.Column("updated_at", store.types.UTCDateTime(timezone=True), nullable=False),
        sa.Column("expires_at", store.types.UTCDateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("loop_items", schema=None) as batch_op:
        batch_op.create_index("ix_loop_items_other", ["other_id", "loop", "created_at"], unique=False)
        batch_op.create_index("ix_loop_items_owner", ["owner_id", "loop", "created_at"], unique=False)

    op.create_table(
        "loop_jobs",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("kind", sa.String(length=40), nullable=False),
        sa.Column("key", sa.String(length=160), nullable=False),
        sa.Column("run_at", store.types.UTCDateTime(timezone=True), nullable=False),
        sa.Column(
            "payload",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column("status", sa.String(length=12), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("lease_owner", sa.String(length=64), nullable=True),
        sa.Column("lease_until", store.types.UTCDateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", store.types.UTCDateTime(timezone=True), nullable=False),
        sa.Column("finished_at", store.types.UTCDateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("key"),
    )
    with op.batch_alter_table("loop_jobs", schema=None) as batch_op:
        batch_op.create_index("ix_loop_jobs_due", ["status", "run_at"], unique=False)

    op.create_table(
        "loop_members",
        sa.Column("item_id", sa.String(length=32), nullable=False),
        sa.Column("user_id", sa.String(length=64), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("score", sa.Float(), nullable=True),
        sa.Column("joined_at", store.types.UTCDateTime(timezone=True), nullable=True),
        sa.Column("updated_at", store.types.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("item_id", "user_id"),
    )
    with op.batch_alter_table("loop_members", schema=None) as batch_op:
        batch_op.create_index("ix_loop_members_user", ["user_id"], unique=False)

    op.create_table(
        "prompt_decisions",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("user_id", sa.String(length=64), nullable=False),
        sa.Column("sender_id", sa.String(length=64), nullable=True),
        sa.Column("loop", sa.String(length=24), nullable=False),
        sa.Column("action", sa.String(length=40), nullable=False),
        sa.Column("shown", sa.Boolean(), nullable=False),
        sa.Column("reason", sa.String(length=40), nullable=False),
        sa.Column("created_at", store.types.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("prompt_decisions", schema=None) as batch_op:
        batch_op.create_index("ix_prompt_decisions_loop", ["loop", "created_at"], unique=False)
        batch_op.create_index("ix_prompt_decisions_user", ["user_id", "shown", "created_at"], unique=False)

    op.create_table(
        "streaks",
        sa.Column("user_id", sa.String(length=64), nullable=False),
        sa.Column("days", sa.Integer(), nullable=False),
        sa.Column("last_activity_at", store.types.UTCDateTime(timezone=True), nullable=False),
        sa.Column("deadline_at", store.types.UTCDateTime(timezone=True), nullable=False),
        sa.Column("best", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("user_id"),
    )
    with op.batch_alter_table("streaks", schema=None) as batch_op:
        batch_op.create_index("ix_streaks_deadline", ["deadline_at"], unique=False)

    # Two steps: in one batch, SQLite's copy-and-move would drop the re-created constraint too.
    with op.batch_alter_table("rewards", schema=None) as batch_op:
        batch_op.drop_constraint("uq_rewards_once", type_="unique")
        batch_op.alter_column("conversion_user_id", new_column_name="ref")
    with op.batch_alter_table("rewards", schema=None) as batch_op:
        batch_op.create_unique_constraint("uq_rewards_once", ["user_id", "kind", "reason", "ref"])


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table("rewards", schema=None) as batch_op:
        batch_op.drop_constraint("uq_rewards_once", type_="unique")
        batch_op.alter_column("ref", new_column_name="conversion_user_id")
    with op.batch_alter_table("rewards", schema=None) as batch_op:
        batch_op.create_unique_constraint(
            "uq_rewards_once", ["user_id", "kind", "reason", "conversion_user_id"]
        )

    with op.batch_alter_table("streaks", schema=None) as batch_op:
        batch_op.drop_index("ix_streaks_deadline")

    op.drop_table("streaks")
    with op.batch_alter_table("prompt_decisions", schema=None) as batch_op:
        batch_op.drop_index("ix_prompt_decisions_user")
        batch_op.drop_index("ix_prompt_decisions_loop")

    op.drop_table("prompt_decisions")
    with op.batch_alter_table("loop_members", schema=None) as batch_op:
        batch_op.drop_index("ix_loop_members_user")

    op.drop_table("loop_members")
    with op.batch_alter_table("loop_jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_loop_jobs_due")

    op.drop_table("loop_jobs")
    with op.batch_alter_table("loop_items", schema=None) as batch_op:
        batch_op.drop_index("ix_loop_items_owner")
        batch_op.drop_index("ix_loop_items_other")

    op.drop_table("loop_items")
    op.drop_table("consents")
    with op.batch_alter_table("ai_costs", schema=None) as batch_op:
        batch_op.drop_index("ix_ai_costs_day")

    op.drop_table("ai_costs")
