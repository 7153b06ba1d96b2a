"""Faults production inflicts, each ending with ScheduleHub compared to the source in full.

Every test runs real Dagster runs (`materialize_sync`, `retry_job`,
`reconcile_job`) against both stand-ins over HTTP and a real Postgres, then
calls `verify_deployment`: either ScheduleHub equals the source (0 lost, 0
duplicated) or each difference is held in failed_records/pending_children
with a reason, and a later retry run clears it. Small entities (sites and
their work centers, items) keep each test to seconds of work.
"""

from __future__ import annotations

import datetime as dt
import threading
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
import sqlalchemy as sa

from syncflow_dagster.clients.schedulehub import ScheduleHubClient
from syncflow_dagster.defs.resources import SyncTuning
from syncflow_dagster.defs.runner import materialize_sync, report_of
from syncflow_dagster_tests.reliability_harness import (
    clear_faults,
    faults_served,
    observations,
    put_faults,
    revoke_tokens,
    run_reconcile_job,
    run_retry_job,
)
from syncflow_dagster_tests.sync_harness import Deployment, deployment
from syncflow_dagster_tests.verify import doubly_held, verify_deployment

FAMILY = ["sites", "work_centers"]
TODAY = dt.datetime.now(dt.UTC).date()


pytestmark = pytest.mark.usefixtures("fast_retries")


def _sync(env: Deployment, *entities: str, **kwargs: Any) -> dict[str, dict[str, Any]]:
    reports = {}
    for name in entities:
        result = materialize_sync(name, TODAY, resources=env.resources, **kwargs)
        assert result.success, name
        reports[name] = report_of(result)
    return reports


def _assert_equal(env: Deployment, entities: list[str]) -> None:
    verification = verify_deployment(env, entities)
    assert verification.defects() == [], verification.describe()
    assert verification.unexplained_held() == [], verification.describe()
    assert all(v.matched > 0 for v in verification.verdicts.values()), verification.describe()


def test_apismith_429_with_retry_after_and_5xx_storms_during_fetch(fresh_database_url: str) -> None:
    with deployment(fresh_database_url, rows=100, seed=21) as env:
        put_faults(env.apismith_url, rate_limit_probability=1.0, retry_after_s=1, max_faults=3, seed=1)
        _sync(env, "sites")
        assert faults_served(env.apismith_url) == {"rate_limit": 3}
        put_faults(env.apismith_url, server_error_probability=1.0, max_faults=5, seed=2)
        _sync(env, "work_centers")
        assert faults_served(env.apismith_url) == {"server_error": 5}
        _assert_equal(env, FAMILY)


def test_schedulehub_429_5xx_and_partial_batch_failures_are_held_then_retried(
    fresh_database_url: str,
) -> None:
    with deployment(fresh_database_url, rows=100, seed=22) as env:
        put_faults(env.schedulehub_url, rate_limit_probability=1.0, retry_after_s=1, max_faults=2, seed=3)
        _sync(env, "sites")
        # Rows failing one by one inside accepted batches.
        put_faults(env.schedulehub_url, partial_failure_probability=0.3, seed=5)
        partial = _sync(env, "work_centers")["work_centers"]
        # More 5xx than the client's attempts: whole batches fail.
        put_faults(env.schedulehub_url, server_error_probability=1.0, max_faults=8, seed=4)
        env.apply_changes(updated_pct=60, seed=6, entities=["sites"])
        storm = _sync(env, "sites")["sites"]
        clear_faults(env.schedulehub_url)
        assert storm["failed"] > 0
        assert partial["failed"] > 0
        held = verify_deployment(env, FAMILY)
        assert held.defects() == [], held.describe()
        reasons = {h.reason for v in held.verdicts.values() for h in v.unexplained_held.values()}
        assert reasons <= {"http_503", "http_500", "http_502", "transient_failure"}, reasons
        assert "transient_failure" in reasons
        assert run_retry_job(env.resources).success
        _assert_equal(env, FAMILY)


