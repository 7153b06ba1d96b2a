"""End to end through Dagster: stand-ins over HTTP, real Postgres, the nine stage assets.

One module-scoped deployment walks the life of a sync: the initial load of
every entity, a re-run that delivers nothing, a change set that the change
sensor notices for exactly the changed entities, and the incremental run that
delivers only what changed, after which ScheduleHub equals the source.
"""

import datetime as dt

import dagster as dg
import pyarrow.compute as pc
import pytest

from syncflow_dagster.defs import bookkeeping
from syncflow_dagster.defs.assets import CATALOG, STAGE_ASSETS
from syncflow_dagster.defs.jobs import retry_job
from syncflow_dagster.defs.runner import materialize_sync, report_of, sync_all
from syncflow_dagster.defs.sensors import apismith_change_sensor
from syncflow_dagster.store.frames.stream import EntityFrames, StoredFrame
from syncflow_dagster_tests.sync_harness import deployment


def _handed_over(result: dg.ExecuteInProcessResult) -> dict[str, set[str]]:
    """Each stage's output as the in-process run result keeps it until the run ends: the type names."""
    kept: dict[str, set[str]] = {}
    for asset in STAGE_ASSETS:
        frames = result.output_for_node(asset.key.path[-1])
        assert isinstance(frames, EntityFrames), asset.key
        kept[asset.key.path[-1]] = {type(frame).__name__ for frame in frames.values()}
    return kept


def _sensor_tick(resources: dict, instance: dg.DagsterInstance) -> dg.SensorResult | dg.SkipReason:
    context = dg.build_sensor_context(
        instance=instance, resources={"apismith": resources["apismith"], "database": resources["database"]}
    )
    return apismith_change_sensor(context)


@pytest.mark.slow
def test_initial_rerun_change_sensor_and_incremental(fresh_database_url: str) -> None:
    today = dt.datetime.now(dt.UTC).date()
    with deployment(fresh_database_url, rows=400) as env:
        # One instance for the whole story, so runs see their predecessors' history.
        instance = dg.DagsterInstance.ephemeral()
        # The first tick finds no entity synced: one history run each.
        first = _sensor_tick(env.resources, instance)
        assert isinstance(first, dg.SensorResult)
        assert all(r.run_key and r.run_key.startswith("history:") for r in first.run_requests)
        assert {r.tags["syncflow/entity"] for r in first.run_requests} == {
            "sites",
            "work_centers",
            "items",
            "customers",
            "sales_orders",
            "sales_order_lines",
            "work_orders",
            "operations",
        }

        results = sync_all(today, resources=env.resources, instance=instance)
        assert all(r.success for r in results.values())
        # A run result keeps every step's output: each stage hands over small handles, never its rows.
        for result in results.values():
            assert _handed_over(result) == {
                asset.key.path[-1]: {StoredFrame.__name__} for asset in STAGE_ASSETS
            }
        reports = {name: report_of(r) for name, r in results.items()}
        for name, report in reports.items():
            assert report["fetched"] > 0, name
            # Every fetched row is accounted for: delivered, refused by normalize, or parked/failed.
            assert report["committed"] == report["delivered"], name
            assert report["insert"] + report["rejected"] == report["fetched"], name
        held = env.schedulehub_records("work_orders")
        assert held.num_rows == reports["work_orders"]["committed"]
        assert pc.count_distinct(held["external_key"]).as_py() == held.num_rows

        # Nothing changed: the next tick skips with a reason, a re-run delivers nothing.
        skip = _sensor_tick(env.resources, instance)
        assert isinstance(skip, dg.SkipReason)
        assert "watermark is read through" in skip.skip_message
        again = report_of(materialize_sync("work_orders", today, resources=env.resources, instance=instance))
        assert again["fetched"] == 0  # resumes after what the last finished run of the day read
        assert again["delivered"] == 0
        assert again["insert"] == 0
        assert again["update"] == 0
        # Forcing a full re-read of the day fetches everything again and still delivers nothing:
        # every row is stale by rowversion.
        full = report_of(
            materialize_sync(
                "work_orders", today, resources=env.resources, instance=instance, full_window=True
            )
        )
        assert full["fetched"] == reports["work_orders"]["fetched"]
        assert full["delivered"] == 0
        assert full["stale"] == reports["work_orders"]["committed"]

        # A change set on work orders: the sensor asks for work_orders (and any entity its deletes cascaded to).
        applied = env.apply_changes(
            updated_pct=5, inserted_pct=3, deleted_pct=2, seed=11, entities=["work_orders"]
        )["applied"]
        changed = {source for source, counts in applied.items() if any(counts.values())}
        tick = _sensor_tick(env.resources, instance)
        assert isinstance(tick, dg.SensorResult)
        requested = {r.partition_key.keys_by_dimension["entity"] for r in tick.run_requests}
        source_to_entity = {"ProductionOrders": "work_orders", "ProductionOrderOperations": "operations"}
        assert requested == {source_to_entity[s] for s in changed}
        for request in tick.run_requests:
            # Keyed on (entity, read mark, APISmith watermark): one catch-up run per change seen.
            assert request.run_key == (
                f"catch_up:{request.tags['syncflow/entity']}:{request.tags['syncflow/read_mark']}:"
                f"{request.tags['syncflow/watermark']}"
            )

        incremental = report_of(
            materialize_sync("work_orders", today, resources=env.resources, instance=instance)
        )
        wo = applied["ProductionOrders"]
        assert (
            incremental["update"] + incremental["insert"] + incremental["rejected"]
            >= wo["updated"] + wo["inserted"] - 1
        )
        assert incremental["delete"] == wo["deleted"]
        assert incremental["insert"] > 0
        assert incremental["update"] > 0
        assert incremental["committed"] == incremental["delivered"]  # upserts and deletes alike
        held = env.schedulehub_records("work_orders")
        source_live = reports["work_orders"]["committed"] + incremental["insert"] - incremental["delete"]
        assert held.num_rows == source_live


