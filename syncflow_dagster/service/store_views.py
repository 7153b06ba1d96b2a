"""Read-only views of SyncFlow's state tables for the API, /metrics and the CLI (SQLAlchemy Core).

The sync writes `sync_batches`, `failed_records` and `pending_children`
through the store's repositories; this module only reads them, in the shapes
operators ask for: one batch's metrics, per-entity stats, pages of failures.
Counts keep the names the stages wrote them under (the stage table's,
`engine/stage_table.py`), so every edge speaks the same vocabulary.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import distinct_on

from syncflow_dagster.engine import stage_table as st
from syncflow_dagster.store.events import StageEvent, StageEventRepository, stage_totals
from syncflow_dagster.store.schema import failed_records, pending_children, sync_batches

# The counts every batch reports in fields of their own, in the order people read them:
# the stage table's, under the names the stages write (one vocabulary, no aliases).
BATCH_METRICS = st.BATCH_COUNTS


def normalise_counts(raw: Mapping[str, Any] | None) -> dict[str, int]:
    """Every count of `raw`, with BATCH_METRICS present (0 when missing)."""
    out = dict.fromkeys(BATCH_METRICS, 0)
    for key, value in (raw or {}).items():
        try:
            out[key] = out.get(key, 0) + int(value)
        except (TypeError, ValueError):
            raise ValueError(f"sync_batches count {key!r} is not an integer: {value!r}") from None
    return out


@dataclass(frozen=True)
class StageView:
    """One stage of a batch as far as it got: finished (its counts and seconds) or failed."""

    stage: str
    status: str  # succeeded, failed
    rows: int | None
    seconds: float | None
    at: dt.datetime
    counts: dict[str, int]
    error: str | None = None


@dataclass(frozen=True)
class BatchView:
    """One sync batch: an entity x partition date, within one Dagster run."""

    id: str
    entity: str
    partition_date: dt.date | None
    run_id: str | None
    status: str
    started_at: dt.datetime
    finished_at: dt.datetime | None
    counts: dict[str, int]
    stage_seconds: dict[str, float]
    kind: str = "sync"
    stages: tuple[StageView, ...] = ()

    @property
    def seconds(self) -> float:
        return round(sum(self.stage_seconds.values()), 3)


@dataclass
class EntityStatsView:
    """What an operator wants to know about one entity at a glance."""

    entity: str
    batches: int = 0
    failed_batches: int = 0
    last_batch: BatchView | None = None
    last_success_at: dt.datetime | None = None
    totals: dict[str, int] = field(default_factory=lambda: dict.fromkeys(BATCH_METRICS, 0))
    open_failures: int = 0
    pending_children: int = 0


def _batch(row: sa.Row[Any], events: list[StageEvent] | None = None) -> BatchView:
    """A batch row; with its stage events, its stages, and while it runs the counts they add up to."""
    counts: Mapping[str, Any] = row.counts
    stage_seconds: Mapping[str, Any] = row.stage_seconds or {}
    stages: tuple[StageView, ...] = ()
    if events is not None:
        totals = stage_totals(events)
        if row.status == "running" or not counts:
            # Counts reach the row when the batch closes; until then (and for a batch
            # closed before this was recorded) the finished stages say how far it got.
            counts, stage_seconds = totals.counts, totals.stage_seconds
        stages = tuple(_stage_views(events))
    return BatchView(
        id=str(row.id),
        entity=row.entity,
        partition_date=row.partition_date,
        run_id=row.run_id,
        status=row.status,
        started_at=row.started_at,
        finished_at=row.finished_at,
        counts=normalise_counts(counts),
        stage_seconds={str(k): float(v) for k, v in stage_seconds.items()},
        kind=getattr(row, "kind", "sync"),
        stages=stages,
    )


def _stage_views(events: list[StageEvent]) -> list[StageView]:
    """The latest finish of each stage, in the order the stages first finished."""
    latest: dict[str, StageEvent] = {}
    for event in events:
        if event.status in ("succeeded", "failed"):
            latest[event.stage] = event
    views = []
    for event in sorted(latest.values(), key=lambda e: e.at):
        detail = event.detail or {}
        views.append(
            StageView(
                stage=event.stage,
                status=event.status,
                rows=event.rows,
                seconds=None if event.seconds is None else round(float(event.seconds), 3),
                at=event.at,
                counts={
                    k: int(v) for k, v in detail.items() if isinstance(v, int) and not isinstance(v, bool)
                },
                error=str(detail["error"]) if "error" in detail else None,
            )
        )
    return views


def _with_events(conn: sa.Connection, rows: list[sa.Row[Any]]) -> list[BatchView]:
    events = StageEventRepository(conn.engine).for_batches([row.id for row in rows])
    return [_batch(row, events.get(row.id, [])) for row in rows]


def batches_of_run(conn: sa.Connection, run_id: str) -> list[BatchView]:
    """Every batch a Dagster run wrote, oldest first, each with its stages as far as they got."""
    query = sa.select(sync_batches).where(sync_batches.c.run_id == run_id).order_by(sync_batches.c.started_at)
    return _with_events(conn, list(conn.execute(query)))


@dataclass(frozen=True)
class BatchPage:
    total: int
    items: list[BatchView]


def batches_page(
    conn: sa.Connection,
    *,
    entity: str | None = None,
    status: str | None = None,
    kind: str | None = None,
    since: dt.datetime | None = None,
    limit: int = 50,
    offset: int = 0,
) -> BatchPage:
    """Batches newest first (syncs, retries and reconciles), filtered, each with its stage progress."""
    t = sync_batches
    where: list[sa.ColumnElement[bool]] = []
    if entity is not None:
        where.append(t.c.entity == entity)
    if status is not None:
        where.append(t.c.status == status)
    if kind is not None:
        where.append(t.c.kind == kind)
    if since is not None:
        where.append(t.c.started_at >= since)
    total = conn.execute(sa.select(sa.func.count()).select_from(t).where(*where)).scalar_one()
    query = (
        sa.select(t).where(*where).order_by(t.c.started_at.desc(), t.c.id.desc()).limit(limit).offset(offset)
    )
    return BatchPage(int(total), _with_events(conn, list(conn.execute(query))))


def recent_batches(conn: sa.Connection, limit: int = 1000) -> list[BatchView]:
    query = sa.select(sync_batches).order_by(sync_batches.c.started_at.desc()).limit(limit)
    return [_batch(row) for row in conn.execute(query)]


def entity_stats(conn: sa.Connection, entities: list[str] | None = None) -> dict[str, EntityStatsView]:
    """Per entity: batch totals, the last batch, the last success, open failures and pending children.

    `entities` (the catalog's, in parent-first order) makes entities that never
    synced appear with zeros instead of being absent.
    """
    stats: dict[str, EntityStatsView] = {name: EntityStatsView(name) for name in entities or []}

    def of(name: str) -> EntityStatsView:
        return stats.setdefault(name, EntityStatsView(name))

    per_status = sa.select(
        sync_batches.c.entity,
        sa.func.count().label("n"),
        sa.func.count().filter(sync_batches.c.status == "failed").label("failed"),
        sa.func.max(sync_batches.c.finished_at).filter(sync_batches.c.status == "succeeded").label("last_ok"),
    ).group_by(sync_batches.c.entity)
    for row in conn.execute(per_status):
        view = of(row.entity)
        view.batches, view.failed_batches, view.last_success_at = row.n, row.failed, row.last_ok

    # Sum each count key over the entity's batches inside Postgres (jsonb_each_text).
    kv = sa.func.jsonb_each_text(sync_batches.c.counts).table_valued("key", "value").alias("kv")
    totals = (
        sa.select(sync_batches.c.entity, kv.c.key, sa.func.sum(sa.cast(kv.c.value, sa.BigInteger)))
        .select_from(sync_batches.join(kv, sa.true()))
        .where(kv.c.value.regexp_match(r"^-?[0-9]+$"))
        .group_by(sync_batches.c.entity, kv.c.key)
    )
    for entity, key, total in conn.execute(totals):
        view = of(entity)
        view.totals[key] = view.totals.get(key, 0) + int(total)

    last = (
        sa.select(sync_batches)
        .ext(distinct_on(sync_batches.c.entity))
        .order_by(sync_batches.c.entity, sync_batches.c.started_at.desc())
    )
    for row in conn.execute(last):
        of(row.entity).last_batch = _batch(row)

    open_failures = (
        sa.select(failed_records.c.entity, sa.func.count())
        .where(failed_records.c.resolved_at.is_(None))
        .group_by(failed_records.c.entity)
    )
    for entity, n in conn.execute(open_failures):
        of(entity).open_failures = n
    waiting = sa.select(pending_children.c.entity, sa.func.count()).group_by(pending_children.c.entity)
    for entity, n in conn.execute(waiting):
        of(entity).pending_children = n
    return stats


def entities_with_retry_work(
    engine: sa.Engine, *, include_permanent: bool = False, include_dead: bool = False
) -> set[str]:
    """Entities a retry run would have work for now: failed records it takes, children it can release."""
    from syncflow_dagster.store.failures import FailureRepository
    from syncflow_dagster.store.pending import PendingRepository

    due = FailureRepository(engine).entities_to_retry(
        include_permanent=include_permanent, include_dead=include_dead
    )
    return due | set(PendingRepository(engine).releasable_keys())


@dataclass
class WindowView:
    """One entity over a window of time: every batch that started in it, whatever its kind."""

    entity: str
    batches: dict[str, int] = field(default_factory=dict)  # by kind: sync, retry, reconcile
    statuses: dict[str, int] = field(default_factory=dict)  # by status: succeeded, failed, ...
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(BATCH_METRICS, 0))
    seconds: float = 0.0
    last_batch: BatchView | None = None
    last_success_at: dt.datetime | None = None
    held_failures: int = 0  # open failed records now
    dead_failures: int = 0
    pending_children: int = 0


def window_totals(
    conn: sa.Connection,
    since: dt.datetime,
    until: dt.datetime | None = None,
    entities: list[str] | None = None,
) -> dict[str, WindowView]:
    """Per entity, the totals of every batch (sync, retry, reconcile) that started in [since, until).

    Counts are under the stage table's names (a reconcile's deletes are `delete`, as a
    sync's); a batch still running, or stopped, adds what its finished stages
    counted. Failures and children waiting are as they are now.
    """
    views: dict[str, WindowView] = {name: WindowView(name) for name in entities or []}

    def of(name: str) -> WindowView:
        return views.setdefault(name, WindowView(name))

    t = sync_batches
    where = [t.c.started_at >= since] + ([t.c.started_at < until] if until is not None else [])
    per_kind = sa.select(t.c.entity, t.c.kind, t.c.status, sa.func.count()).where(*where)
    for entity, kind, status, n in conn.execute(per_kind.group_by(t.c.entity, t.c.kind, t.c.status)):
        view = of(entity)
        view.batches[kind] = view.batches.get(kind, 0) + n
        view.statuses[status] = view.statuses.get(status, 0) + n
    kv = sa.func.jsonb_each_text(t.c.counts).table_valued("key", "value").alias("kv")
    closed = (
        sa.select(t.c.entity, kv.c.key, sa.func.sum(sa.cast(kv.c.value, sa.BigInteger)))
        .select_from(t.join(kv, sa.true()))
        .where(*where, t.c.status != "running", kv.c.value.regexp_match(r"^[0-9]+$"))
        .group_by(t.c.entity, kv.c.key)
    )
    for entity, key, total in conn.execute(closed):
        counts = of(entity).counts
        counts[key] = counts.get(key, 0) + int(total)
    seconds = sa.func.extract("epoch", sa.func.coalesce(t.c.finished_at, sa.func.now()) - t.c.started_at)
    for entity, total in conn.execute(
        sa.select(t.c.entity, sa.func.sum(seconds)).where(*where).group_by(t.c.entity)
    ):
        of(entity).seconds = round(float(total or 0.0), 3)
    running = list(conn.execute(sa.select(t).where(*where, t.c.status == "running")))
    for batch in _with_events(conn, running):
        counts = of(batch.entity).counts
        for name, value in batch.counts.items():
            counts[name] = counts.get(name, 0) + value
    last = (
        sa.select(t)
        .where(*where)
        .ext(distinct_on(t.c.entity))
        .order_by(t.c.entity, t.c.started_at.desc(), t.c.id.desc())
    )
    for row in conn.execute(last):
        of(row.entity).last_batch = _batch(row)
    ok = (
        sa.select(t.c.entity, sa.func.max(t.c.finished_at))
        .where(t.c.status == "succeeded")
        .group_by(t.c.entity)
    )
    for entity, finished in conn.execute(ok):
        if entity in views or not entities:
            of(entity).last_success_at = finished
    f = failed_records
    held = sa.select(f.c.entity, f.c.state, sa.func.count()).where(f.c.resolved_at.is_(None))
    for entity, state, n in conn.execute(held.group_by(f.c.entity, f.c.state)):
        if state == "dead":
            of(entity).dead_failures = n
        else:
            of(entity).held_failures = n
    waiting = sa.select(pending_children.c.entity, sa.func.count()).group_by(pending_children.c.entity)
    for entity, n in conn.execute(waiting):
        of(entity).pending_children = n
    return views


@dataclass(frozen=True)
class Page:
    """A page of rows and the total that matched the filter."""

    total: int
    items: list[dict[str, Any]]


def failed_records_page(
    conn: sa.Connection,
    *,
    entity: str | None = None,
    reason: str | None = None,
    limit: int = 100,
    offset: int = 0,
    include_resolved: bool = False,
    state: str | None = None,
) -> Page:
    """Failed records, newest failure first; payloads are left out (they can be large).

    By default the ones that still hold their key (states open and dead);
    `include_resolved` adds the closed ones, `state` picks one state.
    """
    t = failed_records
    where: list[sa.ColumnElement[bool]] = []
    if state is not None:
        where.append(t.c.state == state)
    elif not include_resolved:
        where.append(t.c.resolved_at.is_(None))
    if entity is not None:
        where.append(t.c.entity == entity)
    if reason is not None:
        where.append(t.c.reason_code == reason)
    total = conn.execute(sa.select(sa.func.count()).select_from(t).where(*where)).scalar_one()
    columns = [
        t.c.id,
        t.c.entity,
        t.c.bk,
        t.c.reason_code,
        t.c.reason_class,
        t.c.detail,
        t.c.attempts,
        t.c.first_failed_at,
        t.c.last_failed_at,
        t.c.next_retry_at,
        t.c.resolved_at,
        t.c.batch_id,
        t.c.state,
        t.c.state_at,
        t.c.state_by,
        t.c.state_reason,
    ]
    query = sa.select(*columns).where(*where).order_by(t.c.last_failed_at.desc(), t.c.id).limit(limit)
    items = [_plain(row._mapping) for row in conn.execute(query.offset(offset))]
    return Page(total=int(total), items=items)


def pending_children_page(
    conn: sa.Connection, *, entity: str | None = None, limit: int = 100, offset: int = 0
) -> Page:
    """Children waiting for a parent, longest-waiting first."""
    t = pending_children
    where = [t.c.entity == entity] if entity is not None else []
    total = conn.execute(sa.select(sa.func.count()).select_from(t).where(*where)).scalar_one()
    columns = [
        t.c.id,
        t.c.entity,
        t.c.bk,
        t.c.missing_parent_entity,
        t.c.missing_parent_bk,
        t.c.since,
        t.c.batch_id,
    ]
    query = sa.select(*columns).where(*where).order_by(t.c.since, t.c.id).limit(limit).offset(offset)
    return Page(total=int(total), items=[_plain(row._mapping) for row in conn.execute(query)])


def _plain(row: sa.RowMapping) -> dict[str, Any]:
    return {k: (str(v) if k in ("id", "batch_id") and v is not None else v) for k, v in row.items()}
