"""/metrics exposition: parsed with prometheus_client's parser and checked against the batch rows."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families

from syncflow_dagster.service.metrics import exposition
from syncflow_dagster.store.database import make_engine
from syncflow_dagster.store.migrate import upgrade
from syncflow_dagster.store.schema import failed_records, pending_children, sync_batches
from syncflow_dagster_tests._service_fixtures import insert_batch, insert_failure, insert_pending


@pytest.fixture
def engine(database_url: str) -> Iterator[sa.Engine]:
    upgrade(database_url)
    engine = make_engine(database_url)
    with engine.begin() as conn:
        for table in (sync_batches, failed_records, pending_children):
            conn.execute(sa.delete(table))
    yield engine
    engine.dispose()


def _samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_counters_match_the_batch_rows(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        insert_batch(
            conn, "items", {"fetched": 120, "insert": 100, "update": 15, "skip": 5, "delivered": 115}
        )
        insert_batch(conn, "items", {"fetched": 10, "update": 7, "delete": 3, "delivered": 10}, seconds=4.0)
        insert_batch(conn, "sites", {"fetched": 4, "insert": 4, "failed": 1}, status="failed")
        insert_failure(conn, "items", "I-1", "transient_failure")
        insert_failure(conn, "items", "I-2", "transient_failure")
        insert_failure(conn, "sites", "S-9", "invalid_record")
        insert_pending(conn, "sales_orders", "SO-1", "customers", "C-404")

    samples = _samples(exposition(engine, ["customers", "items", "sites", "sales_orders"]))

    def value(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    assert value("syncflow_store_up") == 1
    assert value("syncflow_rows_total", entity="items", action="fetched") == 130
    assert value("syncflow_rows_total", entity="items", action="inserted") == 100
    assert value("syncflow_rows_total", entity="items", action="updated") == 22
    assert value("syncflow_rows_total", entity="items", action="deleted") == 3
    assert value("syncflow_rows_total", entity="items", action="skipped") == 5
    assert value("syncflow_rows_total", entity="items", action="delivered") == 125
    assert value("syncflow_rows_total", entity="sites", action="failed") == 1
    # An entity that never synced is present with zeros, so dashboards show it.
    assert value("syncflow_rows_total", entity="customers", action="fetched") == 0
    assert value("syncflow_batches_total", entity="items", status="succeeded") == 2
    assert value("syncflow_batches_total", entity="sites", status="failed") == 1
    assert value("syncflow_batch_duration_seconds_count", entity="items") == 2
    assert value("syncflow_batch_duration_seconds_sum", entity="items") == pytest.approx(6.5, abs=0.01)
    assert value("syncflow_stage_seconds_total", entity="items", stage="fetch") == pytest.approx(2.0)
    assert value("syncflow_failed_records", entity="items", reason="transient_failure") == 2
    assert value("syncflow_failed_records", entity="sites", reason="invalid_record") == 1
    assert value("syncflow_pending_children", entity="sales_orders") == 1
    assert value("syncflow_pending_children", entity="items") == 0
    # Only successful batches set the last-success time; sites only failed.
    assert ("syncflow_last_success_timestamp_seconds", (("entity", "items"),)) in samples
    assert ("syncflow_last_success_timestamp_seconds", (("entity", "sites"),)) not in samples


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
