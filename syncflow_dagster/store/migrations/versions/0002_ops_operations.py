"""Operating SyncFlow honestly: cancelled batches, batch kinds, the failed-record lifecycle, the delivery log.

* `sync_batches.status` gains `cancelled` (a run terminated by an operator);
  `kind` says which job wrote the batch (`sync`, `retry`, `reconcile`), and
  `failed_closes` / `cancelled_closes` count how often the batch was closed
  that way, so `syncflow_batches_total` only ever goes up although a
  re-execution reopens the batch.
* `failed_records.state`: `open` (retried on its schedule or waiting for a
  person), `dead` (gave up after the configured attempts or age; still holds
  the key), `delivered` (ScheduleHub took it at last), `resolved` and
  `dismissed` (a person closed it, with `state_by` and `state_reason`), and
  `state_at`, when the state last changed.
* `delivery_log`: one row per record sent to ScheduleHub and its answer, per
  batch, for `syncflow trace` (append-only; pruned by the reconcile job).

Revision ID: ops_0002
Revises: 0001_initial
Create Date: 2026-01-15
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql as pg

revision: str = "ops_0002"
down_revision: str | None = "0001_initial"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

S = "syncflow"
NOW = sa.text("now()")


def upgrade() -> None:
    op.drop_constraint("sync_batches_status", "sync_batches", schema=S, type_="check")
    op.create_check_constraint(
        "sync_batches_status",
        "sync_batches",
        "status IN ('running', 'succeeded', 'failed', 'cancelled')",
        schema=S,
    )
    op.add_column(
        "sync_batches",
        sa.Column("kind", sa.Text, nullable=False, server_default=sa.text("'sync'")),
        schema=S,
    )
    op.create_check_constraint(
        "sync_batches_kind", "sync_batches", "kind IN ('sync', 'retry', 'reconcile')", schema=S
    )
    for name in ("failed_closes", "cancelled_closes"):
        op.add_column(
            "sync_batches",
            sa.Column(name, sa.Integer, nullable=False, server_default=sa.text("0")),
            schema=S,
        )
    # A batch the old code closed as failed was closed once.
    op.execute(f"UPDATE {S}.sync_batches SET failed_closes = 1 WHERE status = 'failed'")
    op.create_index("sync_batches_started", "sync_batches", [sa.text("started_at DESC")], schema=S)

    op.add_column(
        "failed_records",
        sa.Column("state", sa.Text, nullable=False, server_default=sa.text("'open'")),
        schema=S,
    )
    op.add_column("failed_records", sa.Column("state_at", sa.DateTime(timezone=True)), schema=S)
    op.add_column("failed_records", sa.Column("state_by", sa.Text), schema=S)
    op.add_column("failed_records", sa.Column("state_reason", sa.Text), schema=S)
    op.execute(
        f"UPDATE {S}.failed_records SET state = 'delivered', state_at = resolved_at, state_by = 'syncflow'"
        " WHERE resolved_at IS NOT NULL"
    )
    op.create_check_constraint(
        "failed_records_state",
        "failed_records",
        "state IN ('open', 'dead', 'delivered', 'resolved', 'dismissed')",
        schema=S,
    )
    # Open and dead records hold their key; the others are history.
    op.create_check_constraint(
        "failed_records_state_resolved",
        "failed_records",
        "(state IN ('open', 'dead')) = (resolved_at IS NULL)",
        schema=S,
    )

    op.create_table(
        "delivery_log",
        sa.Column("entity", sa.Text, nullable=False),
        sa.Column("bk_hash", pg.UUID(as_uuid=True), nullable=False),
        sa.Column("batch_id", pg.UUID(as_uuid=True), nullable=True),
        sa.Column("action", sa.Text, nullable=False),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("outcome", sa.Text, nullable=True),
        sa.Column("data_hash", pg.BYTEA, nullable=True),
        sa.Column("rowversion", sa.BigInteger, nullable=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False, server_default=NOW),
        schema=S,
    )
    op.create_index("delivery_log_key", "delivery_log", ["entity", "bk_hash"], schema=S)
    op.create_index("delivery_log_at", "delivery_log", ["at"], schema=S, postgresql_using="brin")


def downgrade() -> None:
    op.drop_table("delivery_log", schema=S)
    op.drop_constraint("failed_records_state_resolved", "failed_records", schema=S, type_="check")
    op.drop_constraint("failed_records_state", "failed_records", schema=S, type_="check")
    for name in ("state_reason", "state_by", "state_at", "state"):
        op.drop_column("failed_records", name, schema=S)
    op.drop_index("sync_batches_started", "sync_batches", schema=S)
    for name in ("cancelled_closes", "failed_closes"):
        op.drop_column("sync_batches", name, schema=S)
    op.drop_constraint("sync_batches_kind", "sync_batches", schema=S, type_="check")
    op.drop_column("sync_batches", "kind", schema=S)
    op.execute(f"UPDATE {S}.sync_batches SET status = 'failed' WHERE status = 'cancelled'")
    op.drop_constraint("sync_batches_status", "sync_batches", schema=S, type_="check")
    op.create_check_constraint(
        "sync_batches_status", "sync_batches", "status IN ('running', 'succeeded', 'failed')", schema=S
    )
