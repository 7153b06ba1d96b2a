"""pending_children_sensor, retry_schedule and nightly_reconcile, evaluated with Dagster's test contexts.

Retry and reconcile runs are one per entity and carry `syncflow/entity`, so the
run queue's per-entity limit covers them; the pending sensor's run key names
the set of children it releases, so an unchanged set is never released twice.
"""

from __future__ import annotations

import datetime as dt
import os
import uuid

import dagster as dg
import pyarrow as pa

from syncflow_dagster.defs.resources import SyncDatabase
from syncflow_dagster.defs.sensors import nightly_reconcile_schedule, pending_children_sensor, retry_schedule
from syncflow_dagster.engine.columns import BK, BK_HASH, DATA_HASH, RECIPE, ROWVERSION
from syncflow_dagster.store.pending import MISSING_PARENT, MISSING_PARENT_BK, MISSING_PARENT_BK_HASH


def _deliver_parents(database: SyncDatabase, entity: str, keys: list[bytes]) -> None:
    database.state().commit_delivered(
        entity,
        uuid.uuid4(),
        pa.table(
            {
                BK_HASH: pa.array(keys, pa.binary(16)),
                BK: [f"P-{i}" for i in range(len(keys))],
                DATA_HASH: pa.array([os.urandom(32) for _ in keys], pa.binary(32)),
                ROWVERSION: pa.array(range(1, len(keys) + 1), pa.int64()),
                RECIPE: pa.array([1] * len(keys), pa.int16()),
            }
        ),
    )


def _park(database: SyncDatabase, child: str, parent: str, parent_keys: list[bytes]) -> list[bytes]:
    keys = [os.urandom(16) for _ in parent_keys]
    database.pending().park(
        child,
        uuid.uuid4(),
        pa.table(
            {
                BK_HASH: pa.array(keys, pa.binary(16)),
                BK: [f"C-{k.hex()[:6]}" for k in keys],
                MISSING_PARENT: [parent] * len(keys),
                MISSING_PARENT_BK: [f"P-{i}" for i in range(len(keys))],
                MISSING_PARENT_BK_HASH: pa.array(parent_keys, pa.binary(16)),
                "payload": ["{}"] * len(keys),
            }
        ),
    )
    return keys


# No `instance=`: built with an instance_for_test, these contexts left Dagster's current
# defs-state storage pointing at the disposed instance, and later materializations in the
# same pytest session failed ("Attempted to resolve undefined DagsterInstance weakref").
# The sensor and schedules under test need no instance.
def _tick(database: SyncDatabase, cursor: str | None = None) -> dg.SensorResult | dg.SkipReason:
    context = dg.build_sensor_context(cursor=cursor, resources={"database": database})
    result = pending_children_sensor(context)
    assert isinstance(result, dg.SensorResult | dg.SkipReason)
    return result


def test_pending_sensor_run_key_names_the_releasable_set_and_repeats_while_it_is_unchanged(
    fresh_database_url: str,
) -> None:
    database = SyncDatabase(url=fresh_database_url)
    assert isinstance(_tick(database), dg.SkipReason)

    parents = [os.urandom(16) for _ in range(3)]
    _park(database, "work_centers", "sites", parents)
    # Parked, but no parent delivered yet: nothing to release.
    assert isinstance(_tick(database), dg.SkipReason)

    _deliver_parents(database, "sites", parents[:2])
    first = _tick(database)
    assert isinstance(first, dg.SensorResult)
    (request,) = first.run_requests or []
    assert request.tags["syncflow/entity"] == "work_centers"
    assert request.run_config == {
        "ops": {"retry_failed_and_pending": {"config": {"entities": ["work_centers"]}}}
    }
    assert request.run_key is not None
    assert request.run_key.startswith("release:work_centers:2:")

    # The next tick sees the same set: the same run key, whatever the cursor or the time,
    # so Dagster launches no second run for it.
    again = _tick(database, cursor=dt.datetime.now(dt.UTC).isoformat())
    assert isinstance(again, dg.SensorResult)
    assert [r.run_key for r in again.run_requests or []] == [request.run_key]

    # The third parent arrives: a new set, a new key.
    _deliver_parents(database, "sites", parents)
    changed = _tick(database)
    assert isinstance(changed, dg.SensorResult)
    (bigger,) = changed.run_requests or []
    assert bigger.run_key is not None
    assert bigger.run_key.startswith("release:work_centers:3:")
    assert bigger.run_key != request.run_key

    # Children of a second entity get a run of their own, parents first.
    orders = [os.urandom(16)]
    _deliver_parents(database, "customers", orders)
    _park(database, "sales_orders", "customers", orders)
    both = _tick(database)
    assert isinstance(both, dg.SensorResult)
    from syncflow_dagster.defs.assets import CATALOG

    expected = [n for n in CATALOG.topological_order if n in ("work_centers", "sales_orders")]
    assert [r.tags["syncflow/entity"] for r in both.run_requests or []] == expected


def _schedule_tick(database: SyncDatabase) -> dg.SkipReason | list[dg.RunRequest]:
    context = dg.build_schedule_context(
        scheduled_execution_time=dt.datetime(2026, 1, 5, 10, 15, tzinfo=dt.UTC),
        resources={"database": database},
    )
    result = retry_schedule(context)
    assert isinstance(result, dg.SkipReason | list)
    return result


def test_retry_schedule_skips_when_nothing_is_due_and_runs_one_entity_per_run(
    fresh_database_url: str,
) -> None:
    database = SyncDatabase(url=fresh_database_url)
    skipped = _schedule_tick(database)
    assert isinstance(skipped, dg.SkipReason)

    failures = pa.table(
        {
            BK_HASH: pa.array([os.urandom(16)], pa.binary(16)),
            BK: ["IT-1"],
            "reason_code": ["transient_failure"],
            "reason_class": ["retryable"],
            "detail": ["503"],
            "payload": ["{}"],
        }
    )
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=1)
    database.failures().record_failures("items", None, failures, now=past)
    # A permanent failure waits for a person: it does not make the schedule run.
    database.failures().record_failures(
        "customers",
        None,
        failures.set_column(3, "reason_class", pa.array(["permanent"])),
        now=past,
    )
    requests = _schedule_tick(database)
    assert isinstance(requests, list)
    assert [r.tags["syncflow/entity"] for r in requests] == ["items"]
    assert requests[0].run_config == {
        "ops": {"retry_failed_and_pending": {"config": {"entities": ["items"]}}}
    }


def test_nightly_reconcile_is_one_run_per_entity_tagged_with_it() -> None:
    from syncflow_dagster.defs.assets import CATALOG

    context = dg.build_schedule_context(scheduled_execution_time=dt.datetime(2026, 1, 5, 2, 0, tzinfo=dt.UTC))
    requests = nightly_reconcile_schedule(context)
    assert isinstance(requests, list)
    assert [r.tags["syncflow/entity"] for r in requests] == list(CATALOG.topological_order)
    assert all(
        r.run_config["ops"]["reconcile_entities"]["config"]["entities"] == [r.tags["syncflow/entity"]]
        for r in requests
    )
    assert len({r.run_key for r in requests}) == len(requests)
