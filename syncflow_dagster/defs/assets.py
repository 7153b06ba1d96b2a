"""The nine stage assets of a sync, partitioned by entity × date.

    extracted → normalized → identified → fresh_rows → delta_plan → resolved → delivered → committed → sync_report

Each asset is a row of the stage table (`engine/stage_table.py`): its key,
description and the name its stage events carry come from there. Each body
runs its one stage through `pipeline.run_stage` (the one implementation of
each stage, which the retry, reconcile and repair jobs run too) per entity of
the run, from the stage's input slice into its output slice (written through
the frame IO manager's `writer`, the report's one row too), and returns the
`StoredFrame` handles of those slices with metadata, which the IO manager
only records: no stage hands Dagster a whole table. A run covers one entity,
or several when a single-run backfill groups a few days of many entities:
the body then handles them in the catalog's topological order, parents
first, each with its own batch, and hands over `EntityFrames` (entity →
handle) either way.
Stages are separate assets (rather than one op) so that a run can be
re-executed from the stage that failed, each stage's frame can be inspected
in the UI and in Postgres, and checks attach to the stage they are about.
"""

import datetime as dt
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import dagster as dg
import pyarrow as pa
from dagster import AssetExecutionContext

from syncflow_dagster.catalog import Catalog, EntitySpec, default_catalog
from syncflow_dagster.defs import bookkeeping, checks, pipeline, reading, stages, streamed
from syncflow_dagster.defs import checks as checks_module
from syncflow_dagster.defs.interrupts import stop_means_stop
from syncflow_dagster.defs.partitions import sync_partitions
from syncflow_dagster.defs.resources import ApiSmithResource, ScheduleHubResource, SyncDatabase, SyncTuning
from syncflow_dagster.engine import columns as c
from syncflow_dagster.engine import stage_table as st
from syncflow_dagster.store.frames.io_manager import PostgresFrameIOManager, partition_scopes
from syncflow_dagster.store.frames.stream import EntityFrames, EntityStreams, SliceWriter

GROUP = "sync"
# Run tag that makes the fetch read from the beginning (defs/reading.py).
FULL_WINDOW_TAG = reading.FULL_WINDOW_TAG
# Run tag of a resync: read from the beginning, and rows already delivered are
# delivered again (ScheduleHub lost them); see docs/operations.md, "Repairing ScheduleHub".
RESYNC_TAG = reading.RESYNC_TAG
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
# A backfill runs as few runs as Dagster can make of it: one per range of partitions.
# Over a multi-partition subset Dagster groups by the dimension with fewer keys, so
# 3 days × 8 entities is 3 runs of 8 entities each, 30 days × 8 entities 8 runs of
# one entity each (docs/architecture.md, "Backfills").
BACKFILL_POLICY = dg.BackfillPolicy.single_run()


# One entity's share of a run: its catalog spec and its dates.
Scope = tuple[EntitySpec, tuple[dt.date, ...]]


def _scopes(context: AssetExecutionContext) -> list[Scope]:
    """The run's entities with their dates, parents first (the catalog's topological order).

    A run usually covers one entity; a single-run backfill of a few days ×
    many entities covers several (Dagster groups a backfill by the dimension
    with fewer keys), and each stage then handles them one after another.
    """
    by_entity = partition_scopes(context.partition_keys)
    return [
        (CATALOG.entity(name), by_entity[name]) for name in CATALOG.topological_order if name in by_entity
    ]


def _batch_id(context: AssetExecutionContext, database: SyncDatabase, entity: str, day: dt.date) -> uuid.UUID:
    """The sync batch of this run and entity, started by the first stage that needs it.

    A re-execution (from failure, as the run retries do, or of chosen steps) is a
    new Dagster run whose root is the run it repeats: it continues that run's
    batch, so the batch is closed with every stage's counts instead of being
    left running beside a new one that lacks the stages not re-executed.
    """
    run = context.run
    return bookkeeping.batch_for_run(database, entity, day, run.root_run_id or run.run_id)


