"""Pending children: rows held back because a parent is not in ScheduleHub yet.

A child is parked with the parent it is missing (entity, business key and its
hash) and its payload. Once that parent is in entity_state, i.e. delivered,
the child is a release candidate: one join on entity_state's primary key
finds them all. Released children are removed after their delivery; a child
that waits longer than allowed is moved to failed_records with reason
`parent_missing`, in one statement, so nothing is lost between the two tables.

A key is held in one place at a time: a child whose key already has an open
failed record (it waited too long before, or its delivery failed) is not
parked again; its failure is kept, as `parent_missing`, and retried on the
failure schedule until the parent arrives.
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import sqlalchemy as sa
from psycopg import sql

from syncflow_dagster.engine.columns import BK, BK_HASH
from syncflow_dagster.store.copy import PgColumn, copy_in, create_staging, select_table
from syncflow_dagster.store.database import StoreSettings, driver_cursor
from syncflow_dagster.store.failures import (
    PAYLOAD,
    after_failure_sql,
    again_after_conflict_sql,
    new_ids,
    next_retry_sql,
    retry_params,
)
from syncflow_dagster.store.keys import KEYS, check_keys, execute_for_keys
from syncflow_dagster.store.schema import REASON_CLASSES, SCHEMA, pending_children

MISSING_PARENT = "_missing_parent"  # the parent entity's name
MISSING_PARENT_BK = "_missing_parent_bk"  # its canonical business key text
MISSING_PARENT_BK_HASH = "_missing_parent_bk_hash"  # its BK_HASH, fixed_size_binary(16)
SINCE = "since"
PARENT_MISSING = "parent_missing"

# What park needs of its frame (`payload` may be null).
PENDING_COLUMNS = (BK_HASH, BK, MISSING_PARENT, MISSING_PARENT_BK, MISSING_PARENT_BK_HASH, PAYLOAD)

_PENDING = sql.Identifier(SCHEMA, "pending_children")
_STATE = sql.Identifier(SCHEMA, "entity_state")
_FAILED = sql.Identifier(SCHEMA, "failed_records")
_STAGING = "syncflow_pending"
_STAGING_COLUMNS = [
    PgColumn("id", "uuid"),
    PgColumn("bk_hash", "uuid"),
    PgColumn("bk", "text"),
    PgColumn("missing_parent_entity", "text"),
    PgColumn("missing_parent_bk", "text"),
    PgColumn("missing_parent_bk_hash", "uuid"),
    PgColumn("payload", "jsonb"),
]
_OUT_COLUMNS = [
    PgColumn("bk_hash", "uuid"),
    PgColumn("bk", "text"),
    PgColumn("missing_parent_entity", "text"),
    PgColumn("missing_parent_bk", "text"),
    PgColumn("missing_parent_bk_hash", "uuid"),
    PgColumn("since", "timestamptz"),
    PgColumn("payload", "jsonb"),
    PgColumn("batch_id", "uuid"),
]
_OUT_NAMES = [
    BK_HASH,
    BK,
    MISSING_PARENT,
    MISSING_PARENT_BK,
    MISSING_PARENT_BK_HASH,
    SINCE,
    PAYLOAD,
    "batch_id",
]

# An id with the UUIDv7 layout, made in SQL for rows moved by one statement:
# 48 bits of Unix milliseconds over a random v4 UUID, version bits set to 7.
_UUID7_SQL = (
    "encode(set_bit(set_bit(overlay(uuid_send(gen_random_uuid()) placing"
    " substring(int8send(floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint) FROM 3)"
    " FROM 1 FOR 6), 52, 1), 53, 1), 'hex')::uuid"
)


# Children whose key has an open failure: the failure is kept, now for the missing parent.
# A parent_missing failure keeps its class (expiry may have made it permanent); any
# other becomes retryable, as the parent may still arrive.
_KEPT_CLASS = "CASE WHEN f.reason_code = %(reason)s THEN f.reason_class ELSE 'retryable' END"


def _keep_failed_sql(**names: sql.Composable) -> sql.Composed:
    again = after_failure_sql(
        f"({_KEPT_CLASS})", "%(now)s::timestamptz", "(f.attempts + 1)", "f.first_failed_at", "f.state"
    )
    return sql.SQL(
        "UPDATE {failed} AS f SET attempts = f.attempts + 1, reason_code = %(reason)s,"
        f" reason_class = {_KEPT_CLASS},"
        " detail = 'parent ' || s.missing_parent_entity || ' ' || s.missing_parent_bk || ' still missing',"
        " last_failed_at = %(now)s, {again},"
        " payload = COALESCE(s.payload, f.payload), batch_id = %(batch_id)s"
        " FROM {staging} AS s"
        " WHERE f.entity = %(entity)s AND f.bk_hash = s.bk_hash AND f.resolved_at IS NULL"
    ).format(again=again, **names)


_OPEN_FAILURE = (
    "EXISTS (SELECT 1 FROM {failed} AS f WHERE f.entity = %(entity)s AND f.bk_hash = s.bk_hash"
    " AND f.resolved_at IS NULL)"
)
_PARK_SQL = (
    "INSERT INTO {pending} AS p (id, entity, bk_hash, bk, missing_parent_entity,"
    " missing_parent_bk, missing_parent_bk_hash, since, payload, batch_id)"
    " SELECT s.id, %(entity)s, s.bk_hash, s.bk, s.missing_parent_entity, s.missing_parent_bk,"
    " s.missing_parent_bk_hash, now(), s.payload, %(batch_id)s FROM {staging} AS s"
    f" WHERE NOT {_OPEN_FAILURE}"
    " ON CONFLICT (entity, bk_hash) DO UPDATE SET bk = EXCLUDED.bk,"
    " missing_parent_entity = EXCLUDED.missing_parent_entity,"
    " missing_parent_bk = EXCLUDED.missing_parent_bk,"
    " missing_parent_bk_hash = EXCLUDED.missing_parent_bk_hash,"
    " payload = COALESCE(EXCLUDED.payload, p.payload), batch_id = EXCLUDED.batch_id"
)
_UNPARK_FAILED_SQL = (
    "DELETE FROM {pending} AS p USING {staging} AS s"
    f" WHERE p.entity = %(entity)s AND p.bk_hash = s.bk_hash AND {_OPEN_FAILURE}"
)


@dataclass(frozen=True)
class Parked:
    """What `park` did with its children: parked here, or kept as open failed records."""

    waiting: int
    kept_failed: int


@dataclass(frozen=True)
class PendingChild:
    id: uuid.UUID
    entity: str
    bk_hash: bytes
    bk: str
    missing_parent_entity: str
    missing_parent_bk: str
    missing_parent_bk_hash: bytes
    since: dt.datetime
    payload: Any
    batch_id: uuid.UUID | None


def _child(row: sa.Row[Any]) -> PendingChild:
    values = row._asdict()
    values["bk_hash"] = values["bk_hash"].bytes
    values["missing_parent_bk_hash"] = values["missing_parent_bk_hash"].bytes
    return PendingChild(**values)


class PendingRepository:
    """Park, release, expire and list children waiting for a parent (table syncflow.pending_children)."""

    def __init__(self, engine: sa.Engine, settings: StoreSettings | None = None) -> None:
        self.engine = engine
        self.settings = settings or StoreSettings()

    def park(
        self, entity: str, batch_id: uuid.UUID | None, children: pa.Table, now: dt.datetime | None = None
    ) -> Parked:
        """Hold these children (PENDING_COLUMNS) until their parent is delivered.

        A child already waiting keeps its `since` (the expiry clock does not
        restart when a run sees it again) and takes the new parent, payload
        and batch. A child whose key has an open failed record stays there
        instead, in the same transaction: reason `parent_missing`, one more
        attempt, the next retry time by the failure schedule, the new payload.
        Parking it too would hold the key twice, with two reasons and two
        retry paths (a retry run would re-park it every time it came due).
        """
        missing = [c for c in PENDING_COLUMNS if c not in children.column_names]
        if missing:
            raise ValueError(f"entity {entity!r}: pending rows lack column(s) {missing}")
        if children.num_rows == 0:
            return Parked(0, 0)
        keys = check_keys(entity, BK_HASH, children.column(BK_HASH))
        parents = check_keys(entity, MISSING_PARENT_BK_HASH, children.column(MISSING_PARENT_BK_HASH))
        if pc.count_distinct(keys).as_py() != len(keys):
            raise ValueError(f"entity {entity!r}, field {BK_HASH!r}: a key is parked twice in one call")
        for name in (BK, MISSING_PARENT, MISSING_PARENT_BK):
            if children.column(name).null_count:
                raise ValueError(f"entity {entity!r}, field {name!r}: a pending row has no value")
        staged: dict[str, Any] = {
            "id": new_ids(children.num_rows),
            "bk_hash": keys,
            "bk": children.column(BK),
            "missing_parent_entity": children.column(MISSING_PARENT),
            "missing_parent_bk": children.column(MISSING_PARENT_BK),
            "missing_parent_bk_hash": parents,
            "payload": children.column(PAYLOAD).cast(pa.string()),
        }
        frame = pa.table(staged)
        params = {
            "entity": entity,
            "batch_id": batch_id,
            "now": now or dt.datetime.now(dt.UTC),
            "reason": PARENT_MISSING,
            **retry_params(self.settings),
        }
        names = {"pending": _PENDING, "failed": _FAILED, "staging": sql.Identifier(_STAGING)}
        with self.engine.begin() as conn:
            cursor = driver_cursor(conn)
            create_staging(cursor, _STAGING, _STAGING_COLUMNS)
            copy_in(cursor, _STAGING, frame, _STAGING_COLUMNS)
            cursor.execute(_keep_failed_sql(**names), params)
            kept = int(cursor.rowcount)
            cursor.execute(sql.SQL(_PARK_SQL).format(**names), params)
            waiting = int(cursor.rowcount)
            if kept:
                # A key parked before this rule existed, and failed since, is held once from now on.
                cursor.execute(sql.SQL(_UNPARK_FAILED_SQL).format(**names), params)
        return Parked(waiting, kept)

    def release_candidates(self, entity: str, limit: int | None = None) -> pa.Table:
        """Waiting children of `entity` whose missing parent is now delivered (in entity_state).

        They stay parked until `remove` is called after their own delivery, so
        a run that dies in between loses nothing. Columns: _bk_hash, _bk,
        _missing_parent, _missing_parent_bk, _missing_parent_bk_hash, since,
        payload, batch_id.
        """
        query = sql.SQL(
            "SELECT p.bk_hash, p.bk, p.missing_parent_entity, p.missing_parent_bk, p.missing_parent_bk_hash,"
            " p.since, p.payload, p.batch_id FROM {pending} AS p JOIN {state} AS s"
            " ON s.entity = p.missing_parent_entity AND s.bk_hash = p.missing_parent_bk_hash"
            " WHERE p.entity = {entity} ORDER BY p.id{limit}"
        ).format(
            pending=_PENDING,
            state=_STATE,
            entity=sql.Literal(entity),
            limit=sql.SQL(" LIMIT {}").format(sql.Literal(int(limit))) if limit else sql.SQL(""),
        )
        return self._select(query)

    def releasable_keys(self) -> dict[str, list[bytes]]:
        """Per entity, the sorted key hashes of its parked children whose parent is now delivered (one query)."""
        query = sql.SQL(
            "SELECT p.entity, p.bk_hash FROM {pending} AS p JOIN {state} AS s"
            " ON s.entity = p.missing_parent_entity AND s.bk_hash = p.missing_parent_bk_hash"
        ).format(pending=_PENDING, state=_STATE)
        with self.engine.begin() as conn:
            table = select_table(
                driver_cursor(conn), query, [PgColumn("entity", "text"), PgColumn("bk_hash", "uuid")]
            )
        out: dict[str, list[bytes]] = {}
        for entity, key in zip(table["entity"].to_pylist(), table["bk_hash"].to_pylist(), strict=True):
            if entity is not None and key is not None:  # both columns are NOT NULL
                out.setdefault(str(entity), []).append(bytes(key))
        return {entity: sorted(keys) for entity, keys in out.items()}

    def waiting(self, entity: str) -> pa.Table:
        """Every child of `entity` still parked, as release_candidates' columns."""
        query = sql.SQL(
            "SELECT bk_hash, bk, missing_parent_entity, missing_parent_bk, missing_parent_bk_hash, since,"
            " payload, batch_id FROM {pending} WHERE entity = {entity} ORDER BY id"
        ).format(pending=_PENDING, entity=sql.Literal(entity))
        return self._select(query)

    def _select(self, query: sql.Composable) -> pa.Table:
        with self.engine.begin() as conn:
            table = select_table(driver_cursor(conn), query, _OUT_COLUMNS)
        return table.rename_columns(_OUT_NAMES)

    def remove(self, entity: str, bk_hashes: pa.Array | pa.ChunkedArray) -> int:
        """Forget these parked children (delivered after release); returns how many were parked."""
        statement = sql.SQL(
            "DELETE FROM {pending} AS p USING {keys} AS k WHERE p.entity = %(entity)s AND p.bk_hash = k.bk_hash"
        ).format(pending=_PENDING, keys=KEYS)
        return execute_for_keys(self.engine, entity, BK_HASH, bk_hashes, statement)

    def expire(
        self,
        older_than: dt.timedelta,
        *,
        entity: str | None = None,
        now: dt.datetime | None = None,
        reason_class: str = "retryable",
    ) -> int:
        """Move children parked before `now - older_than` to failed_records (reason parent_missing).

        One statement deletes them here and upserts them there, so a child is
        always in exactly one of the two tables. `reason_class` 'retryable'
        (default) keeps retrying them on the failure schedule, in case the
        parent still arrives; 'permanent' hands them to a person.
        """
        if older_than < dt.timedelta(0):
            raise ValueError(f"expire: older_than must not be negative, got {older_than}")
        if reason_class not in REASON_CLASSES:
            raise ValueError(f"expire, field 'reason_class': {reason_class!r} is not one of {REASON_CLASSES}")
        moment = now or dt.datetime.now(dt.UTC)
        scope = sql.SQL(" AND entity = %(entity)s") if entity is not None else sql.SQL("")
        statement = sql.SQL(
            "WITH moved AS (DELETE FROM {pending} WHERE since < %(cutoff)s{scope}"
            " RETURNING entity, bk_hash, bk, missing_parent_entity, missing_parent_bk, payload, batch_id)"
            " INSERT INTO {failed} AS f (id, entity, bk_hash, bk, reason_code, reason_class, detail,"
            " attempts, first_failed_at, last_failed_at, next_retry_at, payload, batch_id)"
            " SELECT {uuid7}, m.entity, m.bk_hash, m.bk, %(reason)s, %(reason_class)s,"
            " 'parent ' || m.missing_parent_entity || ' ' || m.missing_parent_bk || ' still missing',"
            " 1, %(now)s, %(now)s, {first_retry}, m.payload, m.batch_id FROM moved AS m"
            " ON CONFLICT (entity, bk_hash) WHERE resolved_at IS NULL DO UPDATE SET"
            " attempts = f.attempts + 1, reason_code = EXCLUDED.reason_code,"
            " reason_class = EXCLUDED.reason_class, detail = EXCLUDED.detail,"
            " last_failed_at = EXCLUDED.last_failed_at, {again},"
            " payload = COALESCE(EXCLUDED.payload, f.payload), batch_id = EXCLUDED.batch_id"
        ).format(
            pending=_PENDING,
            failed=_FAILED,
            scope=scope,
            uuid7=sql.SQL(_UUID7_SQL),
            first_retry=next_retry_sql("%(reason_class)s", "%(now)s::timestamptz", "1"),
            again=again_after_conflict_sql(),
        )
        with self.engine.begin() as conn:
            cursor = driver_cursor(conn)
            cursor.execute(
                statement,
                {
                    "cutoff": moment - older_than,
                    "entity": entity,
                    "now": moment,
                    "reason": PARENT_MISSING,
                    "reason_class": reason_class,
                    **retry_params(self.settings),
                },
            )
            return int(cursor.rowcount)

    def list_pending(
        self, entity: str | None = None, *, after: uuid.UUID | None = None, limit: int = 100
    ) -> list[PendingChild]:
        """A page of parked children, oldest first; pass the last id as `after` for the next page."""
        if not 1 <= limit <= 10_000:
            raise ValueError(f"list_pending: limit must be within 1..10000, got {limit}")
        query = sa.select(pending_children).order_by(pending_children.c.id).limit(limit)
        if entity is not None:
            query = query.where(pending_children.c.entity == entity)
        if after is not None:
            query = query.where(pending_children.c.id > after)
        with self.engine.connect() as conn:
            return [_child(row) for row in conn.execute(query)]

    def count(self, entity: str | None = None) -> int:
        query = sa.select(sa.func.count()).select_from(pending_children)
        if entity is not None:
            query = query.where(pending_children.c.entity == entity)
        with self.engine.connect() as conn:
            return int(conn.execute(query).scalar_one())
