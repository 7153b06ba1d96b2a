"""Postgres stopped and started again under a running sync (issue 7), in pg_ctl's fast and immediate modes.

The server is an embedded one of the test's own (`dedicated_postgres_server`,
never the shared one): SyncFlow's state store and the frame IO manager both
live on it. The Dagster instance is one ephemeral (in-memory) instance shared
by every run of a test: the partition's history (the extracted frame's window
mark, which the next run resumes after) carries from run to run as it does in
production, while the restart hits exactly what this issue is about, SyncFlow's
own Postgres. (A Dagster instance on the same server would also lose its event
log writes; that is dagster-postgres's storage, not SyncFlow's.)

A slow ScheduleHub answer holds the run inside its deliver step; the server is
stopped (`pg_ctl stop -m fast|immediate`), kept down, and started again on the
same data directory and socket. An immediate stop makes the next start run
crash recovery, which empties every UNLOGGED stage table while the logged
state tables keep their rows. The run then fails or recovers; the partition is
run again, then the retry job, and ScheduleHub must equal the source with
nothing lost, duplicated, different or extra, and SyncFlow's state must hold
exactly what ScheduleHub holds (a later change set, deletes included, then
syncs as well).
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from typing import Any

import dagster as dg
import psycopg
import pytest

from syncflow_dagster.defs.resources import ScheduleHubResource
from syncflow_dagster.defs.runner import materialize_sync, report_of
from syncflow_dagster_tests.conftest import DedicatedPostgres
from syncflow_dagster_tests.reliability_harness import clear_faults, faults_served, put_faults, run_retry_job
from syncflow_dagster_tests.sync_harness import Deployment, deployment
from syncflow_dagster_tests.verify import Verification, verify_deployment

TODAY = dt.datetime.now(dt.UTC).date()
FAMILY = ["sites", "work_centers"]
ROWS = 400
# ScheduleHub holds its first delivery answer this long: the whole outage lies inside it.
SLOW_DELIVERY_S = 8.0
DOWN_S = 2.0
WAIT_S = 120.0


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Backoffs in milliseconds: the test checks outcomes, not waiting."""
    monkeypatch.setenv("SYNCFLOW_STORE_RETRY_BASE_SECONDS", "0.01")
    monkeypatch.setenv("SYNCFLOW_STORE_RETRY_JITTER", "0")
    monkeypatch.setenv("SYNCFLOW_HTTP_BACKOFF_BASE_S", "0.01")
    monkeypatch.setenv("SYNCFLOW_HTTP_BACKOFF_MAX_S", "0.1")
    monkeypatch.setenv("SYNCFLOW_HTTP_MAX_RETRY_SECONDS", "20")


def _sync(env: Deployment, entity: str, instance: dg.DagsterInstance) -> dict[str, Any]:
    result = materialize_sync(entity, TODAY, resources=env.resources, instance=instance)
    assert result.success, entity
    return report_of(result)


def _wait_until(condition: Any, what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(0.05)


def _server_is_down(url: str) -> bool:
    try:
        with psycopg.connect(url, connect_timeout=2):
            return False
    except psycopg.OperationalError:
        return True


def _assert_equal(env: Deployment, entities: list[str]) -> Verification:
    verification = verify_deployment(env, entities)
    assert verification.defects() == [], verification.describe()
    assert verification.unexplained_held() == [], verification.describe()
    for verdict in verification.verdicts.values():
        assert verdict.matched == verdict.source_rows - verdict.refused_rows > 0, verification.describe()
        assert (len(verdict.lost), len(verdict.duplicated), len(verdict.different), len(verdict.extra)) == (
            0,
            0,
            0,
            0,
        ), verification.describe()
    return verification


def _assert_state_is_hub(env: Deployment, entities: list[str]) -> None:
    """SyncFlow's delivered state holds one row per record ScheduleHub holds, no more, no fewer."""
    state = env.resources["database"].state()
    for entity in entities:
        assert state.count(entity) == env.schedulehub_records(entity).num_rows, entity


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_postgres_stopped_and_restarted_mid_run(dedicated_postgres_server: DedicatedPostgres, mode: str) -> None:
    pg = dedicated_postgres_server
    instance = dg.DagsterInstance.ephemeral()
    with deployment(pg.url, rows=ROWS, seed=31) as env:
        # Small delivery batches: the slow answer is the first of several, the rest wait behind it.
        env.resources["schedulehub"] = ScheduleHubResource(
            base_url=env.schedulehub_url, client_id="syncflow", client_secret=env.secret, batch_size=50
        )
        _sync(env, "sites", instance)
        put_faults(env.schedulehub_url, slow_probability=1.0, slow_delay_s=SLOW_DELIVERY_S, max_faults=1, seed=13)
        outcome: dict[str, dg.ExecuteInProcessResult] = {}
        run = threading.Thread(
            target=lambda: outcome.setdefault(
                "result",
                materialize_sync(
                    "work_centers", TODAY, resources=env.resources, instance=instance, raise_on_error=False
                ),
            ),
            name="work_centers sync",
        )
        run.start()
        try:
            _wait_until(lambda: faults_served(env.schedulehub_url).get("slow") == 1, "the slow delivery answer")
            assert run.is_alive()  # the run is inside its deliver step, waiting for ScheduleHub
            pid_before = pg.server.pid
            pg.server.stop_server(mode)
            assert _server_is_down(pg.url)
            time.sleep(DOWN_S)
            assert _server_is_down(pg.url)
        finally:
            pg.server.start_server()
        assert pg.server.pid != pid_before
        assert not _server_is_down(pg.url)
        run.join(timeout=WAIT_S)
        assert not run.is_alive(), "the run did not end within its bound"
        first = outcome["result"]
        print("FIRST", first.success, report_of(first) if first.success else None)
        for e in first.all_events:
            if e.is_step_up_for_retry or e.is_step_failure:
                print("EVENT", e.step_key, e.event_type_value, str(e.event_specific_data)[:600])
        clear_faults(env.schedulehub_url)

        # Fail or recover: either way the partition's rerun and the retry job finish the job.
        rerun = _sync(env, "work_centers", instance)
        assert run_retry_job(env.resources).success
        verification = _assert_equal(env, FAMILY)
        _assert_state_is_hub(env, FAMILY)

        # The state is whole: a later change set (deletes included) lands exactly.
        env.apply_changes(updated_pct=20, inserted_pct=10, deleted_pct=10, seed=14, entities=["work_centers"])
        after = _sync(env, "work_centers", instance)
        assert after["delete"] > 0
        _assert_equal(env, FAMILY)
        _assert_state_is_hub(env, FAMILY)
        print(
            f"mode={mode} first_run_success={first.success} "
            f"first={report_of(first) if first.success else 'failed'} rerun={rerun} "
            f"verified={verification.verdicts['work_centers'].summary()}"
        )
