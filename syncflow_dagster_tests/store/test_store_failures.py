"""FailureRepository: bulk upsert, exponential backoff with jitter, due list with payloads, resolve, pages."""

from __future__ import annotations

import datetime as dt
import os
import uuid
from collections.abc import Iterator

import pyarrow as pa
import pytest
import sqlalchemy as sa

from syncflow_dagster.engine.columns import BK, BK_HASH
from syncflow_dagster.store.database import StoreSettings, make_engine
from syncflow_dagster.store.failures import FailureRepository
from syncflow_dagster.store.migrate import upgrade

BASE, CAP, JITTER = 60.0, 600.0, 0.25
T0 = dt.datetime(2025, 3, 1, 12, 0, tzinfo=dt.UTC)


@pytest.fixture(scope="module")
def engine(database_url: str) -> Iterator[sa.Engine]:
    engine = make_engine(database_url)
    upgrade(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def repo(engine: sa.Engine) -> FailureRepository:
    settings = StoreSettings(retry_base_seconds=BASE, retry_cap_seconds=CAP, retry_jitter=JITTER)
    return FailureRepository(engine, settings)


@pytest.fixture
def entity() -> str:
    return f"operations_{uuid.uuid4().hex[:8]}"


def _failures(keys: list[bytes], reason_class: str = "retryable", reason: str = "http_422") -> pa.Table:
    return pa.table(
        {
            BK_HASH: pa.array(keys, pa.binary(16)),
            BK: [f"WO-{i}\x1f10" for i in range(len(keys))],
            "reason_code": [reason] * len(keys),
            "reason_class": [reason_class] * len(keys),
            "detail": ["ScheduleHub said: work center unknown"] * len(keys),
            "payload": [f'{{"work_order_no": "WO-{i}", "setup_minutes": "12.50"}}' for i in range(len(keys))],
        }
    )


def test_backoff_doubles_per_attempt_within_jitter_and_is_capped(
    repo: FailureRepository, entity: str
) -> None:
    key = os.urandom(16)
    for attempt in range(1, 7):
        now = T0 + dt.timedelta(hours=attempt)
        assert repo.record_failures(entity, uuid.uuid4(), _failures([key]), now=now) == 1
        [record] = repo.list_failures(entity)
        delay = min(BASE * 2 ** (attempt - 1), CAP)
        waited = (record.next_retry_at - now).total_seconds()  # type: ignore[operator]
        assert record.attempts == attempt
        assert delay * (1 - JITTER) - 1e-3 <= waited <= delay + 1e-3, (attempt, waited)
        assert record.first_failed_at == T0 + dt.timedelta(hours=1)
        assert record.last_failed_at == now


def test_permanent_failures_get_no_retry_time(repo: FailureRepository, entity: str) -> None:
    repo.record_failures(entity, None, _failures([os.urandom(16)], reason_class="permanent"), now=T0)
    [record] = repo.list_failures(entity)
    assert record.next_retry_at is None
    assert repo.due_for_retry(entity, now=T0 + dt.timedelta(days=365)).num_rows == 0


def test_due_for_retry_returns_payloads_of_due_rows_only(repo: FailureRepository, entity: str) -> None:
    keys = [os.urandom(16) for _ in range(50)]
    repo.record_failures(entity, uuid.uuid4(), _failures(keys), now=T0)
    assert repo.due_for_retry(entity, now=T0).num_rows == 0  # nothing due yet
    due = repo.due_for_retry(entity, now=T0 + dt.timedelta(seconds=BASE + 1))
    assert due.num_rows == 50
    assert sorted(due.column(BK_HASH).to_pylist()) == sorted(keys)
    assert set(due.column("payload").to_pylist()) == {
        f'{{"setup_minutes": "12.50", "work_order_no": "WO-{i}"}}' for i in range(50)
    }
    assert due.schema.field(BK_HASH).type == pa.binary(16)
    assert repo.due_for_retry(entity, now=T0 + dt.timedelta(hours=1), limit=7).num_rows == 7


def test_resolve_closes_open_rows_and_a_new_failure_opens_a_fresh_record(
    repo: FailureRepository, entity: str
) -> None:
    keys = [os.urandom(16) for _ in range(3)]
    repo.record_failures(entity, None, _failures(keys), now=T0)
    assert repo.resolve(entity, pa.array(keys[:2], pa.binary(16))) == 2
    assert repo.resolve(entity, pa.array(keys[:2], pa.binary(16))) == 0  # already closed
    assert repo.count(entity) == 1
    assert repo.count(entity, open_only=False) == 3
    repo.record_failures(entity, None, _failures(keys[:1]), now=T0)
    reopened = [r for r in repo.list_failures(entity) if r.bk_hash == keys[0]]
    assert [r.attempts for r in reopened] == [1]


def test_list_pages_and_filters_and_counts(repo: FailureRepository, entity: str) -> None:
    repo.record_failures(entity, None, _failures([os.urandom(16) for _ in range(5)]), now=T0)
    repo.record_failures(
        entity, None, _failures([os.urandom(16) for _ in range(2)], reason="timeout"), now=T0
    )
    first = repo.list_failures(entity, limit=4)
    second = repo.list_failures(entity, limit=4, after=first[-1].id)
    assert len(first) == 4
    assert len(second) == 3
    assert not {r.id for r in first} & {r.id for r in second}
    assert len(repo.list_failures(entity, reason_code="timeout")) == 2
    assert repo.counts()[entity] == {"http_422": 5, "timeout": 2}


def test_bad_failure_frames_name_entity_field_and_value(repo: FailureRepository, entity: str) -> None:
    with pytest.raises(ValueError, match=rf"entity '{entity}', field 'reason_class': 'maybe'"):
        repo.record_failures(entity, None, _failures([os.urandom(16)], reason_class="maybe"))
    key = os.urandom(16)
    with pytest.raises(ValueError, match="field '_bk_hash': a key is reported twice"):
        repo.record_failures(entity, None, _failures([key, key]))
    with pytest.raises(ValueError, match=r"lack column\(s\) \['payload'\]"):
        repo.record_failures(entity, None, _failures([key]).drop_columns(["payload"]))
    assert repo.count(entity) == 0
