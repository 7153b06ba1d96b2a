"""Target repair end to end: checks that tell the truth, the target audit, resync.

A ScheduleHub that loses its records (restored from a backup, a stand-in
started empty) is invisible to an incremental sync, which skips what it
delivered already. The audit finds the drift per entity, `resync` and the
audit's repair deliver it again, idempotently, and the checks of a partition
whose run failed rows warn with the counts.
"""

import asyncio
import datetime as dt
from typing import Any

import dagster as dg
import pyarrow as pa
import pytest

from syncflow_dagster.defs.assets import CATALOG, FRESHNESS_CHECK, STAGE_ASSETS
from syncflow_dagster.defs.audit import (
    AUDIT_CHECK,
    SCHEDULEHUB_RECORDS,
    target_audit_job,
    target_matches_state,
)
from syncflow_dagster.defs.checks import entity_synced_recently
from syncflow_dagster.defs.partitions import sync_partition_key
from syncflow_dagster.defs.runner import materialize_sync, report_of, sync_all
from syncflow_dagster.engine import columns as c
from syncflow_dagster_tests.sync_harness import Deployment, deployment


def _audit(env: Deployment, instance: dg.DagsterInstance, **config: Any) -> dg.AssetCheckEvaluation:
    job = dg.Definitions(
        assets=[*STAGE_ASSETS, SCHEDULEHUB_RECORDS],
        asset_checks=[target_matches_state],
        jobs=[target_audit_job],
        resources=env.resources,
    ).get_job_def("target_audit")
    result = job.execute_in_process(
        instance=instance, run_config={"ops": {f"schedulehub_records_{AUDIT_CHECK}": {"config": config}}}
    )
    assert result.success
    (evaluation,) = result.get_asset_check_evaluations()
    assert evaluation.check_name == AUDIT_CHECK
    return evaluation


def _per_entity(evaluation: dg.AssetCheckEvaluation) -> dict[str, dict[str, Any]]:
    value: Any = evaluation.metadata["per_entity"].value
    return value


def _target_equals_state(env: Deployment) -> None:
    """ScheduleHub holds exactly the keys SyncFlow's state holds, entity by entity."""
    database = env.resources["database"]
    for name in CATALOG.topological_order:
        held = set(database.state().load_state(name, (c.BK,)).column(c.BK).to_pylist())
        target = set(
            env.schedulehub_records(CATALOG.entity(name).resource).column("external_key").to_pylist()
        )
        assert target == held, name


def _upsert(env: Deployment, resource: str, rows: pa.Table) -> pa.Table:
    async def send() -> pa.Table:
        async with env.resources["schedulehub"].client() as client:
            return await client.upsert(resource, rows)

    return asyncio.run(send())


def test_checks_are_per_partition_and_freshness_judges_its_own_entity(fresh_database_url: str) -> None:
    today = dt.datetime.now(dt.UTC).date()
    with deployment(fresh_database_url, rows=60, seed=5) as env:
        key = sync_partition_key("sites", today)
        # The first sync of one entity: its freshness is green though six others never ran.
        result = dg.materialize([*STAGE_ASSETS, FRESHNESS_CHECK], partition_key=key, resources=env.resources)
        evaluations = {e.check_name: e for e in result.get_asset_check_evaluations()}
        assert set(evaluations) == {
            "business_keys_unique_and_present",
            "pending_children_within_age",
            "delivered_equals_committed",
            "no_failed_rows",
            "entity_synced_recently",
        }
        for name, evaluation in evaluations.items():
            assert evaluation.partition == key, name
        fresh = evaluations["entity_synced_recently"]
        assert fresh.passed
        assert fresh.metadata["entity"].value == "sites"
        assert evaluations["no_failed_rows"].passed
        # An entity never synced fails its own freshness, naming only itself.
        stale = entity_synced_recently(env.resources["database"], "items", 26.0)
        assert not stale.passed
        assert stale.severity == dg.AssetCheckSeverity.WARN
        assert stale.metadata["entity"].value == "items"
        assert stale.description == "items: no successful sync yet"
        assert entity_synced_recently(env.resources["database"], "sites", 26.0).passed


