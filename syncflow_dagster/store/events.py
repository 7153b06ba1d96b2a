"""Stage events: when each stage of a batch started and finished, with rows and seconds."""

from __future__ import annotations

import datetime as dt
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from uuid6 import uuid7

from syncflow_dagster.store.schema import STAGE_STATUSES, stage_events


@dataclass(frozen=True)
class StageEvent:
    id: uuid.UUID
    batch_id: uuid.UUID | None
    entity: str
    stage: str
    status: str
    rows: int | None
    seconds: float | None
    at: dt.datetime
    detail: dict[str, Any] | None


@dataclass
class StageProgress:
    """Filled in by the body of `StageEventRepository.stage` and written at its end."""

    rows: int | None = None
    detail: dict[str, Any] = field(default_factory=dict)


class StageEventRepository:
    """Append-only log of stage starts and finishes (table syncflow.stage_events)."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine

    def record(
        self,
        batch_id: uuid.UUID | None,
        entity: str,
        stage: str,
        status: str,
        *,
        rows: int | None = None,
        seconds: float | None = None,
        detail: Mapping[str, Any] | None = None,
    ) -> uuid.UUID:
        if status not in STAGE_STATUSES:
            raise ValueError(
                f"entity {entity!r}, stage {stage!r}, field 'status': {status!r} "
                f"is not one of {STAGE_STATUSES}"
            )
        if rows is not None and rows < 0:
            raise ValueError(f"entity {entity!r}, stage {stage!r}, field 'rows': {rows!r} is negative")
        event_id = uuid.UUID(bytes=uuid7().bytes)
        with self.engine.begin() as conn:
            conn.execute(
                stage_events.insert().values(
                    id=event_id,
                    batch_id=batch_id,
                    entity=entity,
                    stage=stage,
                    status=status,
                    rows=rows,
                    seconds=seconds,
                    detail=dict(detail) if detail is not None else None,
                )
            )
        return event_id

    def record_start(self, batch_id: uuid.UUID | None, entity: str, stage: str) -> uuid.UUID:
        return self.record(batch_id, entity, stage, "started")

    def record_finish(
        self,
        batch_id: uuid.UUID | None,
        entity: str,
        stage: str,
        *,
        succeeded: bool = True,
        rows: int | None = None,
        seconds: float | None = None,
        detail: Mapping[str, Any] | None = None,
    ) -> uuid.UUID:
        status = "succeeded" if succeeded else "failed"
        return self.record(batch_id, entity, stage, status, rows=rows, seconds=seconds, detail=detail)

    @contextmanager
    def stage(self, batch_id: uuid.UUID | None, entity: str, stage: str) -> Iterator[StageProgress]:
        """Record the start, run the body, record the finish (failed, with the error, if it raised)."""
        self.record_start(batch_id, entity, stage)
        progress = StageProgress()
        started = time.perf_counter()
        try:
            yield progress
        except BaseException as exc:
            detail = {**progress.detail, "error": f"{type(exc).__name__}: {exc}"[:2000]}
            self.record_finish(
                batch_id,
                entity,
                stage,
                succeeded=False,
                rows=progress.rows,
                seconds=time.perf_counter() - started,
                detail=detail,
            )
            raise
        self.record_finish(
            batch_id,
            entity,
            stage,
            rows=progress.rows,
            seconds=time.perf_counter() - started,
            detail=progress.detail or None,
        )

    def for_batch(self, batch_id: uuid.UUID) -> list[StageEvent]:
        """A batch's events in the order they happened."""
        return self.for_batches([batch_id]).get(batch_id, [])

    def for_batches(self, batch_ids: list[uuid.UUID]) -> dict[uuid.UUID, list[StageEvent]]:
        """The events of several batches (one query), each batch's in the order they happened."""
        if not batch_ids:
            return {}
        query = (
            sa.select(stage_events)
            .where(stage_events.c.batch_id.in_(batch_ids))
            .order_by(stage_events.c.batch_id, stage_events.c.id)
        )
        out: dict[uuid.UUID, list[StageEvent]] = {}
        with self.engine.connect() as conn:
            for row in conn.execute(query):
                event = StageEvent(**row._asdict())
                assert event.batch_id is not None
                out.setdefault(event.batch_id, []).append(event)
        return out


@dataclass(frozen=True)
class StageTotals:
    """What a batch's finished stages add up to: counts, seconds per stage, the latest event per stage."""

    counts: dict[str, int]
    stage_seconds: dict[str, float]
    latest: dict[str, StageEvent]


def stage_totals(events: list[StageEvent]) -> StageTotals:
    """Total a batch's stage events (in the order they happened) into its counts and seconds.

    Only stages that finished count, and a stage re-executed after a failure or
    a cancel counts once, with its latest finished event: this is what a batch
    reports while it runs, when it closes, and after it stopped half-way.
    """
    latest: dict[str, StageEvent] = {}
    for event in events:
        if event.status == "succeeded":
            latest[event.stage] = event
    counts: dict[str, int] = {}
    seconds: dict[str, float] = {}
    for stage, event in latest.items():
        seconds[stage] = float(event.seconds or 0.0)
        for key, value in (event.detail or {}).items():
            if isinstance(value, bool) or not isinstance(value, int):
                continue  # a note, not a count
            counts[key] = counts.get(key, 0) + value
    return StageTotals({k: max(v, 0) for k, v in counts.items()}, seconds, latest)