def test_child_before_parent_waits_and_the_retry_job_releases_it(fresh_database_url: str) -> None:
    today = dt.datetime.now(dt.UTC).date()
    with deployment(fresh_database_url, rows=200, seed=3) as env:
        early = report_of(materialize_sync("operations", today, resources=env.resources))
        assert early["pending"] > 0
        assert early["delivered"] == 0
        assert env.schedulehub_records("operations").num_rows == 0
        database = env.resources["database"]
        parents = [n for n in CATALOG.topological_order if n != "operations"]
        assert all(r.success for r in sync_all(today, resources=env.resources, entities=parents).values())
        # The parents are in; the pending-children sensor would now start the retry job.
        # Children whose parent was itself refused by normalize (the stand-in's dirty rows) keep waiting.
        releasable = bookkeeping.releasable_counts(env.resources["database"], CATALOG)
        assert set(releasable) == {"operations"}
        assert 0 < releasable["operations"] <= early["pending"]
        result = retry_job.execute_in_process(
            resources=env.resources,
            run_config={"ops": {"retry_failed_and_pending": {"config": {"entities": ["operations"]}}}},
        )
        assert result.success
        delivered = env.schedulehub_records("operations").num_rows
        assert 0 < delivered <= releasable["operations"]
        # The rest wait for a parent the source sent a bad row for: still parked, not lost.
        assert bookkeeping.pending_stats(database, "operations")["count"] == early["pending"] - delivered
        assert database.failures().list_failures("operations", "parent_missing") == []


def test_children_parked_on_one_day_are_released_by_a_run_of_another_day(fresh_database_url: str) -> None:
    """A backfill runs entities in any order: a child parked by today's run may be released by
    yesterday's. The released rows belong to the releasing run's partition (the IO manager refuses
    rows outside the run's dates)."""
    # Two whole past days of changes, so both days' windows hold rows whatever the hour the test runs:
    # with the changes spread over the last 24 hours, "yesterday" held almost none late in the UTC day
    # (a CI run at 23:45 UTC fetched 0 rows for it).
    midnight = dt.datetime.combine(dt.datetime.now(dt.UTC).date(), dt.time(), dt.UTC)
    today = midnight.date() - dt.timedelta(days=1)
    yesterday = today - dt.timedelta(days=1)
    with deployment(fresh_database_url, rows=400, seed=5, history_days=2, as_of=midnight) as env:
        early = report_of(materialize_sync("work_centers", today, resources=env.resources))
        assert early["pending"] > 0
        for day in (yesterday, today):
            assert materialize_sync("sites", day, resources=env.resources).success
        other_day = materialize_sync("work_centers", yesterday, resources=env.resources)
        assert other_day.success
        report = report_of(other_day)
        assert report["fetched"] > 0  # yesterday's own rows, plus today's released children
        # Today's run read yesterday's rows too (a catch-up read has no time bounds): the children
        # parked then that yesterday's window reads again come in as its own rows, the rest released.
        assert 0 < report["released"] <= early["pending"]
        assert bookkeeping.pending_stats(env.resources["database"], "work_centers")["count"] == 0
        held = env.schedulehub_records("work_centers").num_rows
        assert held == report["delivered"]
        assert held >= early["pending"]
