"""An entity's first load, committed chunk by chunk but written into entity_state once, in key order.

A first load persisted chunk by chunk and COPYed straight into entity_state
chunk after chunk inserts each chunk's keys all over the primary key (key
hashes are random): once the index outgrows Postgres's shared buffers, every
chunk reads and dirties most of its leaf pages again, so each chunk costs more
than the one before, and the delivery log's (entity, bk_hash) index the same.
`FirstLoad` instead holds one transaction for the persist stage's state and
one for its delivery log: each chunk's accepted rows and deleted keys, and
its delivery-log rows, are COPYed into TEMP tables (no index, no WAL), and
`finish` puts them into entity_state and the delivery log with one
INSERT ... SELECT ... ORDER BY bk_hash each, so every leaf page is written
once; the state's transaction also advances the watermark. The two are
written at the same time on their two connections, and each commits on its
own, as the per-chunk path logs on a connection of its own too: the log says
what was sent, which it was, whatever became of the state. An exception
before `finish` rolls both back; one in the state's part leaves nothing
marked synced, and as ScheduleHub's deliveries are idempotent by key the next
run delivers and commits them again.

It is meant for an entity with no state when the stage begins. `finish` takes
the entity's commit lock (as `StateRepository.commit_delivered` does); if a
commit of another run stored keys of the entity meanwhile, the staged rows are
merged over them (INSERT ... ON CONFLICT) instead of inserted.
"""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import Any

import psycopg
import pyarrow as pa
import pyarrow.compute as pc
import sqlalchemy as sa
from psycopg import sql

from syncflow_dagster.engine.columns import (
    BK_HASH,
    CHANGED_AT,
    ROWVERSION,
)
from syncflow_dagster.store.copy import PgColumn, copy_in, create_staging
from syncflow_dagster.store.database import DEFAULT_MERGE_WORK_MEM, driver_cursor
from syncflow_dagster.store.delivery_log import ROW_COLUMNS, log_rows
from syncflow_dagster.store.keys import check_keys
from syncflow_dagster.store.locks import COMMIT_NAMESPACE
from syncflow_dagster.store.schema import SCHEMA
from syncflow_dagster.store.state import (
    ACCEPTED_COLUMNS,
    ANALYZE_AFTER_FIRST_LOAD_ROWS,
    SCHEDULEHUB_ID,
    STATE_COLUMNS,
    checked_accepted,
)
from syncflow_dagster.store.watermarks import advance_watermark

_STATE = sql.Identifier(SCHEMA, "entity_state")
_LOG = sql.Identifier(SCHEMA, "delivery_log")
_ROWS = "syncflow_first_load"
_DELETED = "syncflow_first_load_deleted"
_LOGGED = "syncflow_first_load_log"
_ROW_COLUMNS = [STATE_COLUMNS[c] for c in (*ACCEPTED_COLUMNS, SCHEDULEHUB_ID)]
_KEY = [PgColumn("bk_hash", "uuid")]


class _Session:
    """One connection with a transaction open on it, and its driver cursor."""

    def __init__(self, engine: sa.Engine) -> None:
        self.conn = engine.connect()
        try:
            self.transaction = self.conn.begin()
            self.cursor = driver_cursor(self.conn)
        except BaseException:
            self.conn.close()
            raise

    def close(self, *, commit: bool) -> None:
        try:
            if self.transaction.is_active:
                if commit:
                    self.transaction.commit()
                else:
                    self.transaction.rollback()
        finally:
            self.conn.close()


