"""Helpers shared by the service tests: a migrated database and rows written the way the sync writes them."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import sqlalchemy as sa

from syncflow_dagster.store.schema import failed_records, pending_children, sync_batches


def insert_batch(
    conn: sa.Connection,
    entity: str,
    counts: dict[str, int],
    *,
    run_id: str | None = None,
    status: str = "succeeded",
    stage_seconds: dict[str, float] | None = None,
    seconds: float = 2.5,
) -> uuid.UUID:
    started = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=seconds)
    batch_id = uuid.uuid4()
    conn.execute(
        sa.insert(sync_batches).values(
            id=batch_id,
            entity=entity,
            partition_date=started.date(),
            run_id=run_id or f"run-{uuid.uuid4().hex[:8]}",
            status=status,
            started_at=started,
            finished_at=None if status == "running" else started + dt.timedelta(seconds=seconds),
            counts=counts,
            stage_seconds=stage_seconds or {"fetch": 1.0, "deliver": 0.5},
        )
    )
    return batch_id


def insert_failure(conn: sa.Connection, entity: str, bk: str, reason: str, **extra: Any) -> None:
    conn.execute(
        sa.insert(failed_records).values(
            id=uuid.uuid4(),
            entity=entity,
            bk_hash=uuid.uuid4(),
            bk=bk,
            reason_code=reason,
            reason_class="retryable",
            detail=f"{reason} for {bk}",
            payload={"secret_looking": "payloads are never listed"},
            **extra,
        )
    )


def insert_pending(conn: sa.Connection, entity: str, bk: str, parent: str, parent_bk: str) -> None:
    conn.execute(
        sa.insert(pending_children).values(
            id=uuid.uuid4(),
            entity=entity,
            bk_hash=uuid.uuid4(),
            bk=bk,
            missing_parent_entity=parent,
            missing_parent_bk=parent_bk,
            missing_parent_bk_hash=uuid.uuid4(),
        )
    )
