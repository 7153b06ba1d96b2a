"""The nine stage assets of a sync, partitioned by entity × date.

    extracted → normalized → identified → fresh_rows → delta_plan → resolved → delivered → committed → sync_report

Each body calls one stage function from `stages.py` and returns its frame
with metadata; the Postgres frame IO manager stores the frame per partition.
Stages are separate assets (rather than one op) so that a run can be
re-executed from the stage that failed, each stage's frame can be inspected
in the UI and in Postgres, and checks attach to the stage they are about.
"""

import datetime as dt
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import dagster as dg
import pyarrow as pa
from dagster import AssetExecutionContext

from syncflow_dagster.catalog import Catalog, EntitySpec, default_catalog
from syncflow_dagster.defs import bookkeeping, checks, reading, stages
from syncflow_dagster.defs.interrupts import stop_means_stop
from syncflow_dagster.defs.partitions import sync_partitions
from syncflow_dagster.defs.resources import ApiSmithResource, ScheduleHubResource, SyncDatabase, SyncTuning
from syncflow_dagster.engine import columns as c
from syncflow_dagster.store.frame_io_manager import partition_scope

GROUP = "sync"
# Run tag that makes the fetch read from the beginning (defs/reading.py).
FULL_WINDOW_TAG = reading.FULL_WINDOW_TAG
OWNERS = ["team:syncflow"]
FRAME_IO = "frame_io_manager"
PREVIEW_ROWS = 5

CATALOG: Catalog = default_catalog()
PARTITIONS = sync_partitions(CATALOG)

# Stages that talk to a partner system retry with exponential backoff and full
# jitter, so parallel runs that failed together do not retry together.
NETWORK_RETRY = dg.RetryPolicy(
    max_retries=3, delay=2.0, backoff=dg.Backoff.EXPONENTIAL, jitter=dg.Jitter.FULL
)
DATABASE_RETRY = dg.RetryPolicy(
    max_retries=2, delay=1.0, backoff=dg.Backoff.EXPONENTIAL, jitter=dg.Jitter.FULL
)


def _scope(context: AssetExecutionContext) -> tuple[EntitySpec, tuple[dt.date, ...]]:
    entity, dates = partition_scope(context.partition_keys)
    return CATALOG.entity(entity), dates


def _batch_id(context: AssetExecutionContext, database: SyncDatabase, entity: str, day: dt.date) -> uuid.UUID:
    """The sync batch of this run and entity, started by the first stage that needs it.

    A re-execution (from failure, as the run retries do, or of chosen steps) is a
    new Dagster run whose root is the run it repeats: it continues that run's
    batch, so the batch is closed with every stage's counts instead of being
    left running beside a new one that lacks the stages not re-executed.
    """
    run = context.run
    return bookkeeping.batch_for_run(database, entity, day, run.root_run_id or run.run_id)


def _preview(frame: pa.Table) -> dg.MetadataValue:
    hidden = {c.BK_HASH, c.DATA_HASH, stages.STORED_DATA_HASH}
    shown = frame.select([n for n in frame.column_names if n not in hidden][:12]).slice(0, PREVIEW_ROWS)
    if shown.num_rows == 0:
        return dg.MetadataValue.md("_no rows_")
    header = "| " + " | ".join(shown.column_names) + " |"
    rule = "|" + "---|" * shown.num_columns
    lines = [header, rule]
    for row in shown.to_pylist():
        lines.append("| " + " | ".join("" if v is None else str(v)[:40] for v in row.values()) + " |")
    return dg.MetadataValue.md("\n".join(lines))


def _output(
    context: AssetExecutionContext,
    database: SyncDatabase,
    stage: str,
    started: float,
    result: stages.StageResult,
) -> dg.Output[pa.Table]:
    entity, dates = _scope(context)
    seconds = round(time.perf_counter() - started, 3)
    batch = _batch_id(context, database, entity.name, dates[0])
    bookkeeping.record_stage(
        database, batch, entity.name, stage, result.frame.num_rows, seconds, result.counts
    )
    metadata: dict[str, Any] = {f"rows_{k}": v for k, v in result.counts.items()}
    metadata.update(
        {
            "entity": entity.name,
            "dates": ", ".join(d.isoformat() for d in dates),
            "seconds": seconds,
            "batch_id": str(batch),
            "preview": _preview(result.frame),
            **result.notes,
        }
    )
    return dg.Output(result.frame, metadata=metadata)


