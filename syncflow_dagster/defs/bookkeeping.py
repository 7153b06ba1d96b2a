"""Bookkeeping of a sync around the stages: batches, stage events, failed and pending rows.

The store's repositories speak in tables and JSON payloads; the stages speak
in frames. This module translates: which batch a run's stage belongs to, how
a rejected or parked row is written so a retry can rebuild it, and how a
batch's counts are totalled from its stage events.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Mapping
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import sqlalchemy as sa

from syncflow_dagster.catalog import Catalog, EntitySpec
from syncflow_dagster.engine import columns as c
from syncflow_dagster.engine import stage_table as st
from syncflow_dagster.engine.identity import key_hash_of, key_text_of
from syncflow_dagster.engine.normalize import target_type
from syncflow_dagster.store.batches import STOPPED_STATUSES
from syncflow_dagster.store.events import stage_totals
from syncflow_dagster.store.payload import payload_json, payload_table
from syncflow_dagster.store.pending import MISSING_PARENT, MISSING_PARENT_BK, MISSING_PARENT_BK_HASH, Parked
from syncflow_dagster.store.repositories import SyncStore

PAYLOAD = "payload"
# What a parked or failed row carries so that a retry can resend it as it was.
_ROW_EXTRAS = (c.BK_HASH, c.BK, c.DATA_HASH, c.ROWVERSION, c.RECIPE, c.ACTION)


def row_schema(entity: EntitySpec) -> pa.Schema:
    """Schema of a delivery-ready row of `entity`: its typed targets plus SyncFlow's columns."""
    fields = [pa.field(spec.target, target_type(spec)) for spec in entity.fields]
    fields += [
        pa.field(c.BK_HASH, c.BK_HASH_TYPE),
        pa.field(c.BK, pa.string()),
        pa.field(c.DATA_HASH, c.DATA_HASH_TYPE),
        pa.field(c.ROWVERSION, c.ROWVERSION_TYPE),
        pa.field(c.RECIPE, c.RECIPE_TYPE),
        pa.field(c.ACTION, pa.string()),
    ]
    return pa.schema(fields)


def row_payloads(entity: EntitySpec, rows: pa.Table) -> pa.Array:
    names = [n for n in (*entity.targets, *_ROW_EXTRAS) if n in rows.column_names]
    return payload_json(rows, names)


def rows_from_payloads(entity: EntitySpec, payloads: pa.Array | pa.ChunkedArray) -> pa.Table:
    return payload_table(payloads, row_schema(entity), entity.name)


# batches and events ----------------------------------------------------------------------------


def batch_for_run(
    database: SyncStore, entity: str, day: dt.date | None, run_id: str, kind: str = "sync"
) -> uuid.UUID:
    """The batch of this run and entity, started by the first stage that asks.

    `run_id` is the root run of a re-execution (see assets._batch_id); `kind`
    the job that writes it (sync, retry, reconcile).
    """
    for batch in database.batches().list_by_run(run_id):
        if batch.entity == entity:
            if batch.status in STOPPED_STATUSES:
                # Closed by batch_failure_sensor or batch_cancel_sensor; the re-execution goes on.
                database.batches().reopen(batch.id)
            return uuid.UUID(str(batch.id))
    return database.batches().start_batch(entity, day, run_id, kind)


def record_stage(
    database: SyncStore,
    batch: uuid.UUID,
    entity: str,
    stage: str,
    rows: int,
    seconds: float,
    counts: dict[str, int],
) -> None:
    """Write a finished stage's event; its name and counts must be the stage table's (one vocabulary)."""
    st.check_counts(stage, counts)
    database.events().record(
        batch,
        entity,
        stage,
        "succeeded",
        rows=rows,
        seconds=seconds,
        detail={k: int(v) for k, v in counts.items()},
    )


def finish_from_events(database: SyncStore, batch: uuid.UUID, status: str = "succeeded") -> dict[str, Any]:
    """Total the batch's stage events into its counts and per-stage seconds, and close it.

    A stage re-executed after a retry appears twice; its latest event counts.
    """
    totals = stage_totals(database.events().for_batch(batch))
    database.batches().finish_batch(batch, status, totals.counts, totals.stage_seconds)
    return {"counts": totals.counts, "stage_seconds": totals.stage_seconds}


# failed records ---------------------------------------------------------------------------------


