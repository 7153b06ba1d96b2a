"""Sensors and schedules that start syncs by themselves.

* `apismith_change_sensor` reads each entity's APISmith watermark (cheap) and
  compares it with the entity's read-through mark in SyncFlow's store (not a
  cursor, so a restored cursor can skip nothing): an entity behind gets one run
  of today's partition, whose catch-up read takes every change after the mark
  whatever its change time (defs/reading.py); an entity never synced gets one
  history run [partitions start .. today]. Not while the entity has a sync run
  queued or in flight; run keys name (entity, mark, watermark).
* `pending_children_sensor` asks for one retry run per entity whose parked
  children now have their parents in ScheduleHub, with a run key naming that
  set of children, so an unchanged set is never released twice.
* `batch_failure_sensor` and `batch_cancel_sensor` close as failed or
  cancelled the sync batches of a run that stopped before its report stage,
  with the counts of the stages that finished, so the monitoring API and
  /metrics never show a dead run as still running (a re-execution reopens and
  continues the batch).
* `retry_schedule` redelivers failed records every 15 minutes, one run per
  entity with work due (none: a SkipReason); `nightly_reconcile_schedule` runs
  the full key scan at 02:00 UTC, one run per entity. Retry and reconcile runs
  carry `syncflow/entity`, so the per-entity run limit covers them.

Default status of the automation (not of the two batch sensors, which are
bookkeeping and always RUNNING): STOPPED in a deployment (an operator turns them on), RUNNING
when SYNCFLOW_AUTOMATION=running, which `syncflow dev` and the demo set.
"""

import datetime as dt
import hashlib
import os
from collections.abc import Collection, Mapping
from typing import Any

import dagster as dg
from dagster import SensorEvaluationContext

from syncflow_dagster.clients.apismith import ApiSmithClient, Watermark
from syncflow_dagster.defs.assets import CATALOG
from syncflow_dagster.defs.jobs import entity_run_tags, reconcile_job, retry_job, sync_job
from syncflow_dagster.defs.partitions import partitions_start, sync_partition_key
from syncflow_dagster.defs.resources import ApiSmithResource, SyncDatabase
from syncflow_dagster.defs.run_tags import partition_tags
from syncflow_dagster.defs.stages import run_async
from syncflow_dagster.deploy.run_coordinator import entities_of_run

AUTOMATION_ENV = "SYNCFLOW_AUTOMATION"


def default_status() -> dg.DefaultSensorStatus:
    running = os.environ.get(AUTOMATION_ENV, "").lower() == "running"
    return dg.DefaultSensorStatus.RUNNING if running else dg.DefaultSensorStatus.STOPPED


def default_schedule_status() -> dg.DefaultScheduleStatus:
    running = os.environ.get(AUTOMATION_ENV, "").lower() == "running"
    return dg.DefaultScheduleStatus.RUNNING if running else dg.DefaultScheduleStatus.STOPPED


async def _watermarks(client: ApiSmithClient) -> dict[str, Watermark]:
    async with client:
        return {entity.name: await client.watermark(entity.source) for entity in CATALOG.entities}


CHANGE_TRIGGER = "change_sensor"
WATERMARK_TAG = "syncflow/watermark"
READ_MARK_TAG = "syncflow/read_mark"
# Runs of an entity that hold its slot: a second catch-up run would only read what this one reads.
IN_FLIGHT = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
]


def plan_change_runs(
    marks: Mapping[str, int],
    watermarks: Mapping[str, Any],
    busy: Collection[str],
    *,
    today: dt.date,
    start: dt.date,
) -> tuple[list[dg.RunRequest], list[str]]:
    """The runs the sensor asks for, and why each other entity was left alone.

    `marks` are the entities' read-through marks (store/read_marks.py),
    `watermarks` APISmith's per-entity watermarks, `busy` the entities with a
    sync run queued or in flight. Per entity, in parent-first order:

    * a run already queued or in flight: nothing (it reads what a new one would);
    * never synced (no mark): one history run over [start .. today] (range tags),
      which reads everything whatever its change time;
    * APISmith's watermark above the mark: one run of today's partition, whose
      catch-up read takes every change after the mark, whatever its change time;
    * otherwise nothing.

    The run key names the entity, its mark and the watermark seen: the same
    (entity, mark, watermark) is launched once; a run that failed leaves the mark
    where it was, so it is tried again as soon as the source moves on.
    """
    requests: list[dg.RunRequest] = []
    left: list[str] = []
    for name in CATALOG.topological_order:
        source = int(watermarks[name].max_rowversion or 0)
        mark = marks.get(name)
        if name in busy:
            left.append(f"{name}: a sync run is queued or in flight")
            continue
        tags = {**entity_run_tags(name, CHANGE_TRIGGER), WATERMARK_TAG: str(source)}
        if mark is None:
            history = partition_tags(name, start, today)
            requests.append(
                dg.RunRequest(
                    run_key=f"history:{name}:{source}",
                    partition_key=sync_partition_key(name, today) if start == today else None,
                    tags={**tags, **({} if start == today else history)},
                )
            )
        elif source > mark:
            requests.append(
                dg.RunRequest(
                    run_key=f"catch_up:{name}:{mark}:{source}",
                    partition_key=sync_partition_key(name, today),
                    tags={**tags, READ_MARK_TAG: str(mark)},
                )
            )
        else:
            left.append(f"{name}@{mark}")
    return requests, left


def busy_entities(instance: dg.DagsterInstance) -> set[str]:
    """Entities a sync run queued or in flight writes, however it was launched (sensor, API, UI, backfill)."""
    runs = instance.get_runs(filters=dg.RunsFilter(job_name=sync_job.name, statuses=IN_FLIGHT))
    return {name for run in runs for name in entities_of_run(run.tags, CATALOG)}


