"""Rowversion: rows the source has not changed since the last delivery are stale.

APISmith's rowversion is a monotonic change counter. A row whose rowversion is
not newer than the one last *delivered* for its key cannot carry news, so it is
set aside before any hash is compared (and a replayed or out-of-order page can
never overwrite newer state).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as _compute

from syncflow_dagster.engine.columns import BK_HASH, ROWVERSION

# The pyarrow stubs type each compute function per concrete array class; the
# arrays here get their types at run time, so compute calls are left untyped.
pc: Any = _compute


def stored_lookup(rows: pa.Table, stored: pa.Table | None, column: str) -> pa.Array:
    """For each row, `column` of the stored state with the same `_bk_hash` (null when none)."""
    keys = rows.column(BK_HASH)
    if stored is None or stored.num_rows == 0 or column not in stored.column_names:
        kind = (
            stored.schema.field(column).type if stored is not None and column in stored.column_names else None
        )
        return pa.nulls(rows.num_rows).cast(kind) if kind is not None else pa.nulls(rows.num_rows)
    positions = pc.index_in(keys, value_set=stored.column(BK_HASH))
    looked_up: pa.Array = pc.take(stored.column(column), positions)
    return looked_up.combine_chunks() if isinstance(looked_up, pa.ChunkedArray) else looked_up


def _positions_and_stale(rows: pa.Table, stored: pa.Table) -> tuple[pa.Array, pa.Array]:
    """(each row's position in `stored`, null when never delivered; whether the row is stale).

    The one key lookup both splits are made of: `stored` holds at least
    `_bk_hash` and `_rowversion` of what was last delivered.
    """
    for name in (BK_HASH, ROWVERSION):
        if name not in stored.column_names:
            raise ValueError(f"stored state has no {name!r} column (columns: {stored.column_names})")
    positions = pc.index_in(rows.column(BK_HASH), value_set=stored.column(BK_HASH))
    stored_rowversion = pc.take(stored.column(ROWVERSION), positions)
    stale = pc.fill_null(pc.less_equal(rows.column(ROWVERSION), stored_rowversion), False)
    return positions, stale


def split_by_rowversion(rows: pa.Table, stored: pa.Table | None) -> tuple[pa.Table, pa.Table]:
    """(fresh, stale): the rows newer than what was last delivered for their key, and the rest."""
    if stored is None or stored.num_rows == 0:
        return rows, rows.slice(0, 0)
    _, stale = _positions_and_stale(rows, stored)
    return rows.filter(pc.invert(stale)), rows.filter(stale)


@dataclass(frozen=True)
class FreshRows:
    """The rows newer than the stored state, where each one's stored row is, and how many were stale."""

    fresh: pa.Table
    # For each fresh row, its row in `stored` (null when the key was never delivered).
    stored_positions: pa.Array
    stale: int


def fresh_rows(rows: pa.Table, stored: pa.Table | None, *, keep_stale: bool = False) -> FreshRows:
    """`split_by_rowversion` for a stage that keeps only the fresh rows.

    The key lookup is made once and handed on (the stored columns of the fresh
    rows are a `take` away), and the stale rows are counted, not copied: on a
    full-window re-read nearly every row is stale, and copying them was most
    of the split. `keep_stale` keeps every row (a resync re-delivers what was
    delivered already); `stale` then counts none.
    """
    if stored is None or stored.num_rows == 0:
        return FreshRows(rows, pa.nulls(rows.num_rows, pa.int32()), 0)
    if keep_stale:
        for name in (BK_HASH, ROWVERSION):
            if name not in stored.column_names:
                raise ValueError(f"stored state has no {name!r} column (columns: {stored.column_names})")
        positions = pc.index_in(rows.column(BK_HASH), value_set=stored.column(BK_HASH))
        return FreshRows(rows, _one(positions), 0)
    positions, stale = _positions_and_stale(rows, stored)
    stale_count = int(pc.sum(stale).as_py() or 0)
    if stale_count == 0:
        return FreshRows(rows, _one(positions), 0)
    keep = pc.invert(stale)
    return FreshRows(rows.filter(keep), _one(positions.filter(keep)), stale_count)


def _one(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    return values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
