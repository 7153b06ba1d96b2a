"""Delta: one action and reason per key against the last delivered state."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from syncflow_dagster.engine.columns import BK, BK_HASH, DATA_HASH, RECIPE, ROWVERSION
from syncflow_dagster.engine.delta import (
    dedupe_batch,
    key_order,
    plan_delta,
    plan_reconcile_deletes,
    word_order,
)
from syncflow_dagster_tests.engine_frames import identified, plan_view, stored_from


def test_first_run_is_all_inserts_sorted_by_key_hash() -> None:
    plan = plan_delta(identified([("A", "1", 1), ("B", "2", 1)]), None)
    assert {(r["_bk"], r["_action"], r["_reason"]) for r in plan_view(plan)} == {
        ("A", "insert", "new_key"),
        ("B", "insert", "new_key"),
    }
    hashes: list[Any] = plan.column(BK_HASH).to_pylist()
    assert hashes == sorted(hashes)


def test_unchanged_changed_stale_and_a_b_a() -> None:
    delivered = identified([("A", "1", 1), ("B", "1", 1), ("C", "1", 1)])
    stored = stored_from(delivered)
    # A unchanged at a newer rowversion, B changed, C replayed at the same rowversion.
    batch = identified([("A", "1", 2), ("B", "2", 2), ("C", "9", 1)])
    got = {r["_bk"]: (r["_action"], r["_reason"]) for r in plan_view(plan_delta(batch, stored))}
    assert got == {
        "A": ("skip", "unchanged"),
        "B": ("update", "data_changed"),
        "C": ("skip", "stale_rowversion"),
    }
    # A→B→A: B was never delivered, so A again compares with delivered A: unchanged.
    # Delivered B, then back to A, is an update.
    b_delivered = stored_from(identified([("A", "2", 2)]))
    back_to_a = plan_delta(identified([("A", "1", 3)]), b_delivered)
    assert plan_view(back_to_a)[0]["_action"] == "update"


def test_recipe_change_is_an_update() -> None:
    rows = identified([("A", "1", 2)])
    stored = stored_from(identified([("A", "1", 1)]))
    stored = stored.set_column(stored.column_names.index(RECIPE), RECIPE, pa.array([0], pa.int16()))
    assert plan_view(plan_delta(rows, stored))[0]["_reason"] == "recipe_changed"


def test_duplicates_in_a_batch_highest_rowversion_wins() -> None:
    rows = identified([("A", "1", 1), ("A", "3", 3), ("A", "2", 2), ("B", "1", 1)])
    kept, duplicates = dedupe_batch(rows)
    assert sorted(
        zip(kept.column("part_no").to_pylist(), kept.column(ROWVERSION).to_pylist(), strict=True)
    ) == [
        ("A", 3),
        ("B", 1),
    ]
    rowversions: list[Any] = duplicates.column(ROWVERSION).to_pylist()
    assert sorted(rowversions) == [1, 2]
    plan = plan_delta(rows, None)
    assert plan.num_rows == 2


def test_tie_on_rowversion_is_broken_by_data_hash_regardless_of_order() -> None:
    rows = identified([("A", "1", 5), ("A", "2", 5)])
    first, _ = dedupe_batch(rows)
    second, _ = dedupe_batch(rows.take([1, 0]))
    assert first.column(DATA_HASH).equals(second.column(DATA_HASH))


def tombstones(rows: pa.Table, rowversions: list[int | None]) -> pa.Table:
    columns: dict[str, Any] = {
        BK_HASH: rows.column(BK_HASH),
        BK: rows.column(BK),
        ROWVERSION: pa.array(rowversions, pa.int64()),
    }
    return pa.table(columns)


def test_tombstones_delete_known_keys_only() -> None:
    delivered = identified([("A", "1", 1), ("B", "1", 1)])
    graves = tombstones(identified([("A", "1", 0), ("Z", "1", 0)]), [2, 2])
    got = {
        r["_bk"]: (r["_action"], r["_reason"], r[ROWVERSION])
        for r in plan_view(plan_delta(delivered.slice(0, 0), stored_from(delivered), graves))
    }
    assert got == {"A": ("delete", "tombstone", 2), "Z": ("skip", "unknown_key", 2)}


def test_tombstone_against_live_row_in_the_same_batch() -> None:
    delivered = identified([("A", "1", 1), ("B", "1", 1)])
    live = identified([("A", "2", 5), ("B", "2", 3)])
    # A came back after its deletion (5 > 4): the tombstone loses. B was deleted after (4 >= 3).
    graves = tombstones(live, [4, 4])
    got = {
        r["_bk"]: (r["_action"], r["_reason"])
        for r in plan_view(plan_delta(live, stored_from(delivered), graves))
    }
    assert got == {"A": ("update", "data_changed"), "B": ("delete", "tombstone")}


def test_tombstone_older_than_delivered_state_is_stale() -> None:
    delivered = identified([("A", "1", 7)])
    graves = tombstones(delivered, [6])
    plan = plan_delta(delivered.slice(0, 0), stored_from(delivered), graves)
    assert plan_view(plan) == [{"_bk": "A", "_action": "skip", "_reason": "stale_rowversion", ROWVERSION: 6}]
    assert plan.column(DATA_HASH).null_count == 1


def test_plan_requires_identity_columns() -> None:
    with pytest.raises(ValueError, match="run identity before plan_delta"):
        plan_delta(pa.table({"x": [1]}), None)


def test_reconcile_deletes_and_guard() -> None:
    stored = identified([(f"P{i}", "1", 1) for i in range(10)]).select([BK_HASH, BK])
    source = stored.slice(0, 9)
    plan = plan_reconcile_deletes(stored, source, delete_guard=0.2)
    assert not plan.blocked
    assert plan.share == pytest.approx(0.1)
    assert plan.deletes.column(BK).to_pylist() == ["P9"]
    assert plan.deletes.column("_action").to_pylist() == ["delete"]
    blocked = plan_reconcile_deletes(stored, source.slice(0, 0), delete_guard=0.2)
    assert blocked.blocked
    assert blocked.deletes.num_rows == 0
    assert blocked.candidates.num_rows == 10
    assert "more than the delete guard of 20.0%" in blocked.reason
    with pytest.raises(ValueError, match="delete_guard"):
        plan_reconcile_deletes(stored, source, delete_guard=0.0)


def test_key_order_is_arrows_bytewise_order() -> None:
    rows = identified([(f"P{i}", "1", 1) for i in range(300)])
    keys = rows.column(BK_HASH).combine_chunks()
    ours: list[Any] = keys.take(pa.array(key_order(keys))).to_pylist()
    everything: list[Any] = keys.to_pylist()
    assert ours == sorted(everything)
    sliced = keys.slice(7, 50)
    part: list[Any] = sliced.to_pylist()
    assert sliced.take(pa.array(key_order(sliced))).to_pylist() == sorted(part)


def test_key_order_stays_bytewise_when_keys_share_their_first_eight_bytes() -> None:
    # The fast path sorts by the first 8 bytes; equal first halves must still order by the rest.
    shared = bytes(range(8))
    keys = pa.array(
        [shared + bytes([9 - i] * 8) for i in range(5)] + [bytes([200] * 16), bytes([1] * 16)], pa.binary(16)
    )
    everything: list[Any] = keys.to_pylist()
    assert keys.take(pa.array(key_order(keys))).to_pylist() == sorted(everything)
    words = np.array([[1, 5], [0, 7], [1, 2], [0, 9]], dtype=np.uint64)
    assert word_order(words).tolist() == [1, 3, 2, 0]