def _writer(context: AssetExecutionContext, scope: Scope, chunk_size: int) -> SliceWriter:
    """The writer of this stage's output slice for one entity of the run (see `streamed.py`); the
    hand-off keeps a slice of at most two of the run's chunks (`chunk_size` rows each) in memory."""
    manager: PostgresFrameIOManager = getattr(context.resources, FRAME_IO)
    entity, dates = scope
    return manager.writer(context.asset_key.path[-1], entity.name, dates, chunk_size=chunk_size)


def _entity_run(
    database: SyncDatabase, tuning: SyncTuning, scope: Scope, batch: uuid.UUID, **more: Any
) -> pipeline.EntityRun:
    """One entity's share of this run, as `pipeline.run_stage` takes it, `tuning.chunk_size` rows at a time."""
    return pipeline.EntityRun(CATALOG, scope[0], database, batch, chunk_size=tuning.chunk_size, **more)


def _run_stage(
    context: AssetExecutionContext,
    stage: st.Stage,
    run: pipeline.EntityRun,
    scope: Scope,
    streams: EntityStreams,
) -> stages.StageResult:
    """This asset's one stage for one entity of the run: its input slice in, its output slice out."""
    return pipeline.run_stage(
        stage.name, run, streams[scope[0].name], _writer(context, scope, run.chunk_size)
    )


def _shown(result: stages.StageResult) -> pa.Table:
    """The rows a stage's metadata previews: the first rows it wrote (none when it wrote none)."""
    return result.preview if result.preview is not None else pa.table({})


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


def _recorded(
    context: AssetExecutionContext,
    database: SyncDatabase,
    stage: st.Stage,
    scope: Scope,
    batch: uuid.UUID,
    started: float,
    result: stages.StageResult,
) -> dict[str, Any]:
    """Book one entity's stage result (its batch's stage event) and return its metadata."""
    entity, dates = scope
    seconds = round(time.perf_counter() - started, 3)
    bookkeeping.record_stage(
        database, batch, entity.name, stage.name, result.frame.num_rows, seconds, result.counts
    )
    metadata: dict[str, Any] = {f"rows_{k}": v for k, v in result.counts.items()}
    metadata.update(
        {
            "entity": entity.name,
            "dates": ", ".join(d.isoformat() for d in dates),
            "seconds": seconds,
            "batch_id": str(batch),
            "preview": _preview(_shown(result)),
            **result.notes,
        }
    )
    return metadata


def _plain(value: Any) -> Any:
    """A metadata value as JSON can hold it (MetadataValue objects by their value)."""
    inner = getattr(value, "value", value)
    return inner if isinstance(inner, (int, float, str, bool, type(None), list, dict)) else str(inner)


def _across_entities(per_entity: dict[str, dict[str, Any]], counts: tuple[str, ...] = ()) -> dict[str, Any]:
    """Metadata of a stage over several entities: totals of the counts, and each entity's own metadata.

    One metadata set is recorded for every partition of the run, so anything
    that is true of one entity only (its batch, its read mark, its preview)
    goes under `per_entity`, never at the top where it would be read as every
    partition's.
    """
    totals: dict[str, int] = {}
    for metadata in per_entity.values():
        for key, value in metadata.items():
            if (key.startswith("rows_") or key in counts) and isinstance(value, int):
                totals[key] = totals.get(key, 0) + value
    table = {
        name: {k: _plain(v) for k, v in metadata.items() if k not in ("entity", "preview")}
        for name, metadata in per_entity.items()
    }
    seconds = round(sum(float(m.get("seconds", m.get("seconds_total", 0.0))) for m in per_entity.values()), 3)
    return {
        **totals,
        "entities": ", ".join(per_entity),
        "seconds": seconds,
        "per_entity": dg.MetadataValue.json(table),
    }


