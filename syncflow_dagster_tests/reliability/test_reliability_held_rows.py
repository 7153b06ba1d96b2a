"""Rows SyncFlow holds (failed records, parked children) when the source deletes them or their parent.

Regression tests for the soak's failure of the retry job (issue 7): the retry
op raised until Dagster's retries ran out, and a retry could resend a record
the source had deleted. Each test syncs real stand-ins over HTTP into a real
Postgres, then compares ScheduleHub with the source in full.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
import sqlalchemy as sa

from syncflow_dagster.defs import bookkeeping
from syncflow_dagster.defs.jobs import retry_job
from syncflow_dagster.defs.runner import materialize_sync, report_of
from syncflow_dagster_tests.reliability_harness import (
    clear_faults,
    observations,
    put_faults,
    run_retry_job,
    sync_entity,
)
from syncflow_dagster_tests.sync_harness import Deployment, deployment
from syncflow_dagster_tests.verify import verify_deployment

FAMILY = ["sites", "work_centers"]
TODAY = dt.datetime.now(dt.UTC).date()
# Every row of a batch comes back `transient_failure` (retryable): one request, no waiting.
EVERY_ROW_FAILS = {"partial_failure_probability": 1.0}


pytestmark = pytest.mark.usefixtures("fast_retries")


def _assert_equal(env: Deployment, entities: list[str]) -> None:
    verification = verify_deployment(env, entities)
    assert verification.defects() == [], verification.describe()
    assert verification.unexplained_held() == [], verification.describe()
    assert all(v.held == {} for v in verification.verdicts.values()), verification.describe()
    assert all(v.matched > 0 for v in verification.verdicts.values()), verification.describe()


def _stage_metadata(result: Any, asset: str) -> dict[str, Any]:
    (materialization,) = result.asset_materializations_for_node(asset)
    return {k: v.value for k, v in materialization.metadata.items()}


def _work_centers_failed(env: Deployment) -> int:
    """Sites delivered, every work center refused by ScheduleHub: all of them open failed records."""
    sync_entity(env.resources, "sites", TODAY)
    put_faults(env.schedulehub_url, seed=1, **EVERY_ROW_FAILS)
    counts = sync_entity(env.resources, "work_centers", TODAY)
    clear_faults(env.schedulehub_url)
    assert counts["failed"] == counts["fetched"] > 0
    assert env.resources["database"].failures().count("work_centers") == counts["failed"]
    return int(counts["failed"])


def test_retry_run_whose_rows_all_go_back_to_waiting_succeeds(fresh_database_url: str) -> None:
    """Every due row's parent is gone: nothing is sent, the op must not fail (it raised KeyError)."""
    with deployment(fresh_database_url, rows=100, seed=31) as env:
        failed = _work_centers_failed(env)
        # The source deletes every site (cascading to the work centers); the sites' run
        # deletes them in ScheduleHub before the work centers' own run sees the tombstones.
        env.apply_changes(deleted_pct=100, seed=3, entities=["sites"])
        assert sync_entity(env.resources, "sites", TODAY)["deleted_state"] > 0

        result = run_retry_job(env.resources, ["work_centers"])

        assert result.success
        (report,) = [o for o in observations(result) if o.get("entity") == "work_centers"]
        assert report["rows_retried"] == failed
        # Held in one place: they stay the open failed records they were, not parked as well.
        assert report["rows_failed_parent_missing_kept"] == failed
        assert report["rows_pending"] == 0
        assert report["rows_delivered"] == 0
        assert report["still_failed"] == 0
        database = env.resources["database"]
        assert database.failures().count("work_centers") == failed
        assert database.pending().count("work_centers") == 0
        assert env.schedulehub_records("work_centers").num_rows == 0
        # The work centers' run reads the tombstones: what was held for them is closed.
        counts = sync_entity(env.resources, "work_centers", TODAY)
        assert counts["held_deleted_at_source"] == failed
        assert database.failures().count("work_centers") == 0
        assert database.pending().count("work_centers") == 0
        verification = verify_deployment(env, FAMILY)
        assert verification.defects() == [], verification.describe()
        assert all(v.held == {} for v in verification.verdicts.values()), verification.describe()


def test_tombstone_of_a_failed_key_closes_it_and_the_retry_resends_nothing_deleted(
    fresh_database_url: str,
) -> None:
    """A retry resent work centers the source had deleted (`extra` in ScheduleHub); through Dagster here."""
    with deployment(fresh_database_url, rows=100, seed=32) as env:
        failed = _work_centers_failed(env)
        deleted = env.apply_changes(deleted_pct=20, seed=4, entities=["work_centers"])["applied"]
        gone = deleted["WorkCenters"]["deleted"]
        assert gone > 0

        result = materialize_sync("work_centers", TODAY, resources=env.resources)

        resolved = _stage_metadata(result, "resolved")
        assert resolved["rows_held_deleted_at_source"] == gone
        committed = _stage_metadata(result, "committed")
        assert committed["rows_deleted_never_stored"] == gone
        assert committed["rows_deleted_state"] == 0
        assert report_of(result)["delete"] == 0  # the delta plan's count: the engine skips unknown keys
        checks = result.get_asset_check_evaluations()
        assert checks
        assert all(check.passed for check in checks), [(c.check_name, c.metadata) for c in checks]
        # The deleted keys' failed records are closed; the others wait for the retry, which must
        # resend them and none of the deleted ones. (The failed sync accounted for its read, so this
        # catch-up run reads only the deletes.)
        assert env.resources["database"].failures().count("work_centers") == failed - gone
        assert run_retry_job(env.resources).success
        _assert_equal(env, FAMILY)


