"""The read rule of a run (catch-up or window, open start), the partition-date clip, and the change
sensor's plan (plan_change_runs): pure functions, no servers."""

from __future__ import annotations

import datetime as dt
import uuid

import dagster as dg
import pyarrow as pa
import pytest

from syncflow_dagster.clients.apismith import Watermark
from syncflow_dagster.defs.assets import CATALOG
from syncflow_dagster.defs.reading import ReadRule, read_rule
from syncflow_dagster.defs.run_tags import RANGE_END_TAG, RANGE_START_TAG, partition_tags
from syncflow_dagster.defs.sensors import busy_entities, plan_change_runs
from syncflow_dagster.defs.stages import partition_dates

P = dt.date(2026, 11, 1)
T = dt.date(2026, 12, 6)


def _d(day: int, month: int = 11) -> dt.date:
    return dt.date(2026, month, day)


@pytest.mark.parametrize(
    ("dates", "rule"),
    [
        ((T,), ReadRule(catch_up=True, open_start=False)),  # the sensor's run of today
        ((P, T), ReadRule(catch_up=True, open_start=True)),  # history
        ((_d(20), T), ReadRule(catch_up=True, open_start=False)),
        ((T + dt.timedelta(days=1),), ReadRule(catch_up=True, open_start=False)),  # a clock ahead of ours
        ((P,), ReadRule(catch_up=False, open_start=True)),  # the first day holds everything earlier
        ((P, _d(3)), ReadRule(catch_up=False, open_start=True)),
        ((_d(10), _d(12)), ReadRule(catch_up=False, open_start=False)),
        ((T - dt.timedelta(days=1),), ReadRule(catch_up=False, open_start=False)),
    ],
)
def test_read_rule(dates: tuple[dt.date, ...], rule: ReadRule) -> None:
    assert read_rule(dates, start=P, today=T) == rule


def test_read_rule_needs_a_date() -> None:
    with pytest.raises(ValueError, match="at least one date"):
        read_rule((), start=P, today=T)


def test_partition_date_is_the_change_day_clipped_into_the_runs_days() -> None:
    changed = pa.array(
        [
            "2026-10-01T08:00:00+00:00",  # before the run: its first day
            "2026-11-12T23:59:59.999999+00:00",
            "2026-11-13T00:00:00+00:00",
            "2027-01-01T00:00:00+00:00",  # a clock ahead: the last day
            None,  # no change time: the first day
        ]
    )
    days = partition_dates(changed, (_d(11), _d(12), _d(13), _d(14)))
    assert days.to_pylist() == [_d(11), _d(12), _d(13), _d(14), _d(11)]
    # One day: every row lands on it, whatever its change time.
    assert partition_dates(changed, (T,)).to_pylist() == [T] * 5
    assert partition_dates(pa.array([], pa.string()), (P, T)).to_pylist() == []


def _marks(**given: int) -> dict[str, int]:
    return dict(given)


def _watermarks(default: int, **given: int) -> dict[str, Watermark]:
    return {
        name: Watermark(source=name, max_rowversion=given.get(name, default), row_count=1)
        for name in CATALOG.topological_order
    }


def _synced(mark: int) -> dict[str, int]:
    return dict.fromkeys(CATALOG.topological_order, mark)


def test_plan_runs_today_for_entities_behind_their_watermark_whatever_the_change_day() -> None:
    requests, left = plan_change_runs(
        _synced(100), _watermarks(100, items=130, operations=101), set(), today=T, start=P
    )
    assert [r.tags["syncflow/entity"] for r in requests] == ["items", "operations"]
    for request in requests:
        assert request.partition_key is not None
        assert request.partition_key.keys_by_dimension == {
            "entity": request.tags["syncflow/entity"],
            "date": T.isoformat(),
        }
    assert [r.run_key for r in requests] == ["catch_up:items:100:130", "catch_up:operations:100:101"]
    assert len(left) == len(CATALOG.topological_order) - 2
    assert "sites@100" in left


def test_plan_runs_history_for_an_entity_never_synced() -> None:
    marks = _synced(50)
    del marks["work_orders"]
    requests, _ = plan_change_runs(marks, _watermarks(50, work_orders=70), set(), today=T, start=P)
    (history,) = requests
    assert history.run_key == "history:work_orders:70"
    assert history.partition_key is None
    assert history.tags[RANGE_START_TAG] == f"{P.isoformat()}|work_orders"
    assert history.tags[RANGE_END_TAG] == f"{T.isoformat()}|work_orders"
    assert history.tags["syncflow/entity"] == "work_orders"
    # Partitions that start today: the history is today's single partition.
    (today_only,) = plan_change_runs(marks, _watermarks(50), set(), today=T, start=T)[0]
    assert today_only.partition_key is not None
    assert RANGE_START_TAG not in today_only.tags


def test_plan_waits_for_an_entity_with_a_run_in_flight_and_keys_runs_on_mark_and_watermark() -> None:
    behind = _watermarks(10, sites=20, items=20)
    requests, left = plan_change_runs(_synced(10), behind, {"sites"}, today=T, start=P)
    assert [r.tags["syncflow/entity"] for r in requests] == ["items"]
    assert "sites: a sync run is queued or in flight" in left
    # The same (entity, mark, watermark) is the same key: Dagster launches it once.
    again, _ = plan_change_runs(_synced(10), behind, set(), today=T, start=P)
    assert {r.run_key for r in requests} <= {r.run_key for r in again}
    # The run failed (mark unchanged) and the source moved on: a new key, so it is tried again.
    moved, _ = plan_change_runs(_synced(10), _watermarks(10, items=21), set(), today=T, start=P)
    assert [r.run_key for r in moved] == ["catch_up:items:10:21"]
    # The run succeeded (mark = the snapshot it read, at least the watermark seen): nothing.
    assert plan_change_runs(_synced(21), _watermarks(10, items=21), set(), today=T, start=P)[0] == []


def test_plan_runs_parents_first() -> None:
    requests, _ = plan_change_runs({}, _watermarks(5), set(), today=T, start=P)
    assert [r.tags["syncflow/entity"] for r in requests] == list(CATALOG.topological_order)


def test_busy_entities_are_those_with_a_sync_run_queued_or_in_flight() -> None:
    from dagster._core.storage.dagster_run import DagsterRun

    instance = dg.DagsterInstance.ephemeral()
    runs = [
        # (A QUEUED run needs a code location's origin to be stored: the filter is the same list.)
        ("sync", dg.DagsterRunStatus.STARTING, {"syncflow/entity": "items"}),
        ("sync", dg.DagsterRunStatus.STARTED, partition_tags("sites", P, T)),
        ("sync", dg.DagsterRunStatus.SUCCESS, {"syncflow/entity": "customers"}),
        ("sync", dg.DagsterRunStatus.FAILURE, {"syncflow/entity": "operations"}),
        # A backfill's run of one day over several entities (Dagster's range tags only).
        (
            "sync",
            dg.DagsterRunStatus.STARTED,
            {
                "dagster/asset_partition_range_start": f"{T.isoformat()}|sales_orders",
                "dagster/asset_partition_range_end": f"{T.isoformat()}|sales_order_lines",
            },
        ),
        ("retry", dg.DagsterRunStatus.STARTED, {"syncflow/entity": "work_orders"}),
    ]
    for job, status, tags in runs:
        instance.add_run(DagsterRun(job_name=job, run_id=str(uuid.uuid4()), status=status, tags=tags))
    # (a range of entities covers those between, in the entity dimension's order)
    assert busy_entities(instance) == {"items", "sites", "sales_orders", "work_centers", "sales_order_lines"}
