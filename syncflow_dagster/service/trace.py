"""One record's history, from SyncFlow's own tables: what `syncflow trace ENTITY KEY` prints.

* state: what SyncFlow last delivered (entity_state): data hash, rowversion,
  ScheduleHub id, first seen, last synced and the batch that did it;
* deliveries: every time the record was sent, with the batch, run, kind and
  partition date, the action and ScheduleHub's answer (store/delivery_log.py);
* failures: its failed records, open or closed (with attempts, times, who
  closed one and why), and the parent it waits for if it is parked;
* frames: while the stage frames of a partition are kept (retention days),
  what the run read of it there: fetched rowversion and change time, hashes,
  whether the rowversion split kept it, and what the delta planned.

Everything is read by the record's key hash, from the indexes the tables have.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import sqlalchemy as sa

from syncflow_dagster.catalog import EntitySpec
from syncflow_dagster.engine import columns as c
from syncflow_dagster.engine import stage_table as st
from syncflow_dagster.engine.identity import key_hash_of
from syncflow_dagster.store.delivery_log import DeliveryLogRepository
from syncflow_dagster.store.schema import entity_state, failed_records, pending_children

# The stage frames a trace looks into, in pipeline order, and what each tells.
TRACE_STAGES = tuple(stage.asset for stage in (st.IDENTITY, st.ROWVERSION, st.DELTA, st.DELIVER))
MAX_FRAME_DATES = 5


def key_hash(bk: str) -> bytes:
    """BK_HASH of a canonical key text (engine/identity.py)."""
    value = key_hash_of(pa.array([bk], pa.string()))[0].as_py()
    assert isinstance(value, bytes)
    return value


def record_trace(
    engine: sa.Engine,
    entity: EntitySpec,
    bk: str,
    *,
    frames_url: str | None = None,
    dates: list[dt.date] | None = None,
) -> dict[str, Any]:
    """Everything SyncFlow knows of one record. `frames_url` (the database URL) looks into the stage
    frames of `dates`, or of the partition dates its deliveries came from (the latest few)."""
    digest = key_hash(bk)
    hashed = uuid.UUID(bytes=digest)
    with engine.connect() as conn:
        state = conn.execute(
            sa.select(entity_state).where(
                entity_state.c.entity == entity.name, entity_state.c.bk_hash == hashed
            )
        ).one_or_none()
        failures = conn.execute(
            sa.select(failed_records)
            .where(failed_records.c.entity == entity.name, failed_records.c.bk_hash == hashed)
            .order_by(failed_records.c.first_failed_at)
        ).all()
        waiting = conn.execute(
            sa.select(pending_children).where(
                pending_children.c.entity == entity.name, pending_children.c.bk_hash == hashed
            )
        ).one_or_none()
    deliveries = DeliveryLogRepository(engine).history(entity.name, digest)
    document: dict[str, Any] = {
        "entity": entity.name,
        "bk": bk,
        "bk_hash": digest.hex(),
        "state": None
        if state is None
        else {
            "data_hash": state.data_hash.hex(),
            "rowversion": state.rowversion,
            "recipe": state.recipe,
            "schedulehub_id": state.schedulehub_id,
            "first_seen_at": state.first_seen_at,
            "last_synced_at": state.last_synced_at,
            "last_batch_id": state.last_batch_id,
        },
        "deliveries": [
            {
                "at": d.at,
                "batch_id": d.batch_id,
                "run_id": d.run_id,
                "kind": d.kind,
                "partition_date": d.partition_date,
                "action": d.action,
                "status": d.status,
                "outcome": d.outcome,
                "data_hash": None if d.data_hash is None else bytes(d.data_hash).hex(),
                "rowversion": d.rowversion,
            }
            for d in deliveries
        ],
        "failures": [
            {
                key: value
                for key, value in row._asdict().items()
                if key not in ("payload", "bk_hash", "entity", "bk")
            }
            for row in failures
        ],
        "waiting_for": None
        if waiting is None
        else {
            "parent_entity": waiting.missing_parent_entity,
            "parent_bk": waiting.missing_parent_bk,
            "since": waiting.since,
            "batch_id": waiting.batch_id,
        },
        "frames": [],
    }
    if frames_url is not None:
        chosen = dates or sorted({d.partition_date for d in deliveries if d.partition_date}, reverse=True)
        document["frames"] = _frames(frames_url, entity.name, digest, chosen[:MAX_FRAME_DATES])
    return document


def _frames(url: str, entity: str, digest: bytes, dates: list[dt.date]) -> list[dict[str, Any]]:
    """The record's row in each kept stage frame of `dates` (frames of pruned dates say so)."""
    from syncflow_dagster.store.frame_io_manager import FrameSlice, PostgresFrameClient, stage_table_name

    found: list[dict[str, Any]] = []
    with PostgresFrameClient(url) as client:
        for day in sorted(dates):
            seen: dict[str, Any] = {"date": day}
            for stage in TRACE_STAGES:
                frame = client.select_slice(FrameSlice(stage_table_name(stage, entity), entity, (day,)))
                seen[stage] = _row_in(frame, digest)
            found.append(seen)
    return found


# The columns of a stage frame a trace shows.
_TRACED_COLUMNS = (
    c.ROWVERSION,
    c.CHANGED_AT,
    c.DATA_HASH,
    c.ACTION,
    c.REASON,
    "_delivery_status",
    "_outcome",
    "_deleted",
)


def _row_in(frame: pa.Table | None, digest: bytes) -> Any:
    """The record's last row in one stage frame, or why there is none (None: no rows kept)."""
    if frame is None or frame.num_rows == 0:
        return None
    if c.BK_HASH not in frame.column_names:
        return "no key column"
    mine = frame.filter(pc.equal(frame[c.BK_HASH], pa.scalar(digest, c.BK_HASH_TYPE)))
    if mine.num_rows == 0:
        return "absent"
    row = mine.slice(mine.num_rows - 1).to_pylist()[0]
    return {k: (v.hex() if isinstance(v, bytes) else v) for k, v in row.items() if k in _TRACED_COLUMNS}
