"""Alembic migrations of SyncFlow's `syncflow` schema (configured in code by store.migrate)."""
