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


@pytest.fixture(scope="module")
def repo(database_url: str) -> Iterator[StateRepository]:
    engine = make_engine(database_url)
    repository = StateRepository(engine)
    repository.ensure_schema()
    yield repository
    engine.dispose()


def _hashes(rng: np.random.Generator, n: int, width: int) -> pa.Array:
    return pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(width), n, [None, pa.py_buffer(rng.bytes(width * n))]
    )


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
    keys = _hashes(np.random.default_rng(1), 50, 16)
    assert repo.stored_for_keys(entity, keys).num_rows == 0
    with pytest.raises(ValueError, match=entity):
        repo.stored_for_keys(entity, pa.array([None], pa.binary(16)))


def test_first_commit_inserts_and_the_next_merges(repo: StateRepository) -> None:
    entity = f"fresh_{uuid.uuid4().hex[:8]}"
    rng = np.random.default_rng(2)
    keys = _hashes(rng, 1000, 16)
    first = _rows(keys, _hashes(rng, 1000, 32), rowversion=1)
    assert repo.commit_delivered(entity, uuid.uuid4(), first) == 1000
    assert repo.count(entity) == 1000
    stored = repo.stored_for_keys(entity, keys)
    assert stored.num_rows == 1000
    assert set(stored[DATA_HASH].to_pylist()) == set(first[DATA_HASH].to_pylist())

    # Second commit: half the keys again with new data, plus new keys: the merge path.
    more = _hashes(rng, 200, 16)
    again = pa.concat_arrays([keys.slice(0, 500), more])
    second = _rows(again, _hashes(rng, 700, 32), rowversion=2)
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

    keys = _hashes(np.random.default_rng(3), 5000, 16)
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