@dg.sensor(
    job=sync_job,
    minimum_interval_seconds=60,
    default_status=default_status(),
    description="Starts a sync for each entity whose APISmith watermark is above what SyncFlow has read "
    "(a history run for an entity never synced), unless one is already queued or running.",
)
def apismith_change_sensor(
    context: SensorEvaluationContext, apismith: ApiSmithResource, database: SyncDatabase
) -> dg.SensorResult | dg.SkipReason:
    watermarks = run_async(_watermarks(apismith.client()))
    requests, left = plan_change_runs(
        database.read_marks().all(),
        watermarks,
        busy_entities(context.instance),
        today=dt.datetime.now(dt.UTC).date(),
        start=dt.date.fromisoformat(partitions_start()),
    )
    if not requests:
        return dg.SkipReason(
            f"every entity's APISmith watermark is read through or being read ({len(left)} entities checked: "
            + ", ".join(left)
            + ")"
        )
    return dg.SensorResult(run_requests=requests)


def retry_run_config(entity: str) -> dict[str, Any]:
    return {"ops": {"retry_failed_and_pending": {"config": {"entities": [entity]}}}}


def release_run_key(entity: str, keys: list[bytes]) -> str:
    """A run key that names the set of releasable children, so one set is released by one run.

    The same set seen on the next tick asks for no second run (Dagster drops a
    repeated run key); a set that changed (a child arrived or left) is a new key.
    """
    digest = hashlib.blake2b(b"".join(sorted(keys)), digest_size=12).hexdigest()
    return f"release:{entity}:{len(keys)}:{digest}"


@dg.sensor(
    job=retry_job,
    minimum_interval_seconds=120,
    default_status=default_status(),
    description="Releases parked children once their parents are in ScheduleHub: one retry run per entity, "
    "keyed on the set of children it can release.",
)
def pending_children_sensor(
    context: SensorEvaluationContext, database: SyncDatabase
) -> dg.SensorResult | dg.SkipReason:
    releasable = database.pending().releasable_keys()
    if not releasable:
        return dg.SkipReason("no parked child has its parent in ScheduleHub yet")
    return dg.SensorResult(
        run_requests=[
            dg.RunRequest(
                run_key=release_run_key(name, releasable[name]),
                run_config=retry_run_config(name),
                tags=entity_run_tags(name, "pending_children_sensor"),
            )
            for name in CATALOG.topological_order
            if name in releasable
        ]
    )


def close_stopped_batches(context: dg.RunStatusSensorContext, database: SyncDatabase, status: str) -> None:
    """Close as `status` (failed, cancelled) the batches a stopped run left running.

    They keep the counts of the stages that finished; a re-execution of the run
    (it files its stages under the root run's batch, assets._batch_id) reopens
    and continues them.
    """
    run = context.dagster_run
    closed = database.batches().close_running(run.root_run_id or run.run_id, status)
    if closed:
        context.log.info(
            f"run {run.run_id} stopped: closed {len(closed)} sync batch(es) as {status}: "
            + ", ".join(str(batch) for batch in closed)
        )


@dg.run_failure_sensor(
    name="batch_failure_sensor",
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Closes as failed the sync batches a failed run left running (bookkeeping; starts no run).",
)
def batch_failure_sensor(context: dg.RunFailureSensorContext, database: SyncDatabase) -> None:
    close_stopped_batches(context, database, "failed")


@dg.run_status_sensor(
    name="batch_cancel_sensor",
    run_status=dg.DagsterRunStatus.CANCELED,
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Closes as cancelled the sync batches a cancelled run left running, with the counts of "
    "the stages that finished (bookkeeping; starts no run).",
)
def batch_cancel_sensor(context: dg.RunStatusSensorContext, database: SyncDatabase) -> None:
    close_stopped_batches(context, database, "cancelled")


@dg.schedule(
    name="retry_failed_records",
    job=retry_job,
    cron_schedule="*/15 * * * *",
    execution_timezone="UTC",
    default_status=default_schedule_status(),
    description="Every 15 minutes: one retry run per entity with failed records due for retry or children "
    "whose parent arrived; skips when there are none.",
)
def retry_schedule(
    context: dg.ScheduleEvaluationContext, database: SyncDatabase
) -> dg.SkipReason | list[dg.RunRequest]:
    due = database.failures().entities_to_retry() | set(database.pending().releasable_keys())
    if not due:
        return dg.SkipReason("no failed record is due for retry and no parked child can be released")
    tick = context.scheduled_execution_time.isoformat() if context.scheduled_execution_time else "now"
    return [
        dg.RunRequest(
            run_key=f"retry:{name}:{tick}",
            run_config=retry_run_config(name),
            tags=entity_run_tags(name, "retry_schedule"),
        )
        for name in CATALOG.topological_order
        if name in due
    ]


@dg.schedule(
    name="nightly_reconcile",
    job=reconcile_job,
    cron_schedule="0 2 * * *",
    execution_timezone="UTC",
    default_status=default_schedule_status(),
    description="02:00 UTC: full key scan, one reconcile run per entity (guarded against mass deletes).",
)
def nightly_reconcile_schedule(context: dg.ScheduleEvaluationContext) -> list[dg.RunRequest]:
    tick = context.scheduled_execution_time.isoformat() if context.scheduled_execution_time else "now"
    return [
        dg.RunRequest(
            run_key=f"reconcile:{name}:{tick}",
            run_config={"ops": {"reconcile_entities": {"config": {"entities": [name]}}}},
            tags=entity_run_tags(name, "nightly_reconcile"),
        )
        for name in CATALOG.topological_order
    ]