def _stage_output(
    context: AssetExecutionContext,
    database: SyncDatabase,
    stage: st.Stage,
    for_entity: Callable[[Scope, uuid.UUID], stages.StageResult],
) -> dg.Output[EntityFrames]:
    """Run `for_entity` (given the entity's batch) for each of the run's entities, parents first,
    and hand over the `StoredFrame` handles of the slices they wrote.

    Each entity's result is booked in its own batch; the output's metadata is
    the entity's own for a run of one entity, and totals plus a per-entity
    table for a run of several.
    """
    frames = EntityFrames()
    per_entity: dict[str, dict[str, Any]] = {}
    for scope in _scopes(context):
        batch = _batch_id(context, database, scope[0].name, scope[1][0])
        started = time.perf_counter()
        result = for_entity(scope, batch)
        per_entity[scope[0].name] = _recorded(context, database, stage, scope, batch, started, result)
        frames[scope[0].name] = result.frame
    return dg.Output(frames, metadata=_metadata_of(per_entity))


def _metadata_of(per_entity: dict[str, dict[str, Any]], counts: tuple[str, ...] = ()) -> dict[str, Any]:
    if len(per_entity) == 1:
        return next(iter(per_entity.values()))
    return _across_entities(per_entity, counts)


def _check_of(results: dict[str, dg.AssetCheckResult]) -> dg.AssetCheckResult:
    """One check result for the step: the entity's own, or all entities' (passed only if each passed)."""
    if len(results) == 1:
        return next(iter(results.values()))
    first = next(iter(results.values()))
    failed = [name for name, result in results.items() if not result.passed]
    return dg.AssetCheckResult(
        check_name=first.check_name,
        passed=not failed,
        severity=first.severity,
        metadata={
            "failed_entities": ", ".join(failed) or "none",
            "per_entity": dg.MetadataValue.json(
                {name: {k: _plain(v) for k, v in result.metadata.items()} for name, result in results.items()}
            ),
        },
    )


def _stage_asset(
    stage: st.Stage,
    kinds: set[str],
    *,
    retry: dg.RetryPolicy = DATABASE_RETRY,
    pool: str | None = None,
    checks: tuple[dg.AssetCheckSpec, ...] = (),
) -> Callable[[Callable[..., Any]], dg.AssetsDefinition]:
    # stop_means_stop: a terminated run stops instead of retrying the interrupted stage (interrupts.py).
    # single_run: a backfill is one run per range of partitions (a few at most, see BACKFILL_POLICY).
    def define(body: Callable[..., Any]) -> dg.AssetsDefinition:
        with warnings.catch_warnings():
            # `backfill_policy` is marked beta on `asset` in Dagster 1.13 (stable on the policy itself);
            # the notice went to every process importing the code location, the CLI's stderr included.
            warnings.filterwarnings("ignore", message=".*`backfill_policy`", category=dg.BetaWarning)
            return dg.asset(
                check_specs=[checks_module.partitioned(spec, PARTITIONS) for spec in checks],
                name=stage.asset,
                group_name=GROUP,
                partitions_def=PARTITIONS,
                io_manager_key=FRAME_IO,
                description=f"{stage.title}: {stage.description}",
                kinds=kinds,
                owners=OWNERS,
                retry_policy=retry,
                pool=pool,
                backfill_policy=BACKFILL_POLICY,
                code_version="1",
            )(stop_means_stop(body))

    return define


@_stage_asset(
    st.FETCH,
    {"python", "apismith", "postgres"},
    retry=NETWORK_RETRY,
    pool="apismith",
)
def extracted(
    context: AssetExecutionContext, apismith: ApiSmithResource, database: SyncDatabase, tuning: SyncTuning
) -> dg.Output[EntityFrames]:
    return _stage_output(
        context,
        database,
        st.FETCH,
        lambda scope, batch: _extract(context, apismith, database, *scope, batch, tuning.chunk_size),
    )


def _extract(
    context: AssetExecutionContext,
    apismith: ApiSmithResource,
    database: SyncDatabase,
    entity: EntitySpec,
    dates: tuple[dt.date, ...],
    batch: uuid.UUID,
    chunk_size: int,
) -> stages.StageResult:
    out = streamed.Output(_writer(context, (entity, dates), chunk_size))
    with out.writer:
        # Each page is written as it arrives: the fetch never holds the whole read.
        result = reading.extract(context, apismith.client(), database, entity, dates, batch, sink=out.write)
    return stages.StageResult(out.writer.stored, result.counts, result.notes, out.preview)


