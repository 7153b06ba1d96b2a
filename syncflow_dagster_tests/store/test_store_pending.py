"""PendingRepository: park, release when the parent is delivered, remove, expire into failed_records."""

from __future__ import annotations

import datetime as dt
import os
import uuid
from collections.abc import Iterator

import pyarrow as pa
import pytest
import sqlalchemy as sa

from syncflow_dagster.engine.columns import BK, BK_HASH, DATA_HASH, RECIPE, ROWVERSION
from syncflow_dagster.store.database import make_engine
from syncflow_dagster.store.failures import FailureRepository
from syncflow_dagster.store.pending import (
    MISSING_PARENT,
    MISSING_PARENT_BK,
    MISSING_PARENT_BK_HASH,
    Parked,
    PendingRepository,
)
from syncflow_dagster.store.state import StateRepository


@pytest.fixture(scope="module")
def engine(database_url: str) -> Iterator[sa.Engine]:
    engine = make_engine(database_url)
    StateRepository(engine).ensure_schema()
    yield engine
    engine.dispose()


@pytest.fixture
def names() -> tuple[str, str]:
    suffix = uuid.uuid4().hex[:8]
    return f"sales_orders_{suffix}", f"sales_order_lines_{suffix}"


def _children(parent: str, parent_keys: list[bytes], child_keys: list[bytes]) -> pa.Table:
    return pa.table(
        {
            BK_HASH: pa.array(child_keys, pa.binary(16)),
            BK: [f"SO-{i}\x1f1" for i in range(len(child_keys))],
            MISSING_PARENT: [parent] * len(child_keys),
            MISSING_PARENT_BK: [f"SO-{i}" for i in range(len(child_keys))],
            MISSING_PARENT_BK_HASH: pa.array(parent_keys, pa.binary(16)),
            "payload": [f'{{"order_no": "SO-{i}", "line_no": 1}}' for i in range(len(child_keys))],
        }
    )


def _deliver(state: StateRepository, entity: str, keys: list[bytes]) -> None:
    state.commit_delivered(
        entity,
        uuid.uuid4(),
        pa.table(
            {
                BK_HASH: pa.array(keys, pa.binary(16)),
                BK: [f"SO-{i}" for i in range(len(keys))],
                DATA_HASH: pa.array([os.urandom(32) for _ in keys], pa.binary(32)),
                ROWVERSION: pa.array(range(1, len(keys) + 1), pa.int64()),
                RECIPE: pa.array([1] * len(keys), pa.int16()),
            }
        ),
    )


def test_children_are_released_once_their_parent_is_delivered(
    engine: sa.Engine, names: tuple[str, str]
) -> None:
    parent, child = names
    pending, state = PendingRepository(engine), StateRepository(engine)
    parent_keys = [os.urandom(16) for _ in range(4)]
    child_keys = [os.urandom(16) for _ in range(4)]
    assert pending.park(child, uuid.uuid4(), _children(parent, parent_keys, child_keys)) == Parked(4, 0)
    assert pending.release_candidates(child).num_rows == 0

    _deliver(state, parent, parent_keys[:3])
    released = pending.release_candidates(child)
    assert sorted(released.column(BK_HASH).to_pylist()) == sorted(child_keys[:3])
    assert released.column("payload")[0].as_py().startswith('{"line_no": 1')
    assert pending.release_candidates(child, limit=2).num_rows == 2
    # A parent of the same key in ANOTHER entity releases nothing.
    assert pending.release_candidates(parent).num_rows == 0

    assert pending.remove(child, released.column(BK_HASH)) == 3
    assert pending.count(child) == 1
    assert pending.waiting(child).column(BK_HASH).to_pylist() == [child_keys[3]]


def test_parking_again_keeps_since_and_takes_the_new_payload(
    engine: sa.Engine, names: tuple[str, str]
) -> None:
    parent, child = names
    pending = PendingRepository(engine)
    key, parent_key = os.urandom(16), os.urandom(16)
    pending.park(child, None, _children(parent, [parent_key], [key]))
    [before] = pending.list_pending(child)
    again = _children(parent, [parent_key], [key]).set_column(5, "payload", pa.array(['{"line_no": 2}']))
    assert pending.park(child, None, again) == Parked(1, 0)
    [after] = pending.list_pending(child)
    assert after.since == before.since
    assert after.id == before.id
    assert after.payload == {"line_no": 2}


def test_expired_children_move_to_failed_records_as_parent_missing(
    engine: sa.Engine, names: tuple[str, str]
) -> None:
    parent, child = names
    pending, failures = PendingRepository(engine), FailureRepository(engine)
    keys = [os.urandom(16) for _ in range(3)]
    pending.park(child, None, _children(parent, [os.urandom(16) for _ in keys], keys))
    now = dt.datetime.now(dt.UTC)
    assert pending.expire(dt.timedelta(hours=1), entity=child, now=now) == 0  # too young
    moved = pending.expire(dt.timedelta(hours=1), entity=child, now=now + dt.timedelta(hours=2))
    assert moved == 3
    assert pending.count(child) == 0
    records = failures.list_failures(child)
    assert {r.reason_code for r in records} == {"parent_missing"}
    assert {r.bk_hash for r in records} == set(keys)
    assert all(r.next_retry_at is not None and r.payload["line_no"] == 1 for r in records)
    assert all(f"parent {parent} SO-" in (r.detail or "") for r in records)
    assert all(r.id.version == 7 for r in records)


