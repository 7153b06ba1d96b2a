"""The sync stages as plain functions: engine + store + clients, no Dagster.

Each stage function takes a frame (a chunk of the previous stage's output)
and returns its own frame plus the counts it wants reported: they are the
per-chunk kernels that `streamed.py` runs over a stage's input, and
`pipeline.py` is the one place that runs a stage, for the assets of
`assets.py` and for the retry, reconcile and repair jobs alike.

Here: the helpers the kernels share (`StageResult`, the frame flags below)
and the kernels of fetch, normalize, identity, rowversion, delta and deliver.
Parent-child's are in `parents.py`, persist's in `commits.py`.

Frames follow docs/architecture.md. Two flags travel through the stages:
`_deleted` marks tombstones (a key deleted at the source) and `_partition_date`
the date partition a row belongs to.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import pyarrow as pa
import pyarrow.compute as pc

from syncflow_dagster.catalog import EntitySpec
from syncflow_dagster.clients.apismith import ApiSmithClient
from syncflow_dagster.clients.schedulehub import ScheduleHubClient
from syncflow_dagster.engine import columns as c
from syncflow_dagster.engine.chunks import DEFAULT_CHUNK_SIZE
from syncflow_dagster.engine.delta import UNKNOWN_KEY, dedupe_batch, plan_delta, resync_skips
from syncflow_dagster.engine.identity import add_identity
from syncflow_dagster.engine.normalize import normalize
from syncflow_dagster.engine.rowversion import fresh_rows
from syncflow_dagster.store.state import StateRepository

DELETED = "_deleted"
PARTITION_DATE = "_partition_date"
STORED_DATA_HASH = "_stored_data_hash"
STORED_ROWVERSION = "_stored_rowversion"
STORED_RECIPE = "_stored_recipe"
REF_PREFIX = "_ref."

T = TypeVar("T")


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run a client coroutine from a synchronous Dagster step."""
    return asyncio.run(coro)


def is_value(column: Any, value: str) -> Any:
    """Boolean mask `column == value`, with nulls read as False."""
    return pc.fill_null(pc.equal(column, pa.scalar(value)), pa.scalar(False))


def count_true(mask: Any) -> int:
    """How many entries of a boolean mask are true."""
    return int(pc.sum(pc.cast(mask, pa.int64())).as_py() or 0)


def table_of(columns: dict[str, Any]) -> pa.Table:
    return pa.table(columns)


@dataclass
class StageResult:
    """A stage's output: its frame (a table, or the `StoredFrame` of one it streamed to the store),
    the counts it reports, notes for the metadata, and a few rows to show when the frame is not at hand."""

    frame: Any
    counts: dict[str, int] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)
    preview: pa.Table | None = None


def window_of(dates: tuple[dt.date, ...]) -> tuple[dt.datetime, dt.datetime]:
    """[first day 00:00 UTC, day after the last 00:00 UTC): the records that changed on those days."""
    start = dt.datetime.combine(min(dates), dt.time(), tzinfo=dt.UTC)
    end = dt.datetime.combine(max(dates) + dt.timedelta(days=1), dt.time(), tzinfo=dt.UTC)
    return start, end


def partition_dates(changed_at_text: pa.ChunkedArray | pa.Array, dates: tuple[dt.date, ...]) -> pa.Array:
    """Partition date of each row: its change day (ISO changed_at text, UTC) clipped into the run's days.

    A row changed before the run's first day lands on the first day (the open
    start of a history run, a backdated record of a catch-up read), one changed
    after its last day (a clock ahead of ours) on the last; no time is a change
    before everything, so it lands on the first day.
    """
    if len(dates) == 1 or len(changed_at_text) == 0:
        return pa.array([dates[0]] * len(changed_at_text), pa.date32())
    day = pc.cast(pc.utf8_slice_codeunits(pc.cast(changed_at_text, pa.string()), 0, 10), pa.date32())
    low = pa.scalar(min(dates), pa.date32())
    high = pa.scalar(max(dates), pa.date32())
    clipped: Any = pc.min_element_wise(pc.max_element_wise(pc.fill_null(day, low), low), high)
    return clipped


