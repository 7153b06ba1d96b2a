"""Delta: what to send to ScheduleHub, per key, against the last *delivered* state.

`plan_delta` gives each business key one action (insert, update, delete, skip)
and the reason for it. It compares DATA_HASH only with what ScheduleHub last
confirmed, so A→B→A is an update, and it sorts its output by `_bk_hash` so the
order of the input rows can never change the plan. `plan_reconcile_deletes`
finds keys SyncFlow delivered that APISmith no longer lists, and refuses to
delete more than the entity's delete guard allows.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as _compute

from syncflow_dagster.engine.columns import (
    ACTION,
    BK_HASH,
    DATA_HASH,
    DELETE,
    INSERT,
    REASON,
    RECIPE,
    ROWVERSION,
    SKIP,
    UPDATE,
)
from syncflow_dagster.engine.normalize import run_column_jobs
from syncflow_dagster.engine.rowversion import stored_lookup

# The pyarrow stubs type each compute function per concrete array class; the
# arrays here get their types at run time, so compute calls are left untyped.
pc: Any = _compute

# Reasons a plan gives, spelled once.
NEW_KEY = "new_key"
DATA_CHANGED = "data_changed"
UNCHANGED = "unchanged"
RECIPE_CHANGED = "recipe_changed"
STALE_ROWVERSION = "stale_rowversion"
TOMBSTONE = "tombstone"
UNKNOWN_KEY = "unknown_key"
MISSING_FROM_SOURCE = "missing_from_source"
RESYNC = "resync"


def _first_of_each_key(ordered: pa.Table) -> pa.Array:
    """True on the first row of each run of equal `_bk_hash` in a key-sorted table."""
    keys = ordered.column(BK_HASH).combine_chunks()
    n = len(keys)
    if n == 0:
        return pa.array([], pa.bool_())
    changed = pc.not_equal(keys.slice(1), keys.slice(0, n - 1))
    return pa.concat_arrays([pa.array([True]), changed])


def key_order(keys: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Indices that sort 16-byte key hashes bytewise (Arrow's order), via numpy.

    The hash is read as two big-endian uint64 words and sorted by
    `word_order`: several times faster than Arrow's sort on fixed_size_binary.
    """
    array = keys.combine_chunks() if isinstance(keys, pa.ChunkedArray) else keys
    if array.null_count:
        raise ValueError(f"{BK_HASH} has {array.null_count} null(s): every row needs identity")
    return word_order(key_words(array))


