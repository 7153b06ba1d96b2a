"""Sync batches: one row per sync of an entity and partition date: status, counts, stage timings."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import distinct_on
from uuid6 import uuid7

from syncflow_dagster.store.events import StageEventRepository, stage_totals
from syncflow_dagster.store.schema import BATCH_KINDS, BATCH_STATUSES, sync_batches


@dataclass(frozen=True)
class BatchRecord:
    id: uuid.UUID
    entity: str
    partition_date: dt.date | None
    run_id: str | None
    status: str
    started_at: dt.datetime
    finished_at: dt.datetime | None
    counts: dict[str, int]
    stage_seconds: dict[str, float]
    kind: str = "sync"
    failed_closes: int = 0
    cancelled_closes: int = 0


def _record(row: sa.Row[Any]) -> BatchRecord:
    return BatchRecord(**row._asdict())


# A run that stopped closes its running batches with one of these.
STOPPED_STATUSES = ("failed", "cancelled")


class BatchRepository:
    """Start, finish and look up sync batches (table syncflow.sync_batches)."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine

    def start_batch(
        self, entity: str, partition_date: dt.date | None, run_id: str | None, kind: str = "sync"
    ) -> uuid.UUID:
        """A new running batch of job `kind`; its UUIDv7 id sorts by start time."""
        if not entity:
            raise ValueError("start_batch: entity name is empty")
        if kind not in BATCH_KINDS:
            raise ValueError(f"entity {entity!r}, field 'kind': {kind!r} is not one of {BATCH_KINDS}")
        batch_id = uuid.UUID(bytes=uuid7().bytes)
        with self.engine.begin() as conn:
            conn.execute(
                sync_batches.insert().values(
                    id=batch_id, entity=entity, partition_date=partition_date, run_id=run_id, kind=kind
                )
            )
        return batch_id

    def finish_batch(
        self,
        batch_id: uuid.UUID,
        status: str,
        counts: Mapping[str, int] | None = None,
        stage_seconds: Mapping[str, float] | None = None,
    ) -> None:
        """Close a batch as succeeded, failed or cancelled with its counts and per-stage seconds."""
        if status not in BATCH_STATUSES or status == "running":
            raise ValueError(
                f"batch {batch_id}, field 'status': {status!r} is not 'succeeded', 'failed' or 'cancelled'"
            )
        clean_counts: dict[str, int] = {}
        for key, value in (counts or {}).items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"batch {batch_id}, count {key!r}: {value!r} is not a non-negative integer")
            clean_counts[key] = value
        clean_seconds: dict[str, float] = {}
        for key, seconds in (stage_seconds or {}).items():
            if isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds < 0:
                raise ValueError(f"batch {batch_id}, stage {key!r}: {seconds!r} is not a number of seconds")
            clean_seconds[key] = float(seconds)
        with self.engine.begin() as conn:
            result = conn.execute(
                sync_batches.update()
                .where(sync_batches.c.id == batch_id)
                .values(
                    status=status,
                    finished_at=sa.func.now(),
                    counts=clean_counts,
                    stage_seconds=clean_seconds,
                    **_close_counter(status),
                )
            )
        if result.rowcount == 0:
            raise KeyError(f"no sync batch with id {batch_id}")

    def close_running(self, run_id: str, status: str) -> list[uuid.UUID]:
        """Close every batch the run `run_id` left running as `status` (failed or cancelled); the ids.

        A run that stops before its report stage (a step that failed for good, a
        killed process, an operator's cancel) never finishes its batch itself.
        The batch keeps what the stages that finished counted (their stage
        events), so it says how far the run got; a re-execution reopens it.
        """
        if status not in STOPPED_STATUSES:
            raise ValueError(f"run {run_id!r}, field 'status': {status!r} is not one of {STOPPED_STATUSES}")
        running = sa.select(sync_batches.c.id).where(
            sync_batches.c.run_id == run_id, sync_batches.c.status == "running"
        )
        with self.engine.connect() as conn:
            ids = [row.id for row in conn.execute(running)]
        events = StageEventRepository(self.engine).for_batches(ids)
        closed: list[uuid.UUID] = []
        with self.engine.begin() as conn:
            for batch_id in ids:
                totals = stage_totals(events.get(batch_id, []))
                result = conn.execute(
                    sync_batches.update()
                    # Still running: a batch that finished meanwhile keeps its own close.
                    .where(sync_batches.c.id == batch_id, sync_batches.c.status == "running")
                    .values(
                        status=status,
                        finished_at=sa.func.now(),
                        counts=totals.counts,
                        stage_seconds=totals.stage_seconds,
                        **_close_counter(status),
                    )
                )
                if result.rowcount:
                    closed.append(batch_id)
        return closed

    def fail_running(self, run_id: str) -> list[uuid.UUID]:
        """`close_running(run_id, "failed")`."""
        return self.close_running(run_id, "failed")

    def reopen(self, batch_id: uuid.UUID) -> None:
        """Mark a failed or cancelled batch running again: a re-execution of its run continues it."""
        with self.engine.begin() as conn:
            conn.execute(
                sync_batches.update()
                .where(sync_batches.c.id == batch_id, sync_batches.c.status.in_(STOPPED_STATUSES))
                .values(status="running", finished_at=None)
            )

    def get(self, batch_id: uuid.UUID) -> BatchRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(sync_batches).where(sync_batches.c.id == batch_id)).one_or_none()
        return None if row is None else _record(row)

    def latest(self, entity: str | None = None) -> list[BatchRecord]:
        """The most recent batch of each entity (or of the one entity given), by entity name."""
        query = (
            sa.select(sync_batches)
            .ext(distinct_on(sync_batches.c.entity))
            .order_by(sync_batches.c.entity, sync_batches.c.started_at.desc(), sync_batches.c.id.desc())
        )
        if entity is not None:
            query = query.where(sync_batches.c.entity == entity)
        with self.engine.connect() as conn:
            return [_record(row) for row in conn.execute(query)]

    def list_by_run(self, run_id: str) -> list[BatchRecord]:
        """The batches a Dagster run produced, oldest first."""
        query = sa.select(sync_batches).where(sync_batches.c.run_id == run_id).order_by(sync_batches.c.id)
        with self.engine.connect() as conn:
            return [_record(row) for row in conn.execute(query)]

    def last_success_per_entity(self) -> dict[str, dt.datetime]:
        """When each entity's latest succeeded batch finished (entities with none are absent)."""
        query = (
            sa.select(sync_batches.c.entity, sa.func.max(sync_batches.c.finished_at))
            .where(sync_batches.c.status == "succeeded")
            .group_by(sync_batches.c.entity)
        )
        with self.engine.connect() as conn:
            return {entity: finished for entity, finished in conn.execute(query) if finished is not None}


def _close_counter(status: str) -> dict[str, Any]:
    """The closes counter a close as `status` adds one to (none for a success: that is final)."""
    if status == "failed":
        return {"failed_closes": sync_batches.c.failed_closes + 1}
    if status == "cancelled":
        return {"cancelled_closes": sync_batches.c.cancelled_closes + 1}
    return {}