def key_only(entity: EntitySpec) -> EntitySpec:
    """The entity restricted to its key fields: how tombstones are normalised and keyed."""
    # Validated afresh rather than model_copy'd: a copy would keep the
    # original's cached `targets`, which list every field.
    body = entity.model_dump()
    body["fields"] = [f for f in body["fields"] if f["target"] in entity.business_key]
    body["parents"] = []
    return EntitySpec.model_validate(body)


# 1. fetch ---------------------------------------------------------------------------------------


async def _fetch_pages(
    client: ApiSmithClient,
    entity: EntitySpec,
    dates: tuple[dt.date, ...],
    window: tuple[dt.datetime | None, dt.datetime | None],
    after_rowversion: int,
    snapshot: int | None,
    sink: Callable[[pa.Table], None],
) -> tuple[int, int, int]:
    """Hand each page of changes, then of tombstones, to `sink` as it arrives (as `_page_frame`).

    The first page of each read goes to the sink even when empty (its columns
    are the frame's schema). Returns (changes, tombstones, highest rowversion read).
    """
    start, end = window
    reads: list[tuple[Literal["changes", "tombstones"], bool]] = [("changes", False)]
    if entity.delete_policy.value == "tombstones":
        reads.append(("tombstones", True))
    counts = [0, 0]
    top = 0
    async with client:
        for index, (kind, deleted) in enumerate(reads):
            first = True
            pages = client.iter_change_pages(
                entity.source, start, end, after_rowversion, kind=kind, snapshot_rowversion=snapshot
            )
            async for page in pages:
                rows = page.rows
                if not rows.num_rows and not (first and (rows.num_columns or not deleted)):
                    continue
                first = False
                counts[index] += rows.num_rows
                if rows.num_columns and rows.num_rows and entity.rowversion in rows.column_names:
                    top = max(top, int(pc.max(rows[entity.rowversion]).as_py() or 0))
                sink(_page_frame(entity, dates, rows, deleted=deleted))
    return counts[0], counts[1], top


def _page_frame(entity: EntitySpec, dates: tuple[dt.date, ...], rows: pa.Table, *, deleted: bool) -> pa.Table:
    """One page as the extracted frame holds it: text payload, `_deleted`, `_partition_date`."""
    rows = rows.append_column(DELETED, pa.array([deleted] * rows.num_rows, pa.bool_()))
    if deleted and "DeletedAt" in rows.column_names and entity.changed_at not in rows.column_names:
        rows = rows.rename_columns([entity.changed_at if n == "DeletedAt" else n for n in rows.column_names])
    rows = _as_text(rows)
    if entity.changed_at in rows.column_names:
        return rows.append_column(PARTITION_DATE, partition_dates(rows[entity.changed_at], dates))
    return rows.append_column(PARTITION_DATE, pa.array([dates[0]] * rows.num_rows, pa.date32()))


async def _watermark(client: ApiSmithClient, entity: EntitySpec) -> int:
    async with client:
        mark = await client.watermark(entity.source)
    return int(mark.max_rowversion or 0)


# Metadata keys of the extracted asset. WINDOW_ROWVERSION: every record of the
# window up to this rowversion has been read by that run (see `fetch_stage`);
# READ_SNAPSHOT: the rowversion a catch-up read was pinned at.
WINDOW_ROWVERSION = "window_rowversion"
READ_SNAPSHOT = "read_snapshot"


