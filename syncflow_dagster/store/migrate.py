"""Versioned, idempotent schema management: Alembic configured in code, run under an advisory lock.

`upgrade(url_or_engine)` brings schema `syncflow` to the newest revision. It is
a no-op when the database is already there, and safe when several processes
(Dagster run workers, the service, the CLI) call it at once: a session
advisory lock makes them take turns, and whoever comes second finds the head
already applied. There is no alembic.ini; the script location points into
this package, so an installed wheel migrates exactly like a checkout.
"""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from syncflow_dagster.store.database import make_engine
from syncflow_dagster.store.locks import SCHEMA_UPGRADE_NAMESPACE, advisory_lock
from syncflow_dagster.store.schema import SCHEMA

MIGRATIONS_DIR = Path(__file__).with_name("migrations")


def alembic_config(connection: sa.Connection | None = None) -> Config:
    """An Alembic Config for SyncFlow's migrations, optionally bound to a connection."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("version_table_schema", SCHEMA)
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    """The newest revision shipped with this package."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:  # pragma: no cover - the package always ships revisions
        raise RuntimeError(f"no Alembic revisions found in {MIGRATIONS_DIR}")
    return head


def current_revision(url_or_engine: str | sa.Engine) -> str | None:
    """The revision the database is at, or None before the first upgrade."""
    engine, owned = _engine(url_or_engine)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"version_table_schema": SCHEMA})
            return context.get_current_revision()
    finally:
        if owned:
            engine.dispose()


def upgrade(url_or_engine: str | sa.Engine, revision: str = "head") -> None:
    """Migrate schema `syncflow` to `revision` (default: head), once, under a lock."""
    engine, owned = _engine(url_or_engine)
    try:
        # The lock is session-level: it is held across the migration
        # transaction that Alembic opens and commits inside the block.
        with engine.connect() as conn, advisory_lock(conn, SCHEMA_UPGRADE_NAMESPACE, SCHEMA):
            conn.exec_driver_sql(f'CREATE SCHEMA IF NOT EXISTS "{SCHEMA}"')
            conn.commit()
            command.upgrade(alembic_config(conn), revision)
            conn.commit()
    finally:
        if owned:
            engine.dispose()


def _engine(url_or_engine: str | sa.Engine) -> tuple[sa.Engine, bool]:
    if isinstance(url_or_engine, sa.Engine):
        return url_or_engine, False
    return make_engine(url_or_engine, poolclass=sa.pool.NullPool), True
