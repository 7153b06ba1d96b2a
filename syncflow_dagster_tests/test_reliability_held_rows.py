"""Rows SyncFlow holds (failed records, parked children) when the source deletes them or their parent.

Regression tests for the soak's failure of the retry job (issue 7): the retry
op raised until Dagster's retries ran out, and a retry could resend a record
the source had deleted. Each test syncs real stand-ins over HTTP into a real
Postgres, then compares ScheduleHub with the source in full.
"""

from __future__ import annotations

import datetime as dt

import pytest

from syncflow_dagster_tests.reliability_harness import (
    clear_faults,
    observations,
    put_faults,
    run_retry_job,
    sync_stages,
)
from syncflow_dagster_tests.sync_harness import Deployment, deployment
from syncflow_dagster_tests.verify import verify_deployment

FAMILY = ["sites", "work_centers"]
TODAY = dt.datetime.now(dt.UTC).date()
# Every row of a batch comes back `transient_failure` (retryable): one request, no waiting.
EVERY_ROW_FAILS = {"partial_failure_probability": 1.0}


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Backoffs in milliseconds: the tests check outcomes, not waiting."""
    monkeypatch.setenv("SYNCFLOW_STORE_RETRY_BASE_SECONDS", "0.01")
    monkeypatch.setenv("SYNCFLOW_STORE_RETRY_JITTER", "0")
    monkeypatch.setenv("SYNCFLOW_HTTP_BACKOFF_BASE_S", "0.01")
    monkeypatch.setenv("SYNCFLOW_HTTP_BACKOFF_MAX_S", "0.1")
    monkeypatch.setenv("SYNCFLOW_HTTP_MAX_RETRY_SECONDS", "20")


def _work_centers_failed(env: Deployment) -> int:
    """Sites delivered, every work center refused by ScheduleHub: all of them open failed records."""
    sync_stages(env.resources, "sites", TODAY)
    put_faults(env.schedulehub_url, seed=1, **EVERY_ROW_FAILS)
    counts = sync_stages(env.resources, "work_centers", TODAY)
    clear_faults(env.schedulehub_url)
    assert counts["failed"] == counts["fetched"] > 0
    assert env.resources["database"].failures().count("work_centers") == counts["failed"]
    return int(counts["failed"])


def test_retry_run_whose_rows_all_go_back_to_waiting_succeeds(fresh_database_url: str) -> None:
    """Every due row's parent is gone: the rows are parked again, the op must not fail (it raised KeyError)."""
    with deployment(fresh_database_url, rows=100, seed=31) as env:
        failed = _work_centers_failed(env)
        # The source deletes every site (cascading to the work centers); the sites' run
        # deletes them in ScheduleHub before the work centers' own run sees the tombstones.
        env.apply_changes(deleted_pct=100, seed=3, entities=["sites"])
        assert sync_stages(env.resources, "sites", TODAY)["deleted_state"] > 0

        result = run_retry_job(env.resources, ["work_centers"])

        assert result.success
        (report,) = [o for o in observations(result) if o.get("entity") == "work_centers"]
        assert report["rows_retried"] == failed
        assert report["rows_pending"] == failed
        assert report["rows_delivered"] == 0
        assert report["still_failed"] == 0
        database = env.resources["database"]
        assert database.pending().count("work_centers") == failed
        assert env.schedulehub_records("work_centers").num_rows == 0
        verification = verify_deployment(env, FAMILY)
        assert verification.defects() == [], verification.describe()
