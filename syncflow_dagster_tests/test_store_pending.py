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
    assert pending.park(child, uuid.uuid4(), _children(parent, parent_keys, child_keys)) == 4
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
    assert pending.park(child, None, again) == 1
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