def _stage_asset(
    name: str,
    description: str,
    kinds: set[str],
    *,
    retry: dg.RetryPolicy = DATABASE_RETRY,
    pool: str | None = None,
    checks: tuple[dg.AssetCheckSpec, ...] = (),
) -> Callable[[Callable[..., Any]], dg.AssetsDefinition]:
    # stop_means_stop: a terminated run stops instead of retrying the interrupted stage (interrupts.py).
    return lambda body: dg.asset(
        check_specs=list(checks),
        name=name,
        group_name=GROUP,
        partitions_def=PARTITIONS,
        io_manager_key=FRAME_IO,
        description=description,
        kinds=kinds,
        owners=OWNERS,
        retry_policy=retry,
        pool=pool,
        code_version="1",
    )(stop_means_stop(body))


@_stage_asset(
    "extracted",
    "1 · fetch: the entity's APISmith records and tombstones (`_deleted`), keyset-paged by rowversion. A run "
    "of today reads everything newer than the entity's read-through mark, whatever its change time; a run of "
    "past days reads the records that changed on them (the first day also holds everything earlier). "
    "Raw source columns, as text.",
    {"python", "apismith", "postgres"},
    retry=NETWORK_RETRY,
    pool="apismith",
)
def extracted(
    context: AssetExecutionContext, apismith: ApiSmithResource, database: SyncDatabase
) -> dg.Output[pa.Table]:
    started = time.perf_counter()
    entity, dates = _scope(context)
    batch = _batch_id(context, database, entity.name, dates[0])
    result = reading.extract(context, apismith.client(), database, entity, dates, batch)
    return _output(context, database, "fetch", started, result)


@_stage_asset(
    "normalized",
    "2 · normalize: field mapping and the layered coercions the catalog declares (type, string, numeric, "
    "datetime). Rows with a value that cannot be coerced become failed records naming entity, key, field, value.",
    {"python", "pyarrow", "postgres"},
)
def normalized(
    context: AssetExecutionContext, database: SyncDatabase, extracted: pa.Table
) -> dg.Output[pa.Table]:
    started = time.perf_counter()
    entity, dates = _scope(context)
    result, rejected = stages.normalize_stage(entity, extracted)
    if rejected.num_rows:
        batch = _batch_id(context, database, entity.name, dates[0])
        bookkeeping.record_rejected(database, entity, batch, rejected)
        result.notes["rejected_sample"] = _preview(rejected)
    return _output(context, database, "normalize", started, result)


@_stage_asset(
    "identified",
    "3 · identity: BK_HASH = xxHash3-128 of the canonical business key, DATA_HASH = BLAKE3 of the canonical "
    "payload (recipe and test vectors in docs/identity.md).",
    {"python", "pyarrow", "postgres"},
)
def identified(
    context: AssetExecutionContext, database: SyncDatabase, normalized: pa.Table
) -> dg.Output[pa.Table]:
    started = time.perf_counter()
    entity, _ = _scope(context)
    return _output(context, database, "identity", started, stages.identity_stage(entity, normalized))


@_stage_asset(
    "fresh_rows",
    "4 · rowversion: rows whose source rowversion is not newer than the delivered one are dropped before any "
    "hash compare; the incremental path's cost scales with the rows changed, not the entity's size.",
    {"python", "pyarrow", "postgres"},
)
def fresh_rows(
    context: AssetExecutionContext, database: SyncDatabase, identified: pa.Table
) -> dg.Output[pa.Table]:
    started = time.perf_counter()
    entity, _ = _scope(context)
    return _output(
        context,
        database,
        "rowversion",
        started,
        stages.rowversion_stage(database.state(), entity, identified),
    )


@_stage_asset(
    "delta_plan",
    "5 · delta: insert / update / delete per business key against the last DELIVERED data hash (A→B→A is an "
    "update); duplicates in a batch resolve to the highest rowversion. Skips are counted, not kept.",
    {"python", "pyarrow", "postgres"},
    checks=(checks.KEYS_UNIQUE,),
)
def delta_plan(
    context: AssetExecutionContext, database: SyncDatabase, fresh_rows: pa.Table
) -> Iterator[dg.Output[pa.Table] | dg.AssetCheckResult]:
    started = time.perf_counter()
    result = stages.delta_stage(fresh_rows)
    yield _output(context, database, "delta", started, result)
    yield checks.business_keys_unique_and_present(result.frame)


