"""StageEventRepository: start/finish events, and the stage() block that records both."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from syncflow_dagster.store.batches import BatchRepository
from syncflow_dagster.store.database import make_engine
from syncflow_dagster.store.events import StageEventRepository
from syncflow_dagster.store.migrate import upgrade


@pytest.fixture(scope="module")
def engine(database_url: str) -> Iterator[sa.Engine]:
    engine = make_engine(database_url)
    upgrade(engine)
    yield engine
    engine.dispose()


def test_stage_block_records_start_and_finish_with_rows(engine: sa.Engine) -> None:
    events = StageEventRepository(engine)
    batch_id = BatchRepository(engine).start_batch("items", None, None)
    with events.stage(batch_id, "items", "normalize") as progress:
        progress.rows = 42
        progress.detail["rejected"] = 1
    with pytest.raises(RuntimeError, match="ScheduleHub down"), events.stage(batch_id, "items", "deliver"):
        raise RuntimeError("ScheduleHub down")
    log = events.for_batch(batch_id)
    assert [(e.stage, e.status) for e in log] == [
        ("normalize", "started"),
        ("normalize", "succeeded"),
        ("deliver", "started"),
        ("deliver", "failed"),
    ]
    assert log[1].rows == 42
    assert log[1].detail == {"rejected": 1}
    assert log[1].seconds is not None
    assert log[1].seconds >= 0
    assert log[3].detail == {"error": "RuntimeError: ScheduleHub down"}


def test_explicit_start_finish_and_bad_status(engine: sa.Engine) -> None:
    events = StageEventRepository(engine)
    batch_id = uuid.uuid4()
    events.record_start(batch_id, "sites", "fetch")
    events.record_finish(batch_id, "sites", "fetch", rows=3, seconds=0.5)
    assert [e.status for e in events.for_batch(batch_id)] == ["started", "succeeded"]
    with pytest.raises(ValueError, match="entity 'sites', stage 'fetch', field 'status': 'meh'"):
        events.record(batch_id, "sites", "fetch", "meh")
