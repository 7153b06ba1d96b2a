"""Relations: parents before children.

A child row may only go to ScheduleHub once every parent it names is there
(or arrives earlier in the same run, in topological order). `split_ready_pending`
holds back the others with reason `parent_missing`; calling it again with the
grown set of known parents releases them; `expire_pending` turns those that
waited too long into failures.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any

import pyarrow as pa
import pyarrow.compute as _compute

from syncflow_dagster.catalog.models import Catalog, EntitySpec
from syncflow_dagster.engine.columns import ACTION, BK_HASH_TYPE, DELETE, REASON
from syncflow_dagster.engine.identity import key_hash_of, key_text_of

# The pyarrow stubs type each compute function per concrete array class; the
# arrays here get their types at run time, so compute calls are left untyped.
pc: Any = _compute

PARENT_MISSING = "parent_missing"
MISSING_PARENT = "_missing_parent"
PENDING_SINCE = "_pending_since"


def delivery_order(catalog: Catalog) -> tuple[str, ...]:
    """Entity names with every parent before its children."""
    return catalog.topological_order


def parent_key_hashes(catalog: Catalog, entity: EntitySpec | str, rows: pa.Table) -> dict[str, pa.Array]:
    """Per parent entity, the BK_HASH of the parent each row names (null: relation not set).

    The parent's canonical key is built from the child's FK fields exactly as
    identity builds it from the parent's own key fields, so the hashes match.
    With two relations to one parent, the second is keyed "<parent>#2".
    """
    spec = catalog.entity(entity) if isinstance(entity, str) else entity
    out: dict[str, pa.Array] = {}
    for relation in spec.parents:
        for field in relation.fields:
            if field not in rows.column_names:
                raise ValueError(
                    f"entity {spec.name!r}, parent {relation.entity!r}: FK field {field!r} is not in the rows"
                )
        text = key_text_of([rows.column(field) for field in relation.fields])
        name = relation.entity
        suffix = 2
        while name in out:
            name = f"{relation.entity}#{suffix}"
            suffix += 1
        out[name] = _distinct_key_hashes(text)
    return out


def _distinct_key_hashes(texts: pa.Array | pa.ChunkedArray) -> pa.Array:
    """key_hash_of, computed once per distinct text and spread back to the rows.

    Foreign keys repeat (a million work orders name some fifty thousand items
    and a handful of sites), and the per-value hash call is the cost, so only
    the distinct texts are hashed (figures: docs/benchmarks.md, "Where the
    figures behind the code's choices come from").
    """
    array = texts.combine_chunks() if isinstance(texts, pa.ChunkedArray) else texts
    encoded = pc.dictionary_encode(array)
    hashes: pa.Array = key_hash_of(encoded.dictionary).take(encoded.indices)
    return hashes


def _as_value_set(known: pa.Array | pa.ChunkedArray | Iterable[bytes]) -> pa.Array:
    if isinstance(known, pa.ChunkedArray):
        known = pa.concat_arrays(known.chunks) if known.num_chunks else pa.array([], BK_HASH_TYPE)
    if isinstance(known, pa.Array):
        return pc.cast(known, BK_HASH_TYPE)
    return pa.array(list(known), BK_HASH_TYPE)


def split_ready_pending(
    catalog: Catalog,
    entity: EntitySpec | str,
    plan: pa.Table,
    known_parents: Mapping[str, pa.Array | pa.ChunkedArray | set[bytes] | frozenset[bytes]],
    hashes: Mapping[str, pa.Array] | None = None,
) -> tuple[pa.Table, pa.Table]:
    """(ready, pending): pending rows name a parent ScheduleHub does not have yet.

    `known_parents` holds, per parent entity, the BK_HASHes ScheduleHub already
    has or that arrive earlier in this run. Pending rows get `_reason`
    `parent_missing` and `_missing_parent` (the first missing parent, in
    declared order). Deletes are always ready: removing a child never needs
    its parent. `hashes` is `parent_key_hashes` of the same plan when the
    caller has it already (hashing a million FKs per relation is not free).
    """
    spec = catalog.entity(entity) if isinstance(entity, str) else entity
    n = plan.num_rows
    missing_parent = pa.nulls(n, pa.string())
    if hashes is None:
        hashes = parent_key_hashes(catalog, spec, plan)
    for name, child_hashes in reversed(list(hashes.items())):
        parent = name.split("#", 1)[0]
        if parent not in known_parents:
            raise ValueError(
                f"entity {spec.name!r}: known_parents has no entry for parent entity {parent!r} "
                "(pass an empty set when ScheduleHub has none)"
            )
        present = pc.is_in(child_hashes, value_set=_as_value_set(known_parents[parent]))
        absent = pc.and_(pc.is_valid(child_hashes), pc.invert(present))
        missing_parent = pc.if_else(absent, parent, missing_parent)
    if ACTION in plan.column_names:
        missing_parent = pc.if_else(
            pc.equal(plan.column(ACTION), DELETE), pa.scalar(None, pa.string()), missing_parent
        )
    waiting = pc.is_valid(missing_parent)
    base = plan.drop_columns([MISSING_PARENT]) if MISSING_PARENT in plan.column_names else plan
    if not pc.any(waiting).as_py():
        # Every parent is there (the usual case): no copy of the plan.
        ready, pending = base, base.slice(0, 0)
    else:
        ready = base.filter(pc.invert(waiting))
        pending = base.filter(waiting)
    pending_parent = missing_parent.filter(waiting)
    reason = pa.repeat(pa.scalar(PARENT_MISSING, pa.string()), pending.num_rows)
    if REASON in pending.column_names:
        pending = pending.set_column(pending.column_names.index(REASON), REASON, reason)
    else:
        pending = pending.append_column(REASON, reason)
    return ready, pending.append_column(MISSING_PARENT, pending_parent)


def expire_pending(pending: pa.Table, now: datetime, max_age: timedelta) -> tuple[pa.Table, pa.Table]:
    """(still_pending, failed): children waiting longer than `max_age` since `_pending_since` fail.

    Failed rows keep reason `parent_missing`; a missing `_pending_since` counts
    as waiting since now (never failed on the first sight).
    """
    if PENDING_SINCE not in pending.column_names:
        raise ValueError(f"pending rows have no {PENDING_SINCE!r} column (columns: {pending.column_names})")
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware (UTC)")
    since = pc.cast(pending.column(PENDING_SINCE), pa.timestamp("us", tz="UTC"))
    deadline = pa.scalar(now - max_age, pa.timestamp("us", tz="UTC"))
    expired = pc.fill_null(pc.less(since, deadline), False)
    return pending.filter(pc.invert(expired)), pending.filter(expired)
