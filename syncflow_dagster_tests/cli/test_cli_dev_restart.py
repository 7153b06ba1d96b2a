"""A restart of `syncflow dev` never produces failed records.

`syncflow dev` keeps SyncFlow's state and ScheduleHub's records under one
--home (cli/dev.py `stand_in_apps`). These tests run dev's own stand-ins on a
home, stop them and start them again as a restarted dev does (new secrets,
the same --home, APISmith generated from the same seed), with SyncFlow's
state in one Postgres database and one Dagster instance throughout. The
daemon and webserver are left out: what a restart loses or keeps is the
stand-ins' and the state's business (the full `syncflow dev` start and stop
is test_cli_dev.py).
"""

from __future__ import annotations

import datetime as dt
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dagster as dg

from syncflow_dagster.cli.dev import SCHEDULEHUB_DIR, stand_in_apps
from syncflow_dagster.defs.assets import CATALOG, STAGE_ASSETS
from syncflow_dagster.defs.audit import (
    AUDIT_CHECK,
    SCHEDULEHUB_RECORDS,
    target_audit_job,
    target_matches_state,
)
from syncflow_dagster.defs.configuration import deployment_environment
from syncflow_dagster.defs.runner import report_of, sync_all
from syncflow_dagster.simulators.serve import start_server
from syncflow_dagster_tests.sync_harness import Deployment, resources_for
from syncflow_dagster_tests.verify import verify_deployment

ROWS = 120
SEED = 4
TODAY = dt.datetime.now(dt.UTC).date()
CHILDREN = ["work_orders", "operations"]


@contextmanager
def dev_stand_ins(home: Path, database_url: str) -> Iterator[Deployment]:
    """One start of dev's stand-ins on `home`, with fresh secrets as each `syncflow dev` makes them."""
    client_secrets = {"apismith": secrets.token_urlsafe(16), "schedulehub": secrets.token_urlsafe(16)}
    api_app, hub_app = stand_in_apps(home, rows=ROWS, seed=SEED, client_secrets=client_secrets)
    api = start_server(api_app)
    hub = start_server(hub_app)
    try:
        resources = resources_for(
            deployment_environment(
                database_url=database_url,
                apismith_url=api.url,
                apismith_secret=client_secrets["apismith"],
                schedulehub_url=hub.url,
                schedulehub_secret=client_secrets["schedulehub"],
            )
        )
        yield Deployment(api.url, hub.url, database_url, client_secrets["apismith"], resources)
    finally:
        api.stop()
        hub.stop()


def _sync_everything(env: Deployment, instance: dg.DagsterInstance) -> dict[str, dict]:
    results = sync_all(TODAY, resources=env.resources, instance=instance, log_level="WARNING")
    assert all(r.success for r in results.values())
    return {name: report_of(r) for name, r in results.items()}


def _failed_records(env: Deployment) -> int:
    count: int = env.resources["database"].failures().count()
    return count


def _source_changes_to_children(env: Deployment) -> None:
    """Children change at the source while their parents do not: the sync skips the parents."""
    applied = env.apply_changes(updated_pct=20, inserted_pct=0, deleted_pct=0, seed=21, entities=CHILDREN)
    assert any(any(counts.values()) for counts in applied["applied"].values())


def test_dev_restarted_on_its_home_syncs_without_failed_records(
    tmp_path: Path, fresh_database_url: str
) -> None:
    home = tmp_path / "dev"
    instance = dg.DagsterInstance.ephemeral()
    with dev_stand_ins(home, fresh_database_url) as env:
        _sync_everything(env, instance)
        first = verify_deployment(env)
        assert first.equal, first.describe()
        held = {
            name: env.schedulehub_records(CATALOG.entity(name).resource).num_rows
            for name in CATALOG.topological_order
        }
    assert (home / SCHEDULEHUB_DIR).is_dir()

    with dev_stand_ins(home, fresh_database_url) as env:
        # ScheduleHub came back with everything SyncFlow's state says it delivered.
        assert {
            name: env.schedulehub_records(CATALOG.entity(name).resource).num_rows
            for name in CATALOG.topological_order
        } == held
        _source_changes_to_children(env)
        reports = _sync_everything(env, instance)
        assert sum(r["update"] for r in reports.values()) > 0
        assert sum(r["failed"] for r in reports.values()) == 0
        assert _failed_records(env) == 0
        after = verify_deployment(env)
        assert after.equal, after.describe()


def _audit(env: Deployment, instance: dg.DagsterInstance, repair: bool) -> dg.AssetCheckEvaluation:
    job = dg.Definitions(
        assets=[*STAGE_ASSETS, SCHEDULEHUB_RECORDS],
        asset_checks=[target_matches_state],
        jobs=[target_audit_job],
        resources=env.resources,
    ).get_job_def("target_audit")
    result = job.execute_in_process(
        instance=instance,
        run_config={"ops": {f"schedulehub_records_{AUDIT_CHECK}": {"config": {"repair": repair}}}},
    )
    assert result.success
    (evaluation,) = result.get_asset_check_evaluations()
    return evaluation


def test_a_target_that_came_back_empty_is_found_by_the_audit_and_repaired(
    tmp_path: Path, fresh_database_url: str
) -> None:
    home = tmp_path / "dev"
    instance = dg.DagsterInstance.ephemeral()
    with dev_stand_ins(home, fresh_database_url) as env:
        _sync_everything(env, instance)
    # What dev did before it kept ScheduleHub's records: the stand-in starts empty.
    shutil.rmtree(home / SCHEDULEHUB_DIR)

    with dev_stand_ins(home, fresh_database_url) as env:
        _source_changes_to_children(env)
        reports = _sync_everything(env, instance)
        # The changed children are refused: ScheduleHub lost the parents the sync skipped.
        assert sum(reports[name]["failed"] for name in CHILDREN) > 0
        assert _failed_records(env) > 0
        drift = _audit(env, instance, repair=False)
        assert not drift.passed
        assert drift.metadata["missing_in_target"].value > 0
        repaired = _audit(env, instance, repair=True)
        assert repaired.passed, repaired.description
        assert _failed_records(env) == 0
        after = verify_deployment(env)
        assert after.equal, after.describe()
        assert _audit(env, instance, repair=False).passed