def record_rejected(database: SyncStore, entity: EntitySpec, batch: uuid.UUID, rejected: pa.Table) -> int:
    """Rows normalisation refused, one failed record per key naming every bad field and value.

    They are `permanent`: resending cannot help until the source fixes the
    row, and a newer version that passes resolves the record when delivered.
    """
    if rejected.num_rows == 0:
        return 0
    by_key: dict[str, list[str]] = {}
    for row in rejected.to_pylist():
        key = row["business_key"] or ""
        by_key.setdefault(key, []).append(
            f"entity {row['entity']}, key {key!r}, field {row['field']}: {row['reason']} (value {row['raw_value']!r})"
        )
    keys = pa.array(list(by_key), pa.string())
    frame = pa.table(
        {
            c.BK_HASH: key_hash_of(keys),
            c.BK: keys,
            "reason_code": pa.array(["invalid_value"] * len(keys)),
            "reason_class": pa.array(["permanent"] * len(keys)),
            "detail": pa.array(["; ".join(v) for v in by_key.values()]),
            PAYLOAD: pa.array(["{}"] * len(keys)),
        }
    )
    return int(database.failures().record_failures(entity.name, batch, frame))


def record_delivery_failures(
    database: SyncStore, entity: EntitySpec, batch: uuid.UUID, rejected: pa.Table
) -> int:
    if rejected.num_rows == 0:
        return 0
    retryable = pc.fill_null(rejected["_retryable"], pa.scalar(True))
    columns: dict[str, Any] = {
        c.BK_HASH: rejected[c.BK_HASH],
        c.BK: rejected[c.BK],
        "reason_code": pc.fill_null(rejected["_reason_code"], pa.scalar("unknown")),
        "reason_class": pc.if_else(retryable, pa.scalar("retryable"), pa.scalar("permanent")),
        "detail": pc.fill_null(rejected["_detail"], pa.scalar("")),
        PAYLOAD: row_payloads(entity, rejected),
    }
    frame = pa.table(columns)
    return int(database.failures().record_failures(entity.name, batch, frame))


UNREADABLE_PAYLOAD = "unreadable_payload"


def due_failures(
    database: SyncStore,
    entity: EntitySpec,
    limit: int,
    *,
    include_permanent: bool = False,
    include_dead: bool = False,
) -> pa.Table:
    """Failed records due for a retry, rebuilt as rows.

    A payload that no longer fits the entity (a field the catalog has since
    dropped or retyped, a hand edit) is a problem of that row: it becomes a
    permanent `unreadable_payload` failure naming the cause, for a person to
    look at, and the other rows are retried.
    """
    due = database.failures().due_for_retry(
        entity.name, limit=limit, include_permanent=include_permanent, include_dead=include_dead
    )
    if due.num_rows == 0:
        return row_schema(entity).empty_table()
    try:
        return rows_from_payloads(entity, due[PAYLOAD])
    except ValueError:
        pass
    readable: list[pa.Table] = []
    unreadable: list[tuple[int, str]] = []
    for index in range(due.num_rows):
        try:
            readable.append(rows_from_payloads(entity, due[PAYLOAD].slice(index, 1)))
        except ValueError as exc:
            unreadable.append((index, str(exc)))
    bad = due.take(pa.array([index for index, _ in unreadable], pa.int64()))
    columns: dict[str, Any] = {
        c.BK_HASH: bad[c.BK_HASH],
        c.BK: bad[c.BK],
        "reason_code": pa.array([UNREADABLE_PAYLOAD] * bad.num_rows),
        "reason_class": pa.array(["permanent"] * bad.num_rows),
        "detail": pa.array([f"cannot rebuild the row for a retry: {cause}" for _, cause in unreadable]),
        PAYLOAD: bad[PAYLOAD],
    }
    frame = pa.table(columns)
    database.failures().record_failures(entity.name, None, frame)
    return pa.concat_tables(readable) if readable else row_schema(entity).empty_table()


# pending children -------------------------------------------------------------------------------


