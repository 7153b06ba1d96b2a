"""Rowversion: rows not newer than the last delivered version are stale."""

from __future__ import annotations

import pyarrow as pa

from syncflow_dagster.engine.columns import BK_HASH, BK_HASH_TYPE, ROWVERSION
from syncflow_dagster.engine.rowversion import split_by_rowversion
from syncflow_dagster_tests.engine_frames import identified


def test_not_newer_is_stale_newer_and_unknown_are_fresh() -> None:
    rows = identified([("A", "1", 5), ("B", "1", 5), ("C", "1", 5), ("D", "1", 5)])
    hashes = rows.column(BK_HASH).to_pylist()
    stored = pa.table(
        {
            BK_HASH: pa.array(hashes[:3], BK_HASH_TYPE),
            ROWVERSION: pa.array([4, 5, 6], pa.int64()),
        }
    )
    fresh, stale = split_by_rowversion(rows, stored)
    assert fresh.column("part_no").to_pylist() == ["A", "D"]
    assert stale.column("part_no").to_pylist() == ["B", "C"]
    assert fresh.schema == rows.schema == stale.schema


def test_empty_or_missing_state_means_all_fresh() -> None:
    rows = identified([("A", "1", 1)])
    for stored in (
        None,
        pa.table({BK_HASH: pa.array([], BK_HASH_TYPE), ROWVERSION: pa.array([], pa.int64())}),
    ):
        fresh, stale = split_by_rowversion(rows, stored)
        assert fresh.num_rows == 1
        assert stale.num_rows == 0


def test_stored_rowversion_null_counts_as_fresh() -> None:
    rows = identified([("A", "1", 1)])
    stored = pa.table([rows.column(BK_HASH), pa.nulls(1, pa.int64())], names=[BK_HASH, ROWVERSION])
    fresh, _ = split_by_rowversion(rows, stored)
    assert fresh.num_rows == 1
