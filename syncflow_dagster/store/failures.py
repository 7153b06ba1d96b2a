"""Failed records: rows ScheduleHub refused or that could not be delivered, with a retry schedule.

One open row per entity and business key (a partial unique index on rows not
yet resolved); a record that fails again has its attempts counted up and its
next retry pushed out exponentially. Retryable failures wait
`base * 2**(attempts-1)` seconds, at most `cap`, shortened by a random share
of up to `jitter` so that a burst of failures does not come back as a burst.
Permanent failures get no retry time: they wait for a person. Resolved rows
stay as history. A key that fails while parked as a pending child (a released
child ScheduleHub refused, a new version normalize refused) leaves
pending_children in the same transaction: a key is held in one place at a time.

Lifecycle (`state`): a failure is `open`. A retryable one that has failed
`retry_max_attempts` times, or whose first failure is older than
`retry_max_age_hours`, gives up: it becomes `dead` (no retry time; it keeps
its attempts, times, detail and payload, and still holds its key) and is
retried only when someone asks for it. A record ScheduleHub finally takes is
closed as `delivered`; a person closes one as `resolved` or `dismissed`, with
who and why. Closed records stay as history.
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
from uuid6 import uuid7

from syncflow_dagster.engine.columns import BK, BK_HASH
from syncflow_dagster.store.copy import PgColumn, copy_in, create_staging, select_table
from syncflow_dagster.store.database import StoreSettings, driver_cursor
from syncflow_dagster.store.keys import KEYS, check_keys, execute_for_keys
from syncflow_dagster.store.schema import FAILURE_STATES, REASON_CLASSES, SCHEMA, failed_records

REASON_CODE = "reason_code"
REASON_CLASS = "reason_class"
DETAIL = "detail"
PAYLOAD = "payload"
RETRYABLE = "retryable"
PERMANENT = "permanent"

# What record_failures needs of its frame (`detail` and `payload` may be null).
FAILURE_COLUMNS = (BK_HASH, BK, REASON_CODE, REASON_CLASS, DETAIL, PAYLOAD)

_FAILED = sql.Identifier(SCHEMA, "failed_records")
_PENDING = sql.Identifier(SCHEMA, "pending_children")
_STAGING = "syncflow_failures"
_STAGING_COLUMNS = [
    PgColumn("id", "uuid"),
    PgColumn("bk_hash", "uuid"),
    PgColumn("bk", "text"),
    PgColumn("reason_code", "text"),
    PgColumn("reason_class", "text"),
    PgColumn("detail", "text"),
    PgColumn("payload", "jsonb"),
]
# Attempts beyond this no longer change the delay (2**30 * base is past any cap).
_MAX_DOUBLINGS = 30

# The retry time of a failure whose attempt count (after this failure) is
# `attempts_sql`, failing at `at_sql`; NULL for permanent failures.
_NEXT_RETRY_SQL = (
    "CASE WHEN {reason_class} = 'retryable' THEN {at} + make_interval(secs =>"
    " least(%(retry_base)s * power(2, least({attempts} - 1, %(max_doublings)s)), %(retry_cap)s)"
    " * (1 - %(retry_jitter)s * random())) END"
)


def next_retry_sql(reason_class: str, at: str, attempts: str) -> sql.SQL:
    """The retry-time expression over the given SQL operands (shared with pending expiry)."""
    return sql.SQL(_NEXT_RETRY_SQL.format(reason_class=reason_class, at=at, attempts=attempts))


def after_failure_sql(reason_class: str, at: str, attempts: str, first: str, state: str) -> sql.SQL:
    """SET clauses of a record that (again) failed: its state, retry time and who/why of a give-up.

    The operands are SQL over the record after this failure: its class, the
    time, the attempt count, its first failure and its state before. A dead
    record stays dead (it is retried only on request); a retryable one dies
    once it reaches `max_attempts` or `max_age_seconds`.
    """
    dies = (
        f"({reason_class} = 'retryable' AND ({attempts} >= %(max_attempts)s"
        f" OR {first} < {at} - make_interval(secs => %(max_age_seconds)s)))"
    )
    dead = f"({state} = 'dead' OR {dies})"
    newly = f"({state} <> 'dead' AND {dies})"
    retry = _NEXT_RETRY_SQL.format(reason_class=reason_class, at=at, attempts=attempts)
    return sql.SQL(
        f"state = CASE WHEN {dead} THEN 'dead' ELSE 'open' END,"
        f" next_retry_at = CASE WHEN {dead} THEN NULL ELSE {retry} END,"
        f" state_at = CASE WHEN {newly} THEN {at} ELSE f.state_at END,"
        f" state_by = CASE WHEN {newly} THEN 'syncflow' ELSE f.state_by END,"
        f" state_reason = CASE WHEN {newly} THEN 'gave up after ' || {attempts} || ' attempt(s) since '"
        f" || to_char({first} AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI') || ' UTC'"
        " || ' (retry_max_attempts ' || %(max_attempts)s || ', retry_max_age_hours '"
        " || %(max_age_hours)s || ')' ELSE f.state_reason END"
    )


def again_after_conflict_sql() -> sql.SQL:
    """after_failure_sql of an `INSERT ... AS f ... ON CONFLICT DO UPDATE` whose new row is EXCLUDED."""
    return after_failure_sql(
        "EXCLUDED.reason_class", "EXCLUDED.last_failed_at", "(f.attempts + 1)", "f.first_failed_at", "f.state"
    )


def retry_params(settings: StoreSettings | None = None) -> dict[str, Any]:
    settings = settings or StoreSettings()
    return {
        "retry_base": settings.retry_base_seconds,
        "retry_cap": settings.retry_cap_seconds,
        "retry_jitter": settings.retry_jitter,
        "max_doublings": _MAX_DOUBLINGS,
        "max_attempts": settings.retry_max_attempts,
        "max_age_seconds": settings.retry_max_age_hours * 3600.0,
        "max_age_hours": settings.retry_max_age_hours,
    }


# Upsert of staged failures into failed_records: a new open record, or one more attempt
# (which may make a retryable record give up: after_failure_sql).
MERGE_FAILURES_SQL = (
    "INSERT INTO {failed} AS f (id, entity, bk_hash, bk, reason_code, reason_class, detail, attempts,"
    " first_failed_at, last_failed_at, next_retry_at, payload, batch_id, state)"
    " SELECT s.id, %(entity)s, s.bk_hash, s.bk, s.reason_code, s.reason_class, s.detail, 1,"
    " %(now)s, %(now)s, {first_retry}, s.payload, %(batch_id)s, 'open' FROM {staging} AS s"
    " ON CONFLICT (entity, bk_hash) WHERE resolved_at IS NULL DO UPDATE SET"
    " attempts = f.attempts + 1, bk = EXCLUDED.bk, reason_code = EXCLUDED.reason_code,"
    " reason_class = EXCLUDED.reason_class, detail = EXCLUDED.detail,"
    " last_failed_at = EXCLUDED.last_failed_at, {again},"
    # A failure reported without a payload keeps the one that can still be resent.
    " payload = COALESCE(EXCLUDED.payload, f.payload), batch_id = EXCLUDED.batch_id"
)
# Who closes a record by hand, and how.
PERSON_STATES = ("resolved", "dismissed")


@dataclass(frozen=True)
class FailedRecord:
    id: uuid.UUID
    entity: str
    bk_hash: bytes
    bk: str
    reason_code: str
    reason_class: str
    detail: str | None
    attempts: int
    first_failed_at: dt.datetime
    last_failed_at: dt.datetime
    next_retry_at: dt.datetime | None
    payload: Any
    batch_id: uuid.UUID | None
    resolved_at: dt.datetime | None
    state: str = "open"
    state_at: dt.datetime | None = None
    state_by: str | None = None
    state_reason: str | None = None


def _record(row: sa.Row[Any]) -> FailedRecord:
    values = row._asdict()
    values["bk_hash"] = values["bk_hash"].bytes
    return FailedRecord(**values)


def new_ids(n: int) -> pa.Array:
    """n fresh UUIDv7 ids as fixed_size_binary(16) (one call per id; failures are few)."""
    return pa.array([uuid7().bytes for _ in range(n)], pa.binary(16))


class FailureRepository:
    """Record, schedule, list and resolve failed records (table syncflow.failed_records)."""

    def __init__(self, engine: sa.Engine, settings: StoreSettings | None = None) -> None:
        self.engine = engine
        self.settings = settings or StoreSettings()

    def record_failures(
        self, entity: str, batch_id: uuid.UUID | None, failures: pa.Table, now: dt.datetime | None = None
    ) -> int:
        """Upsert one failure per row of `failures` (FAILURE_COLUMNS), in bulk; returns rows written.

        `payload` is the row's JSON (payload.payload_json) so a retry can resend
        it; `reason_class` is 'retryable' or 'permanent'.
        """
        missing = [c for c in FAILURE_COLUMNS if c not in failures.column_names]
        if missing:
            raise ValueError(f"entity {entity!r}: failure rows lack column(s) {missing}")
        if failures.num_rows == 0:
            return 0
        keys = check_keys(entity, BK_HASH, failures.column(BK_HASH))
        if pc.count_distinct(keys).as_py() != len(keys):
            raise ValueError(f"entity {entity!r}, field {BK_HASH!r}: a key is reported twice in one call")
        for name in (BK, REASON_CODE, REASON_CLASS):
            if failures.column(name).null_count:
                raise ValueError(f"entity {entity!r}, field {name!r}: a failure row has no value")
        classes = failures.column(REASON_CLASS)
        wrong = pc.filter(classes, pc.invert(pc.is_in(classes, value_set=pa.array(REASON_CLASSES))))
        if len(wrong):
            raise ValueError(
                f"entity {entity!r}, field {REASON_CLASS!r}: {wrong[0].as_py()!r} is not one of {REASON_CLASSES}"
            )
        staged: dict[str, Any] = {
            "id": new_ids(failures.num_rows),
            "bk_hash": keys,
            "bk": failures.column(BK),
            "reason_code": failures.column(REASON_CODE),
            "reason_class": classes,
            "detail": failures.column(DETAIL).cast(pa.string()),
            "payload": failures.column(PAYLOAD).cast(pa.string()),
        }
        frame = pa.table(staged)
        statement = sql.SQL(MERGE_FAILURES_SQL).format(
            failed=_FAILED,
            staging=sql.Identifier(_STAGING),
            first_retry=next_retry_sql("s.reason_class", "%(now)s::timestamptz", "1"),
            again=again_after_conflict_sql(),
        )
        with self.engine.begin() as conn:
            cursor = driver_cursor(conn)
            create_staging(cursor, _STAGING, _STAGING_COLUMNS)
            copy_in(cursor, _STAGING, frame, _STAGING_COLUMNS)
            cursor.execute(
                statement,
                {
                    "entity": entity,
                    "batch_id": batch_id,
                    "now": now or dt.datetime.now(dt.UTC),
                    **retry_params(self.settings),
                },
            )
            written = int(cursor.rowcount)
            cursor.execute(
                sql.SQL(
                    "DELETE FROM {pending} AS p USING {staging} AS s"
                    " WHERE p.entity = %(entity)s AND p.bk_hash = s.bk_hash"
                ).format(pending=_PENDING, staging=sql.Identifier(_STAGING)),
                {"entity": entity},
            )
            return written

    def due_for_retry(
        self,
        entity: str | None = None,
        now: dt.datetime | None = None,
        limit: int = 10_000,
        *,
        include_permanent: bool = False,
        include_dead: bool = False,
    ) -> pa.Table:
        """Open retryable failures whose retry time has come, oldest due first, with their payloads.

        `include_permanent` adds the open permanent ones (they have no retry
        time: a person asked for them), `include_dead` the ones that gave up.
        Columns: entity, _bk_hash, _bk, reason_code, reason_class, detail,
        attempts, next_retry_at, payload (JSON text), batch_id.
        """
        if limit < 1:
            raise ValueError(f"due_for_retry: limit must be positive, got {limit}")
        moment = now or dt.datetime.now(dt.UTC)
        chosen: list[sql.Composable] = [
            sql.SQL(
                "(state = 'open' AND reason_class = 'retryable' AND next_retry_at <= {}::timestamptz)"
            ).format(sql.Literal(moment))
        ]
        if include_permanent:
            chosen.append(sql.SQL("(state = 'open' AND reason_class = 'permanent')"))
        if include_dead:
            chosen.append(sql.SQL("state = 'dead'"))
        where: list[sql.Composable] = [
            sql.SQL("resolved_at IS NULL"),
            sql.SQL("(") + sql.SQL(" OR ").join(chosen) + sql.SQL(")"),
        ]
        if entity is not None:
            where.append(sql.SQL("entity = {}").format(sql.Literal(entity)))
        query = sql.SQL(
            "SELECT entity, bk_hash, bk, reason_code, reason_class, detail, attempts, next_retry_at,"
            " payload, batch_id FROM {failed} WHERE {where}"
            " ORDER BY next_retry_at NULLS LAST, id LIMIT {limit}"
        ).format(failed=_FAILED, where=sql.SQL(" AND ").join(where), limit=sql.Literal(int(limit)))
        columns = [
            PgColumn("entity", "text"),
            PgColumn("bk_hash", "uuid"),
            PgColumn("bk", "text"),
            PgColumn("reason_code", "text"),
            PgColumn("reason_class", "text"),
            PgColumn("detail", "text"),
            PgColumn("attempts", "int4"),
            PgColumn("next_retry_at", "timestamptz"),
            PgColumn("payload", "jsonb"),
            PgColumn("batch_id", "uuid"),
        ]
        with self.engine.begin() as conn:
            table = select_table(driver_cursor(conn), query, columns)
        return table.rename_columns(
            [
                "entity",
                BK_HASH,
                BK,
                REASON_CODE,
                REASON_CLASS,
                DETAIL,
                "attempts",
                "next_retry_at",
                PAYLOAD,
                "batch_id",
            ]
        )

    def resolve(self, entity: str, bk_hashes: pa.Array | pa.ChunkedArray) -> int:
        """Close the failures these keys hold (open or dead) as `delivered`: ScheduleHub took them at last."""
        statement = sql.SQL(
            "UPDATE {failed} AS f SET resolved_at = now(), state = 'delivered', state_at = now(),"
            " state_by = 'syncflow', state_reason = NULL FROM {keys} AS k"
            " WHERE f.entity = %(entity)s AND f.bk_hash = k.bk_hash AND f.resolved_at IS NULL"
        ).format(failed=_FAILED, keys=KEYS)
        return execute_for_keys(self.engine, entity, BK_HASH, bk_hashes, statement)

    def close_by_person(
        self,
        state: str,
        *,
        by: str,
        reason: str,
        ids: list[uuid.UUID] | None = None,
        entity: str | None = None,
        bks: list[str] | None = None,
        reason_code: str | None = None,
    ) -> list[FailedRecord]:
        """Close held failures (open or dead) as `resolved` or `dismissed`, saying who and why.

        Which ones: `ids`, or an `entity` with its business keys (`bks`, the
        canonical key text) or all of its records of one `reason_code`. The
        records closed are returned; a key a run holds again later fails anew.
        """
        if state not in PERSON_STATES:
            raise ValueError(f"field 'state': {state!r} is not one of {PERSON_STATES}")
        if not by.strip():
            raise ValueError("field 'by': say who closes the records")
        if not reason.strip():
            raise ValueError("field 'reason': say why the records are closed")
        t = failed_records
        where: list[sa.ColumnElement[bool]] = [t.c.resolved_at.is_(None)]
        if ids:
            where.append(t.c.id.in_(ids))
        elif entity is not None and (bks or reason_code is not None):
            where.append(t.c.entity == entity)
            if bks:
                where.append(t.c.bk.in_(bks))
            if reason_code is not None:
                where.append(t.c.reason_code == reason_code)
        else:
            raise ValueError("choose failed records by id, or by entity with keys or a reason code")
        query = (
            t.update()
            .where(*where)
            .values(
                resolved_at=sa.func.now(),
                state=state,
                state_at=sa.func.now(),
                state_by=by.strip()[:200],
                state_reason=reason.strip()[:2000],
                next_retry_at=None,
            )
            .returning(*t.c)
        )
        with self.engine.begin() as conn:
            return [_record(row) for row in conn.execute(query)]

    def entities_to_retry(
        self,
        now: dt.datetime | None = None,
        *,
        include_permanent: bool = False,
        include_dead: bool = False,
    ) -> set[str]:
        """Entities holding failures a retry run would take now (the rule of due_for_retry); one query."""
        t = failed_records
        moment = now or dt.datetime.now(dt.UTC)
        chosen: list[sa.ColumnElement[bool]] = [
            sa.and_(t.c.state == "open", t.c.reason_class == "retryable", t.c.next_retry_at <= moment)
        ]
        if include_permanent:
            chosen.append(sa.and_(t.c.state == "open", t.c.reason_class == "permanent"))
        if include_dead:
            chosen.append(t.c.state == "dead")
        query = sa.select(t.c.entity).distinct().where(t.c.resolved_at.is_(None), sa.or_(*chosen))
        with self.engine.connect() as conn:
            return {row.entity for row in conn.execute(query)}

    def give_up_stale(self, entity: str | None = None, now: dt.datetime | None = None) -> int:
        """Retryable open failures older than `retry_max_age_hours` become `dead`; returns how many.

        A record also gives up when it fails again past its limits
        (after_failure_sql); this catches the ones no run has retried since.
        """
        moment = now or dt.datetime.now(dt.UTC)
        params = {**retry_params(self.settings), "now": moment, "entity": entity}
        scope = " AND entity = %(entity)s" if entity is not None else ""
        statement = sql.SQL(
            "UPDATE {failed} AS f SET state = 'dead', next_retry_at = NULL, state_at = %(now)s,"
            " state_by = 'syncflow', state_reason = 'gave up after ' || f.attempts || ' attempt(s) since '"
            " || to_char(f.first_failed_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI') || ' UTC'"
            " || ' (retry_max_attempts ' || %(max_attempts)s || ', retry_max_age_hours '"
            " || %(max_age_hours)s || ')'"
            " WHERE f.resolved_at IS NULL AND f.state = 'open' AND f.reason_class = 'retryable'"
            " AND (f.attempts >= %(max_attempts)s"
            " OR f.first_failed_at < %(now)s::timestamptz - make_interval(secs => %(max_age_seconds)s))"
            + scope
        ).format(failed=_FAILED)
        with self.engine.begin() as conn:
            cursor = driver_cursor(conn)
            cursor.execute(statement, params)
            return int(cursor.rowcount)

    def list_failures(
        self,
        entity: str | None = None,
        reason_code: str | None = None,
        *,
        open_only: bool = True,
        after: uuid.UUID | None = None,
        limit: int = 100,
        state: str | None = None,
    ) -> list[FailedRecord]:
        """A page of failures, oldest first; pass the last id as `after` for the next page."""
        if not 1 <= limit <= 10_000:
            raise ValueError(f"list_failures: limit must be within 1..10000, got {limit}")
        query = sa.select(failed_records).order_by(failed_records.c.id).limit(limit)
        if entity is not None:
            query = query.where(failed_records.c.entity == entity)
        if reason_code is not None:
            query = query.where(failed_records.c.reason_code == reason_code)
        if open_only:
            query = query.where(failed_records.c.resolved_at.is_(None))
        if state is not None:
            if state not in FAILURE_STATES:
                raise ValueError(f"list_failures, field 'state': {state!r} is not one of {FAILURE_STATES}")
            query = query.where(failed_records.c.state == state)
        if after is not None:
            query = query.where(failed_records.c.id > after)
        with self.engine.connect() as conn:
            return [_record(row) for row in conn.execute(query)]

    def counts(self, *, open_only: bool = True) -> dict[str, dict[str, int]]:
        """Failures per entity and reason code."""
        query = sa.select(failed_records.c.entity, failed_records.c.reason_code, sa.func.count()).group_by(
            failed_records.c.entity, failed_records.c.reason_code
        )
        if open_only:
            query = query.where(failed_records.c.resolved_at.is_(None))
        out: dict[str, dict[str, int]] = {}
        with self.engine.connect() as conn:
            for entity, reason_code, n in conn.execute(query):
                out.setdefault(entity, {})[reason_code] = int(n)
        return out

    def count(self, entity: str | None = None, *, open_only: bool = True) -> int:
        query = sa.select(sa.func.count()).select_from(failed_records)
        if entity is not None:
            query = query.where(failed_records.c.entity == entity)
        if open_only:
            query = query.where(failed_records.c.resolved_at.is_(None))
        with self.engine.connect() as conn:
            return int(conn.execute(query).scalar_one())