def _resync(context: AssetExecutionContext) -> bool:
    """Whether this run is a resync (run tag `syncflow/resync=true`)."""
    return context.run.tags.get(RESYNC_TAG) == "true"


@_stage_asset(
    st.NORMALIZE,
    {"python", "pyarrow", "postgres"},
)
def normalized(
    context: AssetExecutionContext, database: SyncDatabase, tuning: SyncTuning, extracted: EntityStreams
) -> dg.Output[EntityFrames]:
    def normalize(scope: Scope, batch: uuid.UUID) -> stages.StageResult:
        run = _entity_run(database, tuning, scope, batch)
        result = _run_stage(context, st.NORMALIZE, run, scope, extracted)
        if run.rejected is not None and run.rejected.num_rows:
            result.notes["rejected_sample"] = _preview(run.rejected)
        return result

    return _stage_output(context, database, st.NORMALIZE, normalize)


@_stage_asset(
    st.IDENTITY,
    {"python", "pyarrow", "postgres"},
)
def identified(
    context: AssetExecutionContext, database: SyncDatabase, tuning: SyncTuning, normalized: EntityStreams
) -> dg.Output[EntityFrames]:
    return _stage_output(
        context,
        database,
        st.IDENTITY,
        lambda scope, batch: _run_stage(
            context, st.IDENTITY, _entity_run(database, tuning, scope, batch), scope, normalized
        ),
    )


@_stage_asset(
    st.ROWVERSION,
    {"python", "pyarrow", "postgres"},
)
def fresh_rows(
    context: AssetExecutionContext, database: SyncDatabase, tuning: SyncTuning, identified: EntityStreams
) -> dg.Output[EntityFrames]:
    resync = _resync(context)
    return _stage_output(
        context,
        database,
        st.ROWVERSION,
        lambda scope, batch: _run_stage(
            context,
            st.ROWVERSION,
            _entity_run(database, tuning, scope, batch, resync=resync),
            scope,
            identified,
        ),
    )


@_stage_asset(
    st.DELTA,
    {"python", "pyarrow", "postgres"},
    checks=(checks.KEYS_UNIQUE,),
)
def delta_plan(
    context: AssetExecutionContext, database: SyncDatabase, tuning: SyncTuning, fresh_rows: EntityStreams
) -> Iterator[dg.Output[EntityFrames] | dg.AssetCheckResult]:
    keys: dict[str, checks.KeyTally] = {}

    def plan(scope: Scope, batch: uuid.UUID) -> stages.StageResult:
        run = _entity_run(database, tuning, scope, batch, resync=_resync(context))
        result = _run_stage(context, st.DELTA, run, scope, fresh_rows)
        assert run.keys is not None
        keys[scope[0].name] = run.keys
        return result

    yield _stage_output(context, database, st.DELTA, plan)
    yield _check_of({name: tally.check() for name, tally in keys.items()})


@_stage_asset(
    st.PARENT_CHILD,
    {"python", "pyarrow", "postgres"},
    checks=(checks.PENDING_AGE,),
)
def resolved(
    context: AssetExecutionContext, database: SyncDatabase, tuning: SyncTuning, delta_plan: EntityStreams
) -> Iterator[dg.Output[EntityFrames] | dg.AssetCheckResult]:
    # Keys each entity of this run hands to delivery: its children in the same run,
    # delivered after it (parents first), may count on them.
    arriving: dict[str, pa.Array] = {}

    def resolve(scope: Scope, batch: uuid.UUID) -> stages.StageResult:
        run = _entity_run(database, tuning, scope, batch, run_date=scope[1][-1], arriving=arriving)
        return _run_stage(context, st.PARENT_CHILD, run, scope, delta_plan)

    yield _stage_output(context, database, st.PARENT_CHILD, resolve)
    yield _check_of(
        {
            entity.name: checks.pending_children_within_age(
                database, entity.name, tuning.pending_max_age_hours
            )
            for entity, _ in _scopes(context)
        }
    )


