"""Rowversion: rows not newer than the last delivered version are stale."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pyarrow as pa
import pytest

from syncflow_dagster.defs import stages
from syncflow_dagster.engine.columns import (
    BK,
    BK_HASH,
    BK_HASH_TYPE,
    CHANGED_AT,
    DATA_HASH,
    RECIPE,
    ROWVERSION,
)
from syncflow_dagster.engine.rowversion import fresh_rows, split_by_rowversion
from syncflow_dagster.store.database import make_engine
from syncflow_dagster.store.state import StateRepository
from syncflow_dagster_tests.engine_frames import ENTITY, identified


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


def test_fresh_rows_keeps_what_split_by_rowversion_keeps_and_points_at_the_stored_row() -> None:
    rows = identified([("A", "1", 5), ("B", "1", 5), ("C", "1", 5), ("D", "1", 5), ("E", "1", 9)])
    hashes = rows.column(BK_HASH).to_pylist()
    # Stored rows in another order than the batch, one of them (X) not in the batch at all.
    stored = pa.table(
        {
            BK_HASH: pa.array([hashes[2], b"X" * 16, hashes[0], hashes[1], hashes[4]], BK_HASH_TYPE),
            ROWVERSION: pa.array([6, 1, 4, 5, 3], pa.int64()),
        }
    )
    split = fresh_rows(rows, stored)
    fresh, stale = split_by_rowversion(rows, stored)
    assert split.fresh.equals(fresh)
    assert split.fresh.column("part_no").to_pylist() == ["A", "D", "E"]
    assert split.stale == stale.num_rows == 2
    assert split.stored_positions.to_pylist() == [2, None, 4]
    nothing = fresh_rows(rows, None)
    assert nothing.fresh.num_rows == 5
    assert nothing.stale == 0
    assert nothing.stored_positions.null_count == 5


@pytest.fixture
def state(database_url: str) -> Iterator[StateRepository]:
    engine = make_engine(database_url)
    repo = StateRepository(engine)
    repo.ensure_schema()
    yield repo
    engine.dispose()


def test_a_batch_asking_for_most_of_the_state_reads_it_whole_with_the_same_outcome(
    state: StateRepository, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full-window re-read loads the whole state; the rowversion stage's frame is the same either way."""
    entity = ENTITY.model_copy(update={"name": f"parts_{uuid.uuid4().hex[:8]}"})
    delivered = identified([(f"P{i}", "1", 5) for i in range(40)])
    accepted = delivered.select([BK_HASH, BK, DATA_HASH, ROWVERSION, RECIPE, CHANGED_AT])
    state.commit_delivered(entity.name, uuid.uuid4(), accepted, pa.array([], BK_HASH_TYPE))
    # The batch: 30 of the 40 delivered keys (10 newer, 20 not) and 5 new ones.
    batch = identified(
        [(f"P{i}", "2", 6 if i < 10 else 5) for i in range(30)] + [(f"N{i}", "1", 1) for i in range(5)]
    )
    keys = batch.column(BK_HASH).combine_chunks()
    monkeypatch.setattr(stages, "WHOLE_STATE_MIN_KEYS", 10**9)
    by_keys = stages.stored_for_batch(state, entity.name, keys)
    monkeypatch.setattr(stages, "WHOLE_STATE_MIN_KEYS", 10)
    whole = stages.stored_for_batch(state, entity.name, keys)
    assert (by_keys.num_rows, whole.num_rows) == (30, 40)
    assert by_keys.schema == whole.schema
    # A small share of the state still takes the keyed lookup.
    assert stages.stored_for_batch(state, entity.name, keys.slice(0, 9)).num_rows == 9
    one = stages.fresh_with_stored(batch, by_keys)
    other = stages.fresh_with_stored(batch, whole)
    assert one.frame.equals(other.frame)
    assert one.counts == other.counts == {"fresh": 15, "stale": 20}
    result = stages.rowversion_stage(state, entity, batch)
    assert result.frame.equals(one.frame)
    assert result.counts == {"fresh": 15, "stale": 20}
