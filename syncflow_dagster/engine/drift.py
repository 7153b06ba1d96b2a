"""Drift: what ScheduleHub holds against what SyncFlow's state says it delivered.

`compare_target` takes both sides as (`_bk_hash`, `_bk`, `_data_hash`) and
sorts every key into one of: held by both with the same data hash (no drift),
missing in the target, extra in the target (ScheduleHub has a key SyncFlow
never delivered or has since deleted), or differing (both hold the key, the
data hashes differ; a target record whose data could not be read back counts
as differing).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as _compute

from syncflow_dagster.engine.columns import BK, BK_HASH, DATA_HASH

# The pyarrow stubs type each compute function per concrete array class.
pc: Any = _compute


@dataclass(frozen=True)
class TargetDrift:
    """Keys (`_bk_hash`, `_bk`) on which ScheduleHub and SyncFlow's state disagree."""

    missing: pa.Table
    extra: pa.Table
    differing: pa.Table
    held: int
    target: int

    @property
    def drifted(self) -> bool:
        return bool(self.missing.num_rows or self.extra.num_rows or self.differing.num_rows)


def compare_target(held: pa.Table, target: pa.Table) -> TargetDrift:
    """Sort the keys of `held` (SyncFlow's state) and `target` (ScheduleHub) into missing, extra, differing."""
    for label, table in (("held", held), ("target", target)):
        for name in (BK_HASH, BK, DATA_HASH):
            if name not in table.column_names:
                raise ValueError(f"{label} has no {name!r} column (columns: {table.column_names})")
    in_target = pc.is_in(held.column(BK_HASH), value_set=target.column(BK_HASH))
    missing = held.filter(pc.invert(in_target)).select([BK_HASH, BK])
    extra = target.filter(pc.invert(pc.is_in(target.column(BK_HASH), value_set=held.column(BK_HASH))))
    both = held.filter(in_target)
    positions = pc.index_in(both.column(BK_HASH), value_set=target.column(BK_HASH))
    target_hash = pc.take(target.column(DATA_HASH), positions)
    same = pc.fill_null(pc.equal(both.column(DATA_HASH), target_hash), False)
    differing = both.filter(pc.invert(same)).select([BK_HASH, BK])
    return TargetDrift(
        missing=missing,
        extra=extra.select([BK_HASH, BK]),
        differing=differing,
        held=held.num_rows,
        target=target.num_rows,
    )


__all__ = ["TargetDrift", "compare_target"]