def key_words(keys: pa.Array) -> np.ndarray:
    """Null-free fixed-width key hashes as an (n, width/8) array of uint64 words, most significant first.

    Ordered by the words left to right, the keys are in byte-wise order: Arrow's
    for fixed_size_binary and Postgres's for uuid.
    """
    width = keys.type.byte_width
    buffer = keys.buffers()[1]
    if buffer is None:
        return np.empty((0, width // 8), dtype=np.uint64)
    raw = np.frombuffer(memoryview(buffer), dtype=np.uint8)
    data = raw[keys.offset * width : (keys.offset + len(keys)) * width]
    return data.view(">u8").reshape(len(keys), width // 8).astype(np.uint64)


def word_order(words: np.ndarray) -> np.ndarray:
    """Indices that sort rows of unsigned 64-bit words (most significant first) ascending.

    Key hashes are uniformly random, so their first word alone almost surely
    orders them (two of a million share it with odds of about 1 in 30
    million): one argsort of that word, faster than a lexsort of all of them
    (docs/benchmarks.md), and the lexsort only when two first words are equal.
    """
    first = words[:, 0]
    order: np.ndarray = np.argsort(first, kind="stable")
    ranked = first[order]
    if words.shape[1] > 1 and len(ranked) > 1 and bool(np.any(ranked[1:] == ranked[:-1])):
        order = np.lexsort(tuple(words[:, i] for i in reversed(range(words.shape[1]))))
    return order


def _sorted_by_key(table: pa.Table) -> tuple[pa.Table, bool]:
    """The table in key-hash order, and whether any key occurs twice."""
    if table.num_rows == 0:
        return table, False
    positions = key_order(table.column(BK_HASH))
    if bool(np.all(positions[1:] > positions[:-1])):
        # Already in key order (plan_delta re-sorting a deduped batch): no gather.
        keys = table.column(BK_HASH).combine_chunks()
        n = len(keys)
        repeated = n > 1 and bool(pc.any(pc.equal(keys.slice(1), keys.slice(0, n - 1))).as_py())
        return table, repeated
    order = pa.array(positions)
    # Columns are taken on threads (Arrow's take releases the GIL): the gather of a
    # wide million-row table is most of a plan's time.
    columns = run_column_jobs([partial(pc.take, column, order) for column in table.columns], table.num_rows)
    ordered = pa.Table.from_arrays(columns, schema=table.schema)
    keys = ordered.column(BK_HASH).combine_chunks()
    n = len(keys)
    repeated = n > 1 and bool(pc.any(pc.equal(keys.slice(1), keys.slice(0, n - 1))).as_py())
    return ordered, repeated


def dedupe_batch(rows: pa.Table) -> tuple[pa.Table, pa.Table]:
    """(one row per key in key-hash order, the duplicates set aside): highest `_rowversion` wins.

    Ties go to the higher `_data_hash` (then `_bk` order is irrelevant: the key
    is the same), so the winner never depends on the input order.
    """
    ordered, repeated = _sorted_by_key(rows)
    if not repeated:
        return ordered, rows.slice(0, 0)
    sort_keys = [(BK_HASH, "ascending"), (ROWVERSION, "descending")]
    if DATA_HASH in rows.column_names:
        sort_keys.append((DATA_HASH, "descending"))
    ordered = rows.take(pc.sort_indices(rows, sort_keys=sort_keys))
    first = _first_of_each_key(ordered)
    return ordered.filter(first), ordered.filter(pc.invert(first))


def _labels(mask_to_label: list[tuple[pa.Array, str]], default: str, n: int) -> pa.Array:
    """A string column: the label of the first mask that holds, else `default`."""
    out = pa.repeat(pa.scalar(default, pa.string()), n)
    for mask, label in reversed(mask_to_label):
        out = pc.if_else(pc.fill_null(mask, False), label, out)
    return out


def _with_plan(table: pa.Table, action: pa.Array, reason: pa.Array) -> pa.Table:
    return table.append_column(ACTION, action).append_column(REASON, reason)


def _plan_live(rows: pa.Table, stored: pa.Table | None) -> pa.Table:
    n = rows.num_rows
    stored_rowversion = stored_lookup(rows, stored, ROWVERSION)
    stored_hash = stored_lookup(rows, stored, DATA_HASH)
    stored_recipe = stored_lookup(rows, stored, RECIPE)
    known = pc.is_valid(stored_hash) if stored is not None and DATA_HASH in stored.column_names else None
    if known is None:
        known = pc.is_valid(stored_rowversion)
    # Rowversion first: a row that is not newer is skipped before any hash compare.
    stale = pc.and_(known, pc.less_equal(rows.column(ROWVERSION), stored_rowversion))
    if stored_recipe.null_count < len(stored_recipe) and RECIPE in rows.column_names:
        recipe_changed = pc.not_equal(pc.cast(stored_recipe, pa.int16()), rows.column(RECIPE))
    else:
        recipe_changed = pa.repeat(pa.scalar(False, pa.bool_()), n)
    new = pc.invert(known)
    same = pc.equal(rows.column(DATA_HASH), stored_hash) if stored_hash.null_count < n else new
    cases = [(stale, STALE_ROWVERSION), (new, NEW_KEY), (recipe_changed, RECIPE_CHANGED), (same, UNCHANGED)]
    reason = _labels(cases, DATA_CHANGED, n)
    action = _labels([(stale, SKIP), (new, INSERT), (recipe_changed, UPDATE), (same, SKIP)], UPDATE, n)
    return _with_plan(rows, action, reason)


def _tombstone_rows(schema: pa.Schema, tombstones: pa.Table) -> pa.Table:
    """Tombstones shaped like the rows: key columns set, payload and hashes null."""
    n = tombstones.num_rows
    columns = []
    for field in schema:
        if field.name in tombstones.column_names:
            columns.append(pc.cast(tombstones.column(field.name), field.type))
        else:
            columns.append(pa.nulls(n).cast(field.type))
    return pa.Table.from_arrays(columns, schema=schema)


def plan_delta(rows: pa.Table, stored: pa.Table | None, tombstones: pa.Table | None = None) -> pa.Table:
    """One row per key with `_action` and `_reason`, sorted by `_bk_hash`.

    `rows` come from identity (`_bk_hash`, `_data_hash`, `_rowversion`, `_recipe`);
    `stored` is the last delivered state (`_bk_hash`, `_data_hash`, `_rowversion`,
    optional `_recipe`), empty or None on a first run; `tombstones` are APISmith's
    deletions (`_bk_hash`, `_bk`, `_rowversion`).
    """
    for name in (BK_HASH, DATA_HASH, ROWVERSION):
        if name not in rows.column_names:
            raise ValueError(f"rows have no {name!r} column: run identity before plan_delta")
    live, _ = dedupe_batch(rows)
    parts = []
    if tombstones is not None and tombstones.num_rows:
        for name in (BK_HASH, ROWVERSION):
            if name not in tombstones.column_names:
                raise ValueError(f"tombstones have no {name!r} column (columns: {tombstones.column_names})")
        graves, _ = dedupe_batch(tombstones)
        live_rowversion = stored_lookup(graves, live, ROWVERSION)
        # A live row in the same batch that is newer than the tombstone means the
        # record came back: the tombstone loses. On a tie the deletion wins.
        grave_wins = pc.invert(pc.fill_null(pc.greater(live_rowversion, graves.column(ROWVERSION)), False))
        graves = graves.filter(grave_wins)
        if graves.num_rows:
            buried = pc.is_in(live.column(BK_HASH), value_set=graves.column(BK_HASH))
            live = live.filter(pc.invert(buried))
            shaped = _tombstone_rows(live.schema, graves)
            stored_rowversion = stored_lookup(shaped, stored, ROWVERSION)
            known = pc.is_valid(stored_lookup(shaped, stored, BK_HASH))
            stale = pc.and_(known, pc.less_equal(shaped.column(ROWVERSION), stored_rowversion))
            cases = [(pc.invert(known), UNKNOWN_KEY), (stale, STALE_ROWVERSION)]
            reason = _labels(cases, TOMBSTONE, shaped.num_rows)
            action = _labels([(pc.invert(known), SKIP), (stale, SKIP)], DELETE, shaped.num_rows)
            parts.append(_with_plan(shaped, action, reason))
    parts.insert(0, _plan_live(live, stored))
    if len(parts) == 1:
        return parts[0]  # dedupe_batch already put the live rows in key order
    plan, _ = _sorted_by_key(pa.concat_tables(parts))
    return plan


def batch_winners(keys: pa.Table, deleted: str = "_deleted") -> tuple[np.ndarray, int]:
    """Which rows of a batch `plan_delta` keeps, as a mask over the batch; and the live duplicates.

    `keys` holds only `_bk_hash`, `_rowversion`, optional `_data_hash` and the
    tombstone flag `deleted` of every row of the batch, in the batch's order:
    what a streamed delta reads in a first pass, so that the plan of each chunk
    in the second pass sees exactly the rows the whole batch's plan would
    keep. Per key: the live row of the highest rowversion (ties to the higher
    data hash, as `dedupe_batch`), unless a tombstone of the key is at least
    as new (then the newest tombstone, as `plan_delta`).
    """
    n = keys.num_rows
    if n == 0 or len(pc.unique(keys.column(BK_HASH))) == n:
        return np.ones(n, dtype=bool), 0  # one row per key: nothing to resolve
    table = keys.append_column("_row", pa.array(np.arange(n, dtype=np.int64)))
    if deleted in table.column_names:
        dead_mask = pc.fill_null(table.column(deleted), False)
    else:
        dead_mask = pa.repeat(pa.scalar(False), n)
    live = table.filter(pc.invert(dead_mask))
    dead = table.filter(dead_mask)
    winners, _ = dedupe_batch(live.drop_columns([c for c in (deleted,) if c in live.column_names]))
    duplicates = live.num_rows - winners.num_rows
    keep = np.zeros(n, dtype=bool)
    if dead.num_rows:
        graves, _ = dedupe_batch(dead.select([BK_HASH, ROWVERSION, "_row"]))
        live_rowversion = stored_lookup(graves, winners, ROWVERSION)
        grave_wins = pc.invert(pc.fill_null(pc.greater(live_rowversion, graves.column(ROWVERSION)), False))
        graves = graves.filter(grave_wins)
        if graves.num_rows:
            winners = winners.filter(
                pc.invert(pc.is_in(winners.column(BK_HASH), value_set=graves.column(BK_HASH)))
            )
            keep[graves.column("_row").to_numpy()] = True
    keep[winners.column("_row").to_numpy()] = True
    return keep, duplicates


def resync_skips(plan: pa.Table) -> pa.Table:
    """The plan with every live row it skipped as already delivered turned into an update (reason `resync`).

    A resync re-delivers what SyncFlow holds as delivered (ScheduleHub lost it,
    or was restored from a backup): rows skipped as unchanged or not newer by
    rowversion are sent again. Tombstones (no data hash) keep their action.
    """
    if plan.num_rows == 0:
        return plan
    skipped = pc.fill_null(pc.equal(plan.column(ACTION), pa.scalar(SKIP)), False)
    reason = plan.column(REASON)
    already = pc.fill_null(pc.is_in(reason, value_set=pa.array([UNCHANGED, STALE_ROWVERSION])), False)
    live = pc.is_valid(plan.column(DATA_HASH))
    again = pc.and_(pc.and_(skipped, already), live)
    if not pc.any(again).as_py():
        return plan
    action = pc.if_else(again, pa.scalar(UPDATE), plan.column(ACTION))
    reason = pc.if_else(again, pa.scalar(RESYNC), reason)
    plan = plan.set_column(plan.schema.get_field_index(ACTION), ACTION, action)
    return plan.set_column(plan.schema.get_field_index(REASON), REASON, reason)


@dataclass(frozen=True)
class ReconcilePlan:
    """Keys SyncFlow holds that APISmith no longer lists, and whether the guard allows deleting them.

    `deletes` is empty when `blocked`; `candidates` always lists what a full
    reconciliation would delete, for the report.
    """

    deletes: pa.Table
    share: float
    blocked: bool
    reason: str
    candidates: pa.Table


def plan_reconcile_deletes(
    stored_keys: pa.Table, source_keys: pa.Table, delete_guard: float
) -> ReconcilePlan:
    """Full-key reconciliation: delete stored keys missing from the source, unless too many.

    `stored_keys` holds `_bk_hash` (and usually `_bk`) of everything delivered;
    `source_keys` holds `_bk_hash` of every key APISmith lists now. When the
    share of stored keys to delete exceeds `delete_guard`, nothing is deleted:
    an empty or truncated key listing must never wipe ScheduleHub.
    """
    if not 0.0 < delete_guard <= 1.0:
        raise ValueError(f"delete_guard must be in (0, 1], got {delete_guard!r}")
    for label, table in (("stored_keys", stored_keys), ("source_keys", source_keys)):
        if BK_HASH not in table.column_names:
            raise ValueError(f"{label} has no {BK_HASH!r} column (columns: {table.column_names})")
    gone = pc.invert(pc.is_in(stored_keys.column(BK_HASH), value_set=source_keys.column(BK_HASH)))
    candidates, _ = _sorted_by_key(stored_keys.filter(gone))
    count = candidates.num_rows
    candidates = _with_plan(
        candidates,
        pa.repeat(pa.scalar(DELETE, pa.string()), count),
        pa.repeat(pa.scalar(MISSING_FROM_SOURCE, pa.string()), count),
    )
    total = stored_keys.num_rows
    share = count / total if total else 0.0
    blocked = share > delete_guard
    if blocked:
        reason = (
            f"blocked: {count} of {total} stored keys ({share:.1%}) are missing from the source, "
            f"more than the delete guard of {delete_guard:.1%}"
        )
    else:
        reason = f"{count} of {total} stored keys ({share:.1%}) are missing from the source"
    deletes = candidates.slice(0, 0) if blocked else candidates
    return ReconcilePlan(deletes=deletes, share=share, blocked=blocked, reason=reason, candidates=candidates)


__all__ = [
    "ReconcilePlan",
    "batch_winners",
    "dedupe_batch",
    "key_order",
    "key_words",
    "plan_delta",
    "plan_reconcile_deletes",
    "resync_skips",
    "word_order",
]
