"""Read-through marks: per entity, the APISmith rowversion every change up to which is accounted for.

Not the committed watermark (store/watermarks.py): a record ScheduleHub
refused, or a child parked for its parent, is accounted for but not
committed. A catch-up read (defs/reading.py) reads (mark, snapshot] whatever
the change times, notes the snapshot against its batch, and the persist stage
moves the mark to it once the batch's rows are all committed, failed or
parked. A mark only moves forward; a batch that failed or was cancelled never
moves it, so the next catch-up read repeats its range (which is idempotent:
what was committed is stale by rowversion).
"""

from __future__ import annotations

import uuid

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert

from syncflow_dagster.store.schema import read_marks, read_snapshots


def _check(entity: str, rowversion: int, field: str) -> None:
    if not entity:
        raise ValueError("read mark: entity name is empty")
    if isinstance(rowversion, bool) or not isinstance(rowversion, int) or rowversion < 0:
        raise ValueError(f"entity {entity!r}, field {field!r}: {rowversion!r} is not a non-negative integer")


class ReadMarkRepository:
    """Read the per-entity read-through marks, note a batch's snapshot, advance a mark from it."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine

    def get(self, entity: str) -> int | None:
        """The entity's mark, or None when no catch-up read of it was ever accounted for."""
        with self.engine.connect() as conn:
            value = conn.execute(
                sa.select(read_marks.c.rowversion).where(read_marks.c.entity == entity)
            ).scalar_one_or_none()
        return None if value is None else int(value)

    def all(self) -> dict[str, int]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(read_marks.c.entity, read_marks.c.rowversion)).all()
        return {str(entity): int(rowversion) for entity, rowversion in rows}

    def note_snapshot(self, batch_id: uuid.UUID, entity: str, after: int, snapshot: int) -> None:
        """Remember that `batch_id` read `entity`'s changes in (after, snapshot]; a re-read replaces it."""
        _check(entity, after, "after_rowversion")
        _check(entity, snapshot, "snapshot_rowversion")
        statement = insert(read_snapshots).values(
            batch_id=batch_id, entity=entity, after_rowversion=after, snapshot_rowversion=snapshot
        )
        statement = statement.on_conflict_do_update(
            index_elements=[read_snapshots.c.batch_id],
            set_={
                "entity": statement.excluded.entity,
                "after_rowversion": statement.excluded.after_rowversion,
                "snapshot_rowversion": statement.excluded.snapshot_rowversion,
                "noted_at": sa.func.now(),
            },
        )
        with self.engine.begin() as conn:
            conn.execute(statement)

    def snapshot_of(self, batch_id: uuid.UUID) -> int | None:
        with self.engine.connect() as conn:
            value = conn.execute(
                sa.select(read_snapshots.c.snapshot_rowversion).where(read_snapshots.c.batch_id == batch_id)
            ).scalar_one_or_none()
        return None if value is None else int(value)

    def advance_from_batch(self, batch_id: uuid.UUID) -> int | None:
        """Move the batch's entity's mark up to the snapshot the batch read at; the mark now in force.

        None when the batch made no catch-up read (a closed window's run). The
        batch's note is consumed in the same transaction, so the table holds
        only batches that have not finished.
        """
        with self.engine.begin() as conn:
            noted = conn.execute(
                sa.delete(read_snapshots)
                .where(read_snapshots.c.batch_id == batch_id)
                .returning(read_snapshots.c.entity, read_snapshots.c.snapshot_rowversion)
            ).one_or_none()
            if noted is None:
                return None
            entity, snapshot = str(noted[0]), int(noted[1])
            statement = insert(read_marks).values(entity=entity, rowversion=snapshot)
            statement = statement.on_conflict_do_update(
                index_elements=[read_marks.c.entity],
                set_={"rowversion": statement.excluded.rowversion, "updated_at": sa.func.now()},
                where=read_marks.c.rowversion < statement.excluded.rowversion,
            )
            conn.execute(statement)
            return int(
                conn.execute(
                    sa.select(read_marks.c.rowversion).where(read_marks.c.entity == entity)
                ).scalar_one()
            )