def _held_in_both(engine: sa.Engine, entity: str) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                sa.text(
                    "SELECT count(*) FROM syncflow.pending_children AS p JOIN syncflow.failed_records AS f"
                    " ON f.entity = p.entity AND f.bk_hash = p.bk_hash AND f.resolved_at IS NULL"
                    " WHERE p.entity = :entity"
                ),
                {"entity": entity},
            ).scalar_one()
        )


def test_a_child_with_an_open_failure_stays_a_failed_record_when_parked_again(
    engine: sa.Engine, names: tuple[str, str]
) -> None:
    parent, child = names
    pending, failures = PendingRepository(engine), FailureRepository(engine)
    keys = [os.urandom(16) for _ in range(3)]
    parent_keys = [os.urandom(16) for _ in keys]
    pending.park(child, None, _children(parent, parent_keys, keys))
    now = dt.datetime.now(dt.UTC)
    assert pending.expire(dt.timedelta(hours=1), entity=child, now=now + dt.timedelta(hours=2)) == 3
    ids_before = {r.id for r in failures.list_failures(child)}

    # A retry (or a sync) finds the parents still missing: two of the three come back to be parked.
    again = _children(parent, parent_keys[:2], keys[:2]).set_column(
        5, "payload", pa.array(['{"line_no": 7}', '{"line_no": 7}'])
    )
    later = now + dt.timedelta(hours=3)
    assert pending.park(child, None, again, now=later) == Parked(0, 2)
    assert pending.count(child) == 0
    assert _held_in_both(engine, child) == 0
    records = {r.bk_hash: r for r in failures.list_failures(child)}
    assert len(records) == 3
    for key in keys[:2]:
        kept = records[key]
        assert (kept.reason_code, kept.reason_class, kept.attempts) == ("parent_missing", "retryable", 2)
        assert kept.payload == {"line_no": 7}
        assert kept.last_failed_at == later
        assert kept.next_retry_at is not None
        assert kept.next_retry_at > later
    assert records[keys[2]].attempts == 1
    assert {r.id for r in records.values()} == ids_before  # the same records, not new ones

    # A new child of the same batch, without a failure, is parked as before.
    fresh = _children(parent, [os.urandom(16)], [os.urandom(16)])
    assert pending.park(child, None, fresh) == Parked(1, 0)


def test_a_failure_of_another_reason_becomes_parent_missing_and_retryable(
    engine: sa.Engine, names: tuple[str, str]
) -> None:
    parent, child = names
    pending, failures = PendingRepository(engine), FailureRepository(engine)
    key = os.urandom(16)
    refused = pa.table(
        {
            BK_HASH: pa.array([key], pa.binary(16)),
            BK: ["SO-0\x1f1"],
            "reason_code": ["invalid_value"],
            "reason_class": ["permanent"],
            "detail": ["field qty: not a number"],
            "payload": ["{}"],
        }
    )
    failures.record_failures(child, None, refused)
    assert pending.park(child, None, _children(parent, [os.urandom(16)], [key])) == Parked(0, 1)
    [record] = failures.list_failures(child)
    assert (record.reason_code, record.reason_class) == ("parent_missing", "retryable")
    assert record.detail == f"parent {parent} SO-0 still missing"
    assert record.payload == {"order_no": "SO-0", "line_no": 1}


def test_a_parked_child_that_fails_leaves_pending(engine: sa.Engine, names: tuple[str, str]) -> None:
    parent, child = names
    pending, failures = PendingRepository(engine), FailureRepository(engine)
    keys = [os.urandom(16) for _ in range(2)]
    pending.park(child, None, _children(parent, [os.urandom(16) for _ in keys], keys))
    # Released, delivered, and refused by ScheduleHub: the failure holds it now, not the parking.
    rejected = pa.table(
        {
            BK_HASH: pa.array(keys[:1], pa.binary(16)),
            BK: ["SO-0\x1f1"],
            "reason_code": ["transient_failure"],
            "reason_class": ["retryable"],
            "detail": ["try again"],
            "payload": ['{"order_no": "SO-0", "line_no": 1}'],
        }
    )
    assert failures.record_failures(child, None, rejected) == 1
    assert pending.waiting(child).column(BK_HASH).to_pylist() == keys[1:]
    assert _held_in_both(engine, child) == 0


def test_bad_pending_frames_name_entity_and_field(engine: sa.Engine, names: tuple[str, str]) -> None:
    parent, child = names
    pending = PendingRepository(engine)
    frame = _children(parent, [os.urandom(16)], [os.urandom(16)])
    with pytest.raises(
        ValueError, match=rf"entity '{child}'.*lack column\(s\) \['_missing_parent_bk_hash'\]"
    ):
        pending.park(child, None, frame.drop_columns([MISSING_PARENT_BK_HASH]))
    nulls = frame.set_column(2, MISSING_PARENT, pa.array([None], pa.string()))
    with pytest.raises(ValueError, match=rf"entity '{child}', field '_missing_parent'"):
        pending.park(child, None, nulls)
    with pytest.raises(ValueError, match="reason_class"):
        pending.expire(dt.timedelta(0), reason_class="sometimes")
    assert pending.count(child) == 0
