"""No record is ever missed, and history is one run per entity: through Dagster, stand-ins over HTTP.

* Range runs (what `POST /sync --history` and a single-run backfill launch)
  succeed end to end, and their first day holds everything earlier.
* The property: random inserts, updates and deletes with change times backdated
  by up to 30 days (before the partitions' start too) or ahead of our clock,
  synced ONLY by the runs the change sensor's planning function asks for, end
  with ScheduleHub == source. On main, whose sensor ran the days from its
  cursor's last day to the newest change day and whose runs read only their
  days' windows, every backdated record was left behind.
"""

from __future__ import annotations

import datetime as dt
import random
from typing import Any

import dagster as dg
import pytest

from syncflow_dagster.defs.assets import CATALOG, STAGE_ASSETS
from syncflow_dagster.defs.partitions import PARTITIONS_START_ENV
from syncflow_dagster.defs.sensors import _watermarks, plan_change_runs
from syncflow_dagster.defs.stages import run_async
from syncflow_dagster.service.launch import SyncRequest, plan_sync
from syncflow_dagster_tests.sync_harness import Deployment, deployment
from syncflow_dagster_tests.verify import fetch_snapshot, verify_deployment

TODAY = dt.datetime.now(dt.UTC).date()
START = TODAY - dt.timedelta(days=10)


@pytest.fixture(autouse=True)
def _partitions_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """Partitions that start 10 days ago: the seeded history and the backdated changes reach before it."""
    monkeypatch.setenv(PARTITIONS_START_ENV, START.isoformat())


def _run(env: Deployment, instance: dg.DagsterInstance, tags: dict[str, str], partition_key: Any = None):
    return dg.materialize(
        [*STAGE_ASSETS],
        partition_key=partition_key,
        resources=env.resources,
        instance=instance,
        tags=tags,
        raise_on_error=False,
        run_config={"loggers": {"console": {"config": {"log_level": "WARNING"}}}},
    )


def _stage_metadata(result: dg.ExecuteInProcessResult, stage: str) -> dict[str, Any]:
    """The stage's metadata (a range run materialises each of its partitions with the same)."""
    materialization = result.asset_materializations_for_node(stage)[-1]
    return {k: v.value for k, v in materialization.metadata.items()}


def _days_changed(env: Deployment, entity: str) -> list[dt.date]:
    snapshot = fetch_snapshot(env.apismith_url, CATALOG.entity(entity).source)
    return [
        dt.date.fromisoformat(str(v)[:10]) for v in snapshot[CATALOG.entity(entity).changed_at].to_pylist()
    ]


def test_history_range_run_succeeds_and_its_first_day_holds_everything_earlier(
    fresh_database_url: str,
) -> None:
    family = ["sites", "work_centers"]
    with deployment(fresh_database_url, rows=120, seed=21, history_days=25) as env:
        assert min(_days_changed(env, "sites")) < START  # records that changed before the partitions start
        instance = dg.DagsterInstance.ephemeral()
        _, runs = plan_sync(CATALOG, SyncRequest(entities=family, history=True), today=TODAY)
        for run in runs:
            result = _run(env, instance, run.tags)
            assert result.success, run.entity
            extracted = _stage_metadata(result, "extracted")
            assert extracted["rows_fetched"] == len(_days_changed(env, run.entity))
            assert extracted["dates"].split(", ")[0] == START.isoformat()
            assert extracted["read"].startswith("catch-up: every change with rowversion in (0, ")
            committed = _stage_metadata(result, "committed")
            assert committed["read_through"] == extracted["read_snapshot"]
            assert env.resources["database"].read_marks().get(run.entity) == extracted["read_snapshot"]
        verification = verify_deployment(env, family)
        assert verification.defects() == [], verification.describe()
        assert env.schedulehub_records("sites").num_rows == len(_days_changed(env, "sites"))

        # A closed range from the partitions' start (a backfill of past days): an open start, the window's
        # end at the end of its last day; everything in it is stale by now, so nothing is delivered.
        _, (closed,) = plan_sync(
            CATALOG, SyncRequest(entities=["sites"], dates=(START, TODAY - dt.timedelta(days=2))), today=TODAY
        )
        result = _run(env, instance, closed.tags)
        assert result.success
        expected = sum(day <= TODAY - dt.timedelta(days=2) for day in _days_changed(env, "sites"))
        assert _stage_metadata(result, "extracted")["rows_fetched"] == expected
        assert _stage_metadata(result, "extracted")["read"].startswith(
            "window: changed from the beginning to "
        )
        assert _stage_metadata(result, "sync_report")["delivered"] == 0
        assert "read_through" not in _stage_metadata(result, "committed")  # a window read moves no mark


def _sensor_round(env: Deployment, instance: dg.DagsterInstance) -> int:
    """What one tick of the change sensor asks for, run in process (parents first); how many runs."""
    marks = env.resources["database"].read_marks().all()
    watermarks = run_async(_watermarks(env.resources["apismith"].client()))
    requests, _ = plan_change_runs(marks, watermarks, set(), today=TODAY, start=START)
    for request in requests:
        result = _run(env, instance, dict(request.tags), request.partition_key)
        assert result.success, request.run_key
    return len(requests)


def _change_time(rng: random.Random) -> str:
    """Backdated by up to 30 days, or a clock up to 3 hours ahead of ours."""
    now = dt.datetime.now(dt.UTC)
    if rng.random() < 0.2:
        return (now + dt.timedelta(minutes=rng.randint(1, 180))).isoformat()
    return (now - dt.timedelta(days=rng.uniform(0, 30))).isoformat()


@pytest.mark.slow
@pytest.mark.parametrize("seed", [11, 29])
def test_backdated_and_skewed_changes_synced_by_sensor_planned_runs_end_with_hub_equal_to_source(
    fresh_database_url: str, seed: int
) -> None:
    rng = random.Random(seed)
    entities = list(CATALOG.topological_order)
    with deployment(fresh_database_url, rows=60, seed=seed, history_days=20) as env:
        instance = dg.DagsterInstance.ephemeral()
        assert _sensor_round(env, instance) == len(entities)  # never synced: one history run each
        for _step in range(6):
            for _ in range(rng.randint(1, 2)):
                env.apply_changes(
                    updated_pct=rng.choice([0, 5, 20]),
                    inserted_pct=rng.choice([0, 5, 10]),
                    deleted_pct=rng.choice([0, 0, 3]),
                    seed=rng.randrange(10_000),
                    entities=rng.sample(entities, rng.randint(1, 3)),
                    changed_at=_change_time(rng),
                )
            if rng.random() < 0.7:  # the sensor does not tick after every change
                _sensor_round(env, instance)
        rounds = [_sensor_round(env, instance) for _ in range(2)]
        verification = verify_deployment(env)
        assert verification.defects() == [], verification.describe()
        # With no change, the sensor settles: every entity is read through.
        assert rounds[-1] == 0, rounds