def park_children(
    database: SyncStore, catalog: Catalog, entity: EntitySpec, batch: uuid.UUID, waiting: pa.Table
) -> Parked:
    """Hold children whose parent ScheduleHub lacks, with the parent they wait for.

    Children whose key is an open failed record stay failed records (`Parked.kept_failed`).
    """
    if waiting.num_rows == 0:
        return Parked(0, 0)
    parent_bk = pa.nulls(waiting.num_rows, pa.string())
    for relation in reversed(entity.parents):
        text = pc.cast(key_text_of([waiting[f] for f in relation.fields]), pa.string())
        mine = pc.equal(waiting[MISSING_PARENT], pa.scalar(relation.entity))
        parent_bk = pc.if_else(mine, text, parent_bk)
    columns: dict[str, Any] = {
        c.BK_HASH: waiting[c.BK_HASH],
        c.BK: waiting[c.BK],
        MISSING_PARENT: waiting[MISSING_PARENT],
        MISSING_PARENT_BK: parent_bk,
        MISSING_PARENT_BK_HASH: key_hash_of(parent_bk),
        PAYLOAD: row_payloads(entity, waiting),
    }
    frame = pa.table(columns)
    parked: Parked = database.pending().park(entity.name, batch, frame)
    parent: Any = pc.cast(waiting[MISSING_PARENT], pa.string()).combine_chunks()
    waits_for = pc.binary_join_element_wise(parent, parent_bk, " ")  # e.g. "work_orders WO-0728"
    database.delivery_log().record_parked(entity.name, batch, waiting[c.BK_HASH].combine_chunks(), waits_for)
    return parked


def released_children(
    database: SyncStore, entity: EntitySpec, arriving: Mapping[str, pa.Array] | None = None
) -> pa.Table:
    """Parked children of `entity` whose parent is now delivered, rebuilt as rows.

    `arriving` (parent entity → key hashes) adds the children whose parent the
    same run delivers ahead of them (a run over several entities, parents first).
    They stay parked until delivered (`forget_delivered_children`), so a run
    that dies in between loses none.
    """
    ready = database.pending().release_candidates(entity.name)
    wanted = {parent: keys for parent, keys in (arriving or {}).items() if parent in entity.parent_entities}
    if any(len(keys) for keys in wanted.values()):
        waiting = database.pending().waiting(entity.name)
        mask = pa.repeat(pa.scalar(False), waiting.num_rows)
        for parent, keys in wanted.items():
            mine = pc.and_(
                pc.equal(waiting[MISSING_PARENT], pa.scalar(parent)),
                pc.is_in(waiting[MISSING_PARENT_BK_HASH], value_set=keys.cast(c.BK_HASH_TYPE)),
            )
            mask = pc.or_(mask, mine)
        awaited = waiting.filter(mask)
        if ready.num_rows:
            awaited = awaited.filter(pc.invert(pc.is_in(awaited[c.BK_HASH], value_set=ready[c.BK_HASH])))
        if awaited.num_rows:
            ready = pa.concat_tables([ready, awaited.select(ready.column_names).cast(ready.schema)])
    return rows_from_payloads(entity, ready[PAYLOAD]) if ready.num_rows else row_schema(entity).empty_table()


def forget_delivered_children(database: SyncStore, entity: EntitySpec, accepted: pa.Table) -> int:
    if accepted.num_rows == 0:
        return 0
    return int(database.pending().remove(entity.name, accepted[c.BK_HASH].combine_chunks()))


def pending_stats(database: SyncStore, entity: str) -> dict[str, Any]:
    waiting = database.pending().waiting(entity)
    if waiting.num_rows == 0:
        return {"count": 0, "oldest_since": None, "by_parent": {}}
    parents: Any = pc.value_counts(waiting[MISSING_PARENT])  # a StructArray the stubs type too narrowly
    by_parent = {row["values"]: row["counts"] for row in parents.to_pylist()}
    return {
        "count": waiting.num_rows,
        "oldest_since": pc.min(waiting["since"]).as_py(),
        "by_parent": by_parent,
    }


def releasable_counts(database: SyncStore, catalog: Catalog) -> dict[str, int]:
    """Per entity (of `catalog`), how many parked children now have their parent."""
    keys = database.pending().releasable_keys()
    return {name: len(keys[name]) for name in catalog.topological_order if name in keys}


def last_success_per_entity(database: SyncStore) -> dict[str, dt.datetime]:
    return database.batches().last_success_per_entity()


def held_among(
    database: SyncStore, table: sa.Table, entity: str, accepted_keys: pa.Array, *, open_only: bool = False
) -> pa.Array:
    """The given key hashes that have a row in `table` (failed_records or pending_children)."""
    query = sa.select(table.c.bk_hash).where(table.c.entity == entity)
    if open_only:
        query = query.where(table.c.resolved_at.is_(None))
    with database.engine.connect() as conn:
        held = [row[0].bytes for row in conn.execute(query)]
    if not held:
        return pa.array([], c.BK_HASH_TYPE)
    keys = pa.array(held, c.BK_HASH_TYPE)
    return accepted_keys.filter(pc.is_in(accepted_keys, value_set=keys))
