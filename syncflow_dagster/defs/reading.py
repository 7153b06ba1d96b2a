"""Which APISmith records a sync run reads, so that no record is ever missed.

A run covers an entity and the dates [D1..Dn]; P is the partitions' start and
T today (UTC).

* Open end (Dn >= T: the run of today, what the change sensor launches, and a
  history run): a catch-up read. Every change and tombstone with a rowversion
  in (M, S], whatever its change time: M is the entity's read-through mark
  (0 when it has none, or with the run tag `syncflow/full_window=true`), S the
  entity's APISmith watermark, pinned as the snapshot of both streams. Each row
  lands on its change day clipped into [D1, Dn].
* Closed (Dn < T: a re-run or backfill of past days): the window of its days,
  after the `window_rowversion` of the partition's last finished run; with no
  lower time bound when D1 == P ("the first day also holds everything earlier").
* M := S once the run's rows are all accounted for (committed, failed or
  parked): `account_read`, called by the persist stage after the commit. A run
  that fails or is cancelled before it leaves M where it was, and the next
  catch-up read repeats the range (what was committed is then stale by
  rowversion, so nothing is delivered twice).

So the change time decides only the partition a record is filed under; the
rowversion decides what is new.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import dagster as dg
import pyarrow as pa
from dagster import AssetExecutionContext

from syncflow_dagster.catalog import EntitySpec
from syncflow_dagster.clients.apismith import ApiSmithClient
from syncflow_dagster.defs import stages
from syncflow_dagster.defs.partitions import partitions_start
from syncflow_dagster.engine import stage_table as st
from syncflow_dagster.store.repositories import SyncStore

# Run tag: read from the beginning (M = 0 for a catch-up read, the whole window for a closed one).
FULL_WINDOW_TAG = "syncflow/full_window"
# Run tag of a resync (ScheduleHub lost records): reads from the beginning too, and delivers again.
RESYNC_TAG = "syncflow/resync"


def from_the_beginning(tags: Mapping[str, str]) -> bool:
    """Whether a run with these tags reads from the beginning: `syncflow/full_window` or a resync."""
    return tags.get(FULL_WINDOW_TAG) == "true" or tags.get(RESYNC_TAG) == "true"


@dataclass(frozen=True)
class ReadRule:
    """How a run over some dates reads APISmith (see the module's docstring)."""

    catch_up: bool
    open_start: bool


def read_rule(dates: tuple[dt.date, ...], *, start: dt.date, today: dt.date) -> ReadRule:
    """Open end when the run reaches today; open start when it begins at the partitions' start."""
    if not dates:
        raise ValueError("a sync run reads at least one date")
    return ReadRule(catch_up=max(dates) >= today, open_start=min(dates) <= start)


def utc_today() -> dt.date:
    return dt.datetime.now(dt.UTC).date()


def extract(
    context: AssetExecutionContext,
    client: ApiSmithClient,
    database: SyncStore,
    entity: EntitySpec,
    dates: tuple[dt.date, ...],
    batch: uuid.UUID,
    sink: Callable[[pa.Table], None] | None = None,
) -> stages.StageResult:
    """The fetch stage of this run, read by the rule of its dates; a catch-up read notes its snapshot.

    With `sink`, the pages go to it as they arrive (see `stages.fetch_stage`)."""
    rule = read_rule(dates, start=dt.date.fromisoformat(partitions_start()), today=utc_today())
    from_scratch = from_the_beginning(context.run.tags)
    if not rule.catch_up:
        after = window_read_up_to(context)
        return stages.fetch_stage(client, entity, dates, after, open_start=rule.open_start, sink=sink)
    marks = database.read_marks()
    after = 0 if from_scratch else (marks.get(entity.name) or 0)
    result = stages.fetch_stage(client, entity, dates, after, catch_up=True, sink=sink)
    snapshot = int(result.notes[stages.READ_SNAPSHOT])
    marks.note_snapshot(batch, entity.name, int(result.notes["after_rowversion"]), snapshot)
    return result


def account_read(database: SyncStore, batch: uuid.UUID) -> int | None:
    """Move the entity's read-through mark to the snapshot the batch read at (None: no catch-up read).

    Called once the batch's rows are all committed, failed or parked.
    """
    return database.read_marks().advance_from_batch(batch)


def window_read_up_to(context: AssetExecutionContext) -> int:
    """The `window_rowversion` of the extracted frame of this partition's last run that reached the report.

    Only a run whose sync_report materialised accounted for every row it read,
    so only its mark is used; anything else (no history, a range of dates, a
    re-execution) reads the whole window again, which is always correct. An
    operator forces that with the run tag `syncflow/full_window=true` (after
    restoring SyncFlow's state from a backup, say); a resync does too.
    """
    if len(context.partition_keys) != 1 or from_the_beginning(context.run.tags):
        return 0
    key = context.partition_keys[0]
    instance = context.instance
    reports = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(st.REPORT.asset), asset_partitions=[key]), limit=1
    ).records
    if not reports:
        return 0
    finished_run = reports[0].run_id
    extractions = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=context.asset_key, asset_partitions=[key]), limit=20
    ).records
    for record in extractions:
        if record.run_id == finished_run and record.asset_materialization is not None:
            mark = record.asset_materialization.metadata.get(stages.WINDOW_ROWVERSION)
            value = getattr(mark, "value", None)
            return int(value) if isinstance(value, int) else 0
    return 0
