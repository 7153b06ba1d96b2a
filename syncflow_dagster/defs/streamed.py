"""The sync stages over streams: each reads its input slice chunk by chunk and writes its output as it goes.

The stage functions of `stages.py`, `parents.py` and `commits.py` are the per-chunk kernels; here each is
run over chunks of `size` rows (the run's chunk size) of its input (a `FrameReader`:
a stored slice's `SliceReader` in a sync, a `TableReader` in the retry and
reconcile jobs), and what it returns is appended to the stage's output (a
`FrameWriter`: a `SliceWriter`, one transaction, committed when the stage
ends). So the memory a stage holds follows the chunk size, not the
partition's size. `pipeline.py` is what calls these, one stage at a time.

Row-wise stages (normalize, identity, rowversion, deliver, persist) are exact
chunk by chunk. Two need the whole batch, and read only the few columns that
decide it first:

* delta: duplicate keys across chunks resolve to the highest rowversion, and a
  tombstone against a live row as in `plan_delta`: pass 1 reads `_bk_hash`,
  `_rowversion`, `_data_hash` and `_deleted` and picks each key's one row
  (`batch_winners`); pass 2 plans each chunk's kept rows. An input of one
  chunk is read once, and its winners picked on the table it plans. A larger
  batch whose keys are all distinct (told from their first 64-bit words, 8
  bytes a row) keeps every row without reading those columns whole.
* parent-child: children parked earlier are released once (minus the keys the
  plan holds anew, read as key hashes only); a plan of several chunks reads
  the delivered keys of its (smaller) parents once (`parents.stored_parent_keys`,
  16 bytes a key), a smaller one looks each chunk's parents up, and the keys an entity hands on to its children in the
  same run (`arriving`) are kept as key hashes only.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import pyarrow as pa

from syncflow_dagster.catalog import Catalog, EntitySpec
from syncflow_dagster.defs import commits, parents, stages
from syncflow_dagster.defs.checks import KeyTally, accepted_changes
from syncflow_dagster.defs.memory_frames import FrameReader, FrameWriter
from syncflow_dagster.engine import columns as c
from syncflow_dagster.engine.delta import batch_winners, key_words
from syncflow_dagster.store.first_load import FirstLoad
from syncflow_dagster.store.repositories import SyncStore

PREVIEW_ROWS = 5
# An initial load of more rows than this is persisted as one `FirstLoad` (store/first_load.py):
# its final sorted inserts cost more than they save until the primary keys outgrow
# Postgres's buffers (measured: slower at 3M rows, faster at 10M; docs/benchmarks.md).
FIRST_LOAD_MIN_ROWS = 5_000_000


class Output:
    """A stage's output slice as it is written: the writer, the counts so far, a few rows to show."""

    def __init__(self, writer: FrameWriter) -> None:
        self.writer = writer
        self.counts: dict[str, int] = {}
        self.notes: dict[str, Any] = {}
        self.preview: pa.Table | None = None

    def add(self, result: stages.StageResult) -> None:
        """Append a chunk's result: its frame to the slice, its counts to the totals."""
        frame = result.frame
        if frame is not None:
            self.write(frame)
        self.counts = stages.merged_counts(self.counts, result.counts)
        self.notes.update(result.notes)

    def write(self, frame: pa.Table) -> None:
        self.writer.write(frame)
        if self.preview is None and frame.num_rows:
            self.preview = frame.slice(0, PREVIEW_ROWS)

    def result(self) -> stages.StageResult:
        """The stage's result once the writer has committed: the stored frame's handle and the totals."""
        return stages.StageResult(self.writer.stored, self.counts, self.notes, self.preview)


