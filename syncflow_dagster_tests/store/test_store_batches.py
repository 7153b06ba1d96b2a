"""BatchRepository: start, finish with counts, latest per entity, by run."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from syncflow_dagster.store.batches import BatchRepository
from syncflow_dagster.store.database import make_engine
from syncflow_dagster.store.migrate import upgrade
from syncflow_dagster.store.schema import sync_batches


@pytest.fixture(scope="module")
def repo(database_url: str) -> Iterator[BatchRepository]:
    engine = make_engine(database_url)
    upgrade(engine)
    yield BatchRepository(engine)
    engine.dispose()


def test_batch_round_trip(repo: BatchRepository) -> None:
    entity, run = f"items_{uuid.uuid4().hex[:8]}", f"run-{uuid.uuid4()}"
    batch_id = repo.start_batch(entity, dt.date(2025, 3, 1), run)
    assert batch_id.version == 7
    started = repo.get(batch_id)
    assert started is not None
    assert (started.status, started.finished_at, started.counts) == ("running", None, {})

    repo.finish_batch(batch_id, "succeeded", {"fetched": 10, "inserted": 7, "skipped": 3}, {"fetch": 1.5})
    done = repo.get(batch_id)
    assert done is not None
    assert done.status == "succeeded"
    assert done.finished_at is not None
    assert done.counts == {"fetched": 10, "inserted": 7, "skipped": 3}
    assert done.stage_seconds == {"fetch": 1.5}
    assert done.partition_date == dt.date(2025, 3, 1)
    assert repo.get(uuid.uuid4()) is None


def test_latest_per_entity_and_list_by_run(repo: BatchRepository) -> None:
    suffix = uuid.uuid4().hex[:8]
    a, b, run = f"sites_{suffix}", f"work_centers_{suffix}", f"run-{suffix}"
    repo.start_batch(a, None, run)
    newest_a = repo.start_batch(a, None, run)
    only_b = repo.start_batch(b, dt.date(2025, 1, 2), "other-run")
    latest = {r.entity: r.id for r in repo.latest() if r.entity in (a, b)}
    assert latest == {a: newest_a, b: only_b}
    assert [r.id for r in repo.latest(a)] == [newest_a]
    assert [r.entity for r in repo.list_by_run(run)] == [a, a]


def test_bad_finish_is_refused_naming_batch_and_field(repo: BatchRepository) -> None:
    batch_id = repo.start_batch("customers", None, None)
    with pytest.raises(ValueError, match="field 'status': 'done'"):
        repo.finish_batch(batch_id, "done")
    with pytest.raises(ValueError, match="count 'inserted': -1"):
        repo.finish_batch(batch_id, "failed", {"inserted": -1})
    with pytest.raises(KeyError, match="no sync batch"):
        repo.finish_batch(uuid.uuid4(), "failed")
    still = repo.get(batch_id)
    assert still is not None
    assert still.status == "running"


def test_rejects_empty_entity(repo: BatchRepository) -> None:
    run = f"run-{uuid.uuid4()}"
    with pytest.raises(ValueError, match="entity name is empty"):
        repo.start_batch("", None, run)
    # Refused before anything was written: no batch of that run, no batch without an entity.
    assert repo.list_by_run(run) == []
    with repo.engine.connect() as conn:
        unnamed = conn.execute(sa.select(sa.func.count()).where(sync_batches.c.entity == "")).scalar_one()
    assert unnamed == 0


def test_last_success_per_entity_is_the_latest_succeeded_finish(repo: BatchRepository) -> None:
    entity, never = f"items_{uuid.uuid4().hex[:8]}", f"items_{uuid.uuid4().hex[:8]}"
    first = repo.start_batch(entity, dt.date(2025, 3, 1), f"run-{uuid.uuid4()}")
    repo.finish_batch(first, "succeeded", {}, {})
    second = repo.start_batch(entity, dt.date(2025, 3, 2), f"run-{uuid.uuid4()}")
    repo.finish_batch(second, "succeeded", {}, {})
    failed = repo.start_batch(entity, dt.date(2025, 3, 3), f"run-{uuid.uuid4()}")
    repo.finish_batch(failed, "failed", {}, {})
    repo.start_batch(never, dt.date(2025, 3, 1), f"run-{uuid.uuid4()}")

    last = repo.last_success_per_entity()
    latest = repo.get(second)
    assert latest is not None
    assert last[entity] == latest.finished_at
    assert never not in last
