"""Persist, stage 8: commit entity state for what ScheduleHub confirmed, and record what it refused.

Accepted rows become entity state (or drop it, for deletes) and close the
failed records and parked children of their keys; rejected rows become failed
records. Every delivered row goes to the delivery log. The stage's frame is a
summary per partition date × action × status (`regroup_summaries` joins the
per-chunk ones). A per-chunk kernel like those of `stages.py`;
`streamed.persist` runs it over the delivered frame.
"""

from __future__ import annotations

import uuid
from concurrent.futures import Future, ThreadPoolExecutor

import pyarrow as pa
import pyarrow.compute as pc

from syncflow_dagster.catalog import EntitySpec
from syncflow_dagster.defs import bookkeeping
from syncflow_dagster.defs.stages import (
    PARTITION_DATE,
    STATUS,
    StageResult,
    count_true,
    is_value,
    never_stored_deletes,
    table_of,
)
from syncflow_dagster.engine import columns as c
from syncflow_dagster.store.first_load import FirstLoad
from syncflow_dagster.store.repositories import SyncStore
from syncflow_dagster.store.schema import failed_records, pending_children


def persist_stage(
    database: SyncStore,
    entity: EntitySpec,
    delivered: pa.Table,
    batch_id: uuid.UUID,
    *,
    new_keys: bool = False,
    first_load: FirstLoad | None = None,
) -> StageResult:
    """Commit state for what ScheduleHub confirmed; everything else becomes a failed record.

    Nothing is marked synced that ScheduleHub did not accept: rejected rows keep
    their old state (or none), so the next run compares against what is really there.
    `new_keys`: the entity held no state when the stage began (see `commit_delivered`).
    `first_load`: the state rows and the delivery log of this chunk are staged in
    it and written when the stage finishes it (store/first_load.py), not now.
    """
    if delivered.num_rows == 0:
        return StageResult(_summary(delivered), {"committed": 0, "deleted_state": 0, "failed_recorded": 0})
    ok = is_value(delivered[STATUS], "accepted")
    # Only the state columns of accepted rows are needed (rejected rows keep
    # their payload for the failed record): filtering the narrow table spares
    # a copy of every payload column of a million delivered rows.
    committed_columns = [
        c.BK_HASH,
        c.BK,
        c.DATA_HASH,
        c.ROWVERSION,
        c.RECIPE,
        "_schedulehub_id",
        c.ACTION,
        c.REASON,
    ]
    accepted = delivered.select([n for n in committed_columns if n in delivered.column_names])
    if count_true(ok) < delivered.num_rows:
        accepted = accepted.filter(ok)
        rejected = delivered.filter(pc.invert(ok))
    else:
        rejected = delivered.slice(0, 0)
    is_delete = is_value(accepted[c.ACTION], c.DELETE)
    upserted = accepted.filter(pc.invert(is_delete))
    deleted = accepted.filter(is_delete)
    # Every row sent and ScheduleHub's answer, for `syncflow trace` (store/delivery_log.py):
    # written on a thread and connection of its own while the state commits on this one.
    committed = upserted.select(
        [c.BK_HASH, c.BK, c.DATA_HASH, c.ROWVERSION, c.RECIPE, "_schedulehub_id"]
    ).rename_columns([c.BK_HASH, c.BK, c.DATA_HASH, c.ROWVERSION, c.RECIPE, "schedulehub_id"])
    logged: Future[int] | None = None
    if first_load is not None:
        first_load.log(delivered)
    else:
        logged = _LOG_WRITER.submit(database.delivery_log().record, entity.name, batch_id, delivered)
    with database.entity_lock(entity.name):
        if first_load is not None:
            written = first_load.add(committed, deleted[c.BK_HASH].combine_chunks())
        else:
            written = database.state().commit_delivered(
                entity.name, batch_id, committed, deleted[c.BK_HASH].combine_chunks(), new_keys=new_keys
            )
        # Only keys that have an open failure or a parked child need closing:
        # those sets are small, the accepted keys may be a million, and staging
        # a million keys to update a thousand rows took minutes. Read under
        # the entity lock, so no run adds to them meanwhile.
        if accepted.num_rows:
            accepted_keys = accepted[c.BK_HASH].combine_chunks()
            failing = bookkeeping.held_among(
                database, failed_records, entity.name, accepted_keys, open_only=True
            )
            if len(failing):
                database.failures().resolve(entity.name, failing)
            parked = bookkeeping.held_among(database, pending_children, entity.name, accepted_keys)
            if len(parked):
                bookkeeping.forget_delivered_children(database, entity, pa.table({c.BK_HASH: parked}))
        parent_missing = is_value(rejected["_reason_code"], "parent_missing")
        bookkeeping.record_delivery_failures(database, entity, batch_id, rejected)
    if logged is not None:
        logged.result()
    # A delete of a key that was never stored removes no state (see `stages.delta_stage`).
    never_stored = count_true(never_stored_deletes(deleted))
    counts = {
        "committed": int(written),
        "deleted_state": deleted.num_rows - never_stored,
        "deleted_never_stored": never_stored,
        "failed_recorded": rejected.num_rows,
        "failed_parent_missing": count_true(parent_missing),
    }
    return StageResult(_summary(delivered), counts)


# The delivery log's writers (a stage waits for its own write before it ends).
_LOG_WRITER = ThreadPoolExecutor(max_workers=2, thread_name_prefix="delivery-log")


def _summary(delivered: pa.Table) -> pa.Table:
    """One row per partition date × action × status: what the persist stage committed or failed.

    The partition date is kept so that the summary of a run over several dates
    is stored, like every stage frame, on the dates its rows belong to.
    """
    if delivered.num_rows == 0:
        return pa.table(
            {
                c.ACTION: pa.array([], pa.string()),
                "status": pa.array([], pa.string()),
                "rows": pa.array([], pa.int64()),
                PARTITION_DATE: pa.array([], pa.date32()),
            }
        )
    keys = [c.ACTION, STATUS, *([PARTITION_DATE] if PARTITION_DATE in delivered.column_names else [])]
    grouped = delivered.group_by(keys).aggregate([(c.BK, "count")])
    columns = {
        c.ACTION: grouped[c.ACTION],
        "status": grouped[STATUS],
        "rows": pc.cast(grouped[f"{c.BK}_count"], pa.int64()),
    }
    if PARTITION_DATE in grouped.column_names:
        columns[PARTITION_DATE] = grouped[PARTITION_DATE]
    return table_of(columns)


def regroup_summaries(summaries: list[pa.Table]) -> pa.Table:
    """Per-chunk `_summary` frames as one: rows summed per partition date × action × status."""
    if len(summaries) == 1:
        return summaries[0]
    whole = pa.concat_tables(summaries, promote_options="default")
    if whole.num_rows == 0:
        return summaries[0]
    keys = [name for name in (c.ACTION, "status", PARTITION_DATE) if name in whole.column_names]
    grouped = whole.group_by(keys).aggregate([("rows", "sum")])
    columns = {name: grouped[name] for name in keys if name != PARTITION_DATE}
    columns["rows"] = pc.cast(grouped["rows_sum"], pa.int64())
    if PARTITION_DATE in keys:
        columns[PARTITION_DATE] = grouped[PARTITION_DATE]
    return table_of(columns)
