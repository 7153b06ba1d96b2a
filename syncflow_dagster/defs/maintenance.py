"""Ops of the reconcile and retry jobs: full key scans, redelivery of failures and released children."""

import datetime as dt
import time
from typing import Any

import dagster as dg
import pyarrow as pa
from dagster import OpExecutionContext
from pydantic import Field

from syncflow_dagster.catalog import DeletePolicy, EntitySpec
from syncflow_dagster.clients.apismith import ApiSmithClient
from syncflow_dagster.defs import bookkeeping, pipeline, stages
from syncflow_dagster.defs.interrupts import stop_means_stop
from syncflow_dagster.defs.resources import ApiSmithResource, ScheduleHubResource, SyncDatabase, SyncTuning
from syncflow_dagster.engine import columns as c
from syncflow_dagster.engine import stage_table as st
from syncflow_dagster.engine.delta import plan_reconcile_deletes
from syncflow_dagster.engine.identity import add_identity
from syncflow_dagster.engine.normalize import normalize

_NO_CHANGE_TIME = pa.scalar("1970-01-01T00:00:00+00:00", pa.string())
# The reconcile and retry ops talk to both partner systems: a failed attempt is retried with
# exponential backoff and full jitter, like the stages that do (assets.NETWORK_RETRY).
MAINTENANCE_RETRY = dg.RetryPolicy(
    max_retries=2, delay=5, backoff=dg.Backoff.EXPONENTIAL, jitter=dg.Jitter.FULL
)


class EntitiesConfig(dg.Config):
    entities: list[str] = Field(default_factory=list, description="Entities to act on; empty means all.")


class RetryConfig(EntitiesConfig):
    include_permanent: bool = Field(
        default=False,
        description="Also retry open permanent failures (they have no retry time: a person asks for them).",
    )
    include_dead: bool = Field(
        default=False,
        description="Also retry failures that gave up (state dead) after their attempts or age.",
    )


class ReconcileConfig(EntitiesConfig):
    dry_run: bool = Field(
        default=False, description="Compare and report what would be deleted; delete nothing."
    )


def root_run_id(context: OpExecutionContext) -> str:
    """The run a retry or reconcile run files its batches under: the first of its lineage.

    A re-execution continues the batch of the run it repeats, as a sync does
    (assets._batch_id), so GET /sync/{run_id} of either shows the same batch.
    """
    run = context.run
    return run.root_run_id or run.run_id


def _selected(config: EntitiesConfig) -> list[EntitySpec]:
    from syncflow_dagster.defs.assets import CATALOG

    names = config.entities or list(CATALOG.topological_order)
    return [CATALOG.entity(name) for name in CATALOG.topological_order if name in names]


async def _source_keys(client: ApiSmithClient, entity: EntitySpec) -> pa.Table:
    async with client:
        return await client.fetch_keys(entity.source)


@dg.op(
    description="For each entity: list APISmith's keys, compare with what ScheduleHub holds, delete the rest "
    "unless the delete guard blocks it.",
    retry_policy=MAINTENANCE_RETRY,
    pool="apismith",
)
@stop_means_stop
def reconcile_entities(
    context: OpExecutionContext,
    config: ReconcileConfig,
    apismith: ApiSmithResource,
    schedulehub: ScheduleHubResource,
    database: SyncDatabase,
    tuning: SyncTuning,
) -> None:
    from syncflow_dagster.defs.assets import CATALOG

    for entity in _selected(config):
        started = time.perf_counter()
        keys = stages.run_async(_source_keys(apismith.client(), entity))
        if entity.changed_at not in keys.column_names:
            # The key listing carries no change time, which normalize requires;
            # only the keys' identity is used here, so any valid time will do.
            keys = keys.append_column(entity.changed_at, pa.repeat(_NO_CHANGE_TIME, keys.num_rows))
        key_spec = stages.key_only(entity)
        normalized = normalize(key_spec, keys, tuning.chunk_size)
        source_keys = add_identity(key_spec, normalized.rows, tuning.chunk_size).select([c.BK_HASH, c.BK])
        # The key text travels too: ScheduleHub deletes by external key, not by hash.
        stored = database.state().load_state(
            entity.name, (c.BK_HASH, c.BK, c.DATA_HASH, c.ROWVERSION, c.RECIPE)
        )
        plan = plan_reconcile_deletes(stored, source_keys, entity.delete_guard)
        metadata: dict[str, Any] = {
            "entity": entity.name,
            "source_keys": source_keys.num_rows,
            "stored_keys": stored.num_rows,
            "to_delete": plan.candidates.num_rows,  # what the guard weighed, also when it blocks
            "share": round(plan.share, 4),
            "delete_guard": entity.delete_guard,
            "blocked": plan.blocked,
            "unparseable_keys": normalized.rejected.num_rows,
            "dry_run": config.dry_run,
        }
        if plan.blocked:
            context.log.warning(f"reconcile {entity.name}: {plan.reason}")
            metadata["reason"] = plan.reason
        elif config.dry_run:
            context.log.info(f"reconcile {entity.name} (dry run): would delete {plan.deletes.num_rows}")
        elif plan.deletes.num_rows and entity.delete_policy is not DeletePolicy.NONE:
            batch = bookkeeping.batch_for_run(
                database, entity.name, None, root_run_id(context), kind="reconcile"
            )
            # The plan already says `_action` = delete (and the stored state may carry `_rowversion`):
            # add only what is missing, a second column of one name makes every later stage fail.
            deletes = plan.deletes
            if c.ACTION not in deletes.column_names:
                deletes = deletes.append_column(c.ACTION, pa.array([c.DELETE] * deletes.num_rows))
            if c.ROWVERSION not in deletes.column_names:
                deletes = deletes.append_column(c.ROWVERSION, pa.nulls(deletes.num_rows, pa.int64()))
            run = pipeline.EntityRun(
                CATALOG, entity, database, batch, schedulehub=schedulehub.client, chunk_size=tuning.chunk_size
            )
            # A reconcile's deletes count under the name a sync's do (`delete`), so a
            # status over both kinds adds them up (stage_table.RECONCILE).
            ran, _ = pipeline.run_batch(st.RECONCILE, deletes, run, {c.DELETE: deletes.num_rows}, started)
            metadata.update({f"rows_{k}": v for k, v in ran[st.PERSIST.name].counts.items()})
        metadata["seconds"] = round(time.perf_counter() - started, 3)
        context.log_event(dg.AssetObservation(asset_key=st.REPORT.asset, metadata=metadata, partition=None))


