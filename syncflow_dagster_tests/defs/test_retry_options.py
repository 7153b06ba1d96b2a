"""The retry job's options, end to end (stand-ins over HTTP, real Postgres): permanent and dead failed
records are retried only when asked for, and then delivered and closed as `delivered`."""

from __future__ import annotations

import datetime as dt

import pyarrow as pa
import pytest

from syncflow_dagster.defs import bookkeeping
from syncflow_dagster.defs.assets import CATALOG
from syncflow_dagster.defs.jobs import retry_job
from syncflow_dagster.engine import columns as c
from syncflow_dagster.engine.identity import add_identity
from syncflow_dagster.engine.normalize import normalize
from syncflow_dagster_tests.sync_harness import deployment

ITEM = {
    "Description": "held back",
    "ItemType": "MAKE",
    "UoM": "pc",
    "StdCost": "1.5",
    "LeadTimeDays": "3",
    "Blocked": "false",
    "ModifiedAt": "2026-01-01T00:00:00Z",
}


def _fail(database: object, item_no: str, reason_class: str, rowversion: int) -> None:
    spec = CATALOG.entity("items")
    raw = pa.table({"ItemNo": [item_no], "RowVersion": [rowversion], **{k: [v] for k, v in ITEM.items()}})
    row = add_identity(spec, normalize(spec, raw).rows).append_column(c.ACTION, pa.array([c.INSERT]))
    database.failures().record_failures(  # type: ignore[attr-defined]
        "items",
        None,
        pa.table(
            {
                c.BK_HASH: row[c.BK_HASH],
                c.BK: row[c.BK],
                "reason_code": ["invalid_record" if reason_class == "permanent" else "transient_failure"],
                "reason_class": [reason_class],
                "detail": ["refused"],
                "payload": bookkeeping.row_payloads(spec, row),
            }
        ),
        now=dt.datetime.now(dt.UTC) - dt.timedelta(days=1),
    )


def _retry(env: object, **options: bool) -> None:
    config = {"entities": ["items"], **options}
    result = retry_job.execute_in_process(
        resources=env.resources,  # type: ignore[attr-defined]
        run_config={"ops": {"retry_failed_and_pending": {"config": config}}},
    )
    assert result.success


def test_permanent_and_dead_records_are_retried_only_on_request(
    fresh_database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SYNCFLOW_STORE_RETRY_MAX_ATTEMPTS", "2")
    with deployment(fresh_database_url, rows=100, seed=8) as env:
        database = env.resources["database"]
        _fail(database, "IT-PERMANENT", "permanent", 1)
        # A retryable record that failed twice has given up (SYNCFLOW_STORE_RETRY_MAX_ATTEMPTS=2).
        _fail(database, "IT-DEAD", "retryable", 2)
        _fail(database, "IT-DEAD", "retryable", 2)
        (dead,) = [r for r in database.failures().list_failures("items") if r.bk == "IT-DEAD"]
        assert (dead.state, dead.attempts, dead.state_by) == ("dead", 2, "syncflow")

        _retry(env)
        states = {r.bk: r.state for r in database.failures().list_failures("items", open_only=False)}
        assert states == {"IT-PERMANENT": "open", "IT-DEAD": "dead"}
        assert env.schedulehub_records("items").num_rows == 0

        _retry(env, include_permanent=True)
        states = {r.bk: r.state for r in database.failures().list_failures("items", open_only=False)}
        assert states == {"IT-PERMANENT": "delivered", "IT-DEAD": "dead"}

        _retry(env, include_dead=True)
        states = {r.bk: r.state for r in database.failures().list_failures("items", open_only=False)}
        assert states == {"IT-PERMANENT": "delivered", "IT-DEAD": "delivered"}
        held = set(env.schedulehub_records("items").column("external_key").to_pylist())
        assert held == {"IT-PERMANENT", "IT-DEAD"}
