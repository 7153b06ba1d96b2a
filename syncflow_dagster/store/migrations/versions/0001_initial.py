"""The initial state schema: batches, entity state, watermarks, failures, pending children, events.

Written out by hand rather than imported from store.schema, so that this
revision stays what it was when later revisions change the tables.

Revision ID: 0001_initial
Revises:
Create Date: 2025-01-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql as pg

revision: str = "0001_initial"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

S = "syncflow"
NOW = sa.text("now()")


def upgrade() -> None:
    op.create_table(
        "sync_batches",
        sa.Column("id", pg.UUID(as_uuid=True), primary_key=True),
        sa.Column("entity", sa.Text, nullable=False),
        sa.Column("partition_date", sa.Date, nullable=True),
        sa.Column("run_id", sa.Text, nullable=True),
        sa.Column("status", sa.Text, nullable=False, server_default=sa.text("'running'")),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False, server_default=NOW),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("counts", pg.JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
        sa.Column("stage_seconds", pg.JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
        sa.CheckConstraint("status IN ('running', 'succeeded', 'failed')", name="sync_batches_status"),
        schema=S,
    )
    op.create_index(
        "sync_batches_entity_started", "sync_batches", ["entity", sa.text("started_at DESC")], schema=S
    )
    op.create_index("sync_batches_run_id", "sync_batches", ["run_id"], schema=S)

    op.create_table(
        "entity_state",
        sa.Column("entity", sa.Text, primary_key=True),
        sa.Column("bk_hash", pg.UUID(as_uuid=True), primary_key=True),
        sa.Column("bk", sa.Text, nullable=False),
        sa.Column("data_hash", pg.BYTEA, nullable=False),
        sa.Column("rowversion", sa.BigInteger, nullable=False),
        sa.Column("recipe", sa.SmallInteger, nullable=False),
        sa.Column("schedulehub_id", sa.Text, nullable=True),
        sa.Column("first_seen_at", sa.DateTime(timezone=True), nullable=False, server_default=NOW),
        sa.Column("last_synced_at", sa.DateTime(timezone=True), nullable=False, server_default=NOW),
        sa.Column("last_batch_id", pg.UUID(as_uuid=True), nullable=True),
        schema=S,
    )

    op.create_table(
        "watermarks",
        sa.Column("entity", sa.Text, primary_key=True),
        sa.Column("rowversion", sa.BigInteger, nullable=False),
        sa.Column("changed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=NOW),
        schema=S,
    )

    op.create_table(
        "failed_records",
        sa.Column("id", pg.UUID(as_uuid=True), primary_key=True),
        sa.Column("entity", sa.Text, nullable=False),
        sa.Column("bk_hash", pg.UUID(as_uuid=True), nullable=False),
        sa.Column("bk", sa.Text, nullable=False),
        sa.Column("reason_code", sa.Text, nullable=False),
        sa.Column("reason_class", sa.Text, nullable=False),
        sa.Column("detail", sa.Text, nullable=True),
        sa.Column("attempts", sa.Integer, nullable=False, server_default=sa.text("1")),
        sa.Column("first_failed_at", sa.DateTime(timezone=True), nullable=False, server_default=NOW),
        sa.Column("last_failed_at", sa.DateTime(timezone=True), nullable=False, server_default=NOW),
        sa.Column("next_retry_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("payload", pg.JSONB, nullable=True),
        sa.Column("batch_id", pg.UUID(as_uuid=True), nullable=True),
        sa.Column("resolved_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("reason_class IN ('retryable', 'permanent')", name="failed_records_reason_class"),
        sa.CheckConstraint("attempts >= 1", name="failed_records_attempts"),
        schema=S,
    )
    op.create_index(
        "failed_records_open_key",
        "failed_records",
        ["entity", "bk_hash"],
        unique=True,
        postgresql_where=sa.text("resolved_at IS NULL"),
        schema=S,
    )
    op.create_index(
        "failed_records_due",
        "failed_records",
        ["entity", "next_retry_at"],
        postgresql_where=sa.text("resolved_at IS NULL"),
        schema=S,
    )
    op.create_index("failed_records_entity_reason", "failed_records", ["entity", "reason_code"], schema=S)

    op.create_table(
        "pending_children",
        sa.Column("id", pg.UUID(as_uuid=True), primary_key=True),
        sa.Column("entity", sa.Text, nullable=False),
        sa.Column("bk_hash", pg.UUID(as_uuid=True), nullable=False),
        sa.Column("bk", sa.Text, nullable=False),
        sa.Column("missing_parent_entity", sa.Text, nullable=False),
        sa.Column("missing_parent_bk", sa.Text, nullable=False),
        sa.Column("missing_parent_bk_hash", pg.UUID(as_uuid=True), nullable=False),
        sa.Column("since", sa.DateTime(timezone=True), nullable=False, server_default=NOW),
        sa.Column("payload", pg.JSONB, nullable=True),
        sa.Column("batch_id", pg.UUID(as_uuid=True), nullable=True),
        sa.UniqueConstraint("entity", "bk_hash", name="pending_children_key"),
        schema=S,
    )
    op.create_index(
        "pending_children_parent",
        "pending_children",
        ["missing_parent_entity", "missing_parent_bk_hash"],
        schema=S,
    )
    op.create_index("pending_children_since", "pending_children", ["since"], schema=S)

    op.create_table(
        "stage_events",
        sa.Column("id", pg.UUID(as_uuid=True), primary_key=True),
        sa.Column("batch_id", pg.UUID(as_uuid=True), nullable=True),
        sa.Column("entity", sa.Text, nullable=False),
        sa.Column("stage", sa.Text, nullable=False),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("rows", sa.BigInteger, nullable=True),
        sa.Column("seconds", sa.Float, nullable=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False, server_default=NOW),
        sa.Column("detail", pg.JSONB, nullable=True),
        sa.CheckConstraint("status IN ('started', 'succeeded', 'failed')", name="stage_events_status"),
        schema=S,
    )
    op.create_index("stage_events_batch", "stage_events", ["batch_id", "at"], schema=S)
    op.create_index("stage_events_entity_at", "stage_events", ["entity", "at"], schema=S)


def downgrade() -> None:
    for table in ("stage_events", "pending_children", "failed_records", "watermarks", "entity_state"):
        op.drop_table(table, schema=S)
    op.drop_table("sync_batches", schema=S)