@pytest.mark.slow
def test_a_target_that_lost_records_is_audited_resynced_and_repaired(fresh_database_url: str) -> None:
    today = dt.datetime.now(dt.UTC).date()
    with deployment(fresh_database_url, rows=150, seed=9) as env:
        instance = dg.DagsterInstance.ephemeral()
        database = env.resources["database"]
        assert all(r.success for r in sync_all(today, resources=env.resources, instance=instance).values())
        clean = _audit(env, instance)
        assert clean.passed, clean.description
        assert clean.metadata["missing_in_target"].value == 0
        assert clean.metadata["differing"].value == 0

        # ScheduleHub loses every record; SyncFlow's state still says they were delivered.
        env.admin(env.schedulehub_url, "POST", "/admin/reset")
        held = {name: database.state().count(name) for name in CATALOG.topological_order}
        lost = _audit(env, instance)
        assert not lost.passed
        assert lost.severity == dg.AssetCheckSeverity.ERROR
        assert {name: found["missing_in_target"] for name, found in _per_entity(lost).items()} == held
        assert "syncflow resync" in (lost.description or "")

        # The issue: a full-window re-read skips what it delivered already.
        full = report_of(
            materialize_sync("sites", today, resources=env.resources, instance=instance, full_window=True)
        )
        assert full["delivered"] == 0
        # Children synced now fail: their parents are gone from ScheduleHub. The check says so.
        centers = materialize_sync(
            "work_centers", today, resources=env.resources, instance=instance, resync=True
        )
        (failed_rows,) = [
            e for e in centers.get_asset_check_evaluations() if e.check_name == "no_failed_rows"
        ]
        assert not failed_rows.passed
        assert failed_rows.severity == dg.AssetCheckSeverity.WARN
        assert failed_rows.partition == sync_partition_key("work_centers", today)
        assert failed_rows.metadata["failed"].value == held["work_centers"]
        assert failed_rows.metadata["list_them"].value == "syncflow failed list --entity work_centers"

        # A resync delivers the parent again, and doing it twice changes nothing.
        for _ in range(2):
            again = report_of(
                materialize_sync("sites", today, resources=env.resources, instance=instance, resync=True)
            )
            assert again["delivered"] == held["sites"]
            assert again["resync"] == held["sites"]
            assert again["failed"] == 0
        assert env.schedulehub_records("sites").num_rows == held["sites"]

        # The audit's repair delivers the rest, parents first, and closes the children's failures.
        repaired = _audit(env, instance, repair=True)
        assert repaired.passed, repaired.description
        per_entity = _per_entity(repaired)
        assert per_entity["sites"]["missing_in_target"] == 0
        assert per_entity["operations"]["repaired"] == held["operations"]
        _target_equals_state(env)
        assert database.failures().count() == 0
        assert _audit(env, instance).passed

        # A record changed behind SyncFlow's back, and one SyncFlow never sent.
        site = env.schedulehub_records("sites").slice(0, 1)
        changed = pa.table(
            {c.BK: site["external_key"], "site_code": site["site_code"], "name": ["changed by hand"]}
        )
        extra = pa.table({c.BK: ["ZZEXTRA"], "site_code": ["ZZEXTRA"], "name": ["not from the ERP"]})
        for rows in (changed, extra):
            assert _upsert(env, "sites", rows)["status"].to_pylist() == ["accepted"]
        drift = _per_entity(_audit(env, instance))["sites"]
        assert drift["differing"] == 1
        assert drift["sample_differing"] == site["external_key"].to_pylist()
        assert drift["extra_in_target"] == 1
        assert drift["sample_extra"] == ["ZZEXTRA"]
        fixed = _audit(env, instance, repair=True, entities=["sites"])
        assert not fixed.passed  # the extra record is reported, never deleted by the audit
        assert fixed.severity == dg.AssetCheckSeverity.WARN
        assert _per_entity(fixed)["sites"]["repaired"] == 1
        assert _per_entity(_audit(env, instance, entities=["sites"]))["sites"]["differing"] == 0


@pytest.mark.parametrize("bad", ["nope"])
def test_the_audit_refuses_an_unknown_entity(fresh_database_url: str, bad: str) -> None:
    with deployment(fresh_database_url, rows=20) as env:
        job = dg.Definitions(
            assets=[*STAGE_ASSETS, SCHEDULEHUB_RECORDS],
            asset_checks=[target_matches_state],
            jobs=[target_audit_job],
            resources=env.resources,
        ).get_job_def("target_audit")
        result = job.execute_in_process(
            run_config={"ops": {f"schedulehub_records_{AUDIT_CHECK}": {"config": {"entities": [bad]}}}},
            raise_on_error=False,
        )
        assert not result.success