@_stage_asset(
    "resolved",
    "6 · parent-child: rows whose parent ScheduleHub does not have yet wait in pending_children; children "
    "parked earlier whose parents have since arrived are released into this frame.",
    {"python", "pyarrow", "postgres"},
    checks=(checks.PENDING_AGE,),
)
def resolved(
    context: AssetExecutionContext, database: SyncDatabase, tuning: SyncTuning, delta_plan: pa.Table
) -> Iterator[dg.Output[pa.Table] | dg.AssetCheckResult]:
    started = time.perf_counter()
    entity, dates = _scope(context)
    batch = _batch_id(context, database, entity.name, dates[0])
    result = stages.parent_child_stage(CATALOG, entity, database, delta_plan, batch, run_date=dates[-1])
    yield _output(context, database, "parent_child", started, result)
    yield checks.pending_children_within_age(database, entity.name, tuning.pending_max_age_hours)


@_stage_asset(
    "delivered",
    "7 · deliver: batched, idempotent upserts and deletes by external key to ScheduleHub; every row comes back "
    "accepted (with its ScheduleHub id) or rejected with a reason code.",
    {"python", "schedulehub", "postgres"},
    retry=NETWORK_RETRY,
    pool="schedulehub",
)
def delivered(
    context: AssetExecutionContext,
    schedulehub: ScheduleHubResource,
    database: SyncDatabase,
    resolved: pa.Table,
) -> dg.Output[pa.Table]:
    started = time.perf_counter()
    entity, _ = _scope(context)
    return _output(
        context, database, "deliver", started, stages.deliver_stage(schedulehub.client(), entity, resolved)
    )


@_stage_asset(
    "committed",
    "8 · persist: entity state is committed only for rows ScheduleHub confirmed; rejected rows become failed "
    "records with their reason and a retry time. Serialised per entity by an advisory lock.",
    {"python", "postgres"},
    checks=(checks.DELIVERED_COMMITTED,),
)
def committed(
    context: AssetExecutionContext, database: SyncDatabase, delivered: pa.Table
) -> Iterator[dg.Output[pa.Table] | dg.AssetCheckResult]:
    started = time.perf_counter()
    entity, dates = _scope(context)
    batch = _batch_id(context, database, entity.name, dates[0])
    result = stages.persist_stage(database, entity, delivered, batch)
    # Every row of the run is now committed, failed or parked: its catch-up read is accounted for.
    read_through = reading.account_read(database, batch)
    if read_through is not None:
        result.notes["read_through"] = read_through
    yield _output(context, database, "persist", started, result)
    yield checks.delivered_equals_committed(delivered, result.counts)


@_stage_asset(
    "sync_report",
    "9 · report: the batch's counts per action and stage timings, written to sync_batches and shown here; "
    "the monitoring API and /metrics read the same rows.",
    {"python", "postgres"},
)
def sync_report(
    context: AssetExecutionContext, database: SyncDatabase, committed: pa.Table
) -> dg.Output[pa.Table]:
    entity, dates = _scope(context)
    batch = _batch_id(context, database, entity.name, dates[0])
    summary = bookkeeping.finish_from_events(database, batch, status="succeeded")
    counts = summary["counts"]
    frame = pa.table(
        {
            "entity": [entity.name],
            "batch_id": [str(batch)],
            # A run over several dates files its report under the last one.
            stages.PARTITION_DATE: pa.array([dates[-1]], pa.date32()),
            **{name: pa.array([int(counts.get(name, 0))], pa.int64()) for name in REPORT_COUNTS},
            "seconds": pa.array([float(sum(summary["stage_seconds"].values()))], pa.float64()),
        }
    )
    metadata: dict[str, Any] = {name: int(counts.get(name, 0)) for name in REPORT_COUNTS}
    metadata.update(
        {
            "entity": entity.name,
            "batch_id": str(batch),
            "stage_seconds": dg.MetadataValue.json(summary["stage_seconds"]),
            "seconds_total": round(float(sum(summary["stage_seconds"].values())), 3),
        }
    )
    return dg.Output(frame, metadata=metadata)


REPORT_COUNTS = (
    "fetched",
    "tombstones",
    "normalized",
    "rejected",
    "stale",
    "insert",
    "update",
    "delete",
    "skip",
    "duplicates",
    "pending",
    "released",
    "delivered",
    "failed",
    "committed",
)

STAGE_ASSETS = [
    extracted,
    normalized,
    identified,
    fresh_rows,
    delta_plan,
    resolved,
    delivered,
    committed,
    sync_report,
]