def fetch_stage(
    client: ApiSmithClient,
    entity: EntitySpec,
    dates: tuple[dt.date, ...],
    after_rowversion: int = 0,
    *,
    open_start: bool = False,
    catch_up: bool = False,
    sink: Callable[[pa.Table], None] | None = None,
) -> StageResult:
    """The run's changes and tombstones newer than `after_rowversion`.

    With `sink`, each page goes to it as it arrives (a streaming writer) and
    the result's frame is None; without, the frame holds every page.

    A window read (`catch_up` False) takes the records whose change time falls
    on the run's days (from the beginning of time with `open_start`).
    `after_rowversion` is then the `window_rowversion` of the last run of the
    same window that finished: that run accounted for every record of the
    window up to it (committed, failed or pending), and a record that changes
    again gets a newer rowversion. So an incremental run reads only what
    changed, and its cost follows the changed rows rather than the entity's size.

    A catch-up read (`catch_up` True, the run of today) has no time bounds: it
    reads every change and tombstone with a rowversion in (after, S], S being
    the entity's APISmith watermark read first and pinned as the snapshot of
    both streams, so that together they cover exactly that range. Every row
    lands on its change day clipped into the run's days (`partition_dates`):
    a backdated record, or one from before the partitions' start, is read by
    the next run of today whatever its change time (defs/reading.py).
    """
    snapshot: int | None = None
    window: tuple[dt.datetime | None, dt.datetime | None]
    if catch_up:
        snapshot = run_async(_watermark(client, entity))
        # A source restored below what was read (snapshot < after) reads nothing, never an error.
        after_rowversion = min(after_rowversion, snapshot)
        window = (None, None)
    else:
        start, end = window_of(dates)
        window = (None if open_start else start, end)
    pages: list[pa.Table] = []
    fetched, deleted, top = run_async(
        _fetch_pages(client, entity, dates, window, after_rowversion, snapshot, sink or pages.append)
    )
    read_up_to = max(after_rowversion if snapshot is None else snapshot, top)
    frame = pa.concat_tables(pages, promote_options="default") if sink is None else None
    counts = {"fetched": fetched, "tombstones": deleted}
    notes: dict[str, Any] = {"after_rowversion": after_rowversion, WINDOW_ROWVERSION: read_up_to}
    if snapshot is not None:
        notes[READ_SNAPSHOT] = snapshot
        notes["read"] = f"catch-up: every change with rowversion in ({after_rowversion}, {snapshot}]"
    else:
        since = "the beginning" if window[0] is None else window[0].isoformat()
        notes["read"] = f"window: changed from {since} to {window[1].isoformat() if window[1] else 'now'}"
    return StageResult(frame, counts, notes)


def _as_text(table: pa.Table) -> pa.Table:
    """Source payload as text (the rowversion stays an integer): one schema for every page."""
    columns = []
    for name, column in zip(table.column_names, table.columns, strict=True):
        if name == DELETED or pa.types.is_integer(column.type) or pa.types.is_string(column.type):
            columns.append(column)
        elif pa.types.is_null(column.type):
            columns.append(column.cast(pa.string()))
        else:
            columns.append(pc.cast(column, pa.string()))
    return pa.Table.from_arrays(columns, names=table.column_names)


# 2. normalize -----------------------------------------------------------------------------------


def normalize_stage(
    entity: EntitySpec, extracted: pa.Table, size: int = DEFAULT_CHUNK_SIZE
) -> tuple[StageResult, pa.Table]:
    """Typed rows (live and tombstones) plus the rejected frame (one row per bad value), `size` rows at a time."""
    deleted: Any = extracted[DELETED] if DELETED in extracted.column_names else None
    live_mask: Any = pc.invert(pc.fill_null(deleted, pa.scalar(False))) if deleted is not None else None
    if live_mask is not None and pc.all(live_mask).as_py():
        live_mask = None  # no tombstones: no copy of the whole frame through a filter
    live = extracted.filter(live_mask) if live_mask is not None else extracted
    dead = extracted.filter(pc.invert(live_mask)) if live_mask is not None else extracted.slice(0, 0)
    result = normalize(entity, live.drop_columns([DELETED]) if DELETED in live.column_names else live, size)
    rows = _carry_partition(result.rows, live, entity)
    rows = rows.append_column(DELETED, pa.array([False] * rows.num_rows, pa.bool_()))
    frames = [rows]
    rejected = result.rejected
    if dead.num_rows:
        keys = normalize(key_only(entity), dead.drop_columns([DELETED]), size)
        tomb = _carry_partition(keys.rows, dead, entity)
        tomb = tomb.append_column(DELETED, pa.array([True] * tomb.num_rows, pa.bool_()))
        frames.append(tomb)
        rejected = pa.concat_tables([rejected, keys.rejected])
    frame = pa.concat_tables(frames, promote_options="default")
    counts = {
        "normalized": rows.num_rows,
        "rejected": len(set(rejected["business_key"].to_pylist())) if rejected.num_rows else 0,
        "rejected_values": rejected.num_rows,
    }
    return StageResult(frame, counts), rejected


