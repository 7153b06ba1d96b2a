"""/metrics exposition: parsed with prometheus_client's parser and checked against the batch rows."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families

from syncflow_dagster.defs import bookkeeping
from syncflow_dagster.defs.resources import SyncDatabase
from syncflow_dagster.service.metrics import exposition
from syncflow_dagster.store.database import make_engine
from syncflow_dagster.store.migrate import upgrade
from syncflow_dagster.store.schema import failed_records, pending_children, stage_events, sync_batches
from syncflow_dagster_tests._service_fixtures import insert_failure, insert_pending


@pytest.fixture
def engine(database_url: str) -> Iterator[sa.Engine]:
    upgrade(database_url)
    engine = make_engine(database_url)
    with engine.begin() as conn:
        for table in (sync_batches, stage_events, failed_records, pending_children):
            conn.execute(sa.delete(table))
    yield engine
    engine.dispose()


@pytest.fixture
def database(database_url: str, engine: sa.Engine) -> SyncDatabase:
    return SyncDatabase(url=database_url)


def _samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def _batch(
    database: SyncDatabase,
    entity: str,
    stages: dict[str, dict[str, int]],
    status: str = "succeeded",
    kind: str = "sync",
) -> uuid.UUID:
    """A batch written the way a run writes it: one stage event per stage, then its close."""
    run_id = f"run-{uuid.uuid4().hex[:8]}"
    batch = bookkeeping.batch_for_run(database, entity, None, run_id, kind=kind)
    for stage, counts in stages.items():
        bookkeeping.record_stage(database, batch, entity, stage, sum(counts.values()), 1.0, counts)
    if status == "succeeded":
        bookkeeping.finish_from_events(database, batch)
    elif status != "running":
        database.batches().close_running(run_id, status)
    return batch


def test_counters_match_the_stages_that_ran(engine: sa.Engine, database: SyncDatabase) -> None:
    _batch(
        database,
        "items",
        {
            "fetch": {"fetched": 120},
            "delta": {"insert": 100, "update": 15, "skip": 5},
            "deliver": {"delivered": 115},
        },
    )
    _batch(
        database,
        "items",
        {"fetch": {"fetched": 10}, "delta": {"update": 7, "delete": 3}, "deliver": {"delivered": 10}},
    )
    _batch(
        database,
        "sites",
        {"fetch": {"fetched": 4}, "delta": {"insert": 4}, "deliver": {"failed": 1}},
        "failed",
    )
    _batch(database, "items", {"reconcile": {"delete": 301, "delivered": 301}}, kind="reconcile")
    with engine.begin() as conn:
        insert_failure(conn, "items", "I-1", "transient_failure")
        insert_failure(conn, "items", "I-2", "transient_failure")
        insert_failure(conn, "sites", "S-9", "invalid_record")
        insert_pending(conn, "sales_orders", "SO-1", "customers", "C-404")

    samples = _samples(exposition(engine, ["customers", "items", "sites", "sales_orders"]))

    def value(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    assert value("syncflow_store_up") == 1
    assert value("syncflow_rows_total", entity="items", action="fetched") == 130
    assert value("syncflow_rows_total", entity="items", action="insert") == 100
    assert value("syncflow_rows_total", entity="items", action="update") == 22
    # A reconcile's deletes count under the same name as a sync's.
    assert value("syncflow_rows_total", entity="items", action="delete") == 304
    assert value("syncflow_rows_total", entity="items", action="skip") == 5
    assert value("syncflow_rows_total", entity="items", action="delivered") == 426
    assert value("syncflow_rows_total", entity="sites", action="failed") == 1
    # An entity that never synced is present with zeros, so dashboards show it.
    assert value("syncflow_rows_total", entity="customers", action="fetched") == 0
    assert value("syncflow_batches_total", entity="items", kind="sync", status="succeeded") == 2
    assert value("syncflow_batches_total", entity="items", kind="reconcile", status="succeeded") == 1
    assert value("syncflow_batches_total", entity="sites", kind="sync", status="failed") == 1
    assert value("syncflow_batches_total", entity="customers", kind="sync", status="succeeded") == 0
    assert value("syncflow_batch_duration_seconds_count", entity="items") == 3
    assert value("syncflow_stage_seconds_total", entity="items", stage="fetch") == pytest.approx(2.0)
    assert value("syncflow_failed_records", entity="items", reason="transient_failure") == 2
    assert value("syncflow_failed_records", entity="sites", reason="invalid_record") == 1
    assert value("syncflow_pending_children", entity="sales_orders") == 1
    assert value("syncflow_pending_children", entity="items") == 0
    # Only successful batches set the last-success time; sites only failed.
    assert ("syncflow_last_success_timestamp_seconds", (("entity", "items"),)) in samples
    assert ("syncflow_last_success_timestamp_seconds", (("entity", "sites"),)) not in samples


def _families(text: bytes) -> dict[str, str]:
    return {family.name: family.type for family in text_string_to_metric_families(text.decode())}


def test_counters_never_go_down_across_scrapes_while_gauges_follow_what_is_open(
    engine: sa.Engine, database: SyncDatabase
) -> None:
    entities = ["items", "sites"]
    batch = _batch(database, "items", {"fetch": {"fetched": 50}, "delta": {"insert": 50}}, "running")
    first_text = exposition(engine, entities)
    first = _samples(first_text)
    assert first[("syncflow_batches_running", (("entity", "items"), ("kind", "sync")))] == 1

    # The run fails; the batch is closed as failed; a re-execution reopens it and it succeeds.
    record = database.batches().get(batch)
    assert record is not None
    assert record.run_id is not None
    database.batches().close_running(record.run_id, "failed")
    middle = _samples(exposition(engine, entities))
    assert (
        middle[("syncflow_batches_total", (("entity", "items"), ("kind", "sync"), ("status", "failed")))] == 1
    )
    assert bookkeeping.batch_for_run(database, "items", None, record.run_id) == batch
    bookkeeping.record_stage(database, batch, "items", "deliver", 50, 1.0, {"delivered": 50})
    bookkeeping.finish_from_events(database, batch)
    second_text = exposition(engine, entities)
    second = _samples(second_text)

    types = _families(second_text)
    counters = {name for name, kind in types.items() if kind == "counter"}
    assert counters == {"syncflow_rows", "syncflow_batches", "syncflow_stage_seconds"}
    assert types["syncflow_batches_running"] == "gauge"
    assert types["syncflow_failed_records"] == "gauge"
    assert types["syncflow_batch_duration_seconds"] == "summary"
    for scrape in (first, middle):
        for key, earlier in scrape.items():
            name = key[0]
            if name.endswith(("_total", "_count", "_sum")):
                assert second.get(key, 0) >= earlier, f"{key} went down: {earlier} -> {second.get(key)}"
    # The failed close stays counted; the success is counted once.
    failed_key = ("syncflow_batches_total", (("entity", "items"), ("kind", "sync"), ("status", "failed")))
    succeeded_key = (
        "syncflow_batches_total",
        (("entity", "items"), ("kind", "sync"), ("status", "succeeded")),
    )
    assert (second[failed_key], second[succeeded_key]) == (1, 1)
    assert second[("syncflow_batches_running", (("entity", "items"), ("kind", "sync")))] == 0
    assert second[("syncflow_rows_total", (("action", "delivered"), ("entity", "items")))] == 50


def test_resolved_failures_leave_the_gauge(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        insert_failure(conn, "items", "I-1", "transient_failure")
        conn.execute(sa.update(failed_records).values(resolved_at=sa.func.now(), state="delivered"))
        insert_failure(conn, "items", "I-2", "parent_missing")
    samples = _samples(exposition(engine, ["items"]))
    assert ("syncflow_failed_records", (("entity", "items"), ("reason", "transient_failure"))) not in samples
    assert samples[("syncflow_failed_records", (("entity", "items"), ("reason", "parent_missing")))] == 1


def test_unreachable_store_reports_down_instead_of_failing() -> None:
    # Port 1 on loopback: nothing listens, the connect is refused at once.
    engine = make_engine(
        "postgresql://nobody:s3cret-pw@127.0.0.1:1/none", connect_args={"connect_timeout": 2}
    )
    text = exposition(engine, ["items"]).decode()
    samples = _samples(text.encode())
    assert samples[("syncflow_store_up", ())] == 0
    assert "s3cret-pw" not in text
