"""The whole code location loads, and what the UI shows is described, grouped, kinded and checked."""

import itertools
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg

from syncflow_dagster.definitions import defs
from syncflow_dagster.defs.assets import STAGE_ASSETS

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


def test_every_stage_is_described_grouped_kinded_owned_and_partitioned() -> None:
    for assets_def in STAGE_ASSETS:
        spec = next(iter(assets_def.specs))
        assert spec.group_name == "sync"
        assert spec.description
        assert len(spec.description) > 40
        assert "python" in spec.kinds
        assert spec.owners == ["team:syncflow"]
        partitions = assets_def.partitions_def
        assert isinstance(partitions, dg.MultiPartitionsDefinition)
        assert {d.name for d in partitions.partitions_defs} == {"entity", "date"}


def test_checks_are_attached_to_the_stages_they_judge() -> None:
    checks = {
        key.name: key.asset_key.to_user_string()
        for assets_def in defs.get_repository_def().asset_graph.asset_check_keys
        for key in [assets_def]
    }
    assert checks["business_keys_unique_and_present"] == "delta_plan"
    assert checks["pending_children_within_age"] == "resolved"
    assert checks["delivered_equals_committed"] == "committed"
    assert checks["entities_synced_recently"] == "sync_report"


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
