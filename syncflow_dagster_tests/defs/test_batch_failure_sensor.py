"""batch_failure_sensor: a run that dies before its report stage does not leave its batch 'running'."""

from __future__ import annotations

import datetime as dt

import dagster as dg

from syncflow_dagster.defs import bookkeeping
from syncflow_dagster.defs.resources import SyncDatabase
from syncflow_dagster.defs.sensors import batch_failure_sensor


@dg.op
def _dies() -> None:
    raise RuntimeError("the step's process went away")


@dg.job
def _failing_job() -> None:
    _dies()


def _failure_context(
    instance: dg.DagsterInstance, database: SyncDatabase, run: dg.DagsterRun
) -> dg.RunFailureSensorContext:
    failure = next(
        record.event_log_entry.dagster_event
        for record in instance.get_records_for_run(run.run_id).records
        if record.event_log_entry.dagster_event is not None
        and record.event_log_entry.dagster_event.event_type == dg.DagsterEventType.RUN_FAILURE
    )
    assert failure is not None
    return dg.build_run_status_sensor_context(
        sensor_name="batch_failure_sensor",
        dagster_event=failure,
        dagster_instance=instance,
        dagster_run=run,
        resources={"database": database},
    ).for_run_failure()


def test_a_failed_runs_batches_are_closed_as_failed_and_a_reexecution_reopens_them(
    fresh_database_url: str,
) -> None:
    database = SyncDatabase(url=fresh_database_url)
    batches = database.batches()
    day = dt.date(2026, 11, 2)
    with dg.instance_for_test() as instance:
        failed = _failing_job.execute_in_process(instance=instance, raise_on_error=False)
        assert not failed.success
        run = failed.dagster_run
        # Two entities' batches opened by the failed run, and one of another run that is still going.
        sites = bookkeeping.batch_for_run(database, "sites", day, run.run_id)
        items = bookkeeping.batch_for_run(database, "items", day, run.run_id)
        other = batches.start_batch("sites", day, "another-run-still-going")

        batch_failure_sensor(_failure_context(instance, database, run))

        for batch in (sites, items):
            record = batches.get(batch)
            assert record.status == "failed"
            assert record.finished_at is not None
        assert batches.get(other).status == "running"
        assert batches.get(other).finished_at is None

        # A second evaluation finds nothing left to close (idempotent).
        assert batches.fail_running(run.run_id) == []

    # A re-execution of the failed run files its stages under the root run's batch:
    # it reopens that batch instead of starting another.
    assert bookkeeping.batch_for_run(database, "sites", day, run.run_id) == sites
    reopened = batches.get(sites)
    assert reopened.status == "running"
    assert reopened.finished_at is None
    assert batches.get(items).status == "failed"
    assert [b.id for b in batches.list_by_run(run.run_id)] == sorted([sites, items])


def test_a_cancelled_runs_batch_is_cancelled_with_the_counts_of_the_stages_that_finished(
    fresh_database_url: str,
) -> None:
    from syncflow_dagster.defs.sensors import batch_cancel_sensor

    database = SyncDatabase(url=fresh_database_url)
    batches = database.batches()
    day = dt.date(2026, 11, 3)
    with dg.instance_for_test() as instance:
        run = instance.create_run_for_job(_failing_job)
        batch = bookkeeping.batch_for_run(database, "items", day, run.run_id)
        bookkeeping.record_stage(database, batch, "items", "fetch", 40, 1.5, {"fetched": 40, "tombstones": 2})
        bookkeeping.record_stage(
            database, batch, "items", "normalize", 40, 0.5, {"normalized": 39, "rejected": 1}
        )
        # The deliver stage was under way when the operator cancelled: it never finished.
        database.events().record_start(batch, "items", "deliver")
        instance.report_run_canceled(run)
        canceled = next(
            record.event_log_entry.dagster_event
            for record in instance.get_records_for_run(run.run_id).records
            if record.event_log_entry.dagster_event is not None
            and record.event_log_entry.dagster_event.event_type == dg.DagsterEventType.RUN_CANCELED
        )
        context = dg.build_run_status_sensor_context(
            sensor_name="batch_cancel_sensor",
            dagster_event=canceled,
            dagster_instance=instance,
            dagster_run=instance.get_run_by_id(run.run_id),
            resources={"database": database},
        )
        batch_cancel_sensor(context)

    record = batches.get(batch)
    assert record.status == "cancelled"
    assert record.finished_at is not None
    assert record.counts == {"fetched": 40, "tombstones": 2, "normalized": 39, "rejected": 1}
    assert record.stage_seconds == {"fetch": 1.5, "normalize": 0.5}
    assert (record.cancelled_closes, record.failed_closes) == (1, 0)

    # Resumed: the re-execution continues the same batch, which closes with every stage.
    assert bookkeeping.batch_for_run(database, "items", day, run.run_id) == batch
    assert batches.get(batch).status == "running"
    bookkeeping.record_stage(database, batch, "items", "deliver", 39, 2.0, {"delivered": 39, "failed": 0})
    bookkeeping.finish_from_events(database, batch)
    done = batches.get(batch)
    assert done.status == "succeeded"
    assert done.counts["fetched"] == 40
    assert done.counts["delivered"] == 39
    assert done.cancelled_closes == 1  # the cancel happened, and stays counted
