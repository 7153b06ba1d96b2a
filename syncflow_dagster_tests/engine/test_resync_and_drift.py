"""Resync and drift in the engine: re-planning what was delivered, and comparing ScheduleHub with the state."""

from __future__ import annotations

import pyarrow as pa
import pytest

from syncflow_dagster.engine.columns import BK, BK_HASH, DATA_HASH, ROWVERSION
from syncflow_dagster.engine.delta import plan_delta, resync_skips
from syncflow_dagster.engine.drift import compare_target
from syncflow_dagster.engine.rowversion import fresh_rows
from syncflow_dagster_tests.engine_frames import identified, plan_view, stored_from


def test_keep_stale_keeps_every_row_with_its_stored_position() -> None:
    delivered = identified([("A", "1", 5), ("B", "1", 5)])
    batch = identified([("A", "1", 5), ("B", "2", 6), ("C", "1", 1)])
    plain = fresh_rows(batch, stored_from(delivered))
    assert plain.fresh.column("part_no").to_pylist() == ["B", "C"]
    assert plain.stale == 1
    kept = fresh_rows(batch, stored_from(delivered), keep_stale=True)
    assert kept.fresh.column("part_no").to_pylist() == ["A", "B", "C"]
    assert kept.stale == 0
    assert kept.stored_positions.to_pylist() == [0, 1, None]


def test_resync_turns_skips_of_delivered_rows_into_updates_and_leaves_the_rest() -> None:
    delivered = identified([("A", "1", 5), ("B", "1", 5), ("C", "1", 5)])
    # A unchanged at a newer rowversion, B replayed at its rowversion, C changed, D new.
    batch = identified([("A", "1", 6), ("B", "1", 5), ("C", "2", 6), ("D", "1", 1)])
    plan = plan_delta(batch, stored_from(delivered))
    before = {r["_bk"]: (r["_action"], r["_reason"]) for r in plan_view(plan)}
    assert before["A"] == ("skip", "unchanged")
    assert before["B"] == ("skip", "stale_rowversion")
    after = {r["_bk"]: (r["_action"], r["_reason"]) for r in plan_view(resync_skips(plan))}
    assert after == {
        "A": ("update", "resync"),
        "B": ("update", "resync"),
        "C": ("update", "data_changed"),
        "D": ("insert", "new_key"),
    }
    assert resync_skips(plan.slice(0, 0)).num_rows == 0


def test_resync_leaves_tombstones_as_they_were_planned() -> None:
    delivered = identified([("A", "1", 5)])
    tombstones = delivered.select([BK_HASH, BK, ROWVERSION])  # deleted at the rowversion delivered
    plan = plan_delta(identified([]), stored_from(delivered), tombstones)
    assert [(r["_action"], r["_reason"]) for r in plan_view(plan)] == [("skip", "stale_rowversion")]
    assert plan_view(resync_skips(plan)) == plan_view(plan)


def _side(rows: pa.Table) -> pa.Table:
    return rows.select([BK_HASH, BK, DATA_HASH])


def test_compare_target_sorts_keys_into_missing_extra_and_differing() -> None:
    held = _side(identified([("A", "1", 1), ("B", "1", 1), ("C", "1", 1)]))
    target = _side(identified([("B", "1", 1), ("C", "2", 1), ("Z", "1", 1)]))
    drift = compare_target(held, target)
    assert drift.missing.column(BK).to_pylist() == ["A"]
    assert drift.extra.column(BK).to_pylist() == ["Z"]
    assert drift.differing.column(BK).to_pylist() == ["C"]
    assert (drift.held, drift.target, drift.drifted) == (3, 3, True)
    same = compare_target(held, held)
    assert not same.drifted


def test_a_target_record_without_a_hash_differs() -> None:
    held = _side(identified([("A", "1", 1)]))
    unreadable = held.set_column(2, DATA_HASH, pa.nulls(1, held.schema.field(DATA_HASH).type))
    assert compare_target(held, unreadable).differing.column(BK).to_pylist() == ["A"]


def test_compare_target_names_a_missing_column() -> None:
    held = _side(identified([("A", "1", 1)]))
    with pytest.raises(ValueError, match="target has no '_data_hash' column"):
        compare_target(held, held.select([BK_HASH, BK]))