def _carry_partition(rows: pa.Table, source: pa.Table, entity: EntitySpec) -> pa.Table:
    """Bring `_partition_date` from the extracted rows onto the normalised ones.

    Normalisation drops rejected rows, so rows are matched by rowversion, which
    the source assigns uniquely to every version of a record (and of a tombstone).
    """
    if PARTITION_DATE in rows.column_names:
        return rows
    index = pc.index_in(rows[c.ROWVERSION], value_set=pc.cast(source[entity.rowversion], pa.int64()))
    return rows.append_column(PARTITION_DATE, source[PARTITION_DATE].take(index))


# 3. identity ------------------------------------------------------------------------------------


def identity_stage(entity: EntitySpec, normalized: pa.Table, size: int = DEFAULT_CHUNK_SIZE) -> StageResult:
    live, dead = _split_deleted(normalized)
    live = add_identity(entity, live, size)
    frames = [live]
    if dead.num_rows:
        keyed = add_identity(key_only(entity), dead, size)
        keyed = keyed.set_column(
            keyed.schema.get_field_index(c.DATA_HASH), c.DATA_HASH, pa.nulls(keyed.num_rows, c.DATA_HASH_TYPE)
        )
        frames.append(keyed)
    frame = pa.concat_tables(frames, promote_options="default")
    return StageResult(frame, {"identified": frame.num_rows})


def _split_deleted(frame: pa.Table) -> tuple[pa.Table, pa.Table]:
    if DELETED not in frame.column_names:
        return frame, frame.slice(0, 0)
    mask: Any = pc.fill_null(frame[DELETED], pa.scalar(False))
    if not pc.any(mask).as_py():
        # No tombstones (an initial sync, most batches): no copy of the frame.
        return frame, frame.slice(0, 0).select([n for n in frame.column_names if n in _KEEP])
    live = frame.filter(pc.invert(mask))
    dead = frame.filter(mask)
    dead = dead.select([n for n in dead.column_names if dead[n].null_count < dead.num_rows or n in _KEEP])
    return live, dead


_KEEP = {c.ROWVERSION, c.CHANGED_AT, DELETED, PARTITION_DATE, c.BK, c.BK_HASH, c.RECIPE}


# 4. rowversion ----------------------------------------------------------------------------------


def rowversion_stage(
    state: StateRepository, entity: EntitySpec, identified: pa.Table, *, resync: bool = False
) -> StageResult:
    """Drop rows not newer than what was delivered, before any hash compare.

    The stored versions ride along (`_stored_*`) so the delta stage compares
    against the same snapshot without asking the database again. A resync
    keeps every row: what was delivered is to be delivered again.
    """
    stored = stored_for_batch(state, entity.name, identified[c.BK_HASH].combine_chunks())
    fresh = fresh_with_stored(identified, stored, keep_stale=resync)
    return StageResult(fresh.frame, {"fresh": fresh.frame.num_rows, "stale": fresh.counts["stale"]})


# A batch asking for at least this share of an entity's delivered keys (a full-window
# re-read, a first run after a restore) reads the whole state with one COPY instead of
# staging its keys for a join; below it, cost keeps scaling with the keys asked.
WHOLE_STATE_SHARE = 0.25
WHOLE_STATE_MIN_KEYS = 50_000


