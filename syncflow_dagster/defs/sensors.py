"""Sensors and schedules that start syncs by themselves.

* `apismith_change_sensor` reads each entity's APISmith watermark (cheap), keeps
  the last one seen per entity in its cursor, and asks for a sync run only for
  entities whose watermark moved, one run per changed day, with a run key tied
  to the watermark so the same change is never synced twice by the sensor.
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
import json
import os
from typing import Any

import dagster as dg
from dagster import SensorEvaluationContext

from syncflow_dagster.defs.assets import CATALOG
from syncflow_dagster.defs.jobs import entity_run_tags, reconcile_job, retry_job, sync_job
from syncflow_dagster.defs.partitions import partitions_start, sync_partition_key
from syncflow_dagster.defs.resources import ApiSmithResource, SyncDatabase
from syncflow_dagster.defs.stages import run_async

AUTOMATION_ENV = "SYNCFLOW_AUTOMATION"


def default_status() -> dg.DefaultSensorStatus:
    running = os.environ.get(AUTOMATION_ENV, "").lower() == "running"
    return dg.DefaultSensorStatus.RUNNING if running else dg.DefaultSensorStatus.STOPPED


def default_schedule_status() -> dg.DefaultScheduleStatus:
    running = os.environ.get(AUTOMATION_ENV, "").lower() == "running"
    return dg.DefaultScheduleStatus.RUNNING if running else dg.DefaultScheduleStatus.STOPPED


async def _watermarks(client: Any) -> dict[str, Any]:
    async with client:
        return {entity.name: await client.watermark(entity.source) for entity in CATALOG.entities}


def _days(first: dt.date, last: dt.date) -> list[dt.date]:
    return [first + dt.timedelta(days=n) for n in range((last - first).days + 1)]


def plan_change_runs(
    cursor: dict[str, dict[str, Any]], watermarks: dict[str, Any], today: dt.date
) -> tuple[list[dg.RunRequest], dict[str, dict[str, Any]], list[str]]:
    """Run requests for moved watermarks, the next cursor, and the entities left unchanged.

    A moved entity gets one run per day from the day of its last synced change
    up to the day of its newest change, so a change made just before midnight
    is not missed by a run for the next day.
    """
    requests: list[dg.RunRequest] = []
    next_cursor = dict(cursor)
    unchanged: list[str] = []
    start = dt.date.fromisoformat(partitions_start())
    for name in CATALOG.topological_order:
        mark = watermarks[name]
        seen = cursor.get(name, {})
        rowversion = int(mark.max_rowversion or 0)
        if rowversion <= int(seen.get("rowversion", 0)):
            unchanged.append(name)
            continue
        newest = mark.max_changed_at.date() if mark.max_changed_at else today
        first = dt.date.fromisoformat(seen["day"]) if "day" in seen else newest
        for day in _days(max(first, start), min(newest, today)):
            requests.append(
                dg.RunRequest(
                    run_key=f"{name}:{day.isoformat()}:{rowversion}",
                    partition_key=sync_partition_key(name, day),
                    tags={"syncflow/trigger": "change_sensor", "syncflow/watermark": str(rowversion)},
                )
            )
        next_cursor[name] = {"rowversion": rowversion, "day": newest.isoformat()}
    return requests, next_cursor, unchanged


@dg.sensor(
    job=sync_job,
    minimum_interval_seconds=60,
    default_status=default_status(),
    description="Starts a sync for each entity whose APISmith watermark moved since the last tick.",
)
def apismith_change_sensor(
    context: SensorEvaluationContext, apismith: ApiSmithResource
) -> dg.SensorResult | dg.SkipReason:
    cursor = json.loads(context.cursor) if context.cursor else {}
    watermarks = run_async(_watermarks(apismith.client()))
    requests, next_cursor, unchanged = plan_change_runs(cursor, watermarks, dt.datetime.now(dt.UTC).date())
    if not requests:
        return dg.SkipReason(
            f"no APISmith watermark moved since the last tick ({len(unchanged)} entities checked: "
            + ", ".join(f"{n}@{cursor.get(n, {}).get('rowversion', 0)}" for n in unchanged)
            + ")"
        )
    return dg.SensorResult(run_requests=requests, cursor=json.dumps(next_cursor, sort_keys=True))


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
