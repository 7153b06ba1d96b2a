"""SyncFlow's state tables in Postgres schema `syncflow`, as SQLAlchemy Core Table definitions.

The tables are created by the Alembic migrations in `store/migrations/`; these
definitions are what the repositories query with, and a test checks that the
migrated database and this metadata agree, so the two never drift apart.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg

SCHEMA = "syncflow"

BATCH_STATUSES = ("running", "succeeded", "failed", "cancelled")
# Which job wrote a batch: the sync assets, the retry job, the reconcile job.
BATCH_KINDS = ("sync", "retry", "reconcile")
REASON_CLASSES = ("retryable", "permanent")
# A failed record is `open` (retried on its schedule, or waiting for a person when
# permanent) or `dead` (gave up; retried only when asked): both still hold the key.
# It is closed as `delivered` (ScheduleHub took it), `resolved` or `dismissed`
# (a person said so, with who and why).
FAILURE_STATES = ("open", "dead", "delivered", "resolved", "dismissed")
HELD_FAILURE_STATES = ("open", "dead")
STAGE_STATUSES = ("started", "succeeded", "failed")

metadata = sa.MetaData(schema=SCHEMA)

_NOW = sa.text("now()")

sync_batches = sa.Table(
    "sync_batches",
    metadata,
    sa.Column("id", pg.UUID(as_uuid=True), primary_key=True),  # UUIDv7: ordered by start time
    sa.Column("entity", sa.Text, nullable=False),
    sa.Column("partition_date", sa.Date, nullable=True),
    sa.Column("run_id", sa.Text, nullable=True),
    sa.Column("status", sa.Text, nullable=False, server_default=sa.text("'running'")),
    sa.Column("started_at", sa.DateTime(timezone=True), nullable=False, server_default=_NOW),
    sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("counts", pg.JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
    sa.Column("stage_seconds", pg.JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
    sa.Column("kind", sa.Text, nullable=False, server_default=sa.text("'sync'")),
    # How often the batch was closed as failed / cancelled: a re-execution reopens
    # it, and these only ever grow, so the batches counter never goes down.
    sa.Column("failed_closes", sa.Integer, nullable=False, server_default=sa.text("0")),
    sa.Column("cancelled_closes", sa.Integer, nullable=False, server_default=sa.text("0")),
    sa.CheckConstraint(
        "status IN ('running', 'succeeded', 'failed', 'cancelled')", name="sync_batches_status"
    ),
    sa.CheckConstraint("kind IN ('sync', 'retry', 'reconcile')", name="sync_batches_kind"),
    sa.Index("sync_batches_entity_started", "entity", sa.text("started_at DESC")),
    sa.Index("sync_batches_run_id", "run_id"),
    sa.Index("sync_batches_started", sa.text("started_at DESC")),
)

# The hot table: one row per delivered record. Its primary key is the natural
# (entity, bk_hash) pair on purpose. Every lookup (stored_for_keys, the merge of
# commit_delivered, the pending-release join) goes by that pair, so a surrogate
# UUID would only add a second 16-byte column and a second unique index that
# every one of millions of upserts has to maintain, for no query that uses it.
# bk_hash is stored as `uuid` rather than bytea: both hold the 16 raw bytes of
# xxHash3-128, but uuid is fixed width (no varlena header), so the index tuples
# are smaller and comparisons are plain memcmp.
entity_state = sa.Table(
    "entity_state",
    metadata,
    sa.Column("entity", sa.Text, primary_key=True),
    sa.Column("bk_hash", pg.UUID(as_uuid=True), primary_key=True),
    sa.Column("bk", sa.Text, nullable=False),
    sa.Column("data_hash", pg.BYTEA, nullable=False),
    sa.Column("rowversion", sa.BigInteger, nullable=False),
    sa.Column("recipe", sa.SmallInteger, nullable=False),
    sa.Column("schedulehub_id", sa.Text, nullable=True),
    sa.Column("first_seen_at", sa.DateTime(timezone=True), nullable=False, server_default=_NOW),
    sa.Column("last_synced_at", sa.DateTime(timezone=True), nullable=False, server_default=_NOW),
    sa.Column("last_batch_id", pg.UUID(as_uuid=True), nullable=True),
)

watermarks = sa.Table(
    "watermarks",
    metadata,
    sa.Column("entity", sa.Text, primary_key=True),
    sa.Column("rowversion", sa.BigInteger, nullable=False),
    sa.Column("changed_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=_NOW),
)

failed_records = sa.Table(
    "failed_records",
    metadata,
    sa.Column("id", pg.UUID(as_uuid=True), primary_key=True),
    sa.Column("entity", sa.Text, nullable=False),
    sa.Column("bk_hash", pg.UUID(as_uuid=True), nullable=False),
    sa.Column("bk", sa.Text, nullable=False),
    sa.Column("reason_code", sa.Text, nullable=False),
    sa.Column("reason_class", sa.Text, nullable=False),
    sa.Column("detail", sa.Text, nullable=True),
    sa.Column("attempts", sa.Integer, nullable=False, server_default=sa.text("1")),
    sa.Column("first_failed_at", sa.DateTime(timezone=True), nullable=False, server_default=_NOW),
    sa.Column("last_failed_at", sa.DateTime(timezone=True), nullable=False, server_default=_NOW),
    # NULL for permanent failures: they wait for a person, never for a timer.
    sa.Column("next_retry_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("payload", pg.JSONB, nullable=True),
    sa.Column("batch_id", pg.UUID(as_uuid=True), nullable=True),
    # NULL while the record holds its key (state open or dead).
    sa.Column("resolved_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("state", sa.Text, nullable=False, server_default=sa.text("'open'")),
    sa.Column("state_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("state_by", sa.Text, nullable=True),
    sa.Column("state_reason", sa.Text, nullable=True),
    sa.CheckConstraint("reason_class IN ('retryable', 'permanent')", name="failed_records_reason_class"),
    sa.CheckConstraint(
        "state IN ('open', 'dead', 'delivered', 'resolved', 'dismissed')", name="failed_records_state"
    ),
    sa.CheckConstraint(
        "(state IN ('open', 'dead')) = (resolved_at IS NULL)", name="failed_records_state_resolved"
    ),
    sa.CheckConstraint("attempts >= 1", name="failed_records_attempts"),
    # At most one open failure per record; resolved ones stay as history.
    sa.Index(
        "failed_records_open_key",
        "entity",
        "bk_hash",
        unique=True,
        postgresql_where=sa.text("resolved_at IS NULL"),
    ),
    # due_for_retry: open retryable rows of an entity ordered by next_retry_at.
    sa.Index(
        "failed_records_due",
        "entity",
        "next_retry_at",
        postgresql_where=sa.text("resolved_at IS NULL"),
    ),
    sa.Index("failed_records_entity_reason", "entity", "reason_code"),
)

pending_children = sa.Table(
    "pending_children",
    metadata,
    sa.Column("id", pg.UUID(as_uuid=True), primary_key=True),
    sa.Column("entity", sa.Text, nullable=False),
    sa.Column("bk_hash", pg.UUID(as_uuid=True), nullable=False),
    sa.Column("bk", sa.Text, nullable=False),
    sa.Column("missing_parent_entity", sa.Text, nullable=False),
    sa.Column("missing_parent_bk", sa.Text, nullable=False),
    # Stored so that release is one join against entity_state's primary key.
    sa.Column("missing_parent_bk_hash", pg.UUID(as_uuid=True), nullable=False),
    sa.Column("since", sa.DateTime(timezone=True), nullable=False, server_default=_NOW),
    sa.Column("payload", pg.JSONB, nullable=True),
    sa.Column("batch_id", pg.UUID(as_uuid=True), nullable=True),
    sa.UniqueConstraint("entity", "bk_hash", name="pending_children_key"),
    sa.Index("pending_children_parent", "missing_parent_entity", "missing_parent_bk_hash"),
    sa.Index("pending_children_since", "since"),
)

stage_events = sa.Table(
    "stage_events",
    metadata,
    sa.Column("id", pg.UUID(as_uuid=True), primary_key=True),
    sa.Column("batch_id", pg.UUID(as_uuid=True), nullable=True),
    sa.Column("entity", sa.Text, nullable=False),
    sa.Column("stage", sa.Text, nullable=False),
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("rows", sa.BigInteger, nullable=True),
    sa.Column("seconds", sa.Float, nullable=True),
    sa.Column("at", sa.DateTime(timezone=True), nullable=False, server_default=_NOW),
    sa.Column("detail", pg.JSONB, nullable=True),
    sa.CheckConstraint("status IN ('started', 'succeeded', 'failed')", name="stage_events_status"),
    sa.Index("stage_events_batch", "batch_id", "at"),
    sa.Index("stage_events_entity_at", "entity", "at"),
)

# One row per record sent to ScheduleHub, with its answer: what `syncflow trace`
# reads. Append-only, written in the persist stage's transaction; rows older than
# the store's delivery_log_days are pruned by the reconcile job.
delivery_log = sa.Table(
    "delivery_log",
    metadata,
    sa.Column("entity", sa.Text, nullable=False),
    sa.Column("bk_hash", pg.UUID(as_uuid=True), nullable=False),
    sa.Column("batch_id", pg.UUID(as_uuid=True), nullable=True),
    sa.Column("action", sa.Text, nullable=False),
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("outcome", sa.Text, nullable=True),
    sa.Column("data_hash", pg.BYTEA, nullable=True),
    sa.Column("rowversion", sa.BigInteger, nullable=True),
    sa.Column("at", sa.DateTime(timezone=True), nullable=False, server_default=_NOW),
    sa.Index("delivery_log_key", "entity", "bk_hash"),
    sa.Index("delivery_log_at", "at", postgresql_using="brin"),
)

# Per entity, the rowversion up to which every APISmith change and tombstone has been
# read AND accounted for (committed, failed or parked), whatever its change time: the
# catch-up read of the next run starts after it (defs/reading.py). Only moves forward.
read_marks = sa.Table(
    "read_marks",
    metadata,
    sa.Column("entity", sa.Text, primary_key=True),
    sa.Column("rowversion", sa.BigInteger, nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=_NOW),
)

# The snapshot a batch's catch-up read was pinned at: noted by the fetch stage, turned
# into the entity's read mark by the persist stage once the batch's rows are accounted
# for (and then deleted). A batch that never gets there leaves its row behind, and the
# mark where it was.
read_snapshots = sa.Table(
    "read_snapshots",
    metadata,
    sa.Column("batch_id", pg.UUID(as_uuid=True), primary_key=True),
    sa.Column("entity", sa.Text, nullable=False),
    sa.Column("after_rowversion", sa.BigInteger, nullable=False),
    sa.Column("snapshot_rowversion", sa.BigInteger, nullable=False),
    sa.Column("noted_at", sa.DateTime(timezone=True), nullable=False, server_default=_NOW),
)
