"""Alembic environment: runs the migrations on the connection store.migrate hands over.

There is no alembic.ini. `store.migrate.upgrade` builds the Config in code,
takes the upgrade advisory lock on a connection and passes that connection in
`config.attributes["connection"]`, so the lock and the migration share one
session. The version table lives in schema `syncflow`, beside the tables it
versions, so it never collides with the Dagster instance's own Alembic table.
"""

from __future__ import annotations

from alembic import context

from syncflow_dagster.store.schema import SCHEMA, metadata

connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - only store.migrate runs these migrations
    raise RuntimeError("run SyncFlow migrations through syncflow_dagster.store.migrate.upgrade()")

context.configure(
    connection=connection,
    target_metadata=metadata,
    version_table_schema=SCHEMA,
    include_schemas=True,
    transaction_per_migration=False,
)
with context.begin_transaction():
    context.run_migrations()
