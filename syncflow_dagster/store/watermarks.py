"""Rowversion watermarks: per entity, the highest rowversion SyncFlow has committed.

A watermark only moves forward. Fetch asks APISmith for changes after it; a
late commit of an older batch (a retry, a backfill) can never pull it back and
make the next run re-read, or worse skip, a range of changes.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert

from syncflow_dagster.store.schema import watermarks


@dataclass(frozen=True)
class Watermark:
    entity: str
    rowversion: int
    changed_at: dt.datetime | None
    updated_at: dt.datetime


def _check(entity: str, rowversion: int) -> None:
    if not entity:
        raise ValueError("watermark: entity name is empty")
    if isinstance(rowversion, bool) or not isinstance(rowversion, int) or rowversion < 0:
        raise ValueError(
            f"entity {entity!r}, field 'rowversion': {rowversion!r} is not a non-negative integer"
        )


def advance_watermark(
    conn: sa.Connection, entity: str, rowversion: int, changed_at: dt.datetime | None = None
) -> None:
    """Raise the entity's watermark to `rowversion` inside the caller's transaction; never lower it."""
    _check(entity, rowversion)
    statement = insert(watermarks).values(entity=entity, rowversion=rowversion, changed_at=changed_at)
    statement = statement.on_conflict_do_update(
        index_elements=[watermarks.c.entity],
        set_={
            "rowversion": statement.excluded.rowversion,
            # GREATEST ignores NULLs, so a commit without changed_at keeps the known one.
            "changed_at": sa.func.greatest(watermarks.c.changed_at, statement.excluded.changed_at),
            "updated_at": sa.func.now(),
        },
        where=watermarks.c.rowversion < statement.excluded.rowversion,
    )
    conn.execute(statement)


class WatermarkRepository:
    """Read and advance the per-entity rowversion watermarks."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine

    def get(self, entity: str) -> Watermark | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(watermarks).where(watermarks.c.entity == entity)).one_or_none()
        return None if row is None else Watermark(**row._asdict())

    def all(self) -> list[Watermark]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(watermarks).order_by(watermarks.c.entity)).all()
        return [Watermark(**row._asdict()) for row in rows]

    def set_if_higher(self, entity: str, rowversion: int, changed_at: dt.datetime | None = None) -> Watermark:
        """Advance to `rowversion` if it is higher than the stored one; returns the watermark now in force."""
        with self.engine.begin() as conn:
            advance_watermark(conn, entity, rowversion, changed_at)
            row = conn.execute(sa.select(watermarks).where(watermarks.c.entity == entity)).one()
        return Watermark(**row._asdict())
