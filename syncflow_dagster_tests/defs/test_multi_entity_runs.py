"""A run over several entities, as a single-run backfill of a few days × many entities launches it.

Dagster groups a backfill of the stage assets by the partition dimension with
fewer keys, so one run may cover every entity of a day. The runs here carry
the same tags such a backfill run carries (`dagster/asset_partition_range_start`
/ `_end`) and execute in process against both stand-ins and a real Postgres:
each stage handles the run's entities parents first, so children delivered in
the same run as their parents park nothing, and ScheduleHub ends equal to the
source.
"""

from __future__ import annotations

import datetime as dt
import json

import dagster as dg
import pyarrow as pa
import pytest

from syncflow_dagster.catalog import default_catalog
from syncflow_dagster.defs.assets import CATALOG, STAGE_ASSETS
from syncflow_dagster.defs.partitions import sync_partitions
from syncflow_dagster.defs.runner import report_of
from syncflow_dagster.simulators.datagen import generate_dataset
from syncflow_dagster.store.frame_io_manager import FrameStoreError, PostgresFrameIOManager
from syncflow_dagster_tests.sync_harness import Deployment, deployment
from syncflow_dagster_tests.verify import verify_deployment

ORDER = list(CATALOG.topological_order)
RANGE_START = "dagster/asset_partition_range_start"
RANGE_END = "dagster/asset_partition_range_end"


def _range_run(env: Deployment, day: dt.date, first: str, last: str) -> dg.ExecuteInProcessResult:
    """One run over entities first..last (catalog order) of `day`, tagged as a backfill's range run."""
    return dg.materialize(
        [*STAGE_ASSETS],
        resources=env.resources,
        tags={RANGE_START: f"{day.isoformat()}|{first}", RANGE_END: f"{day.isoformat()}|{last}"},
    )


def _clean_source(rows: int, seed: int) -> dict:
    # No malformed rows: a child of a row normalize refuses would wait for good, by design.
    return generate_dataset(default_catalog(), rows, seed, bad_row_fraction=0.0)


@pytest.mark.slow
def test_one_run_over_every_entity_delivers_parents_first_and_parks_nothing(fresh_database_url: str) -> None:
    today = dt.datetime.now(dt.UTC).date()
    with deployment(fresh_database_url, dataset=_clean_source(300, 41)) as env:
        result = _range_run(env, today, ORDER[0], ORDER[-1])
        assert result.success

        database = env.resources["database"]
        assert database.pending().count() == 0
        verification = verify_deployment(env)
        assert verification.equal, verification.describe()

        # Every stage materialised every entity's partition in this one run.
        for asset in STAGE_ASSETS:
            keys = {str(m.partition) for m in result.asset_materializations_for_node(asset.key.path[-1])}
            assert keys == {f"{today.isoformat()}|{name}" for name in ORDER}, asset.key

        # The report shows totals and each entity's own counts; each entity has its own batch.
        report = report_of(result)
        per_entity = json.loads(json.dumps(report["per_entity"]))
        assert list(per_entity) == ORDER
        assert report["committed"] == sum(per_entity[name]["committed"] for name in ORDER)
        assert report["pending"] == 0
        batches = database.batches().list_by_run(result.run_id)
        assert sorted(b.entity for b in batches) == sorted(ORDER)
        for batch in batches:
            assert batch.status == "succeeded", batch
            assert batch.counts["committed"] == batch.counts["delivered"] > 0, batch
            assert batch.counts["committed"] == per_entity[batch.entity]["committed"]
        # Batches start with each entity's fetch, in the catalog's topological order.
        assert [b.entity for b in sorted(batches, key=lambda b: (b.started_at, b.id))] == ORDER

        # A second run of today reads only what changed after each entity's read-through mark: nothing.
        again = report_of(_range_run(env, today, ORDER[0], ORDER[-1]))
        assert again["fetched"] == 0
        assert again["delivered"] == 0
        assert all(database.read_marks().get(name) for name in ORDER)  # each entity's own mark


@pytest.mark.slow
def test_children_parked_on_an_earlier_day_are_released_by_the_run_that_delivers_their_parents(
    fresh_database_url: str,
) -> None:
    """Yesterday's run parks work orders whose item or sales order line changed today (and their
    operations behind them). Today's run delivers those parents ahead of their children, which
    release the parked rows in the same run, down the chain: the parents are not in the state yet
    when the children's stage runs, they arrive in this run."""
    today = dt.datetime.now(dt.UTC).date()
    yesterday = today - dt.timedelta(days=1)
    source = generate_dataset(default_catalog(), 300, 43, history_days=1, bad_row_fraction=0.0)
    with deployment(fresh_database_url, dataset=source) as env:
        database = env.resources["database"]
        first = _range_run(env, yesterday, ORDER[0], ORDER[-1])
        assert first.success
        parked = {name: database.pending().count(name) for name in ORDER}
        assert parked["work_orders"] > 0
        assert parked["operations"] > 0

        second = _range_run(env, today, ORDER[0], ORDER[-1])
        assert second.success
        per_entity = report_of(second)["per_entity"]
        # Today's run is a catch-up read and no entity has a read mark yet (yesterday's run was a
        # window read): it reads yesterday's rows again, so the parked children come back as rows of
        # this run or are released; either way, none is left waiting.
        for name in ("work_orders", "operations"):
            assert per_entity[name]["released"] <= parked[name]
            assert per_entity[name]["fetched"] >= parked[name]
        assert database.pending().count() == 0
        assert database.failures().list_failures(reason_code="parent_missing") == []
        verification = verify_deployment(env)
        assert verification.equal, verification.describe()


def test_a_single_frame_for_several_entities_is_refused(fresh_database_url: str) -> None:
    """The IO manager stores per entity: a stage over several entities must say which frame is whose."""

    @dg.asset(partitions_def=sync_partitions(CATALOG), io_manager_key="frames")
    def lumped() -> pa.Table:
        return pa.table({"n": [1]})

    today = dt.datetime.now(dt.UTC).date().isoformat()
    with pytest.raises(FrameStoreError, match="returns EntityFrames"):
        dg.materialize(
            [lumped],
            resources={"frames": PostgresFrameIOManager(database_url=fresh_database_url)},
            tags={RANGE_START: f"{today}|{ORDER[0]}", RANGE_END: f"{today}|{ORDER[1]}"},
        )


@pytest.mark.parametrize(("days", "runs", "entities_per_run"), [(3, 3, len(ORDER)), (30, len(ORDER), 1)])
def test_a_backfill_is_one_run_per_range_grouped_by_the_smaller_dimension(
    days: int, runs: int, entities_per_run: int
) -> None:
    """What docs/architecture.md promises of the single-run policy: 3 days x 8 entities is 3 runs
    of every entity, 30 days x 8 entities is 8 runs of one entity each (Dagster's own grouping)."""
    for asset in STAGE_ASSETS:
        policy = asset.backfill_policy
        assert policy is not None, asset.key
        assert policy.max_partitions_per_run is None, asset.key  # single_run
    partitions = sync_partitions(CATALOG)
    first = dt.date(2026, 1, 1)
    keys = [
        f"{(first + dt.timedelta(days=offset)).isoformat()}|{name}"
        for offset in range(days)
        for name in ORDER
    ]
    ranges = partitions.subset_with_partition_keys(keys).get_partition_key_ranges(partitions)
    assert len(ranges) == runs
    for key_range in ranges:
        covered = partitions.get_partition_keys_in_range(key_range)
        assert len({str(k).rpartition("|")[2] for k in covered}) == entities_per_run
