"""The failed-record lifecycle: open → dead after its attempts or age; delivered; resolved or dismissed by a person.

Each test is one promise of docs/operations.md ("Failed records").
"""

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
from syncflow_dagster.store.failures import FailedRecord, FailureRepository
from syncflow_dagster.store.migrate import upgrade

T0 = dt.datetime(2025, 3, 1, 12, 0, tzinfo=dt.UTC)


@pytest.fixture(scope="module")
def engine(database_url: str) -> Iterator[sa.Engine]:
    engine = make_engine(database_url)
    upgrade(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def entity() -> str:
    return f"operations_{uuid.uuid4().hex[:8]}"


def _repo(engine: sa.Engine, **settings: float) -> FailureRepository:
    return FailureRepository(
        engine, StoreSettings(retry_base_seconds=60, retry_cap_seconds=600, retry_jitter=0, **settings)
    )


def _failure(key: bytes, reason_class: str = "retryable", bk: str = "WO-1\x1f10") -> pa.Table:
    return pa.table(
        {
            BK_HASH: pa.array([key], pa.binary(16)),
            BK: [bk],
            "reason_code": ["transient_failure" if reason_class == "retryable" else "invalid_record"],
            "reason_class": [reason_class],
            "detail": ["ScheduleHub answered 503"],
            "payload": ['{"work_order_no": "WO-1"}'],
        }
    )


def _only(repo: FailureRepository, entity: str) -> FailedRecord:
    (record,) = repo.list_failures(entity, open_only=False)
    return record


def test_a_retryable_record_gives_up_after_its_attempts_and_keeps_its_history(
    engine: sa.Engine, entity: str
) -> None:
    repo = _repo(engine, retry_max_attempts=3)
    key = os.urandom(16)
    for attempt in range(3):
        repo.record_failures(entity, None, _failure(key), now=T0 + dt.timedelta(minutes=attempt))
    record = _only(repo, entity)
    assert record.state == "dead"
    assert record.attempts == 3
    assert record.next_retry_at is None
    assert record.resolved_at is None  # it still holds its key
    assert record.state_by == "syncflow"
    assert "gave up after 3 attempt(s)" in record.state_reason
    assert record.first_failed_at == T0
    assert record.detail == "ScheduleHub answered 503"
    assert record.payload == {"work_order_no": "WO-1"}
    # No longer due on its schedule; only when asked for.
    later = T0 + dt.timedelta(days=1)
    assert repo.due_for_retry(entity, now=later).num_rows == 0
    assert repo.due_for_retry(entity, now=later, include_dead=True).num_rows == 1
    assert entity not in repo.entities_to_retry(later)
    assert entity in repo.entities_to_retry(later, include_dead=True)
    # Failing again (asked for, it failed once more) it stays dead, one more attempt counted.
    repo.record_failures(entity, None, _failure(key), now=later)
    again = _only(repo, entity)
    assert (again.state, again.attempts, again.next_retry_at) == ("dead", 4, None)


def test_a_retryable_record_gives_up_after_its_age(engine: sa.Engine, entity: str) -> None:
    repo = _repo(engine, retry_max_attempts=100, retry_max_age_hours=24)
    key = os.urandom(16)
    repo.record_failures(entity, None, _failure(key), now=T0)
    assert _only(repo, entity).state == "open"
    # A failure past the age gives up at once ...
    repo.record_failures(entity, None, _failure(key), now=T0 + dt.timedelta(hours=25))
    assert _only(repo, entity).state == "dead"


def test_a_record_no_run_retried_gives_up_by_age_too(engine: sa.Engine, entity: str) -> None:
    repo = _repo(engine, retry_max_attempts=100, retry_max_age_hours=24)
    stale, fresh, permanent = os.urandom(16), os.urandom(16), os.urandom(16)
    repo.record_failures(entity, None, _failure(stale), now=T0)
    repo.record_failures(entity, None, _failure(fresh, bk="WO-2\x1f10"), now=T0 + dt.timedelta(hours=20))
    repo.record_failures(entity, None, _failure(permanent, "permanent", bk="WO-3\x1f10"), now=T0)
    assert repo.give_up_stale(entity, now=T0 + dt.timedelta(hours=30)) == 1
    states = {r.bk: r.state for r in repo.list_failures(entity, open_only=False)}
    # A permanent failure waits for a person however old: it never gives up by itself.
    assert states == {"WO-1\x1f10": "dead", "WO-2\x1f10": "open", "WO-3\x1f10": "open"}


def test_permanent_records_are_retried_only_on_request(engine: sa.Engine, entity: str) -> None:
    repo = _repo(engine)
    repo.record_failures(entity, None, _failure(os.urandom(16), "permanent"), now=T0)
    later = T0 + dt.timedelta(days=30)
    assert repo.due_for_retry(entity, now=later).num_rows == 0
    due = repo.due_for_retry(entity, now=later, include_permanent=True)
    assert due["reason_class"].to_pylist() == ["permanent"]
    assert entity in repo.entities_to_retry(later, include_permanent=True)


def test_delivery_closes_a_dead_record_as_delivered(engine: sa.Engine, entity: str) -> None:
    repo = _repo(engine, retry_max_attempts=2)
    key = os.urandom(16)
    for attempt in range(2):
        repo.record_failures(entity, None, _failure(key), now=T0 + dt.timedelta(minutes=attempt))
    assert repo.resolve(entity, pa.array([key], pa.binary(16))) == 1
    record = _only(repo, entity)
    assert record.state == "delivered"
    assert record.resolved_at is not None


def test_a_person_resolves_or_dismisses_with_who_and_why(engine: sa.Engine, entity: str) -> None:
    repo = _repo(engine)
    keys = [os.urandom(16) for _ in range(3)]
    for n, key in enumerate(keys):
        repo.record_failures(entity, None, _failure(key, "permanent", bk=f"WO-{n}\x1f10"), now=T0)
    resolved = repo.close_by_person(
        "resolved", by="ana", reason="fixed in ScheduleHub by hand", entity=entity, bks=["WO-0\x1f10"]
    )
    assert [r.bk for r in resolved] == ["WO-0\x1f10"]
    (one,) = resolved
    assert (one.state, one.state_by, one.state_reason) == ("resolved", "ana", "fixed in ScheduleHub by hand")
    assert one.state_at is not None
    assert one.resolved_at is not None
    dismissed = repo.close_by_person(
        "dismissed", by="ben", reason="test data", entity=entity, reason_code="invalid_record"
    )
    assert sorted(r.bk for r in dismissed) == ["WO-1\x1f10", "WO-2\x1f10"]
    assert repo.count(entity) == 0  # none holds its key any more
    # Closed records are history: closing them again finds nothing.
    assert repo.close_by_person("dismissed", by="ben", reason="again", ids=[one.id]) == []
    # A new failure of a closed key is a new open record.
    repo.record_failures(entity, None, _failure(keys[0], "permanent", bk="WO-0\x1f10"), now=T0)
    assert repo.count(entity) == 1
    with pytest.raises(ValueError, match="'reason'"):
        repo.close_by_person("resolved", by="ana", reason=" ", entity=entity, bks=["WO-0\x1f10"])
    with pytest.raises(ValueError, match="choose failed records"):
        repo.close_by_person("resolved", by="ana", reason="why", entity=entity)
