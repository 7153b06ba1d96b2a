"""FirstLoad: an initial load staged chunk by chunk and written into entity_state once, in key order."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pytest
import sqlalchemy as sa

from syncflow_dagster.engine.columns import ACTION, BK, BK_HASH, DATA_HASH, RECIPE, ROWVERSION
from syncflow_dagster.store.database import make_engine
from syncflow_dagster.store.delivery_log import STATUS, DeliveryLogRepository
from syncflow_dagster.store.first_load import FirstLoad
from syncflow_dagster.store.state import StateRepository
from syncflow_dagster.store.watermarks import WatermarkRepository
from syncflow_dagster_tests.engine_frames import random_hashes


@pytest.fixture(scope="module")
def engine(database_url: str) -> Iterator[sa.Engine]:
    engine = make_engine(database_url)
    StateRepository(engine).ensure_schema()
    yield engine
    engine.dispose()


def _rows(keys: pa.Array, data: pa.Array, rowversion: int) -> pa.Table:
    n = len(keys)
    return pa.table(
        {
            BK_HASH: keys,
            BK: pa.array([f"WO-{i:06d}" for i in range(n)]),
            DATA_HASH: data,
            ROWVERSION: pa.array(np.arange(rowversion, rowversion + n, dtype=np.int64)),
            RECIPE: pa.array(np.ones(n, dtype=np.int16)),
        }
    )


def _delivered(keys: pa.Array) -> pa.Table:
    n = len(keys)
    return pa.table({BK_HASH: keys, ACTION: pa.array(["insert"] * n), STATUS: pa.array(["accepted"] * n)})


def _logged(engine: sa.Engine, entity: str) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                sa.text("SELECT count(*) FROM syncflow.delivery_log WHERE entity = :e"), {"e": entity}
            ).scalar_one()
        )


def test_chunks_are_staged_and_written_once_with_the_log_and_the_watermark(engine: sa.Engine) -> None:
    entity = f"first_{uuid.uuid4().hex[:8]}"
    state = StateRepository(engine)
    rng = np.random.default_rng(5)
    keys = random_hashes(rng, 250, 16)
    chunks = [
        _rows(keys.slice(start, 50), random_hashes(rng, 50, 32), rowversion=1 + start)
        for start in range(0, 250, 50)
    ]
    batch = uuid.uuid4()
    with FirstLoad(engine, entity, batch) as load:
        for chunk in chunks:
            assert load.add(chunk, pa.array([], pa.binary(16))) == 50
            assert load.log(_delivered(chunk[BK_HASH].combine_chunks())) == 50
        # Nothing is visible before the load is finished.
        assert state.count(entity) == 0
        assert _logged(engine, entity) == 0
        load.finish()
    assert state.count(entity) == 250
    assert _logged(engine, entity) == 250
    stored = state.stored_for_keys(entity, keys)
    whole = pa.concat_tables(chunks)
    expected = dict(zip(whole[BK_HASH].to_pylist(), whole[DATA_HASH].to_pylist(), strict=True))
    assert dict(zip(stored[BK_HASH].to_pylist(), stored[DATA_HASH].to_pylist(), strict=True)) == expected
    watermark = WatermarkRepository(engine).get(entity)
    assert watermark is not None
    assert watermark.rowversion == 250
    assert len(DeliveryLogRepository(engine).history(entity, keys[0].as_py())) == 1


def _load_that_fails(engine: sa.Engine, entity: str, keys: pa.Array, rng: np.random.Generator) -> None:
    with FirstLoad(engine, entity, uuid.uuid4()) as load:
        load.add(_rows(keys, random_hashes(rng, len(keys), 32), rowversion=1))
        load.log(_delivered(keys))
        raise RuntimeError("deliver failed")


def _load_with_a_repeated_key(
    engine: sa.Engine, entity: str, keys: pa.Array, rng: np.random.Generator
) -> None:
    with FirstLoad(engine, entity, uuid.uuid4()) as load:
        load.add(_rows(keys, random_hashes(rng, len(keys), 32), rowversion=1))
        load.add(_rows(keys.slice(0, 1), random_hashes(rng, 1, 32), rowversion=20))
        load.finish()


def test_a_load_left_without_finish_leaves_nothing(engine: sa.Engine) -> None:
    entity = f"first_{uuid.uuid4().hex[:8]}"
    rng = np.random.default_rng(6)
    with pytest.raises(RuntimeError, match="deliver failed"):
        _load_that_fails(engine, entity, random_hashes(rng, 20, 16), rng)
    assert StateRepository(engine).count(entity) == 0
    assert _logged(engine, entity) == 0
    assert WatermarkRepository(engine).get(entity) is None


def test_a_repeated_key_fails_the_load_and_leaves_nothing(engine: sa.Engine) -> None:
    entity = f"first_{uuid.uuid4().hex[:8]}"
    rng = np.random.default_rng(7)
    with pytest.raises(ValueError, match="repeat a key"):
        _load_with_a_repeated_key(engine, entity, random_hashes(rng, 10, 16), rng)
    assert StateRepository(engine).count(entity) == 0


def test_keys_stored_by_another_commit_meanwhile_are_merged_over(engine: sa.Engine) -> None:
    entity = f"first_{uuid.uuid4().hex[:8]}"
    state = StateRepository(engine)
    rng = np.random.default_rng(8)
    keys = random_hashes(rng, 30, 16)
    ours = _rows(keys, random_hashes(rng, 30, 32), rowversion=100)
    with FirstLoad(engine, entity, uuid.uuid4()) as load:
        load.add(ours, keys.slice(29, 0))
        # A retry run commits ten of the keys (and one of ours is deleted at the source).
        theirs = _rows(keys.slice(0, 10), random_hashes(rng, 10, 32), rowversion=1)
        state.commit_delivered(entity, uuid.uuid4(), theirs)
        load.add(ours.slice(0, 0), keys.slice(29, 1))
        load.finish()
    assert state.count(entity) == 29
    stored = state.stored_for_keys(entity, keys)
    expected = dict(zip(ours[BK_HASH].to_pylist()[:29], ours[DATA_HASH].to_pylist()[:29], strict=True))
    assert dict(zip(stored[BK_HASH].to_pylist(), stored[DATA_HASH].to_pylist(), strict=True)) == expected


def test_bad_rows_are_refused_when_added(engine: sa.Engine) -> None:
    entity = f"first_{uuid.uuid4().hex[:8]}"
    rng = np.random.default_rng(9)
    keys = random_hashes(rng, 3, 16)
    rows = _rows(keys, random_hashes(rng, 3, 32), rowversion=1)
    with FirstLoad(engine, entity, uuid.uuid4()) as load:
        with pytest.raises(ValueError, match=BK):
            load.add(rows.set_column(1, BK, pa.array([None, "a", "b"], pa.string())))
        with pytest.raises(ValueError, match="lack"):
            load.add(rows.drop_columns([RECIPE]))