def stored_for_batch(state: StateRepository, entity_name: str, keys: pa.Array) -> pa.Table:
    """The delivered state a batch's keys are compared with (rows of other keys may come along)."""
    if len(keys) >= WHOLE_STATE_MIN_KEYS:
        held = state.count(entity_name)
        if held and len(keys) >= WHOLE_STATE_SHARE * held:
            stored: pa.Table = state.load_state(entity_name)
            return stored
    found: pa.Table = state.stored_for_keys(entity_name, keys)
    return found


def fresh_with_stored(identified: pa.Table, stored: pa.Table, *, keep_stale: bool = False) -> StageResult:
    """The rows newer than `stored` (all rows with `keep_stale`), each with its stored hash, rowversion
    and recipe (`_stored_*`)."""
    split = fresh_rows(identified, stored, keep_stale=keep_stale)
    fresh, positions = split.fresh, split.stored_positions
    if stored.num_rows == 0:
        fresh = (
            fresh.append_column(STORED_DATA_HASH, pa.nulls(fresh.num_rows, c.DATA_HASH_TYPE))
            .append_column(STORED_ROWVERSION, pa.nulls(fresh.num_rows, c.ROWVERSION_TYPE))
            .append_column(STORED_RECIPE, pa.nulls(fresh.num_rows, c.RECIPE_TYPE))
        )
    else:
        fresh = (
            fresh.append_column(STORED_DATA_HASH, stored[c.DATA_HASH].take(positions))
            .append_column(STORED_ROWVERSION, stored[c.ROWVERSION].take(positions))
            .append_column(STORED_RECIPE, stored[c.RECIPE].take(positions))
        )
    return StageResult(fresh, {"fresh": fresh.num_rows, "stale": split.stale})


def _stored_of(fresh: pa.Table) -> pa.Table:
    mask = pc.is_valid(fresh[STORED_ROWVERSION])
    known = fresh.filter(mask)
    return table_of(
        {
            c.BK_HASH: known[c.BK_HASH],
            c.DATA_HASH: known[STORED_DATA_HASH],
            c.ROWVERSION: known[STORED_ROWVERSION],
            c.RECIPE: known[STORED_RECIPE],
        }
    )


# 5. delta ---------------------------------------------------------------------------------------


def delta_stage(fresh: pa.Table, *, resync: bool = False) -> StageResult:
    """insert / update / delete per key against the last delivered hash; skips are counted, not kept.

    A resync sends again the rows it would skip as already delivered (as updates, reason `resync`).
    """
    stored = _stored_of(fresh)
    live, dead = _split_deleted(fresh)
    stored_cols = [STORED_DATA_HASH, STORED_ROWVERSION, STORED_RECIPE]
    live = live.drop_columns([n for n in stored_cols if n in live.column_names])
    live, duplicates = dedupe_batch(live)
    tombstones = dead.select([c.BK_HASH, c.BK, c.ROWVERSION, PARTITION_DATE]) if dead.num_rows else None
    plan = plan_delta(live, stored, tombstones)
    resent = 0
    if resync:
        before = count_true(is_value(plan[c.ACTION], c.SKIP)) if plan.num_rows else 0
        plan = resync_skips(plan)
        resent = before - (count_true(is_value(plan[c.ACTION], c.SKIP)) if plan.num_rows else 0)
    counts = {action: 0 for action in c.ACTIONS}
    if plan.num_rows:
        for action, count in zip(
            *plan.group_by(c.ACTION).aggregate([(c.ACTION, "count")]).columns, strict=True
        ):
            counts[str(action)] = int(count.as_py() or 0)
    counts["duplicates"] = duplicates.num_rows
    if resync:
        counts["resync"] = resent
    # The engine skips a tombstone of a key ScheduleHub never confirmed. It stays
    # here as a delete, and the parent-child stage keeps it only if SyncFlow still
    # holds the key (an open failed record or a parked child): left alone, a retry
    # would resend a record the source deleted, and one ScheduleHub took without
    # its answer reaching us (a dropped connection) would stay there for good.
    if counts[c.SKIP]:
        unknown = pc.and_(is_value(plan[c.ACTION], c.SKIP), is_value(plan[c.REASON], UNKNOWN_KEY))
        if count_true(unknown):
            action = pc.if_else(unknown, pa.scalar(c.DELETE), plan[c.ACTION])
            plan = plan.set_column(plan.schema.get_field_index(c.ACTION), c.ACTION, action)
    # Skips are counted, not kept; with none (an initial sync) the plan is kept as it is.
    changed = plan.filter(pc.invert(is_value(plan[c.ACTION], c.SKIP))) if counts[c.SKIP] else plan
    if DELETED not in changed.column_names:
        changed = changed.append_column(DELETED, is_value(changed[c.ACTION], c.DELETE))
    return StageResult(changed, counts)


