"""`batch_winners` + a plan per chunk gives the plan of the whole batch, whatever the chunks.

The streamed delta stage (defs/streamed.py) reads a batch's key columns first, keeps each key's
one row (`batch_winners`), then plans chunk by chunk. Batches here repeat keys across chunks, mix
tombstones with live rows of the same key (older, newer, tied) and carry stored versions.
"""

from __future__ import annotations

import datetime as dt

import numpy as np
import pyarrow as pa
import pytest

from syncflow_dagster.defs import stages
from syncflow_dagster.engine import columns as c
from syncflow_dagster.engine.delta import batch_winners

DAY = dt.date(2026, 11, 28)


def _batch(seed: int, rows: int = 60, keys: int = 15) -> pa.Table:
    rng = np.random.default_rng(seed)
    key = rng.integers(0, keys, rows)
    deleted = rng.random(rows) < 0.25
    rowversion = rng.integers(1, 40, rows)  # ties happen
    data = rng.integers(0, 3, rows)  # equal payloads happen too
    stored_rv = np.where(key % 3 == 0, None, (key * 2) % 30)
    return pa.table(
        {
            c.BK: pa.array([f"K{k}" for k in key]),
            c.BK_HASH: pa.array([int(k).to_bytes(16, "big") for k in key], c.BK_HASH_TYPE),
            c.DATA_HASH: pa.array(
                [None if d else int(v).to_bytes(32, "big") for v, d in zip(data, deleted, strict=True)],
                c.DATA_HASH_TYPE,
            ),
            c.ROWVERSION: pa.array(rowversion, c.ROWVERSION_TYPE),
            c.RECIPE: pa.array([1] * rows, c.RECIPE_TYPE),
            "payload": pa.array([f"v{v}" for v in data]),
            stages.DELETED: pa.array(deleted),
            stages.PARTITION_DATE: pa.array([DAY] * rows, pa.date32()),
            stages.STORED_DATA_HASH: pa.array(
                [
                    None if s is None else int(k % 2).to_bytes(32, "big")
                    for k, s in zip(key, stored_rv, strict=True)
                ],
                c.DATA_HASH_TYPE,
            ),
            stages.STORED_ROWVERSION: pa.array(stored_rv, c.ROWVERSION_TYPE),
            stages.STORED_RECIPE: pa.array([None if s is None else 1 for s in stored_rv], c.RECIPE_TYPE),
        }
    )


def _rows(plan: pa.Table) -> list[tuple[object, ...]]:
    names = [c.BK, c.ACTION, c.REASON, c.ROWVERSION, c.DATA_HASH]
    return sorted(tuple(row[n] for n in names) for row in plan.select(names).to_pylist())


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("size", [1, 7, 1000])
def test_a_plan_made_chunk_by_chunk_after_batch_winners_equals_the_whole_batch_plan(
    seed: int, size: int
) -> None:
    batch = _batch(seed)
    whole = stages.delta_stage(batch)
    keep, duplicates = batch_winners(batch.select([c.BK_HASH, c.ROWVERSION, c.DATA_HASH, stages.DELETED]))
    parts, counts = [], {}
    for start in range(0, batch.num_rows, size):
        chunk = batch.slice(start, size)
        kept = chunk.filter(pa.array(keep[start : start + size]))
        result = stages.delta_stage(kept)
        parts.append(result.frame)
        counts = stages.merged_counts(counts, result.counts)
    counts["duplicates"] = duplicates
    assert _rows(pa.concat_tables(parts)) == _rows(whole.frame)
    assert counts == whole.counts