@dg.op(
    description="Redeliver failed records that are due and children whose parents have arrived.",
    retry_policy=MAINTENANCE_RETRY,
    pool="schedulehub",
)
@stop_means_stop
def retry_failed_and_pending(
    context: OpExecutionContext,
    config: RetryConfig,
    schedulehub: ScheduleHubResource,
    database: SyncDatabase,
    tuning: SyncTuning,
) -> None:
    # A row that cannot be delivered is recorded (failed record or parked child),
    # never raised. What still raises is not a row's problem (the database or
    # ScheduleHub unreachable, a bug): the other entities are retried anyway,
    # and the op then fails naming each entity and its cause.
    errors: dict[str, str] = {}
    first: Exception | None = None
    for entity in _selected(config):
        try:
            _retry_entity(context, entity, schedulehub, database, tuning, config)
        except Exception as exc:
            first = first or exc
            errors[entity.name] = f"{type(exc).__name__}: {exc}"
            context.log.error(f"retry {entity.name} failed: {errors[entity.name]}")
    if errors:
        raise dg.Failure(
            description="retry failed for "
            + "; ".join(f"entity {name}: {cause}" for name, cause in errors.items()),
            metadata={f"error_{name}": cause for name, cause in errors.items()},
        ) from first


def _retry_entity(
    context: OpExecutionContext,
    entity: EntitySpec,
    schedulehub: ScheduleHubResource,
    database: SyncDatabase,
    tuning: SyncTuning,
    config: RetryConfig,
) -> None:
    from syncflow_dagster.defs.assets import CATALOG

    started = time.perf_counter()
    expired = database.pending().expire(dt.timedelta(hours=tuning.pending_max_age_hours), entity=entity.name)
    gave_up = database.failures().give_up_stale(entity.name)
    if gave_up:
        context.log.warning(f"retry {entity.name}: {gave_up} failed record(s) gave up and are now dead")
    due = bookkeeping.due_failures(
        database,
        entity,
        tuning.retry_batch_limit,
        include_permanent=config.include_permanent,
        include_dead=config.include_dead,
    )
    if not due.num_rows and not database.pending().release_candidates(entity.name).num_rows:
        return
    # Released children join inside the parent-child stage.
    # A retried row must still have its parents: otherwise it goes back to waiting.
    batch = bookkeeping.batch_for_run(database, entity.name, None, root_run_id(context), kind="retry")
    run = pipeline.EntityRun(
        CATALOG, entity, database, batch, schedulehub=schedulehub.client, chunk_size=tuning.chunk_size
    )
    ran, counts = pipeline.run_batch(
        st.RETRY,
        due,
        run,
        {"retried": due.num_rows, "expired_pending": int(expired or 0), "gave_up": gave_up},
        started,
    )
    delivered = ran[st.DELIVER.name]
    context.log.info(f"retry {entity.name}: {counts}")
    context.log_event(
        dg.AssetObservation(
            asset_key=st.REPORT.asset,
            metadata={
                "entity": entity.name,
                **{f"rows_{k}": v for k, v in counts.items()},
                # From the counts: when every row went back to waiting, nothing was sent
                # and the delivered frame has no result column to read.
                "still_failed": int(delivered.counts.get("failed", 0)),
            },
        )
    )


@dg.op(
    description="Drop stage-frame partitions older than the frame IO manager's retention_days, and "
    "deliveries older than SYNCFLOW_STORE_DELIVERY_LOG_DAYS from the delivery log.",
    required_resource_keys={"frame_io_manager", "database"},
)
def prune_stage_frames(context: OpExecutionContext) -> None:
    manager = context.resources.frame_io_manager
    cutoff = dt.datetime.now(dt.UTC).date() - dt.timedelta(days=int(manager.retention_days))
    removed = manager.prune(cutoff)
    context.log.info(
        f"pruned stage rows older than {cutoff}: {sum(removed.values())} rows in {len(removed)} tables"
    )
    logged = context.resources.database.delivery_log().prune()
    context.log.info(f"pruned {logged} deliveries from the delivery log")