def test_record_schedulehub_took_without_answering_is_deleted_with_the_source(
    fresh_database_url: str,
) -> None:
    """Dropped answers: ScheduleHub holds records SyncFlow has as failed; the source's delete must reach it."""
    with deployment(fresh_database_url, rows=100, seed=33) as env:
        sync_entity(env.resources, "sites", TODAY)
        put_faults(env.schedulehub_url, drop_connection_probability=1.0, max_faults=1000, seed=5)
        counts = sync_entity(env.resources, "work_centers", TODAY)
        clear_faults(env.schedulehub_url)
        assert counts["failed"] == counts["fetched"] > 0
        # Every upsert was applied; no answer arrived.
        assert env.schedulehub_records("work_centers").num_rows == counts["fetched"]
        gone = env.apply_changes(deleted_pct=20, seed=6, entities=["work_centers"])["applied"]
        assert gone["WorkCenters"]["deleted"] > 0

        again = sync_entity(env.resources, "work_centers", TODAY)

        assert again["held_deleted_at_source"] == gone["WorkCenters"]["deleted"]
        _assert_equal(env, FAMILY)


def test_parked_child_deleted_at_the_source_is_not_released_later(fresh_database_url: str) -> None:
    """A child waiting for its parent and then deleted must not reach ScheduleHub when the parent does."""
    with deployment(fresh_database_url, rows=100, seed=34) as env:
        put_faults(env.schedulehub_url, seed=2, **EVERY_ROW_FAILS)
        assert sync_entity(env.resources, "sites", TODAY)["failed"] > 0
        clear_faults(env.schedulehub_url)
        parked = sync_entity(env.resources, "work_centers", TODAY)["pending"]
        assert parked > 0
        gone = env.apply_changes(deleted_pct=20, seed=7, entities=["work_centers"])["applied"]
        deleted = gone["WorkCenters"]["deleted"]
        assert deleted > 0

        counts = sync_entity(env.resources, "work_centers", TODAY)

        assert counts["held_deleted_at_source"] == deleted
        database = env.resources["database"]
        assert database.pending().count("work_centers") == parked - deleted
        # The sites arrive with the retry run; the surviving children are released after them.
        assert run_retry_job(env.resources).success
        _assert_equal(env, FAMILY)


def test_unreadable_payload_is_recorded_and_the_other_rows_are_retried(fresh_database_url: str) -> None:
    """A payload the catalog no longer fits (a dropped field) is that row's problem, not the retry run's."""
    with deployment(fresh_database_url, rows=100, seed=35) as env:
        failed = _work_centers_failed(env)
        database = env.resources["database"]
        with database.engine.begin() as conn:
            spoiled = conn.execute(
                sa.text(
                    "UPDATE syncflow.failed_records SET payload = payload || '{\"retired_field\": 1}'"
                    " WHERE id = (SELECT id FROM syncflow.failed_records WHERE entity = 'work_centers'"
                    " ORDER BY id LIMIT 1)"
                    " RETURNING bk"
                )
            ).scalar_one()

        result = run_retry_job(env.resources, ["work_centers"])

        assert result.success
        (report,) = [o for o in observations(result) if o.get("entity") == "work_centers"]
        assert report["rows_delivered"] == failed - 1
        (record,) = database.failures().list_failures("work_centers")
        assert record.bk == spoiled
        assert (record.reason_code, record.reason_class) == ("unreadable_payload", "permanent")
        assert "'work_centers'" in record.detail
        assert "retired_field" in record.detail
        held = verify_deployment(env, FAMILY)
        assert held.defects() == [], held.describe()
        assert held.unexplained_held() == [f"work_centers: {spoiled!r} held (permanent unreadable_payload)"]
        # A second run leaves it to a person: nothing is due.
        again = run_retry_job(env.resources, ["work_centers"])
        assert [o for o in observations(again) if o.get("entity") == "work_centers"] == []


def test_retry_op_that_must_fail_names_the_entity_and_cause_and_retries_the_others(
    fresh_database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not a row's problem (here: the store failing for one entity) still raises, but says where and why."""
    original = bookkeeping.due_failures

    def store_fails_for_items(database: Any, entity: Any, limit: int, **options: bool) -> Any:
        if entity.name == "items":
            raise RuntimeError("failed_records unreadable (injected)")
        return original(database, entity, limit, **options)

    with deployment(fresh_database_url, rows=100, seed=36) as env:
        put_faults(env.schedulehub_url, seed=3, **EVERY_ROW_FAILS)
        failed = {name: sync_entity(env.resources, name, TODAY)["failed"] for name in ("sites", "items")}
        clear_faults(env.schedulehub_url)
        assert all(failed.values()), failed
        monkeypatch.setattr(bookkeeping, "due_failures", store_fails_for_items)

        result = retry_job.execute_in_process(
            resources=env.resources,
            run_config={"ops": {"retry_failed_and_pending": {"config": {"entities": ["items", "sites"]}}}},
            raise_on_error=False,
        )

        assert not result.success
        failure = result.failure_data_for_node("retry_failed_and_pending")
        assert failure is not None
        message = str(failure.user_failure_data.description if failure.user_failure_data else failure.error)
        assert message == "retry failed for entity items: RuntimeError: failed_records unreadable (injected)"
        database = env.resources["database"]
        # Every attempt went on to the next entity: the sites were delivered all the same.
        assert database.failures().count("sites") == 0
        assert database.failures().count("items") == failed["items"]
        verification = verify_deployment(env, ["sites"])
        assert verification.defects() == [], verification.describe()
        assert verification.verdicts["sites"].held == {}
