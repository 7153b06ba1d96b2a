"""Entity state: what SyncFlow last delivered to ScheduleHub, one row per entity and business-key hash.

StateRepository is the delta engine's memory. It answers "what did we deliver
for these keys" (stored_for_keys), hands the whole entity to full-key
reconciliation (load_state, known_keys), and records what ScheduleHub
confirmed (commit_delivered). Every bulk path is set-based: keys and rows go
in with binary COPY into a TEMP staging table, one statement merges or joins,
and results come back as one binary SELECT, all inside one transaction. The whole
entity (load_state) is read through the ADBC driver's binary path instead,
which needs no staging. The first
commit of an entity skips the staging: its rows, sorted by key, are COPYed
straight into entity_state.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import psycopg
import pyarrow as pa
import pyarrow.compute as pc
import sqlalchemy as sa
from psycopg import sql

from syncflow_dagster.engine.columns import (
    BK,
    BK_HASH,
    BK_HASH_TYPE,
    CHANGED_AT,
    DATA_HASH,
    DATA_HASH_TYPE,
    RECIPE,
    RECIPE_TYPE,
    ROWVERSION,
    ROWVERSION_TYPE,
)
from syncflow_dagster.engine.delta import key_words, word_order
from syncflow_dagster.store.copy import PgColumn, copy_in, create_staging, select_arrow, select_table
from syncflow_dagster.store.database import DEFAULT_MERGE_WORK_MEM, driver_cursor, libpq_url
from syncflow_dagster.store.keys import KEYS, check_keys, prefer_index_joins, stage_keys
from syncflow_dagster.store.locks import COMMIT_NAMESPACE
from syncflow_dagster.store.migrate import upgrade
from syncflow_dagster.store.schema import SCHEMA, entity_state
from syncflow_dagster.store.watermarks import advance_watermark

SCHEDULEHUB_ID = "schedulehub_id"
FIRST_SEEN_AT = "first_seen_at"
LAST_SYNCED_AT = "last_synced_at"
LAST_BATCH_ID = "last_batch_id"

# Frame column → (entity_state column, how it travels through COPY).
STATE_COLUMNS: dict[str, PgColumn] = {
    BK_HASH: PgColumn("bk_hash", "uuid"),
    BK: PgColumn("bk", "text"),
    DATA_HASH: PgColumn("data_hash", "bytea", width=32),
    ROWVERSION: PgColumn("rowversion", "int8"),
    RECIPE: PgColumn("recipe", "int2"),
    SCHEDULEHUB_ID: PgColumn("schedulehub_id", "text"),
    FIRST_SEEN_AT: PgColumn("first_seen_at", "timestamptz"),
    LAST_SYNCED_AT: PgColumn("last_synced_at", "timestamptz"),
    LAST_BATCH_ID: PgColumn("last_batch_id", "uuid"),
}

# What the delta engine compares against: stored_for_keys returns exactly these.
STORED_COLUMNS: tuple[str, ...] = (BK_HASH, DATA_HASH, ROWVERSION, RECIPE, SCHEDULEHUB_ID)
_STORED_FIELDS: list[Any] = [
    pa.field(BK_HASH, BK_HASH_TYPE),
    pa.field(DATA_HASH, DATA_HASH_TYPE),
    pa.field(ROWVERSION, ROWVERSION_TYPE),
    pa.field(RECIPE, RECIPE_TYPE),
    pa.field(SCHEDULEHUB_ID, pa.string()),
]
STORED_SCHEMA = pa.schema(_STORED_FIELDS)
# What commit_delivered requires of `accepted`.
ACCEPTED_COLUMNS: tuple[str, ...] = (BK_HASH, BK, DATA_HASH, ROWVERSION, RECIPE)

_STATE_TABLE = sql.Identifier(SCHEMA, "entity_state")
# A first load at least this large refreshes the planner's statistics before it commits.
ANALYZE_AFTER_FIRST_LOAD_ROWS = 10_000
_ACCEPTED_STAGING = "syncflow_accepted"
# The first commit of an entity COPYs straight into entity_state: the frame's
# columns plus the ones that are the same on every row of the commit.
_DIRECT_COLUMNS: list[PgColumn] = [
    PgColumn("entity", "text"),
    *(STATE_COLUMNS[c] for c in (*ACCEPTED_COLUMNS, SCHEDULEHUB_ID)),
    STATE_COLUMNS[FIRST_SEEN_AT],
    STATE_COLUMNS[LAST_SYNCED_AT],
    STATE_COLUMNS[LAST_BATCH_ID],
]


class StateRepository:
    """Read and commit the delivered state of entities (table syncflow.entity_state)."""

    def __init__(self, engine: sa.Engine, merge_work_mem: str = DEFAULT_MERGE_WORK_MEM) -> None:
        self.engine = engine
        # work_mem of a commit's transaction (SYNCFLOW_STORE_MERGE_WORK_MEM, through the database resource).
        self.merge_work_mem = merge_work_mem

    def ensure_schema(self) -> None:
        """Migrate schema `syncflow` to the newest revision (idempotent, safe to call concurrently)."""
        upgrade(self.engine)

    # -- reads ----------------------------------------------------------------------------------

    def stored_for_keys(self, entity: str, bk_hashes: pa.Array | pa.ChunkedArray) -> pa.Table:
        """The delivered state of the asked keys that exist (STORED_SCHEMA; absent keys have no row).

        Cost scales with the number of keys asked, not with the entity's size:
        the keys are COPYed into a temp table and joined on the primary key.
        """
        _check_entity(entity)
        if len(bk_hashes) == 0:
            return STORED_SCHEMA.empty_table()
        with self.engine.begin() as conn:
            cursor = driver_cursor(conn)
            cursor.execute(
                sql.SQL("SELECT EXISTS (SELECT 1 FROM {state} WHERE entity = %(entity)s)").format(
                    state=_STATE_TABLE
                ),
                {"entity": entity},
            )
            held = cursor.fetchone()
            if held is not None and not held[0]:
                # Nothing delivered for the entity yet (an initial sync): no key can
                # match, and staging a million keys to learn that costs seconds.
                check_keys(entity, BK_HASH, bk_hashes)
                return STORED_SCHEMA.empty_table()
            stage_keys(cursor, entity, BK_HASH, bk_hashes)
            query = sql.SQL(
                "SELECT s.bk_hash, s.data_hash, s.rowversion, s.recipe, s.schedulehub_id "
                "FROM {keys} AS k JOIN {state} AS s ON s.entity = {entity} AND s.bk_hash = k.bk_hash"
            ).format(state=_STATE_TABLE, entity=sql.Literal(entity), keys=KEYS)
            table = select_table(cursor, query, [STATE_COLUMNS[c] for c in STORED_COLUMNS])
        return table.rename_columns(list(STORED_COLUMNS)).cast(STORED_SCHEMA)

    def load_state(self, entity: str, columns: Sequence[str] = STORED_COLUMNS) -> pa.Table:
        """The whole delivered state of `entity` (for full-key reconciliation), in no particular order.

        `columns` are frame names from STATE_COLUMNS (default: STORED_COLUMNS);
        with the default the result has STORED_SCHEMA. Read in a transaction of
        its own on an ADBC connection (binary COPY decoded in C): less CPU than
        parsing a CSV COPY (figures: docs/benchmarks.md, "Where the figures
        behind the code's choices come from").
        """
        _check_entity(entity)
        unknown = [c for c in columns if c not in STATE_COLUMNS]
        if unknown:
            raise ValueError(
                f"entity {entity!r}: unknown state column(s) {unknown}; known: {list(STATE_COLUMNS)}"
            )
        specs = [STATE_COLUMNS[c] for c in columns]
        query = sql.SQL("SELECT {cols} FROM {state} WHERE entity = {entity}").format(
            cols=sql.SQL(", ").join(sql.Identifier(c.name) for c in specs),
            state=_STATE_TABLE,
            entity=sql.Literal(entity),
        )
        url = libpq_url(self.engine.url.render_as_string(hide_password=False))
        table = select_arrow(url, query.as_string(None), specs)
        table = table.rename_columns(list(columns))
        if RECIPE in table.column_names:
            table = table.set_column(
                table.schema.get_field_index(RECIPE), RECIPE, table[RECIPE].cast(RECIPE_TYPE)
            )
        return table

    def known_keys(self, entity: str) -> pa.Array:
        """Every business-key hash SyncFlow has delivered for `entity`."""
        return self.load_state(entity, [BK_HASH]).column(BK_HASH).combine_chunks()

    def count(self, entity: str) -> int:
        """How many records of `entity` are in the delivered state."""
        with self.engine.connect() as conn:
            return int(
                conn.execute(
                    sa.select(sa.func.count())
                    .select_from(entity_state)
                    .where(entity_state.c.entity == entity)
                ).scalar_one()
            )

    # -- the commit -----------------------------------------------------------------------------

    def _copy_new_rows(
        self, cursor: Any, entity: str, batch_id: uuid.UUID, frame: pa.Table, order: np.ndarray | None
    ) -> int:
        """COPY rows of keys not stored yet straight into entity_state; returns the rows written.

        Every row is an insert, so the rows go in with one COPY, sorted by key
        so that the primary key fills in order (the heap too, as the sorted
        INSERT ... SELECT from a staging table did, at more of the server's
        time: docs/benchmarks.md). The commit lock keeps other commits of the
        entity out until the transaction ends, and the COPY is part of it: a
        failure leaves nothing behind.
        """
        if order is not None:
            frame = frame.take(order)
        cursor.execute("SELECT now()")
        now = cursor.fetchone()
        assert now is not None
        timestamp = pa.scalar(now[0], pa.timestamp("us", tz="UTC"))
        written = int(
            copy_in(
                cursor,
                "entity_state",
                frame,
                _DIRECT_COLUMNS,
                schema=SCHEMA,
                constants={
                    "entity": pa.scalar(entity, pa.string()),
                    "first_seen_at": timestamp,
                    "last_synced_at": timestamp,
                    "last_batch_id": pa.scalar(batch_id.bytes, BK_HASH_TYPE),
                },
            )
        )
        if written >= ANALYZE_AFTER_FIRST_LOAD_ROWS:
            # Until statistics list the new rows the planner takes the entity for
            # far fewer, and the key-staged joins of the next run (hash and merge
            # joins are off there) then scan the staged keys once per stored
            # row, a long stall on a large entity, if autovacuum has not come by
            # yet. ANALYZE of `entity` alone (cheap; it also counts this
            # transaction's own rows) closes that window at once.
            cursor.execute(sql.SQL("ANALYZE {state} (entity)").format(state=_STATE_TABLE))
        return written

    def commit_delivered(
        self,
        entity: str,
        batch_id: uuid.UUID,
        accepted: pa.Table,
        deleted: pa.Array | pa.ChunkedArray | None = None,
        *,
        new_keys: bool = False,
    ) -> int:
        """Record what ScheduleHub confirmed, in one transaction; returns rows written.

        Contract: `accepted` holds ONLY rows the target accepted (upserted), and
        `deleted` ONLY the key hashes whose delete the target confirmed.
        Nothing that was not delivered may be passed here: state is the memory
        of what ScheduleHub has, and a row recorded too early would be
        skipped as unchanged forever. Rejected and failed rows go to
        FailureRepository, rows waiting for a parent to PendingRepository.

        `accepted` has `_bk_hash, _bk, _data_hash, _rowversion, _recipe` and
        optionally `schedulehub_id` (kept from the previous commit when absent
        or null) and `_changed_at` (carried into the watermark). Upserted rows
        keep their first_seen_at and get last_synced_at = now() and
        last_batch_id = batch_id; deleted hashes are removed. The entity's
        watermark advances to the highest committed rowversion, never back.
        The result is upserted rows plus deleted rows.

        Callers that may race on one entity hold `locks.entity_lock` around it.

        `new_keys`: the caller expects none of the accepted keys to be stored
        (a chunk of an initial load after the first): they are COPYed in as
        into an empty entity, and if a key was stored after all, that COPY is
        rolled back to a savepoint and the rows are merged instead.

        Three steps, each its own function: `_validated` (refuses a batch that
        breaks the contract before anything is touched), `_first_load` (COPY
        straight into entity_state) or else `_merge` (staged UPDATE + INSERT),
        then the deletes and the watermark.
        """
        commit = _validated(entity, accepted, deleted)
        written = 0
        with self.engine.begin() as conn:
            cursor = driver_cursor(conn)
            # Commits of one entity take turns (a second one waits here until the
            # first has committed); other entities are not affected. A separate
            # namespace from entity_lock, so a caller holding that one on another
            # session does not deadlock with itself.
            cursor.execute(
                "SELECT pg_advisory_xact_lock(hashtext(%(ns)s), hashtext(%(entity)s))",
                {"ns": COMMIT_NAMESPACE, "entity": entity},
            )
            # Room to sort the staged keys in memory rather than in temp files.
            cursor.execute(sql.SQL("SET LOCAL work_mem = {}").format(sql.Literal(self.merge_work_mem)))
            copied = False
            if commit.frame.num_rows:
                loaded = self._first_load(cursor, entity, batch_id, commit, new_keys=new_keys)
                copied = loaded is not None
                written += loaded or 0
            if commit.frame.num_rows and not copied:
                written += self._merge(cursor, entity, batch_id, commit)
            if commit.deleted is not None and len(commit.deleted):
                written += self._delete(cursor, entity, commit.deleted)
            if commit.frame.num_rows:
                top = pc.max(accepted.column(ROWVERSION)).as_py()
                changed_at = (
                    pc.max(accepted.column(CHANGED_AT)).as_py()
                    if CHANGED_AT in accepted.column_names
                    else None
                )
                advance_watermark(conn, entity, int(top), changed_at)
        return written

    def _first_load(
        self, cursor: Any, entity: str, batch_id: uuid.UUID, commit: _Commit, *, new_keys: bool
    ) -> int | None:
        """COPY the accepted rows in when none of their keys can be stored yet; None when they must merge.

        An entity with no state at all takes the COPY outright. With `new_keys`
        (the caller expects every key to be new, an initial load's later
        chunks) the COPY runs under a savepoint: a key stored after all
        violates the primary key, the savepoint is rolled back and the caller
        merges instead. Otherwise None: the rows go through `_merge`.
        """
        cursor.execute(
            sql.SQL("SELECT EXISTS (SELECT 1 FROM {state} WHERE entity = %(entity)s)").format(
                state=_STATE_TABLE
            ),
            {"entity": entity},
        )
        held = cursor.fetchone()
        entity_is_new = held is not None and not held[0]
        if entity_is_new:
            return self._copy_new_rows(cursor, entity, batch_id, commit.frame, commit.order)
        if not new_keys:
            return None
        cursor.execute("SAVEPOINT new_keys")
        try:
            return self._copy_new_rows(cursor, entity, batch_id, commit.frame, commit.order)
        except psycopg.errors.UniqueViolation:
            cursor.execute("ROLLBACK TO SAVEPOINT new_keys")
            return None

    def _merge(self, cursor: Any, entity: str, batch_id: uuid.UUID, commit: _Commit) -> int:
        """Stage the accepted rows and merge them into entity_state; returns rows updated plus inserted.

        One statement, two halves that share a snapshot: the UPDATE rewrites
        keys already stored, the INSERT adds the keys that were not (NOT
        EXISTS sees the state before the UPDATE). This is faster than INSERT
        ... ON CONFLICT DO UPDATE (docs/benchmarks.md), whose speculative
        insertion costs per row. It relies on no other transaction inserting
        the same keys meanwhile, which the transaction-scoped commit lock
        taken by `commit_delivered` guarantees.
        """
        create_staging(cursor, _ACCEPTED_STAGING, commit.columns)
        copy_in(cursor, _ACCEPTED_STAGING, commit.frame, commit.columns)
        prefer_index_joins(cursor)
        cursor.execute(
            sql.SQL(
                "WITH updated AS ("
                " UPDATE {state} AS s SET bk = a.bk, data_hash = a.data_hash,"
                " rowversion = a.rowversion, recipe = a.recipe,"
                " schedulehub_id = COALESCE(a.schedulehub_id, s.schedulehub_id),"
                " last_synced_at = now(), last_batch_id = %(batch_id)s"
                " FROM {staging} AS a WHERE s.entity = %(entity)s AND s.bk_hash = a.bk_hash"
                " RETURNING 1),"
                " inserted AS ("
                " INSERT INTO {state} (entity, bk_hash, bk, data_hash, rowversion, recipe,"
                " schedulehub_id, first_seen_at, last_synced_at, last_batch_id)"
                " SELECT %(entity)s, a.bk_hash, a.bk, a.data_hash, a.rowversion, a.recipe,"
                " a.schedulehub_id, now(), now(), %(batch_id)s FROM {staging} AS a"
                " WHERE NOT EXISTS (SELECT 1 FROM {state} AS s"
                " WHERE s.entity = %(entity)s AND s.bk_hash = a.bk_hash)"
                # Sorted by key, the index inserts walk the btree in order
                # instead of touching a random leaf page per row.
                " ORDER BY a.bk_hash"
                " RETURNING 1)"
                " SELECT (SELECT count(*) FROM updated), (SELECT count(*) FROM inserted)"
            ).format(state=_STATE_TABLE, staging=sql.Identifier(_ACCEPTED_STAGING)),
            {"entity": entity, "batch_id": batch_id},
        )
        counted = cursor.fetchone()
        updated, inserted = counted if counted is not None else (0, 0)
        return int(updated) + int(inserted)

    def _delete(self, cursor: Any, entity: str, deleted_keys: pa.Array) -> int:
        """Remove the state of the key hashes whose delete ScheduleHub confirmed; returns rows removed."""
        stage_keys(cursor, entity, "deleted", deleted_keys)
        cursor.execute(
            sql.SQL(
                "DELETE FROM {state} AS s USING {keys} AS k"
                " WHERE s.entity = %(entity)s AND s.bk_hash = k.bk_hash"
            ).format(state=_STATE_TABLE, keys=KEYS),
            {"entity": entity},
        )
        return int(cursor.rowcount)


@dataclass(frozen=True)
class _Commit:
    """A commit's rows once validated: the state frame, the order that sorts its keys, the deletes."""

    frame: pa.Table
    columns: list[PgColumn]
    order: np.ndarray | None
    deleted: pa.Array | None


def checked_accepted(entity: str, accepted: pa.Table) -> pa.Array:
    """The accepted rows' key hashes, once their columns, required values and data-hash type are checked.

    Refuses (ValueError naming entity and field) a missing column, a null in a
    required field and a data hash of the wrong type: the row contract that
    `commit_delivered` and a first load (`store/first_load.py`) share.
    """
    missing = [c for c in ACCEPTED_COLUMNS if c not in accepted.column_names]
    if missing:
        raise ValueError(f"entity {entity!r}: accepted rows lack column(s) {missing}")
    keys = check_keys(entity, BK_HASH, accepted.column(BK_HASH))
    for name in (BK, DATA_HASH, ROWVERSION, RECIPE):
        nulls = accepted.column(name).null_count
        if nulls:
            raise ValueError(f"entity {entity!r}, field {name!r}: {nulls} accepted row(s) have no value")
    if accepted.column(DATA_HASH).type != DATA_HASH_TYPE:
        raise ValueError(
            f"entity {entity!r}, field {DATA_HASH!r}: expected {DATA_HASH_TYPE}, "
            f"got {accepted.column(DATA_HASH).type}"
        )
    return keys


def _validated(entity: str, accepted: pa.Table, deleted: pa.Array | pa.ChunkedArray | None) -> _Commit:
    """Check a commit against `commit_delivered`'s contract and shape its rows as entity_state's columns.

    Refuses (ValueError naming entity and field) a missing column, a null in a
    required field, a data hash of the wrong type, a key accepted twice, and a
    key both accepted and deleted. Nothing has touched the database yet.
    """
    _check_entity(entity)
    keys = checked_accepted(entity, accepted)
    words = key_words(keys)
    order = _key_order(words)
    if _repeats_in_order(words, order):
        raise ValueError(
            f"entity {entity!r}, field {BK_HASH!r}: accepted rows repeat a key; "
            "dedupe the batch before delivering (delta.dedupe_batch)"
        )
    deleted_keys = check_keys(entity, "deleted", deleted) if deleted is not None else None
    if deleted_keys is not None and len(deleted_keys) and len(keys):
        both = int(pc.sum(pc.cast(pc.is_in(deleted_keys, value_set=keys), pa.int64())).as_py() or 0)
        if both:
            raise ValueError(
                f"entity {entity!r}: {both} key hash(es) are both accepted and deleted in one commit"
            )

    columns = [STATE_COLUMNS[c] for c in (*ACCEPTED_COLUMNS, SCHEDULEHUB_ID)]
    frame = accepted.select(list(ACCEPTED_COLUMNS))
    if SCHEDULEHUB_ID in accepted.column_names:
        frame = frame.append_column(SCHEDULEHUB_ID, accepted.column(SCHEDULEHUB_ID).cast(pa.string()))
    else:
        frame = frame.append_column(SCHEDULEHUB_ID, pa.nulls(accepted.num_rows, pa.string()))
    frame = frame.rename_columns([c.name for c in columns])
    return _Commit(frame, columns, order, deleted_keys)


def _key_order(words: np.ndarray) -> np.ndarray | None:
    """The row order that sorts the keys, or None when they are already strictly ascending.

    A sort on the words (`delta.word_order`): several times faster than
    Arrow's sort of a million fixed-size binaries. Frames from the delta
    engine usually arrive in key order already, which costs one comparison
    of neighbours.
    """
    high, low = words[:, 0], words[:, 1]
    if bool(np.all((high[1:] > high[:-1]) | ((high[1:] == high[:-1]) & (low[1:] > low[:-1])))):
        return None
    return word_order(words)


def _repeats_in_order(words: np.ndarray, order: np.ndarray | None) -> bool:
    """Whether two keys are equal, given the order that sorts them (None: already ascending)."""
    if order is None:
        return False  # strictly ascending: no two neighbours, hence no two keys, are equal
    ordered = words[order]
    return bool(np.any(np.all(ordered[1:] == ordered[:-1], axis=1)))


def _repeats_a_key(keys: pa.Array) -> bool:
    """Whether a 16-byte key hash occurs twice: a sort on the two 64-bit words, then neighbours.

    Faster than Arrow's hash-based count_distinct on fixed-size binaries
    (docs/benchmarks.md), and `keys` is already checked null-free.
    """
    words = key_words(keys)
    return _repeats_in_order(words, _key_order(words))


def _check_entity(entity: str) -> None:
    if not isinstance(entity, str) or not entity:
        raise ValueError(f"entity name must be a non-empty string, got {entity!r}")
