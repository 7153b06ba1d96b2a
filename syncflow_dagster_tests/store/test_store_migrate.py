"""Schema management: Alembic upgrade to head is idempotent, concurrent-safe and matches store.schema."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from syncflow_dagster.store import migrate
from syncflow_dagster.store.database import libpq_url, make_engine
from syncflow_dagster.store.schema import SCHEMA, metadata


@pytest.fixture
def fresh_url(database_url: str) -> Iterator[str]:
    """An empty database of its own, so the first upgrade really starts from nothing."""
    name = f"syncflow_mig_{uuid.uuid4().hex[:10]}"
    admin = libpq_url(database_url)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    parts = urlsplit(admin)
    try:
        yield urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, parts.fragment))
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _tables(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(sa.inspect(engine).get_table_names(schema=SCHEMA))
    finally:
        engine.dispose()


def test_upgrade_creates_every_table_and_the_version_table_in_schema_syncflow(fresh_url: str) -> None:
    assert migrate.current_revision(fresh_url) is None
    migrate.upgrade(fresh_url)
    assert migrate.current_revision(fresh_url) == migrate.head_revision()
    assert _tables(fresh_url) == {
        "alembic_version",
        "sync_batches",
        "entity_state",
        "watermarks",
        "failed_records",
        "pending_children",
        "stage_events",
        "delivery_log",
        "read_marks",
        "read_snapshots",
    }


def test_upgrade_twice_is_a_no_op(fresh_url: str) -> None:
    migrate.upgrade(fresh_url)
    engine = make_engine(fresh_url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("INSERT INTO syncflow.watermarks (entity, rowversion) VALUES ('items', 7)"))
        migrate.upgrade(engine)
        with engine.connect() as conn:
            kept = conn.execute(sa.text("SELECT rowversion FROM syncflow.watermarks")).scalar_one()
            versions = conn.execute(sa.text("SELECT count(*) FROM syncflow.alembic_version")).scalar_one()
    finally:
        engine.dispose()
    assert kept == 7
    assert versions == 1


def test_concurrent_upgrades_take_turns_and_both_succeed(fresh_url: str) -> None:
    errors: list[BaseException] = []
    barrier = threading.Barrier(3, timeout=30)

    def run() -> None:
        try:
            barrier.wait()
            migrate.upgrade(fresh_url)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert migrate.current_revision(fresh_url) == migrate.head_revision()


def test_migrated_database_matches_the_core_table_definitions(fresh_url: str) -> None:
    migrate.upgrade(fresh_url)
    engine = make_engine(fresh_url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(
                conn,
                opts={
                    "include_schemas": True,
                    "version_table_schema": SCHEMA,
                    # Compare schema syncflow only (public holds nothing of ours).
                    "include_name": lambda name, type_, _parent: type_ != "schema" or name == SCHEMA,
                },
            )
            diff = compare_metadata(context, metadata)
    finally:
        engine.dispose()
    assert diff == []