class FirstLoad:
    """The persist stage's transactions for an entity's first load (see the module's docstring).

    Use as a context manager: `add` each chunk's committed rows and deleted
    keys, `log` each chunk's delivered frame, then `finish` (which commits).
    Leaving the block without `finish` rolls everything back.
    """

    def __init__(
        self,
        engine: sa.Engine,
        entity: str,
        batch_id: uuid.UUID,
        merge_work_mem: str = DEFAULT_MERGE_WORK_MEM,
    ) -> None:
        if not isinstance(entity, str) or not entity:
            raise ValueError(f"entity name must be a non-empty string, got {entity!r}")
        self.engine = engine
        self.entity = entity
        self.batch_id = batch_id
        self.merge_work_mem = merge_work_mem
        self.rows = 0
        self._top: int | None = None
        self._changed_at: Any = None
        self._state: _Session | None = None
        self._log: _Session | None = None

    def __enter__(self) -> FirstLoad:
        try:
            self._state = _Session(self.engine)
            create_staging(self._state.cursor, _ROWS, _ROW_COLUMNS)
            create_staging(self._state.cursor, _DELETED, _KEY)
            self._log = _Session(self.engine)
            create_staging(self._log.cursor, _LOGGED, ROW_COLUMNS)
        except BaseException:
            self._close(commit=False)
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self._close(commit=False)

    def _close(self, *, commit: bool) -> None:
        sessions, self._state, self._log = (self._state, self._log), None, None
        for session in sessions:
            if session is not None:
                session.close(commit=commit)

    def _open(self, session: _Session | None) -> _Session:
        if session is None:
            raise RuntimeError(f"entity {self.entity!r}: the first load is not open")
        return session

    def add(self, accepted: pa.Table, deleted: pa.Array | pa.ChunkedArray | None = None) -> int:
        """Stage a chunk's accepted rows (as `commit_delivered` takes them) and deleted keys; rows staged."""
        cursor = self._open(self._state).cursor
        entity = self.entity
        checked_accepted(entity, accepted)
        if deleted is not None and len(deleted):
            copy_in(cursor, _DELETED, pa.table({"bk_hash": check_keys(entity, "deleted", deleted)}), _KEY)
        if accepted.num_rows == 0:
            return 0
        frame = accepted.select(list(ACCEPTED_COLUMNS))
        ids = (
            accepted.column(SCHEDULEHUB_ID).cast(pa.string())
            if SCHEDULEHUB_ID in accepted.column_names
            else pa.nulls(accepted.num_rows, pa.string())
        )
        frame = frame.append_column(SCHEDULEHUB_ID, ids).rename_columns([c.name for c in _ROW_COLUMNS])
        copy_in(cursor, _ROWS, frame, _ROW_COLUMNS)
        top = int(pc.max(accepted.column(ROWVERSION)).as_py())
        self._top = top if self._top is None else max(self._top, top)
        if CHANGED_AT in accepted.column_names:
            changed_at = pc.max(accepted.column(CHANGED_AT)).as_py()
            if changed_at is not None:
                self._changed_at = (
                    changed_at if self._changed_at is None else max(self._changed_at, changed_at)
                )
        self.rows += accepted.num_rows
        return accepted.num_rows

    def log(self, delivered: pa.Table) -> int:
        """Stage a chunk's delivery-log rows (every row sent and ScheduleHub's answer); rows staged."""
        frame = log_rows(self.entity, delivered)
        if frame.num_rows == 0:
            return 0
        return int(copy_in(self._open(self._log).cursor, _LOGGED, frame, ROW_COLUMNS))

    def finish(self) -> None:
        """Write the staged log rows and, meanwhile, the staged rows, deletes and watermark; commit both."""
        state, log = self._open(self._state), self._open(self._log)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="first-load-log") as pool:
            logged = pool.submit(self._write_log, log)
            try:
                self._write_state(state)
            finally:
                # The log's rows were sent, so they are logged whatever became of the state.
                logged.result()
        self._state = None
        state.close(commit=True)

    def _write_log(self, log: _Session) -> None:
        self._log = None
        try:
            cursor = log.cursor
            cursor.execute(sql.SQL("SET LOCAL work_mem = {}").format(sql.Literal(self.merge_work_mem)))
            logged = sql.SQL(", ").join(sql.Identifier(c.name) for c in ROW_COLUMNS)
            cursor.execute(
                sql.SQL(
                    "INSERT INTO {log} (entity, batch_id, {cols}) SELECT %(entity)s, %(batch_id)s, {cols}"
                    " FROM {logged} ORDER BY bk_hash"
                ).format(log=_LOG, cols=logged, logged=sql.Identifier(_LOGGED)),
                {"entity": self.entity, "batch_id": self.batch_id},
            )
        except BaseException:
            log.close(commit=False)
            raise
        log.close(commit=True)

    def _write_state(self, state: _Session) -> None:
        cursor = state.cursor
        params = {"entity": self.entity, "batch_id": self.batch_id}
        # Commits of one entity take turns (see StateRepository.commit_delivered).
        cursor.execute(
            "SELECT pg_advisory_xact_lock(hashtext(%(ns)s), hashtext(%(entity)s))",
            {"ns": COMMIT_NAMESPACE, "entity": self.entity},
        )
        # Room to sort the staged rows in memory rather than in temp files.
        cursor.execute(sql.SQL("SET LOCAL work_mem = {}").format(sql.Literal(self.merge_work_mem)))
        cursor.execute(
            sql.SQL("SELECT EXISTS (SELECT 1 FROM {state} WHERE entity = %(entity)s)").format(state=_STATE),
            params,
        )
        held = cursor.fetchone()
        stored_meanwhile = held is not None and bool(held[0])
        # A key stored by another run's commit since the stage began: ours is the later commit.
        merge = (
            " ON CONFLICT (entity, bk_hash) DO UPDATE SET bk = EXCLUDED.bk, data_hash = EXCLUDED.data_hash,"
            " rowversion = EXCLUDED.rowversion, recipe = EXCLUDED.recipe,"
            " schedulehub_id = COALESCE(EXCLUDED.schedulehub_id, s.schedulehub_id),"
            " last_synced_at = EXCLUDED.last_synced_at, last_batch_id = EXCLUDED.last_batch_id"
            if stored_meanwhile
            else ""
        )
        try:
            cursor.execute(
                sql.SQL(
                    "INSERT INTO {state} AS s (entity, bk_hash, bk, data_hash, rowversion, recipe,"
                    " schedulehub_id, first_seen_at, last_synced_at, last_batch_id)"
                    " SELECT %(entity)s, bk_hash, bk, data_hash, rowversion, recipe, schedulehub_id,"
                    " now(), now(), %(batch_id)s FROM {rows} ORDER BY bk_hash" + merge
                ).format(state=_STATE, rows=sql.Identifier(_ROWS)),
                params,
            )
        except (psycopg.errors.UniqueViolation, psycopg.errors.CardinalityViolation) as exc:
            raise ValueError(
                f"entity {self.entity!r}, field {BK_HASH!r}: the first load's accepted rows repeat a key; "
                "dedupe the batch before delivering (delta.dedupe_batch)"
            ) from exc
        cursor.execute(
            sql.SQL(
                "DELETE FROM {state} AS s USING {deleted} AS d"
                " WHERE s.entity = %(entity)s AND s.bk_hash = d.bk_hash"
            ).format(state=_STATE, deleted=sql.Identifier(_DELETED)),
            params,
        )
        if self.rows >= ANALYZE_AFTER_FIRST_LOAD_ROWS:
            # As after StateRepository's first commit: the next run's key-staged joins
            # need statistics that know the entity's rows (see _copy_new_rows).
            cursor.execute(sql.SQL("ANALYZE {state} (entity)").format(state=_STATE))
        if self._top is not None:
            advance_watermark(state.conn, self.entity, self._top, self._changed_at)
