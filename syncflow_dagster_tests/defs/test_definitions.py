"""The whole code location loads: the stages in order, the sync job's partitions, checks, sensors and schedules."""

import datetime as dt
import itertools
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from syncflow_dagster.catalog import default_catalog
from syncflow_dagster.definitions import defs
from syncflow_dagster.defs.assets import STAGE_ASSETS
from syncflow_dagster.defs.partitions import (
    PARTITIONS_START_ENV,
    partitions_start,
    sync_partition_key,
    sync_partitions,
)

ROOT = Path(__file__).resolve().parents[2]
STAGES = [
    "extracted",
    "normalized",
    "identified",
    "fresh_rows",
    "delta_plan",
    "resolved",
    "delivered",
    "committed",
    "sync_report",
]


def test_definitions_load_with_the_nine_stages_in_order() -> None:
    repo = defs.get_repository_def()
    graph = repo.asset_graph
    keys = {key.to_user_string() for key in graph.get_all_asset_keys()}
    assert set(STAGES) <= keys
    # Each stage depends on exactly the one before it.
    for upstream, downstream in itertools.pairwise(STAGES):
        parents = {k.to_user_string() for k in graph.get(dg.AssetKey(downstream)).parent_keys}
        assert parents == {upstream}, downstream
    assert {job.name for job in repo.get_all_jobs()} >= {"sync", "reconcile", "retry"}
    assert {s.name for s in repo.sensor_defs} == {
        "apismith_change_sensor",
        "pending_children_sensor",
        "batch_failure_sensor",
        "batch_cancel_sensor",
    }
    assert {s.name for s in repo.schedule_defs} == {"retry_failed_records", "nightly_reconcile"}


def test_the_sync_job_runs_the_nine_stages_for_any_entity_and_day_up_to_today() -> None:
    job = defs.get_repository_def().get_job("sync")
    # One run of `sync` materialises the nine stages, no more, no fewer.
    assert {k.to_user_string() for k in job.asset_layer.executable_asset_keys} == set(STAGES)
    # What a run or a backfill can target: every catalog entity on every day up to today (UTC).
    assert job.partitions_def is not None
    keys = set(job.partitions_def.get_partition_keys())
    today = dt.datetime.now(dt.UTC).date()
    for entity in default_catalog().topological_order:
        assert str(sync_partition_key(entity, today)) in keys, entity
        assert str(sync_partition_key(entity, partitions_start())) in keys, entity
        assert str(sync_partition_key(entity, today + dt.timedelta(days=1))) not in keys, entity
    assert len(keys) == len(default_catalog().topological_order) * (
        (today - dt.date.fromisoformat(partitions_start())).days + 1
    )
    # Every stage shares that one partitioning, so a partition means the same to all nine.
    assert all(a.partitions_def == job.partitions_def for a in STAGE_ASSETS)


def test_the_first_day_comes_from_the_environment_and_a_bad_one_is_named(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(PARTITIONS_START_ENV, "2026-03-30")
    days = sync_partitions(default_catalog()).get_partitions_def_for_dimension("date")
    assert days.get_first_partition_key() == "2026-03-30"
    monkeypatch.setenv(PARTITIONS_START_ENV, "30/03/2026")
    with pytest.raises(ValueError, match=r"SYNCFLOW_PARTITIONS_START='30/03/2026' is not a date"):
        sync_partitions(default_catalog())


def test_every_check_but_the_audit_runs_in_every_sync_on_the_stage_it_judges() -> None:
    repository = defs.get_repository_def()
    everywhere = {key.name: key.asset_key.to_user_string() for key in repository.asset_graph.asset_check_keys}
    in_sync = {
        key.name: key.asset_key.to_user_string()
        for key in repository.get_job("sync").asset_layer.asset_graph.asset_check_keys
    }
    # A check defined but left out of the sync job would never run: only the target audit is.
    assert set(everywhere) - set(in_sync) == {"target_matches_state"}
    assert all(stage in STAGES for stage in in_sync.values()), in_sync
    # The stage whose output each one reads.
    assert in_sync == {
        "business_keys_unique_and_present": "delta_plan",
        "pending_children_within_age": "resolved",
        "delivered_equals_committed": "committed",
        "entity_synced_recently": "sync_report",
        "no_failed_rows": "sync_report",
    }


def test_checks_about_a_partition_are_partitioned_and_say_nothing_internal() -> None:
    graph = defs.get_repository_def().asset_graph
    specs = {key.name: graph.get_check_spec(key) for key in graph.asset_check_keys}
    for name, spec in specs.items():
        # Every check judges one entity × date partition (freshness: the partition's entity),
        # except the target audit, which reads whole entities back from ScheduleHub.
        if name != "target_matches_state":
            assert spec.partitions_def == graph.get(spec.asset_key).partitions_def, name
        assert spec.description, name
        # Descriptions are read in the UI by people who never saw the code.
        assert "SyncTuning" not in spec.description, name
        assert "freshness_hours" not in spec.description, name
    assert "syncflow failed list --entity" in specs["no_failed_rows"].description


def test_the_target_audit_runs_in_its_own_job_never_in_a_sync() -> None:
    repository = defs.get_repository_def()
    sync_checks = {key.name for key in repository.get_job("sync").asset_layer.asset_graph.asset_check_keys}
    audit_job = repository.get_job("target_audit")
    audit_checks = {key.name for key in audit_job.asset_layer.asset_graph.asset_check_keys}
    assert "target_matches_state" in audit_checks
    # The audit reads all of ScheduleHub: a sync (or a UI materialisation of the group) must not run it.
    steps = {node.name for node in repository.get_job("sync").graph.nodes}
    assert not any("target_matches_state" in step for step in steps)
    assert "no_failed_rows" in sync_checks
    assert not audit_job.asset_layer.executable_asset_keys


def test_automation_is_stopped_by_default_and_running_in_dev() -> None:
    code = (
        "from syncflow_dagster.definitions import defs;"
        "r = defs.get_repository_def();"
        "print(sorted({str(s.default_status) for s in [*r.sensor_defs, *r.schedule_defs]"
        " if s.name not in ('batch_failure_sensor', 'batch_cancel_sensor')}))"
    )
    base = {k: v for k, v in os.environ.items() if k != "SYNCFLOW_AUTOMATION"}
    stopped = subprocess.run(
        [sys.executable, "-c", code], env=base, capture_output=True, text=True, check=True
    )
    assert "RUNNING" not in stopped.stdout
    assert "STOPPED" in stopped.stdout
    running = subprocess.run(
        [sys.executable, "-c", code],
        env={**base, "SYNCFLOW_AUTOMATION": "running"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert "STOPPED" not in running.stdout
    assert "RUNNING" in running.stdout


def test_dagster_definitions_validate_passes(fresh_database_url: str) -> None:
    """`dagster definitions validate` with the repo's dagster.yaml on a Postgres instance."""
    dagster = Path(sys.executable).with_name("dagster")
    env = {**os.environ, "DAGSTER_POSTGRES_URL": fresh_database_url}
    env.pop("DAGSTER_HOME", None)
    result = subprocess.run(
        [str(dagster), "definitions", "validate", "-w", str(ROOT / "workspace.yaml")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
