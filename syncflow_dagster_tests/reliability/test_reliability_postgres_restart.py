"""Postgres stopped and started again under a running sync (issue 7), in pg_ctl's fast and immediate modes.

The server is an embedded one of this module's own (`module_postgres_server`,
never the shared one; each test has a database of its own on it): SyncFlow's
state store and the frame IO manager both live on it. The Dagster instance is one ephemeral (in-memory) instance shared
by every run of a test: the partition's history (the extracted frame's window
mark, which the next run resumes after) carries from run to run as it does in
production, while the restart hits exactly what this issue is about, SyncFlow's
own Postgres. (A Dagster instance on the same server would also lose its event
log writes; that is dagster-postgres's storage, not SyncFlow's.)

A slow ScheduleHub answer holds the run inside its deliver step; the server is
stopped (`pg_ctl stop -m fast|immediate`), seen down, and started again on the
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
from collections.abc import Iterator
from typing import Any

import dagster as dg
import psutil
import psycopg
import pytest

from syncflow_dagster.defs.resources import ScheduleHubResource
from syncflow_dagster.defs.runner import materialize_sync, report_of
from syncflow_dagster.store.embedded import EmbeddedPostgres
from syncflow_dagster_tests.conftest import DedicatedPostgres
from syncflow_dagster_tests.isolation import scratch_database
from syncflow_dagster_tests.reliability_harness import clear_faults, faults_served, put_faults, run_retry_job
from syncflow_dagster_tests.sync_harness import Deployment, deployment
from syncflow_dagster_tests.verify import Verification, verify_deployment
from syncflow_dagster_tests.waiting import wait_until

TODAY = dt.datetime.now(dt.UTC).date()
FAMILY = ["sites", "work_centers"]
ROWS = 400
# ScheduleHub holds its first delivery answer this long: the whole outage (stop, start with
# crash recovery: about 4 s here) lies inside it, with room to spare on a loaded machine.
SLOW_DELIVERY_S = 10.0
WAIT_S = 120.0


# Both modes restart the same server (one start saved), each in a database of its own.
pytestmark = [pytest.mark.usefixtures("fast_retries"), pytest.mark.xdist_group("postgres-restart")]


@pytest.fixture
def dedicated_postgres_server(module_postgres_server: EmbeddedPostgres) -> Iterator[DedicatedPostgres]:
    """This module's own server (never the shared one) and a database of this test's own on it."""
    with scratch_database(module_postgres_server.url, "syncflow_restart") as url:
        yield DedicatedPostgres(module_postgres_server, url)


def _sync(env: Deployment, entity: str, instance: dg.DagsterInstance) -> dict[str, Any]:
    result = materialize_sync(entity, TODAY, resources=env.resources, instance=instance)
    assert result.success, entity
    return report_of(result)


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


def _stage_rows(url: str, table: str) -> tuple[int, int]:
    """(rows found, rows the frame IO manager recorded as written) of one stage table."""
    with psycopg.connect(url) as conn:
        # Each stored chunk of the frame records its row count.
        found = conn.execute(f'SELECT coalesce(sum(rows), 0) FROM syncflow_stage."{table}"').fetchone()
        recorded = conn.execute(
            "SELECT coalesce(sum(row_count), 0) FROM syncflow_stage._slices WHERE table_name = %s", (table,)
        ).fetchone()
    assert found is not None
    assert recorded is not None
    return int(found[0]), int(recorded[0])


def _failure_messages(result: dg.ExecuteInProcessResult) -> list[str]:
    return [str(e.step_failure_data.error) for e in result.all_events if e.is_step_failure]


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_postgres_stopped_and_restarted_mid_run(
    dedicated_postgres_server: DedicatedPostgres, mode: str
) -> None:
    pg = dedicated_postgres_server
    with dg.DagsterInstance.ephemeral() as instance, deployment(pg.url, rows=ROWS, seed=31) as env:
        # Small delivery batches: the slow answer is the first of several, the rest wait behind it.
        env.resources["schedulehub"] = ScheduleHubResource(
            base_url=env.schedulehub_url, client_id="syncflow", client_secret=env.secret, batch_size=10
        )
        _sync(env, "sites", instance)
        put_faults(
            env.schedulehub_url, slow_probability=1.0, slow_delay_s=SLOW_DELIVERY_S, max_faults=1, seed=13
        )
        outcome: dict[str, dg.ExecuteInProcessResult] = {}
        run = threading.Thread(
            target=lambda: outcome.setdefault(
                "result",
                materialize_sync(
                    "work_centers", TODAY, resources=env.resources, instance=instance, raise_on_error=False
                ),
            ),
            name="work_centers sync",
            daemon=True,  # a run that outlives its bound must not keep the test process alive
        )
        run.start()
        try:
            wait_until(
                lambda: faults_served(env.schedulehub_url).get("slow") == 1,
                "the slow delivery answer",
                timeout_s=30,
                interval_s=0.05,
            )
            assert run.is_alive()  # inside its deliver step, waiting for ScheduleHub's first answer
            pid_before = pg.server.pid
            assert pid_before is not None
            pg.server.stop_server(mode)
            assert _server_is_down(pg.url)
            # Down for good, not restarting on its own: the old postmaster is gone.
            wait_until(lambda: not psutil.pid_exists(pid_before), "the old postmaster to exit", timeout_s=30)
            assert _server_is_down(pg.url)
        finally:
            pg.server.start_server()
        assert pg.server.pid != pid_before
        assert not _server_is_down(pg.url)
        # The fault did what it says: a clean stop keeps the UNLOGGED frames, crash recovery empties them.
        found, written = _stage_rows(pg.url, "identified__work_centers")
        assert written > 0
        assert found == (0 if mode == "immediate" else written)

        run.join(timeout=WAIT_S)
        assert not run.is_alive(), f"the run did not end within {WAIT_S:g} s"
        first = outcome["result"]
        clear_faults(env.schedulehub_url)
        if first.success:
            # Recovered (the deliver step's retry, pool_pre_ping): everything planned was committed.
            report = report_of(first)
            assert report["insert"] == report["delivered"] == report["committed"] == written
        else:
            # Failed, saying why and what to do: a frame crash recovery emptied is never synced as empty.
            messages = _failure_messages(first)
            assert messages, "a failed run names its failed step"
            assert all("lost rows" in m and "Run the partition again" in m for m in messages), messages
        if mode == "fast":
            assert first.success, _failure_messages(first)

        # Rerun the partition, then the retry job: ScheduleHub equals the source, the state equals ScheduleHub.
        rerun = _sync(env, "work_centers", instance)
        assert rerun["failed"] == 0
        assert rerun["committed"] == rerun["delivered"] == (0 if first.success else written)
        assert run_retry_job(env.resources).success
        database = env.resources["database"]
        assert database.failures().count("work_centers") == 0
        assert database.pending().count("work_centers") == 0
        verification = _assert_equal(env, FAMILY)
        assert verification.verdicts["work_centers"].matched == written
        _assert_state_is_hub(env, FAMILY)

        # The state is whole: a later change set, deletes included, lands exactly.
        env.apply_changes(updated_pct=20, inserted_pct=10, deleted_pct=10, seed=14, entities=["work_centers"])
        after = _sync(env, "work_centers", instance)
        assert after["delete"] > 0
        assert after["committed"] == after["delivered"] > 0
        _assert_equal(env, FAMILY)
        _assert_state_is_hub(env, FAMILY)