def test_token_expiring_and_revoked_mid_run(fresh_database_url: str) -> None:
    with deployment(fresh_database_url, rows=100, seed=23) as env:
        # Tokens live one second while every other answer takes longer: each run outlives its tokens.
        for url in (env.apismith_url, env.schedulehub_url):
            put_faults(url, token_ttl_s=1.0, slow_probability=0.5, slow_delay_s=1.2, seed=7)
        _sync(env, "sites")
        revoke_tokens(env.apismith_url)
        revoke_tokens(env.schedulehub_url)
        _sync(env, "work_centers")
        assert faults_served(env.schedulehub_url).get("slow", 0) > 0
        clear_faults(env.apismith_url, env.schedulehub_url)
        _assert_equal(env, FAMILY)


def test_run_interrupted_mid_delivery_is_redelivered_without_duplicates(
    fresh_database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Delivery dies after half the batches were accepted; the step's retry resends all, upserts by key."""
    original = ScheduleHubClient.upsert
    interrupted = {"count": 0}

    async def dies_after_half(self: ScheduleHubClient, resource: str, records: Any) -> Any:
        if interrupted["count"] == 0 and records.num_rows > 1:
            interrupted["count"] += 1
            await original(self, resource, records.slice(0, records.num_rows // 2))
            raise ConnectionResetError("run terminated mid-delivery (injected)")
        return await original(self, resource, records)

    monkeypatch.setattr(ScheduleHubClient, "upsert", dies_after_half)
    with deployment(fresh_database_url, rows=100, seed=24) as env:
        first = _sync(env, "sites", "work_centers")
        assert interrupted["count"] == 1
        # The sites step was retried by its policy: everything committed once, nothing twice.
        assert first["sites"]["committed"] == first["sites"]["delivered"] > 0
        again = _sync(env, "sites", "work_centers")
        assert again["sites"]["delivered"] == 0
        assert again["work_centers"]["delivered"] == 0
        _assert_equal(env, FAMILY)


def test_two_runs_for_the_same_entity_at_once(fresh_database_url: str) -> None:
    with deployment(fresh_database_url, rows=100, seed=25) as env:
        _sync(env, "sites")
        env.apply_changes(updated_pct=20, inserted_pct=20, seed=8, entities=["work_centers"])
        results: dict[int, Any] = {}
        errors: list[BaseException] = []

        def run(slot: int) -> None:
            try:
                results[slot] = materialize_sync("work_centers", TODAY, resources=env.resources)
            except BaseException as exc:  # recorded and asserted below
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
        assert not any(t.is_alive() for t in threads)
        assert errors == []
        assert all(r.success for r in results.values())
        database = env.resources["database"]
        held = env.schedulehub_records("work_centers")
        assert database.state().count("work_centers") == held.num_rows
        _assert_equal(env, FAMILY)


def test_partial_key_listing_and_mass_delete_delete_nothing(fresh_database_url: str) -> None:
    with deployment(fresh_database_url, rows=400, seed=26) as env:
        _sync(env, "items")
        database = env.resources["database"]
        stored = database.state().count("items")
        # A key listing missing half the keys: the client refuses it as a partial read (the op's
        # retry then reads the full listing), so reconcile deletes nothing.
        put_faults(env.apismith_url, keys_drop_fraction=0.5, max_faults=stored // 2, seed=9)
        partial = run_reconcile_job(env.resources, ["items"])
        assert partial.success
        assert faults_served(env.apismith_url) == {"keys_dropped": stored // 2}
        retries = [repr(e.event_specific_data) for e in partial.all_events if e.is_step_up_for_retry]
        assert len(retries) == 1
        assert "IncompleteKeysError" in retries[0]
        assert "partial read" in retries[0]
        (report,) = [o for o in observations(partial) if o.get("entity") == "items"]
        assert report["to_delete"] == 0
        assert env.schedulehub_records("items").num_rows == stored == database.state().count("items")
        clear_faults(env.apismith_url)

        # A real delete within the guard (5 % of items) goes through.
        applied = env.apply_changes(deleted_pct=5, seed=10, entities=["items"])["applied"]
        assert applied["Items"]["deleted"] >= 1
        allowed = run_reconcile_job(env.resources, ["items"])
        (report,) = [o for o in observations(allowed) if o.get("entity") == "items"]
        assert report["blocked"] is False
        assert report["rows_deleted_state"] == applied["Items"]["deleted"]
        _assert_equal(env, ["items"])

        # Half the items gone at once looks like a partial read: the delete guard blocks and reports.
        before = env.schedulehub_records("items").num_rows
        mass = env.apply_changes(deleted_pct=50, seed=11, entities=["items"])["applied"]["Items"]["deleted"]
        blocked = run_reconcile_job(env.resources, ["items"])
        (report,) = [o for o in observations(blocked) if o.get("entity") == "items"]
        assert report["blocked"] is True
        assert report["to_delete"] == mass
        assert "guard" in report["reason"]
        assert env.schedulehub_records("items").num_rows == before
        # What verify sees is exactly the blocked deletes, still in ScheduleHub on purpose.
        (verdict,) = verify_deployment(env, ["items"]).verdicts.values()
        assert len(verdict.extra) == mass
        assert verdict.lost == verdict.different == verdict.duplicated == []


def test_child_days_before_parent_waits_expires_with_reason_then_retry_clears(
    fresh_database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Production's retry schedule: an expired child is not due again within this test.
    monkeypatch.setenv("SYNCFLOW_STORE_RETRY_BASE_SECONDS", "3600")
    with deployment(fresh_database_url, rows=100, seed=27) as env:
        early = _sync(env, "work_centers")["work_centers"]
        assert early["pending"] > 0
        assert early["delivered"] == 0
        database = env.resources["database"]
        # The children have waited four days.
        with database.engine.begin() as conn:
            conn.execute(
                sa.text(
                    "UPDATE syncflow.pending_children SET since = since - interval '4 days'"
                    " WHERE entity = 'work_centers'"
                )
            )
        resources = {**env.resources, "tuning": SyncTuning(pending_max_age_hours=72)}
        assert run_retry_job(resources, ["work_centers"]).success
        assert database.pending().count("work_centers") == 0
        expired = database.failures().list_failures("work_centers", "parent_missing", limit=10_000)
        assert len(expired) == early["pending"]
        assert all(f.detail.startswith("parent sites ") for f in expired)
        held = verify_deployment(env, ["work_centers"])
        assert held.defects() == [], held.describe()
        assert len(held.unexplained_held()) == early["pending"]
        _sync(env, "sites")
        # The parent arrived; the failures come due (time passes), and the next retry run clears them.
        with database.engine.begin() as conn:
            conn.execute(
                sa.text(
                    "UPDATE syncflow.failed_records SET next_retry_at = now() - interval '1 second'"
                    " WHERE entity = 'work_centers' AND resolved_at IS NULL"
                )
            )
        assert run_retry_job(resources, ["work_centers"]).success
        assert database.failures().count("work_centers") == 0
        assert database.pending().count("work_centers") == 0
        _assert_equal(env, FAMILY)


def _held_once(database: Any, entity: str, keys: int) -> tuple[list[Any], int]:
    """Every one of `keys` children is held in exactly one place; returns (open failures, parked)."""
    assert doubly_held(database.engine, entity) == []
    failures = database.failures().list_failures(entity, limit=10_000)
    parked = database.pending().count(entity)
    assert len(failures) + parked == keys
    return failures, parked


def test_an_expired_child_whose_parent_is_still_missing_is_held_in_one_place(
    fresh_database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Production's retry schedule: nothing comes due unless the test says so.
    monkeypatch.setenv("SYNCFLOW_STORE_RETRY_BASE_SECONDS", "3600")
    with deployment(fresh_database_url, rows=100, seed=29) as env:
        database = env.resources["database"]
        resources = {**env.resources, "tuning": SyncTuning(pending_max_age_hours=72)}

        def come_due() -> None:
            with database.engine.begin() as conn:
                conn.execute(
                    sa.text(
                        "UPDATE syncflow.failed_records SET next_retry_at = now() - interval '1 second'"
                        " WHERE entity = 'work_centers' AND resolved_at IS NULL"
                    )
                )

        waiting = _sync(env, "work_centers")["work_centers"]["pending"]
        assert waiting > 0
        assert _held_once(database, "work_centers", waiting)[1] == waiting
        with database.engine.begin() as conn:
            conn.execute(
                sa.text(
                    "UPDATE syncflow.pending_children SET since = since - interval '4 days'"
                    " WHERE entity = 'work_centers'"
                )
            )
        assert run_retry_job(resources, ["work_centers"]).success  # they expire: parent_missing
        failures, parked = _held_once(database, "work_centers", waiting)
        assert parked == 0
        assert {(f.reason_code, f.attempts) for f in failures} == {("parent_missing", 1)}

        # Retried while the parent is still missing: they stay failed records, one more
        # attempt each and a later retry time, and are not parked a second time.
        come_due()
        assert run_retry_job(resources, ["work_centers"]).success
        failures, parked = _held_once(database, "work_centers", waiting)
        assert parked == 0
        assert {(f.reason_code, f.attempts) for f in failures} == {("parent_missing", 2)}
        assert all(
            f.next_retry_at is not None and f.next_retry_at > dt.datetime.now(dt.UTC) for f in failures
        )

        # A sync that sees them changed at the source keeps them where they are, with the new payload.
        env.apply_changes(updated_pct=100, seed=30, entities=["work_centers"])
        _sync(env, "work_centers")
        failures, parked = _held_once(database, "work_centers", waiting)
        assert parked == 0
        assert {f.reason_code for f in failures} == {"parent_missing"}

        # The parent arrives; once the failures come due, a retry run clears them.
        _sync(env, "sites")
        come_due()
        assert run_retry_job(resources, ["work_centers"]).success
        assert _held_once(database, "work_centers", 0) == ([], 0)
        _assert_equal(env, FAMILY)


def _with_db(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, parts.fragment))


def test_postgres_connections_cut_mid_run(dedicated_postgres: str) -> None:
    with deployment(dedicated_postgres, rows=100, seed=28) as env:
        _sync(env, "sites")
        env.apply_changes(updated_pct=30, inserted_pct=10, seed=11, entities=["work_centers"])
        # Delivery is slow, so the run is inside its deliver step when every connection is cut.
        put_faults(env.schedulehub_url, slow_probability=1.0, slow_delay_s=3.0, max_faults=1, seed=12)
        outcome: dict[str, Any] = {}
        run = threading.Thread(
            target=lambda: outcome.setdefault(
                "result",
                materialize_sync("work_centers", TODAY, resources=env.resources, raise_on_error=False),
            )
        )
        run.start()
        cut = 0
        for _ in range(100):  # bounded: until the slow answer is being served
            if faults_served(env.schedulehub_url).get("slow"):
                break
            threading.Event().wait(0.1)
        database_name = urlsplit(dedicated_postgres).path.lstrip("/")
        with psycopg.connect(_with_db(dedicated_postgres, "postgres"), autocommit=True) as conn:
            row = conn.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = %s AND pid <> pg_backend_pid()",
                (database_name,),
            ).fetchone()
            cut = int(row[0]) if row else 0
        run.join(timeout=300)
        assert not run.is_alive()
        assert cut > 0
        if not outcome["result"].success:
            # The run failed on its cut connections: the rerun picks it up; nothing was marked synced early.
            _sync(env, "work_centers")
        clear_faults(env.schedulehub_url)
        _assert_equal(env, FAMILY)
