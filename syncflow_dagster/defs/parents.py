"""Parent-child, stage 6: which rows of a plan can go to ScheduleHub now, and which wait for a parent.

A child row is ready once its parents are delivered (held in entity state) or
arrive in the same run; otherwise it is parked in pending_children until they
do, and children parked earlier whose parents have arrived are released back
into the stage. Ready rows gain their `_ref.<parent resource>` columns here.
These are per-chunk kernels like those of `stages.py`; `streamed.parent_child`
runs them over the plan.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Mapping

import pyarrow as pa
import pyarrow.compute as pc

from syncflow_dagster.catalog import Catalog, EntitySpec
from syncflow_dagster.defs import bookkeeping
from syncflow_dagster.defs.stages import (
    PARTITION_DATE,
    REF_PREFIX,
    StageResult,
    count_true,
    is_value,
    never_stored_deletes,
)
from syncflow_dagster.engine import columns as c
from syncflow_dagster.engine.identity import key_text_of
from syncflow_dagster.engine.keyset import KeySet
from syncflow_dagster.engine.relations import parent_key_hashes, split_ready_pending
from syncflow_dagster.store.repositories import SyncStore
from syncflow_dagster.store.schema import failed_records, pending_children


def released_for_run(
    database: SyncStore,
    entity: EntitySpec,
    plan_keys: pa.Array | pa.ChunkedArray,
    run_date: dt.date | None,
    arriving: Mapping[str, pa.Array],
) -> pa.Table:
    """Children of `entity` parked earlier whose parents have arrived, but for keys the plan holds anew."""
    released = bookkeeping.released_children(database, entity, arriving)
    if released.num_rows and run_date is not None:
        released = released.append_column(
            PARTITION_DATE, pa.repeat(pa.scalar(run_date, pa.date32()), released.num_rows)
        )
    if released.num_rows and len(plan_keys):
        released = released.filter(pc.invert(pc.is_in(released[c.BK_HASH], value_set=plan_keys)))
    return released


def resolve_parents(
    catalog: Catalog,
    entity: EntitySpec,
    database: SyncStore,
    plan: pa.Table,
    batch_id: uuid.UUID,
    arriving: Mapping[str, pa.Array],
    *,
    hold_deletes: bool = True,
    parent_keys: Mapping[str, KeySet] | None = None,
) -> StageResult:
    """Rows of `plan` (a chunk of it, or the released children) split into ready and parked.

    With `hold_deletes`, the never-stored deletes of keys SyncFlow does not
    hold are dropped first (`_held_tombstones_only`). Each row is judged on
    its own parents, so a plan can be resolved chunk by chunk. `parent_keys`
    (parent entity → its delivered keys, read once for the stage by
    `stored_parent_keys`) answers for those parents instead of a lookup.
    """
    held_deletes = 0
    if hold_deletes:
        plan, held_deletes = _held_tombstones_only(database, entity, plan)
    state = database.state()
    needed = parent_key_hashes(catalog, entity.name, plan)
    known: dict[str, pa.Array] = {}
    for name, hashes in needed.items():
        parent = name.split("#", 1)[0]
        wanted = pc.unique(pc.drop_null(hashes)) if len(hashes) else hashes
        if not len(wanted):
            found = None
        elif parent_keys is not None and parent in parent_keys:
            found = parent_keys[parent].among(wanted)
        else:
            found = state.stored_for_keys(parent, wanted)[c.BK_HASH].combine_chunks()
        previous = known.get(parent)
        if found is None:
            found = pa.array([], c.BK_HASH_TYPE)
        known[parent] = found if previous is None else pa.concat_arrays([previous, found])
    for parent in entity.parent_entities:
        known.setdefault(parent, pa.array([], c.BK_HASH_TYPE))
        if len(arriving.get(parent, [])):
            known[parent] = pa.concat_arrays([known[parent], arriving[parent].cast(c.BK_HASH_TYPE)])
    ready, waiting = split_ready_pending(catalog, entity.name, plan, known, needed)
    parked = bookkeeping.park_children(database, catalog, entity, batch_id, waiting)
    ready = add_references(catalog, entity, ready)
    counts = {
        "ready": ready.num_rows,
        "pending": parked.waiting,
        # Waiting for a parent too, but held as the open failed records they already were.
        "failed_parent_missing_kept": parked.kept_failed,
        "released": 0,
        "held_deleted_at_source": held_deletes,
    }
    return StageResult(ready, counts)


def stored_parent_keys(
    database: SyncStore, entity: EntitySpec, plan_rows: int, chunk: int
) -> dict[str, KeySet]:
    """The delivered keys of the parents worth reading whole for a plan of `plan_rows` rows.

    Looked up chunk by chunk, every chunk stages its distinct parents and
    probes the parent's index for each, so the lookups of a large plan cost
    about a probe per row, each dearer as the parent grows; read whole (one
    binary COPY) and held as a `KeySet`, a parent costs 16 bytes a key. Only for a plan of more than one chunk, and only parents that hold no more
    keys than the plan has rows (so the set is no larger than the plan's own
    key column): a small run keeps its per-chunk lookups, whose cost follows
    the keys asked. The set is read once, when the stage starts; a parent
    delivered by another run while the stage goes is seen by the next run,
    as one delivered just after the stage would be.
    """
    if plan_rows <= chunk:
        return {}
    state = database.state()
    out: dict[str, KeySet] = {}
    for parent in entity.parent_entities:
        if parent in out:
            continue
        held = state.count(parent)
        if held <= plan_rows:
            out[parent] = KeySet(state.known_keys(parent)) if held else KeySet(pa.array([], c.BK_HASH_TYPE))
    return out


def arriving_keys(ready: pa.Table) -> pa.Array:
    """The keys a resolved frame hands to delivery as live records (its deletes excluded)."""
    if ready.num_rows == 0:
        return pa.array([], c.BK_HASH_TYPE)
    live = ready.filter(pc.invert(is_value(ready[c.ACTION], c.DELETE)))
    return live[c.BK_HASH].combine_chunks()


def _held_tombstones_only(database: SyncStore, entity: EntitySpec, plan: pa.Table) -> tuple[pa.Table, int]:
    """The plan without the never-stored deletes of keys SyncFlow does not hold; and how many it kept.

    A key deleted at the source before anything of it was delivered or held
    needs nothing. One with an open failed record or a parked child is deleted
    in ScheduleHub (idempotent: `not_found` is success), which closes both.
    """
    unknown = never_stored_deletes(plan)
    candidates = count_true(unknown)
    if not candidates:
        return plan, 0
    keys = plan.filter(unknown)[c.BK_HASH].combine_chunks()
    held = pa.concat_arrays(
        [
            bookkeeping.held_among(database, failed_records, entity.name, keys, open_only=True),
            bookkeeping.held_among(database, pending_children, entity.name, keys),
        ]
    )
    keep = pc.or_(pc.invert(unknown), pc.is_in(plan[c.BK_HASH], value_set=held))
    kept = plan.filter(keep)
    return kept, kept.num_rows - (plan.num_rows - candidates)


def align(frame: pa.Table, like: pa.Table) -> pa.Table:
    """Cast and order `frame`'s columns like `like`'s (missing ones become nulls)."""
    columns = []
    for fld in like.schema:
        if fld.name in frame.column_names:
            columns.append(frame[fld.name].cast(fld.type))
        else:
            columns.append(pa.nulls(frame.num_rows, fld.type))
    return pa.Table.from_arrays(columns, schema=like.schema)


def add_references(catalog: Catalog, entity: EntitySpec, rows: pa.Table) -> pa.Table:
    """`_ref.<parent resource>` columns: the parent's external key (its `_bk`), as ScheduleHub wants it.

    Built from the child's FK fields with the same canonical recipe identity
    uses for the parent's own key, so the reference matches the parent's `_bk`.
    """
    for relation in entity.parents:
        name = REF_PREFIX + catalog.entity(relation.entity).resource
        if name in rows.column_names:
            rows = rows.drop_columns([name])
        if rows.num_rows == 0 or any(f not in rows.column_names for f in relation.fields):
            rows = rows.append_column(name, pa.nulls(rows.num_rows, pa.string()))
            continue
        text = key_text_of([rows[f] for f in relation.fields])
        rows = rows.append_column(name, pc.cast(text, pa.string()))
    return rows