def _each_chunk(
    reader: FrameReader,
    writer: FrameWriter,
    stage: Callable[[pa.Table], stages.StageResult],
    size: int,
    extra: Iterable[pa.Table] = (),
) -> stages.StageResult:
    """Run `stage` over every chunk of `size` rows of `reader` (then `extra`), writing each result; once on no rows.

    On an empty input the stage still runs once, on an empty table of the
    input's schema, so the output slice gets the schema a whole-frame run gives.
    """
    out = Output(writer)
    with writer:
        seen = False
        for chunk in _chain(reader, size, extra):
            seen = True
            out.add(stage(chunk))
        if not seen:
            out.add(stage(reader.schema.empty_table()))
    return out.result()


def _chain(reader: FrameReader, size: int, extra: Iterable[pa.Table]) -> Iterable[pa.Table]:
    yield from reader.chunks(size)
    yield from extra


def row_wise(
    reader: FrameReader, writer: FrameWriter, stage: Callable[[pa.Table], stages.StageResult], size: int
) -> stages.StageResult:
    """A stage whose rows do not depend on each other (identity, rowversion, deliver), `size` rows at a time."""
    return _each_chunk(reader, writer, stage, size)


def normalize(
    entity: EntitySpec, reader: FrameReader, writer: FrameWriter, size: int
) -> tuple[stages.StageResult, pa.Table]:
    """Normalise chunk by chunk; the rejected values of every chunk come back together (they are few)."""
    rejected: list[pa.Table] = []

    def one(chunk: pa.Table) -> stages.StageResult:
        result, refused = stages.normalize_stage(entity, chunk, size)
        if refused.num_rows or not rejected:
            rejected.append(refused)
        return result

    result = _each_chunk(reader, writer, one, size)
    refused = pa.concat_tables(rejected, promote_options="default")
    result.counts["rejected"] = len(set(refused["business_key"].to_pylist())) if refused.num_rows else 0
    result.counts["rejected_values"] = refused.num_rows
    return result, refused


def delta(
    reader: FrameReader, writer: FrameWriter, size: int, *, resync: bool = False
) -> tuple[stages.StageResult, KeyTally]:
    """Plan the batch in two passes (see the module's docstring); the keys check is tallied on the way."""
    wanted = [
        name for name in (c.BK_HASH, c.ROWVERSION, c.DATA_HASH, stages.DELETED) if name in reader.schema.names
    ]
    # One chunk (or less): read once, winners picked on the very table planned (an empty input
    # is that one chunk too, as `_each_chunk` runs the stage once on it).
    whole = reader.read_all() if reader.num_rows <= size else None
    if whole is not None:
        keep, duplicates = batch_winners(whole.select(wanted)) if whole.num_rows else (np.ones(0, bool), 0)
    elif _keys_distinct(reader, size):
        # Every key once (an initial load's usual batch): every row is kept, and the
        # other key columns need not be read at all.
        keep, duplicates = np.ones(reader.num_rows, bool), 0
    else:
        keep, duplicates = batch_winners(reader.read_all(wanted))
    keys = KeyTally()
    offset = 0

    def one(chunk: pa.Table) -> stages.StageResult:
        nonlocal offset
        mask = keep[offset : offset + chunk.num_rows]
        offset += chunk.num_rows
        kept = chunk if bool(mask.all()) else chunk.filter(pa.array(mask))
        result = stages.delta_stage(kept, resync=resync)
        keys.add(result.frame)
        return result

    if whole is None:
        result = _each_chunk(reader, writer, one, size)
    else:
        out = Output(writer)
        with writer:
            out.add(one(whole))
        del whole
        result = out.result()
    result.counts["duplicates"] = duplicates
    return result, keys


def _keys_distinct(reader: FrameReader, size: int) -> bool:
    """Whether no two rows of the slice share a first 64-bit word of their key hash (so no key repeats).

    Holds 8 bytes a row (the first words, sorted in place) instead of the key
    columns `batch_winners` reads. Two distinct keys sharing a first word are
    rare (at 10M random keys, the odds that any pair does are about 1 in
    370 000); then, or for a null key, the answer is False and the caller
    takes `batch_winners`' way, which is exact.
    """
    firsts: list[np.ndarray] = []
    for part in reader.chunks(size, [c.BK_HASH]):
        keys = part[c.BK_HASH].combine_chunks()
        if keys.null_count:
            return False
        firsts.append(np.ascontiguousarray(key_words(keys)[:, 0]))
    words = np.concatenate(firsts) if firsts else np.empty(0, np.uint64)
    del firsts
    words.sort()
    return not bool(np.any(words[1:] == words[:-1]))


