"""StateRepository's initial-sync paths: an entity with no state yet answers lookups without staging
keys and takes its first commit as a plain insert, and the next commit merges into it as before."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pytest
import sqlalchemy as sa

from syncflow_dagster.engine.columns import BK, BK_HASH, DATA_HASH, RECIPE, ROWVERSION
from syncflow_dagster.store.database import make_engine
from syncflow_dagster.store.state import StateRepository
from syncflow_dagster_tests.engine_frames import random_hashes


@pytest.fixture(scope="module")
def repo(database_url: str) -> Iterator[StateRepository]:
    engine = make_engine(database_url)
    repository = StateRepository(engine)
    repository.ensure_schema()
    yield repository
    engine.dispose()


def _rows(keys: pa.Array, data: pa.Array, rowversion: int) -> pa.Table:
    n = len(keys)
    return pa.table(
        {
            BK_HASH: keys,
            BK: pa.array([f"WO-{i:06d}" for i in range(n)]),
            DATA_HASH: data,
            ROWVERSION: pa.array(np.full(n, rowversion, dtype=np.int64)),
            RECIPE: pa.array(np.ones(n, dtype=np.int16)),
        }
    )


def test_new_entity_lookup_is_empty_but_still_refuses_null_keys(repo: StateRepository) -> None:
    entity = f"fresh_{uuid.uuid4().hex[:8]}"
    keys = random_hashes(np.random.default_rng(1), 50, 16)
    assert repo.stored_for_keys(entity, keys).num_rows == 0
    with pytest.raises(ValueError, match=entity):
        repo.stored_for_keys(entity, pa.array([None], pa.binary(16)))


def test_first_commit_inserts_and_the_next_merges(repo: StateRepository) -> None:
    entity = f"fresh_{uuid.uuid4().hex[:8]}"
    rng = np.random.default_rng(2)
    keys = random_hashes(rng, 1000, 16)
    first = _rows(keys, random_hashes(rng, 1000, 32), rowversion=1)
    assert repo.commit_delivered(entity, uuid.uuid4(), first) == 1000
    assert repo.count(entity) == 1000
    stored = repo.stored_for_keys(entity, keys)
    assert stored.num_rows == 1000
    assert set(stored[DATA_HASH].to_pylist()) == set(first[DATA_HASH].to_pylist())

    # Second commit: half the keys again with new data, plus new keys: the merge path.
    more = random_hashes(rng, 200, 16)
    again = pa.concat_arrays([keys.slice(0, 500), more])
    second = _rows(again, random_hashes(rng, 700, 32), rowversion=2)
    assert repo.commit_delivered(entity, uuid.uuid4(), second) == 700
    assert repo.count(entity) == 1200
    after = repo.stored_for_keys(entity, again)
    assert after.num_rows == 700
    assert set(after[ROWVERSION].to_pylist()) == {2}
    assert set(after[DATA_HASH].to_pylist()) == set(second[DATA_HASH].to_pylist())
    with repo.engine.connect() as conn:
        rowversions = conn.execute(
            sa.text("SELECT rowversion, count(*) FROM syncflow.entity_state WHERE entity = :e GROUP BY 1"),
            {"e": entity},
        ).all()
    assert dict(rowversions) == {1: 500, 2: 700}


def test_a_repeated_key_is_found_wherever_it_is() -> None:
    from syncflow_dagster.store.state import _repeats_a_key

    keys = random_hashes(np.random.default_rng(3), 5000, 16)
    assert not _repeats_a_key(keys)
    assert not _repeats_a_key(keys.slice(10, 1))
    for i, j in ((0, 4999), (1234, 1235), (4998, 7)):
        repeated = pa.concat_arrays([keys, keys.slice(i, 1)]).take(
            pa.array([*range(j), 5000, *range(j, 5000)])
        )
        assert _repeats_a_key(repeated), (i, j)
    # An offset slice is read from its own start.
    assert not _repeats_a_key(pa.concat_arrays([keys, keys]).slice(2500, 5000))
    assert _repeats_a_key(pa.concat_arrays([keys, keys]).slice(2500, 5001))


def _state(repo: StateRepository, entity: str) -> list[sa.Row]:
    with repo.engine.connect() as conn:
        return list(
            conn.execute(
                sa.text(
                    "SELECT bk_hash, bk, data_hash, rowversion, recipe, schedulehub_id, first_seen_at,"
                    " last_synced_at, last_batch_id FROM syncflow.entity_state WHERE entity = :e"
                ),
                {"e": entity},
            )
        )


def test_first_commit_stores_every_column_from_unsorted_rows(repo: StateRepository) -> None:
    entity = f"fresh_{uuid.uuid4().hex[:8]}"
    rng = np.random.default_rng(4)
    n = 3000
    rows = _rows(random_hashes(rng, n, 16), random_hashes(rng, n, 32), rowversion=7).append_column(
        "schedulehub_id", pa.array([None if i % 3 else f"sh-{i}" for i in range(n)])
    )
    batch = uuid.uuid4()
    with repo.engine.connect() as conn:
        before = conn.execute(sa.text("SELECT now()")).scalar_one()
    assert repo.commit_delivered(entity, batch, rows) == n
    with repo.engine.connect() as conn:
        after = conn.execute(sa.text("SELECT now()")).scalar_one()

    stored = {bytes(r.bk_hash.bytes): r for r in _state(repo, entity)}
    assert len(stored) == n
    for key, bk, data, shid in zip(
        rows[BK_HASH].to_pylist(),
        rows[BK].to_pylist(),
        rows[DATA_HASH].to_pylist(),
        rows["schedulehub_id"].to_pylist(),
        strict=True,
    ):
        row = stored[key]
        assert (row.bk, bytes(row.data_hash), row.schedulehub_id) == (bk, data, shid)
        assert (row.rowversion, row.recipe, row.last_batch_id) == (7, 1, batch)
    # One commit, one transaction time: first seen and last synced are the same instant.
    times = {(r.first_seen_at, r.last_synced_at) for r in stored.values()}
    assert len(times) == 1
    first_seen, last_synced = times.pop()
    assert first_seen == last_synced
    assert before <= first_seen <= after


def test_first_commit_that_fails_leaves_no_state_and_no_watermark(repo: StateRepository) -> None:
    entity = f"fresh_{uuid.uuid4().hex[:8]}"
    rng = np.random.default_rng(5)
    n = 2000
    # Postgres text cannot hold a NUL byte: the COPY fails at that row, after the rows sorted before it.
    keys = [f"WO-{i:06d}" for i in range(n - 1)] + ["WO-\x00"]
    rows = _rows(random_hashes(rng, n, 16), random_hashes(rng, n, 32), rowversion=3).set_column(
        1, BK, pa.array(keys)
    )
    with pytest.raises(Exception, match="0x00"):
        repo.commit_delivered(entity, uuid.uuid4(), rows)
    assert repo.count(entity) == 0
    with repo.engine.connect() as conn:
        mark = conn.execute(
            sa.text("SELECT count(*) FROM syncflow.watermarks WHERE entity = :e"), {"e": entity}
        ).scalar_one()
    assert mark == 0
    # The entity is still new: the same rows, repaired, take the first-commit path again.
    repaired = rows.set_column(1, BK, pa.array([*keys[:-1], "WO-last"]))
    assert repo.commit_delivered(entity, uuid.uuid4(), repaired) == n
    assert repo.count(entity) == n


def test_first_commit_refuses_a_repeated_key_in_unsorted_rows(repo: StateRepository) -> None:
    entity = f"fresh_{uuid.uuid4().hex[:8]}"
    rng = np.random.default_rng(6)
    keys = random_hashes(rng, 500, 16)
    repeated = pa.concat_arrays([keys, keys.slice(123, 1)])
    rows = _rows(repeated, random_hashes(rng, 501, 32), rowversion=1)
    with pytest.raises(ValueError, match=f"{entity}.*repeat a key"):
        repo.commit_delivered(entity, uuid.uuid4(), rows)
    assert repo.count(entity) == 0


def test_key_order_sorts_bytewise_and_sees_an_already_sorted_frame() -> None:
    from syncflow_dagster.engine.delta import key_words
    from syncflow_dagster.store.state import _key_order

    keys = random_hashes(np.random.default_rng(7), 4000, 16)
    # Keys that tie on the first eight bytes are ordered by the last eight.
    tied = pa.array([b"\x01" * 8 + bytes([9 - i]) * 8 for i in range(5)], pa.binary(16))
    keys = pa.concat_arrays([keys, tied])
    order = _key_order(key_words(keys))
    assert order is not None
    assert keys.take(pa.array(order)).to_pylist() == sorted(keys.to_pylist())
    in_order = keys.take(pa.array(order))
    assert _key_order(key_words(in_order)) is None
    assert _key_order(key_words(in_order.slice(1, 3000))) is None
    assert _key_order(key_words(keys.slice(0, 1))) is None


def _estimated_rows(repo: StateRepository, entity: str) -> int:
    with repo.engine.connect() as conn:
        plan = conn.execute(
            sa.text("EXPLAIN (FORMAT JSON) SELECT 1 FROM syncflow.entity_state WHERE entity = :e"),
            {"e": entity},
        ).scalar_one()
    return int(plan[0]["Plan"]["Plan Rows"])


def test_a_large_first_load_is_known_to_the_planner_before_autovacuum(repo: StateRepository) -> None:
    # Right after a first load by COPY, a planner that still takes the entity
    # for one row put the whole entity on the outer side of the key-staged
    # nested loops: the next run's lookups ran for minutes at 1M rows. The
    # first commit refreshes the statistics itself.
    from syncflow_dagster.store.state import ANALYZE_AFTER_FIRST_LOAD_ROWS

    entity = f"fresh_{uuid.uuid4().hex[:8]}"
    n = ANALYZE_AFTER_FIRST_LOAD_ROWS
    rng = np.random.default_rng(4)
    assert _estimated_rows(repo, entity) < 100  # unknown to the planner before the load
    keys = random_hashes(rng, n, 16)
    assert (
        repo.commit_delivered(entity, uuid.uuid4(), _rows(keys, random_hashes(rng, n, 32), rowversion=1)) == n
    )
    assert _estimated_rows(repo, entity) >= n // 2


def test_chunks_of_new_keys_are_copied_in_and_a_stored_key_among_them_falls_back_to_the_merge(
    repo: StateRepository,
) -> None:
    """An initial load persisted chunk by chunk: later chunks take the COPY path too (`new_keys`);
    if a key was stored after all, that COPY is rolled back and the chunk is merged instead."""
    entity = f"fresh_{uuid.uuid4().hex[:8]}"
    rng = np.random.default_rng(3)
    keys = random_hashes(rng, 300, 16)
    for start in (0, 100):
        chunk = _rows(keys.slice(start, 100), random_hashes(rng, 100, 32), rowversion=1)
        assert repo.commit_delivered(entity, uuid.uuid4(), chunk, new_keys=True) == 100
    assert repo.count(entity) == 200
    # 50 keys stored already, 100 new: the COPY meets a stored key and the merge takes over.
    mixed_keys = pa.concat_arrays([keys.slice(150, 50), keys.slice(200, 100)])
    mixed = _rows(mixed_keys, random_hashes(rng, 150, 32), rowversion=2)
    assert repo.commit_delivered(entity, uuid.uuid4(), mixed, new_keys=True) == 150
    assert repo.count(entity) == 300
    after = repo.stored_for_keys(entity, mixed_keys)
    assert set(after[ROWVERSION].to_pylist()) == {2}
    assert set(after[DATA_HASH].to_pylist()) == set(mixed[DATA_HASH].to_pylist())
