"""The one pipeline: each stage after the fetch has one implementation, and one function chains them.

* `run_stage(name, run, reader, writer)` runs ONE stage of one entity over its
  input, chunk by chunk (the streamed form in `streamed.py`, whose kernels are
  the frame functions of `stages.py`), with what belongs to the stage itself:
  rejected rows recorded as failed records (normalize), the keys handed on to
  children in the same run (parent-child), the read-through mark accounted
  once the rows are committed (persist). Each stage asset of `assets.py` calls
  it for its own stage, between the frame store's reader and writer.
* `run_stages(first, frame, run)` runs the stages from `first` through
  persist over a frame held in memory (`memory_frames.py`).
  `run_batch(event, frame, run, ...)` runs those of a job event (the stage
  table's `JOB_EVENTS`) that way as one maintenance batch, booked as one
  stage event and closed: what the retry op (from parent-child, on the failed
  records that are due), the reconcile op (from deliver, on the deletes its
  key scan planned) and the target audit's repair (from parent-child, on
  APISmith's rows of the keys ScheduleHub lost) call. The soak and the other
  end-to-end tests run the assets themselves.

The fetch (`assets.extracted`, `reading.extract`) makes the first frame and
the report (`assets.sync_report`) closes the batch; neither runs on a frame,
so they are not in `STAGES`.
"""

from __future__ import annotations

import datetime as dt
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import pyarrow as pa

from syncflow_dagster.catalog import Catalog, EntitySpec
from syncflow_dagster.clients.schedulehub import ScheduleHubClient
from syncflow_dagster.defs import bookkeeping, reading, stages, streamed
from syncflow_dagster.defs.checks import KeyTally
from syncflow_dagster.defs.memory_frames import FrameReader, FrameWriter, TableReader, TableWriter
from syncflow_dagster.engine import stage_table as st
from syncflow_dagster.store.repositories import SyncStore

# The stages that run on a frame, in order, by their one name (the stage table's).
STAGES: tuple[str, ...] = tuple(stage.name for stage in st.STAGES if stage not in (st.FETCH, st.REPORT))


@dataclass
class EntityRun:
    """One entity's share of a run: what its stages need besides their input, and what they leave.

    `arriving` is shared by the entities of one run (parents first): the keys
    each entity hands to delivery, which its children in the same run count
    on as arrived. `run_date` is the partition date of children released into
    the run (None outside a sync: a retry's rows keep no partition).
    `chunk_size` is how many rows each stage handles at a time (the `tuning`
    resource's, SYNCFLOW_CHUNK_SIZE).
    """

    catalog: Catalog
    entity: EntitySpec
    database: SyncStore
    batch_id: uuid.UUID
    schedulehub: Callable[[], ScheduleHubClient] | None = None
    run_date: dt.date | None = None
    resync: bool = False
    # Required (keyword): a stage that silently fell back to a default would ignore the operator's setting.
    chunk_size: int = field(kw_only=True)
    arriving: dict[str, pa.Array] = field(default_factory=dict)
    # Left by the stages for the checks and the metadata:
    rejected: pa.Table | None = None  # normalize: one row per refused value
    keys: KeyTally | None = None  # delta: the keys check's tally
    accepted: tuple[int, int] = (0, 0)  # persist: accepted (upserts, deletes), for delivered = committed


def run_stage(name: str, run: EntityRun, reader: FrameReader, writer: FrameWriter) -> stages.StageResult:
    """Run stage `name` (one of `STAGES`) for `run.entity`, reading `reader` and writing `writer`."""
    entity, database, size = run.entity, run.database, run.chunk_size
    if name == st.NORMALIZE.name:
        result, run.rejected = streamed.normalize(entity, reader, writer, size)
        if run.rejected.num_rows:
            bookkeeping.record_rejected(database, entity, run.batch_id, run.rejected)
        return result
    if name == st.IDENTITY.name:
        return streamed.row_wise(
            reader, writer, lambda chunk: stages.identity_stage(entity, chunk, size), size
        )
    if name == st.ROWVERSION.name:
        state = database.state()
        return streamed.row_wise(
            reader,
            writer,
            lambda chunk: stages.rowversion_stage(state, entity, chunk, resync=run.resync),
            size,
        )
    if name == st.DELTA.name:
        result, run.keys = streamed.delta(reader, writer, size, resync=run.resync)
        return result
    if name == st.PARENT_CHILD.name:
        result, run.arriving[entity.name] = streamed.parent_child(
            run.catalog,
            entity,
            database,
            reader,
            writer,
            run.batch_id,
            run_date=run.run_date,
            arriving=run.arriving,
            size=size,
        )
        return result
    if name == st.DELIVER.name:
        if run.schedulehub is None:
            raise ValueError(f"entity {entity.name!r}: the deliver stage needs a ScheduleHub client")
        client = run.schedulehub
        return streamed.row_wise(
            reader, writer, lambda chunk: stages.deliver_stage(client(), entity, chunk), size
        )
    if name == st.PERSIST.name:
        result, run.accepted = streamed.persist(database, entity, reader, writer, run.batch_id, size)
        # Every row of the batch is now committed, failed or parked: its catch-up read
        # (a sync's; a retry or reconcile batch made none) is accounted for.
        read_through = reading.account_read(database, run.batch_id)
        if read_through is not None:
            result.notes["read_through"] = read_through
        return result
    raise ValueError(f"unknown stage {name!r}; the stages that run on a frame are {list(STAGES)}")


def run_stages(
    first: str, frame: pa.Table, run: EntityRun, *, last: str = st.PERSIST.name
) -> dict[str, stages.StageResult]:
    """Run the stages from `first` through `last` on `frame`; each stage's result by its name.

    Each stage's output is held in memory as the next one's input, and each
    runs chunk by chunk exactly as a sync's asset does. For the maintenance
    jobs, whose frames are bounded (the retry's `retry_batch_limit` rows, a
    list of deletes, the records an audit found lost).
    """
    if first not in STAGES or last not in STAGES or STAGES.index(first) > STAGES.index(last):
        raise ValueError(f"no stages from {first!r} to {last!r}; the stages are {list(STAGES)}")
    results: dict[str, stages.StageResult] = {}
    reader = TableReader(frame)
    for name in STAGES[STAGES.index(first) : STAGES.index(last) + 1]:
        writer = TableWriter()
        results[name] = run_stage(name, run, reader, writer)
        assert writer.stored is not None
        reader = TableReader(writer.stored)
    return results


def run_batch(
    event: st.JobEvent,
    frame: pa.Table,
    run: EntityRun,
    counts: Mapping[str, int],
    started: float,
) -> tuple[dict[str, stages.StageResult], dict[str, int]]:
    """A maintenance batch: the stages the job event says it runs (`event.stages`) on `frame`, then
    one stage event `event` of `run`'s batch, and the batch closed from its events.

    The event carries `counts` (the job's own) plus every stage's, and the
    seconds since `started`: the batch, progress and /metrics read it. Returns
    each stage's result by its name and the counts booked.
    """
    ran = run_stages(event.stages[0].name, frame, run, last=event.stages[-1].name)
    booked = stages.merged_counts(counts, *(result.counts for result in ran.values()))
    seconds = round(time.perf_counter() - started, 3)
    bookkeeping.record_stage(
        run.database, run.batch_id, run.entity.name, event.name, frame.num_rows, seconds, booked
    )
    bookkeeping.finish_from_events(run.database, run.batch_id)
    return ran, booked
