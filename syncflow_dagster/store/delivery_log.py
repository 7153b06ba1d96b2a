"""The delivery log: one row per record sent to ScheduleHub, with its answer, per batch (what `syncflow trace` reads).

entity_state keeps only the last delivery of a key; the log keeps every one:
which batch (and so which run) sent it, the action, ScheduleHub's answer
(`created`, `updated`, `unchanged`, `deleted`, `not_found`, or the reason code
of a refusal), and the data hash and rowversion sent. A child held back for
its parent is logged too (status `parked`, the parent as the outcome), so a
record's waits are part of its history. It is written by the
persist stage with one binary COPY of narrow columns in key order (the entity
and batch are constants of the COPY), on a thread of its own while the stage
commits the state on another connection, so little of its cost lands on the
stage's wall time (docs/benchmarks.md).
Rows older than `StoreSettings.delivery_log_days` are pruned by the reconcile
job; lookups go by (entity, bk_hash).
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import sqlalchemy as sa

from syncflow_dagster.engine.columns import ACTION, BK_HASH, DATA_HASH, DATA_HASH_TYPE, ROWVERSION
from syncflow_dagster.engine.delta import key_words, word_order
from syncflow_dagster.store.copy import PgColumn, copy_in
from syncflow_dagster.store.database import StoreSettings, driver_cursor
from syncflow_dagster.store.schema import SCHEMA, delivery_log, sync_batches

# The deliver stage's per-row answer (defs/stages.RESULT_COLUMNS).
STATUS = "_delivery_status"
OUTCOME = "_outcome"
REASON_CODE = "_reason_code"

_COLUMNS = [
    PgColumn("entity", "text"),
    PgColumn("batch_id", "uuid"),
    PgColumn("bk_hash", "uuid"),
    PgColumn("action", "text"),
    PgColumn("status", "text"),
    PgColumn("outcome", "text"),
    PgColumn("data_hash", "bytea"),
    PgColumn("rowversion", "int8"),
]


# The columns `log_rows` gives, as a COPY sends them (entity and batch are the COPY's constants).
ROW_COLUMNS = [column for column in _COLUMNS if column.name not in ("entity", "batch_id")]


def log_rows(entity: str, delivered: pa.Table) -> pa.Table:
    """The delivery log's rows of a deliver stage's frame, in key order (ROW_COLUMNS; no columns for no rows)."""
    if delivered.num_rows == 0:
        return pa.table({})
    missing = [n for n in (BK_HASH, ACTION, STATUS) if n not in delivered.column_names]
    if missing:
        raise ValueError(f"entity {entity!r}: delivered rows lack column(s) {missing}")

    def column(name: str, kind: pa.DataType) -> Any:
        if name in delivered.column_names:
            return delivered[name].cast(kind)
        return pa.nulls(delivered.num_rows).cast(kind)

    outcome = column(OUTCOME, pa.string())
    if REASON_CODE in delivered.column_names:
        outcome = pc.coalesce(outcome, delivered[REASON_CODE].cast(pa.string()))
    columns: dict[str, Any] = {
        "bk_hash": delivered[BK_HASH],
        "action": delivered[ACTION].cast(pa.string()),
        "status": delivered[STATUS].cast(pa.string()),
        "outcome": outcome,
        "data_hash": column(DATA_HASH, DATA_HASH_TYPE).cast(pa.binary()),
        "rowversion": column(ROWVERSION, pa.int64()),
    }
    frame = pa.table(columns)
    # In key order, the index inserts walk the btree's leaves in order instead of
    # touching a random leaf per row (as commit_delivered does for entity_state).
    keys = frame["bk_hash"].combine_chunks()
    if len(keys) > 1 and keys.null_count == 0:
        frame = frame.take(pa.array(word_order(key_words(keys))))
    return frame


@dataclass(frozen=True)
class Delivery:
    """One delivery of a record, with the batch and run that sent it."""

    at: dt.datetime
    batch_id: uuid.UUID | None
    run_id: str | None
    kind: str | None
    partition_date: dt.date | None
    action: str
    status: str
    outcome: str | None
    data_hash: bytes | None
    rowversion: int | None


class DeliveryLogRepository:
    """Append, read and prune the delivery log (table syncflow.delivery_log)."""

    def __init__(self, engine: sa.Engine, settings: StoreSettings | None = None) -> None:
        self.engine = engine
        self.settings = settings or StoreSettings()

    def record(self, entity: str, batch_id: uuid.UUID | None, delivered: pa.Table) -> int:
        """Log every row of the deliver stage's frame (`_bk_hash`, `_action`, ScheduleHub's answer); rows logged."""
        frame = log_rows(entity, delivered)
        if frame.num_rows == 0:
            return 0
        constants: dict[str, pa.Scalar[Any]] = {
            "entity": pa.scalar(entity, pa.string()),
            "batch_id": pa.scalar(None if batch_id is None else batch_id.bytes, pa.binary(16)),
        }
        with self.engine.begin() as conn:
            return copy_in(
                driver_cursor(conn), "delivery_log", frame, _COLUMNS, schema=SCHEMA, constants=constants
            )

    def record_parked(
        self, entity: str, batch_id: uuid.UUID | None, bk_hashes: pa.Array, parents: pa.Array
    ) -> int:
        """Log children held back for a parent (status `parked`, the parent they wait for as the outcome)."""
        if len(bk_hashes) == 0:
            return 0
        frame = pa.table(
            {
                BK_HASH: bk_hashes,
                ACTION: pa.repeat(pa.scalar("park", pa.string()), len(bk_hashes)),
                STATUS: pa.repeat(pa.scalar("parked", pa.string()), len(bk_hashes)),
                OUTCOME: parents.cast(pa.string()),
            }
        )
        return self.record(entity, batch_id, frame)

    def history(self, entity: str, bk_hash: bytes) -> list[Delivery]:
        """Every logged delivery of one record, oldest first, with its batch's run, kind and date."""
        log, batches = delivery_log, sync_batches
        query = (
            sa.select(
                log.c.at,
                log.c.batch_id,
                batches.c.run_id,
                batches.c.kind,
                batches.c.partition_date,
                log.c.action,
                log.c.status,
                log.c.outcome,
                log.c.data_hash,
                log.c.rowversion,
            )
            .select_from(log.outerjoin(batches, batches.c.id == log.c.batch_id))
            .where(log.c.entity == entity, log.c.bk_hash == uuid.UUID(bytes=bk_hash))
            .order_by(log.c.at)
        )
        with self.engine.connect() as conn:
            return [Delivery(**row._asdict()) for row in conn.execute(query)]

    def prune(self, now: dt.datetime | None = None) -> int:
        """Forget deliveries older than `delivery_log_days`; how many."""
        cutoff = (now or dt.datetime.now(dt.UTC)) - dt.timedelta(days=self.settings.delivery_log_days)
        with self.engine.begin() as conn:
            return int(conn.execute(sa.delete(delivery_log).where(delivery_log.c.at < cutoff)).rowcount)