def never_stored_deletes(rows: pa.Table) -> Any:
    """Mask of the deletes of keys ScheduleHub never confirmed (see `delta_stage`)."""
    if c.REASON not in rows.column_names or rows.num_rows == 0:
        return pa.repeat(pa.scalar(False), rows.num_rows)
    return pc.and_(is_value(rows[c.ACTION], c.DELETE), is_value(rows[c.REASON], UNKNOWN_KEY))


# 7. deliver -------------------------------------------------------------------------------------

# ScheduleHub's per-row result, renamed on the way in so it can never collide
# with a payload field (work orders have a `status` of their own).
RESULT_COLUMNS = {
    "status": "_delivery_status",
    "schedulehub_id": "_schedulehub_id",
    "outcome": "_outcome",
    "reason_code": "_reason_code",
    "retryable": "_retryable",
    "detail": "_detail",
}
STATUS = RESULT_COLUMNS["status"]


async def _deliver(client: ScheduleHubClient, entity: EntitySpec, ready: pa.Table) -> pa.Table | None:
    """ScheduleHub's results for the rows of `ready` (upserts, then deletes); None for no rows.

    Only the payload columns go to the client, and `ready` is filtered only
    when it holds deletes: the client builds the wire form batch by batch.
    """
    is_delete = is_value(ready[c.ACTION], c.DELETE)
    deleting = count_true(is_delete)
    names = [c.BK, *entity.targets, *[n for n in ready.column_names if n.startswith(REF_PREFIX)]]
    payload = ready.select([n for n in names if n in ready.column_names])
    upserts = payload.filter(pc.invert(is_delete)) if deleting else payload
    parts: list[pa.Table] = []
    async with client:
        if upserts.num_rows:
            parts.append(await client.upsert(entity.resource, upserts))
        del upserts, payload
        if deleting:
            parts.append(await client.delete(entity.resource, ready[c.BK].filter(is_delete).combine_chunks()))
    return pa.concat_tables(parts) if parts else None


def _join_results(rows: pa.Table, results: pa.Table | None) -> pa.Table:
    """`rows` with ScheduleHub's result for each of them appended (RESULT_COLUMNS), in `rows`' order."""
    if results is None or rows.num_rows == 0:
        return rows.slice(0, 0)
    index = pc.index_in(rows[c.BK], value_set=results[c.BK])
    missing = index.null_count
    if missing:
        raise RuntimeError(f"ScheduleHub returned no result for {missing} rows of the batch")
    for name, ours in RESULT_COLUMNS.items():
        if name in results.column_names:
            rows = rows.append_column(ours, results[name].take(index))
    return rows


def deliver_stage(client: ScheduleHubClient, entity: EntitySpec, ready: pa.Table) -> StageResult:
    """Every row of `ready` with ScheduleHub's answer for it: accepted (with its id) or rejected."""
    frame = _join_results(ready, run_async(_deliver(client, entity, ready)))
    accepted = count_true(is_value(frame[STATUS], "accepted")) if frame.num_rows else 0
    counts = {"delivered": accepted, "failed": frame.num_rows - accepted}
    return StageResult(frame, counts)


# 8. persist -------------------------------------------------------------------------------------


def merged_counts(*parts: Mapping[str, int]) -> dict[str, int]:
    out: dict[str, int] = {}
    for part in parts:
        for key, value in part.items():
            out[key] = out.get(key, 0) + int(value)
    return out
