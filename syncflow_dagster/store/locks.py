"""Postgres advisory locks: one writer per entity, and one schema upgrade at a time.

`entity_lock` serialises the writes of one entity (commit of state, failures,
pending children) across processes and machines, while runs of different
entities proceed at once. It is a session-level lock held on a dedicated
autocommit connection, so it spans as many transactions as the caller needs
and dies with the session if the process does.

Keys use the two-int form `pg_advisory_lock(namespace, hashtext(name))`, so
SyncFlow's locks cannot collide with single-bigint advisory locks taken by
other software on the same database (Dagster's storage among them).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError

log = logging.getLogger(__name__)

ENTITY_NAMESPACE = "syncflow.entity"
SCHEMA_UPGRADE_NAMESPACE = "syncflow.schema_upgrade"
# Transaction-scoped lock inside StateRepository.commit_delivered (see there).
COMMIT_NAMESPACE = "syncflow.entity_commit"

# SQLSTATE 55P03 lock_not_available: raised when lock_timeout expires.
_LOCK_NOT_AVAILABLE = "55P03"


class EntityLocked(RuntimeError):
    """Another session holds the entity's lock and it was not released in time."""

    def __init__(self, entity: str, timeout: float | None) -> None:
        waited = "without waiting" if timeout is None else f"within {timeout:g} s"
        super().__init__(
            f"entity {entity!r} is locked by another sync (advisory lock not acquired {waited}); "
            "writes of one entity are serialised, retry when the other run has finished"
        )
        self.entity = entity
        self.timeout = timeout


def _sqlstate(exc: DBAPIError) -> str | None:
    return getattr(exc.orig, "sqlstate", None)


@contextmanager
def advisory_lock(
    connection: sa.Connection,
    namespace: str,
    name: str,
    *,
    wait: bool = True,
    timeout: float | None = None,
) -> Iterator[bool]:
    """Hold a session advisory lock on `connection`; yields whether it was acquired.

    `wait=False` tries once; `timeout` (seconds) bounds the wait through
    lock_timeout, which Postgres applies to advisory locks as to any other.
    The lock is session-level, so each statement here is committed at once:
    the lock outlives those transactions and the ones the caller runs inside
    the block. The connection must therefore not carry an open transaction
    of the caller's on entry.
    """
    if connection.in_transaction():
        raise RuntimeError(
            f"advisory lock {namespace}/{name}: the connection has an open transaction; "
            "commit or roll it back first (the lock must outlive transactions)"
        )
    params = {"ns": namespace, "name": name}
    acquired = False
    if not wait:
        acquired = bool(
            connection.execute(
                sa.text("SELECT pg_try_advisory_lock(hashtext(:ns), hashtext(:name))"), params
            ).scalar_one()
        )
        connection.commit()
    else:
        if timeout is not None:
            # A whole number of milliseconds, at least 1 (0 would mean "wait forever").
            ms = max(1, int(timeout * 1000))
            connection.execute(sa.text(f"SET lock_timeout = {ms}"))
            connection.commit()
        try:
            connection.execute(sa.text("SELECT pg_advisory_lock(hashtext(:ns), hashtext(:name))"), params)
            connection.commit()
            acquired = True
        except DBAPIError as exc:
            connection.rollback()
            if _sqlstate(exc) != _LOCK_NOT_AVAILABLE:
                raise
        finally:
            if timeout is not None:
                connection.execute(sa.text("RESET lock_timeout"))
                connection.commit()
    failed = False
    try:
        yield acquired
    except BaseException:
        failed = True
        raise
    finally:
        if acquired:
            _release(connection, namespace, name, params, failed=failed)


def _release(
    connection: sa.Connection, namespace: str, name: str, params: dict[str, str], *, failed: bool
) -> None:
    try:
        if connection.in_transaction():
            # Work the block left open: kept when the block succeeded, dropped with its error.
            if failed:
                connection.rollback()
            else:
                connection.commit()
        connection.execute(sa.text("SELECT pg_advisory_unlock(hashtext(:ns), hashtext(:name))"), params)
        connection.commit()
    except Exception:
        # A lock we cannot release would outlive us in a pooled session;
        # dropping the connection ends the session and with it the lock.
        log.warning("could not release advisory lock %s/%s; dropping the connection", namespace, name)
        connection.invalidate()
        if not failed:
            raise


@contextmanager
def entity_lock(
    engine_or_conn: sa.Engine | sa.Connection,
    entity: str,
    *,
    wait: bool = True,
    timeout: float | None = None,
    timeout_s: float | None = None,
) -> Iterator[sa.Connection]:
    """Serialise writes of `entity`; raise EntityLocked if not acquired.

    Given an Engine, the lock lives on a dedicated autocommit connection taken
    from it for the duration of the block (yielded, in case the caller wants to
    run its statements on the same session). Given a Connection, that
    connection holds the lock. `wait=False` fails at once when another session
    holds it; `timeout` bounds the wait in seconds; neither means wait forever.
    `timeout_s` is the same bound under the spelling the Dagster resources use.
    """
    if timeout is not None and timeout_s is not None:
        raise ValueError(f"entity_lock({entity!r}): give timeout or timeout_s, not both")
    if timeout is None:
        timeout = timeout_s
    if isinstance(engine_or_conn, sa.Engine):
        with engine_or_conn.connect() as raw:
            conn = raw.execution_options(isolation_level="AUTOCOMMIT")
            with advisory_lock(conn, ENTITY_NAMESPACE, entity, wait=wait, timeout=timeout) as acquired:
                if not acquired:
                    raise EntityLocked(entity, timeout if wait else None)
                yield conn
    else:
        with advisory_lock(engine_or_conn, ENTITY_NAMESPACE, entity, wait=wait, timeout=timeout) as acquired:
            if not acquired:
                raise EntityLocked(entity, timeout if wait else None)
            yield engine_or_conn