@_stage_asset(
    st.DELIVER,
    {"python", "schedulehub", "postgres"},
    retry=NETWORK_RETRY,
    pool="schedulehub",
)
def delivered(
    context: AssetExecutionContext,
    schedulehub: ScheduleHubResource,
    database: SyncDatabase,
    tuning: SyncTuning,
    resolved: EntityStreams,
) -> dg.Output[EntityFrames]:
    return _stage_output(
        context,
        database,
        st.DELIVER,
        lambda scope, batch: _run_stage(
            context,
            st.DELIVER,
            _entity_run(database, tuning, scope, batch, schedulehub=schedulehub.client),
            scope,
            resolved,
        ),
    )


@_stage_asset(
    st.PERSIST,
    {"python", "postgres"},
    checks=(checks.DELIVERED_COMMITTED,),
)
def committed(
    context: AssetExecutionContext, database: SyncDatabase, tuning: SyncTuning, delivered: EntityStreams
) -> Iterator[dg.Output[EntityFrames] | dg.AssetCheckResult]:
    verdicts: dict[str, dg.AssetCheckResult] = {}

    def commit(scope: Scope, batch: uuid.UUID) -> stages.StageResult:
        run = _entity_run(database, tuning, scope, batch)
        result = _run_stage(context, st.PERSIST, run, scope, delivered)
        verdicts[scope[0].name] = checks.delivered_equals_committed(run.accepted, result.counts)
        return result

    yield _stage_output(context, database, st.PERSIST, commit)
    yield _check_of(verdicts)


@_stage_asset(
    st.REPORT,
    {"python", "postgres"},
    checks=(checks.NO_FAILED_ROWS,),
)
def sync_report(
    context: AssetExecutionContext, database: SyncDatabase, tuning: SyncTuning, committed: EntityStreams
) -> Iterator[dg.Output[EntityFrames] | dg.AssetCheckResult]:
    frames = EntityFrames()
    per_entity: dict[str, dict[str, Any]] = {}
    failed_rows: dict[str, dg.AssetCheckResult] = {}
    for entity, dates in _scopes(context):
        report, per_entity[entity.name] = _report(context, database, entity, dates)
        # Written like every stage's frame, so that the run hands over a handle, never a table.
        with _writer(context, (entity, dates), tuning.chunk_size) as writer:
            writer.write(report)
        frames[entity.name] = writer.stored
        failed_rows[entity.name] = checks.no_failed_rows(
            entity.name, per_entity[entity.name], database.failures().count(entity.name)
        )
    yield dg.Output(frames, metadata=_metadata_of(per_entity, st.BATCH_COUNTS))
    yield _check_of(failed_rows)


def _report(
    context: AssetExecutionContext, database: SyncDatabase, entity: EntitySpec, dates: tuple[dt.date, ...]
) -> tuple[pa.Table, dict[str, Any]]:
    """Close the entity's batch from its stage events: the report row and its metadata."""
    batch = _batch_id(context, database, entity.name, dates[0])
    summary = bookkeeping.finish_from_events(database, batch, status="succeeded")
    counts = summary["counts"]
    frame = pa.table(
        {
            "entity": [entity.name],
            "batch_id": [str(batch)],
            # A run over several dates files its report under the last one.
            stages.PARTITION_DATE: pa.array([dates[-1]], pa.date32()),
            **{name: pa.array([int(counts.get(name, 0))], pa.int64()) for name in st.BATCH_COUNTS},
            "seconds": pa.array([float(sum(summary["stage_seconds"].values()))], pa.float64()),
        }
    )
    metadata: dict[str, Any] = {name: int(counts.get(name, 0)) for name in st.BATCH_COUNTS}
    metadata.update(
        {
            "entity": entity.name,
            "batch_id": str(batch),
            "stage_seconds": dg.MetadataValue.json(summary["stage_seconds"]),
            "seconds_total": round(float(sum(summary["stage_seconds"].values())), 3),
        }
    )
    return frame, metadata


# Freshness of the partition's entity: evaluated after each sync's report, or on its own from the UI.
FRESHNESS_CHECK = checks.entity_synced_recently_check(PARTITIONS)

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