def parent_child(
    catalog: Catalog,
    entity: EntitySpec,
    database: SyncStore,
    reader: FrameReader,
    writer: FrameWriter,
    batch_id: uuid.UUID,
    run_date: dt.date | None,
    arriving: Mapping[str, pa.Array],
    size: int,
) -> tuple[stages.StageResult, pa.Array]:
    """Resolve parents chunk by chunk, then the released children; returns the keys handed on too."""
    plan_keys = reader.read_all([c.BK_HASH])[c.BK_HASH] if reader.num_rows else pa.array([], c.BK_HASH_TYPE)
    released = parents.released_for_run(database, entity, plan_keys, run_date, arriving)
    del plan_keys
    parent_keys = parents.stored_parent_keys(database, entity, reader.num_rows + released.num_rows, size)
    handed: list[pa.Array] = []

    def one(chunk: pa.Table, *, hold_deletes: bool = True) -> stages.StageResult:
        result = parents.resolve_parents(
            catalog,
            entity,
            database,
            chunk,
            batch_id,
            arriving,
            hold_deletes=hold_deletes,
            parent_keys=parent_keys,
        )
        handed.append(parents.arriving_keys(result.frame))
        return result

    extra: list[pa.Table] = []
    if released.num_rows:
        extra.append(parents.align(released, reader.schema.empty_table()) if reader.num_rows else released)

    def each(chunk: pa.Table) -> stages.StageResult:
        # The released children come last; they are not the plan's, so no delete of theirs is dropped.
        return one(chunk, hold_deletes=not (extra and chunk is extra[0]))

    result = _each_chunk(reader, writer, each, size, extra)
    result.counts["released"] = released.num_rows
    keys = pa.concat_arrays(handed) if handed else pa.array([], c.BK_HASH_TYPE)
    return result, keys


def persist(
    database: SyncStore,
    entity: EntitySpec,
    reader: FrameReader,
    writer: FrameWriter,
    batch_id: uuid.UUID,
    size: int,
) -> tuple[stages.StageResult, tuple[int, int]]:
    """Commit chunk by chunk (idempotent: a re-run re-commits the same rows); one summary for the slice.

    Returns the accepted (upserts, deletes) too, for the delivered = committed check.
    """
    summaries: list[pa.Table] = []
    counts: dict[str, int] = {}
    upserts = deletes = 0
    # An initial load: every chunk's keys are new (the plan holds each key once), so each
    # is COPYed straight in; a large one is staged and written once, in key order, when
    # the stage ends (store/first_load.py), as chunk after chunk of random keys inserted
    # into a growing primary key costs more with every chunk.
    state = database.state()
    new_keys = reader.num_rows > 0 and state.count(entity.name) == 0
    first_load = (
        FirstLoad(database.engine, entity.name, batch_id, state.merge_work_mem)
        if new_keys and reader.num_rows > max(size, FIRST_LOAD_MIN_ROWS)
        else None
    )
    with first_load or contextlib.nullcontext():
        for chunk in reader.chunks(size) if reader.num_rows else [reader.schema.empty_table()]:
            result = commits.persist_stage(
                database, entity, chunk, batch_id, new_keys=new_keys, first_load=first_load
            )
            summaries.append(result.frame)
            counts = stages.merged_counts(counts, result.counts)
            more_upserts, more_deletes = accepted_changes(chunk)
            upserts, deletes = upserts + more_upserts, deletes + more_deletes
        if first_load is not None:
            with database.entity_lock(entity.name):
                first_load.finish()
    summary = commits.regroup_summaries(summaries)
    out = Output(writer)
    with writer:
        out.write(summary)
    out.counts = counts
    return out.result(), (upserts, deletes)
