"""StateRepository against a real Postgres: commit, lookups by key, reconcile reads, watermark."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pytest
import sqlalchemy as sa

from syncflow_dagster.engine.columns import BK, BK_HASH, CHANGED_AT, DATA_HASH, RECIPE, ROWVERSION
from syncflow_dagster.store.database import make_engine
from syncflow_dagster.store.state import STORED_SCHEMA, StateRepository
from syncflow_dagster.store.watermarks import WatermarkRepository
from syncflow_dagster_tests.engine_frames import random_hashes


@pytest.fixture(scope="module")
def engine(database_url: str) -> Iterator[sa.Engine]:
    engine = make_engine(database_url)
    StateRepository(engine).ensure_schema()
    yield engine
    engine.dispose()


@pytest.fixture
def repo(engine: sa.Engine) -> StateRepository:
    return StateRepository(engine)


@pytest.fixture
def entity() -> str:
    return f"work_orders_{uuid.uuid4().hex[:8]}"


def _accepted(n: int, seed: int = 1, rowversion_start: int = 1) -> pa.Table:
    rng = np.random.default_rng(seed)
    return pa.table(
        {
            BK_HASH: random_hashes(rng, n, 16),
            BK: pa.array([f"WO-{i:07d}" for i in range(n)]),
            DATA_HASH: random_hashes(rng, n, 32),
            ROWVERSION: pa.array(np.arange(rowversion_start, rowversion_start + n, dtype=np.int64)),
            RECIPE: pa.array(np.ones(n, dtype=np.int16)),
        }
    )


def _state_row(engine: sa.Engine, entity: str, bk_hash: bytes) -> sa.Row:
    with engine.connect() as conn:
        return conn.execute(
            sa.text("SELECT * FROM syncflow.entity_state WHERE entity = :e AND bk_hash = :k"),
            {"e": entity, "k": uuid.UUID(bytes=bk_hash)},
        ).one()


def test_commit_then_stored_for_keys_at_a_few_thousand_rows(repo: StateRepository, entity: str) -> None:
    accepted = _accepted(5000)
    batch = uuid.uuid4()
    assert repo.commit_delivered(entity, batch, accepted) == 5000
    assert repo.count(entity) == 5000

    rng = np.random.default_rng(99)
    asked_idx = np.sort(rng.choice(5000, 1200, replace=False))
    unknown = random_hashes(rng, 300, 16)
    asked = pa.concat_arrays([accepted.column(BK_HASH).combine_chunks().take(pa.array(asked_idx)), unknown])
    stored = repo.stored_for_keys(entity, asked)

    assert stored.schema == STORED_SCHEMA
    assert stored.num_rows == 1200  # unknown keys have no row
    expected = accepted.take(pa.array(asked_idx)).select([BK_HASH, DATA_HASH, ROWVERSION, RECIPE])
    got = stored.sort_by(ROWVERSION).select([BK_HASH, DATA_HASH, ROWVERSION, RECIPE])
    assert got.equals(expected.sort_by(ROWVERSION))
    assert stored.column("schedulehub_id").null_count == 1200


def test_stored_for_keys_is_scoped_to_the_entity(repo: StateRepository, entity: str) -> None:
    accepted = _accepted(10, seed=5)
    repo.commit_delivered(entity, uuid.uuid4(), accepted)
    other = repo.stored_for_keys(entity + "_other", accepted.column(BK_HASH))
    assert other.num_rows == 0
    assert repo.stored_for_keys(entity, pa.array([], pa.binary(16))).num_rows == 0


def test_upsert_keeps_first_seen_updates_hash_and_keeps_schedulehub_id(
    repo: StateRepository, engine: sa.Engine, entity: str
) -> None:
    first = _accepted(3, seed=2).append_column("schedulehub_id", pa.array(["sh-1", "sh-2", None]))
    b1, b2 = uuid.uuid4(), uuid.uuid4()
    repo.commit_delivered(entity, b1, first)
    key = first.column(BK_HASH)[0].as_py()
    before = _state_row(engine, entity, key)

    changed = _accepted(3, seed=3, rowversion_start=100)
    changed = changed.set_column(0, BK_HASH, first.column(BK_HASH))  # same keys, new data
    assert repo.commit_delivered(entity, b2, changed) == 3
    after = _state_row(engine, entity, key)

    assert after.first_seen_at == before.first_seen_at
    assert after.last_synced_at >= before.last_synced_at
    assert after.last_batch_id == b2
    assert bytes(after.data_hash) == changed.column(DATA_HASH)[0].as_py()
    assert after.rowversion == 100
    assert after.schedulehub_id == "sh-1"  # not given this time: the known id stays
    assert repo.count(entity) == 3


def test_deleted_hashes_are_removed_and_counted(repo: StateRepository, entity: str) -> None:
    accepted = _accepted(20, seed=4)
    repo.commit_delivered(entity, uuid.uuid4(), accepted)
    gone = accepted.column(BK_HASH).combine_chunks().slice(0, 5)
    stranger = random_hashes(np.random.default_rng(8), 2, 16)
    written = repo.commit_delivered(
        entity, uuid.uuid4(), accepted.slice(0, 0), deleted=pa.concat_arrays([gone, stranger])
    )
    assert written == 5
    assert repo.count(entity) == 15
    assert repo.stored_for_keys(entity, gone).num_rows == 0


def test_load_state_and_known_keys_return_the_whole_entity(repo: StateRepository, entity: str) -> None:
    accepted = _accepted(2500, seed=6)
    repo.commit_delivered(entity, uuid.uuid4(), accepted)
    state = repo.load_state(entity)
    assert state.schema == STORED_SCHEMA
    assert (
        state.sort_by(ROWVERSION).select([BK_HASH, DATA_HASH]).equals(accepted.select([BK_HASH, DATA_HASH]))
    )
    keys = repo.known_keys(entity)
    assert sorted(keys.to_pylist()) == sorted(accepted.column(BK_HASH).to_pylist())
    wide = repo.load_state(entity, [BK_HASH, BK, "first_seen_at", "last_batch_id"])
    assert wide.column_names == [BK_HASH, BK, "first_seen_at", "last_batch_id"]
    assert wide.schema.field("first_seen_at").type == pa.timestamp("us", tz="UTC")
    assert repo.load_state(entity + "_none").num_rows == 0


def test_commit_advances_the_watermark_and_never_backwards(
    repo: StateRepository, engine: sa.Engine, entity: str
) -> None:
    watermarks = WatermarkRepository(engine)
    late = _accepted(4, seed=7, rowversion_start=500)
    late = late.append_column(
        CHANGED_AT, pa.array([None, None, None, 1_700_000_000_000_000], pa.timestamp("us", tz="UTC"))
    )
    repo.commit_delivered(entity, uuid.uuid4(), late)
    mark = watermarks.get(entity)
    assert mark is not None
    assert mark.rowversion == 503
    assert mark.changed_at is not None

    early = _accepted(4, seed=8, rowversion_start=10)
    repo.commit_delivered(entity, uuid.uuid4(), early)
    again = watermarks.get(entity)
    assert again is not None
    assert again.rowversion == 503


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda t: t.drop_columns([DATA_HASH]), r"lack column\(s\) \['_data_hash'\]"),
        (
            lambda t: t.set_column(0, BK_HASH, pa.array([None] * t.num_rows, pa.binary(16))),
            r"field '_bk_hash'.*null key hash",
        ),
        (lambda t: pa.concat_tables([t, t.slice(0, 1)]), r"field '_bk_hash'.*repeat a key"),
        (
            lambda t: t.set_column(1, BK, pa.array([None] * t.num_rows, pa.string())),
            r"field '_bk'.*have no value",
        ),
        (
            lambda t: t.set_column(0, BK_HASH, t.column(BK_HASH).cast(pa.binary())),
            r"field '_bk_hash': expected fixed_size_binary\[16\]",
        ),
    ],
)
def test_bad_accepted_frames_are_refused_naming_entity_and_field(
    repo: StateRepository, entity: str, mutate: object, message: str
) -> None:
    bad = mutate(_accepted(3, seed=9))  # type: ignore[operator]
    with pytest.raises(ValueError, match=message) as info:
        repo.commit_delivered(entity, uuid.uuid4(), bad)
    assert entity in str(info.value)
    assert repo.count(entity) == 0


def test_a_key_both_accepted_and_deleted_is_refused(repo: StateRepository, entity: str) -> None:
    accepted = _accepted(3, seed=10)
    with pytest.raises(ValueError, match="both accepted and deleted"):
        repo.commit_delivered(entity, uuid.uuid4(), accepted, deleted=accepted.column(BK_HASH))
    assert repo.count(entity) == 0


def test_stored_for_keys_answers_each_key_once_even_when_asked_twice(
    repo: StateRepository, entity: str
) -> None:
    accepted = _accepted(50, seed=11)
    repo.commit_delivered(entity, uuid.uuid4(), accepted)
    keys = accepted.column(BK_HASH).combine_chunks()
    stored = repo.stored_for_keys(entity, pa.chunked_array([keys, keys.slice(0, 10)]))
    assert stored.num_rows == 50
    assert sorted(stored.column(BK_HASH).to_pylist()) == sorted(keys.to_pylist())
