"""entity_lock: different entities proceed at once, one entity is serialised, a timeout says so."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from syncflow_dagster.store.database import make_engine
from syncflow_dagster.store.locks import EntityLocked, entity_lock
from syncflow_dagster_tests.waiting import wait_until

WAIT = 30.0  # upper bound of every wait in this module; never reached when things work


@pytest.fixture(scope="module")
def engine(database_url: str) -> Iterator[sa.Engine]:
    engine = make_engine(database_url, pool_size=6)
    yield engine
    engine.dispose()


@pytest.fixture
def entity() -> str:
    return f"items_{uuid.uuid4().hex[:8]}"


def _waiting_advisory_locks(engine: sa.Engine) -> int:
    """Advisory locks asked for and not granted in this database (other sessions on the server are not ours)."""
    with engine.connect() as conn:
        return int(
            conn.execute(
                sa.text(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                    " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
                )
            ).scalar_one()
        )


def test_two_entities_hold_their_locks_at_the_same_time(engine: sa.Engine, entity: str) -> None:
    a_inside = threading.Event()
    b_inside = threading.Event()
    overlapped: list[bool] = []

    def hold(name: str, mine: threading.Event, other: threading.Event) -> None:
        with entity_lock(engine, name, timeout=WAIT):
            mine.set()
            overlapped.append(other.wait(WAIT))

    threads = [
        threading.Thread(target=hold, args=(entity, a_inside, b_inside)),
        threading.Thread(target=hold, args=(entity + "_other", b_inside, a_inside)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT * 2)
    assert overlapped == [True, True]


def test_one_entity_is_serialised(engine: sa.Engine, entity: str) -> None:
    events: list[str] = []
    release_first = threading.Event()
    first_inside = threading.Event()

    def first() -> None:
        with entity_lock(engine, entity):
            events.append("first in")
            first_inside.set()
            release_first.wait(WAIT)
            events.append("first out")

    def second() -> None:
        with entity_lock(engine, entity, timeout=WAIT):
            events.append("second in")

    t1 = threading.Thread(target=first)
    t1.start()
    assert first_inside.wait(WAIT)
    baseline = _waiting_advisory_locks(engine)
    t2 = threading.Thread(target=second)
    t2.start()
    wait_until(
        lambda: _waiting_advisory_locks(engine) > baseline,
        "the second holder to wait on the lock",
        timeout_s=WAIT,
    )
    assert events == ["first in"]  # the second one is waiting on the lock, not inside
    release_first.set()
    t1.join(WAIT)
    t2.join(WAIT)
    assert events == ["first in", "first out", "second in"]


def test_no_wait_and_timeout_raise_entity_locked_naming_the_entity(engine: sa.Engine, entity: str) -> None:
    with entity_lock(engine, entity):
        no_wait = pytest.raises(EntityLocked, match=f"entity '{entity}' is locked.*without waiting")
        with no_wait, entity_lock(engine, entity, wait=False):
            pass
        timed = pytest.raises(EntityLocked, match=r"within 0\.2 s")
        with timed, entity_lock(engine, entity, timeout=0.2):
            pass
    # Released on exit: now it can be taken at once.
    with entity_lock(engine, entity, wait=False):
        pass


def test_lock_is_released_when_the_block_raises(engine: sa.Engine, entity: str) -> None:
    with pytest.raises(RuntimeError, match="boom"), entity_lock(engine, entity):
        raise RuntimeError("boom")
    with entity_lock(engine, entity, wait=False):
        pass


def test_a_connection_can_hold_the_lock_and_keeps_its_work(engine: sa.Engine, entity: str) -> None:
    with engine.connect() as conn:
        with entity_lock(conn, entity) as held:
            assert held is conn
            conn.execute(sa.text("CREATE TEMP TABLE lock_work (x int)"))
            conn.execute(sa.text("INSERT INTO lock_work VALUES (1)"))
        # The block succeeded, so its open transaction was committed, not dropped.
        assert conn.execute(sa.text("SELECT count(*) FROM lock_work")).scalar_one() == 1
        conn.rollback()
        taken = pytest.raises(EntityLocked)
        with taken, entity_lock(engine, entity, wait=False), entity_lock(conn, entity, wait=False):
            pass


def test_timeout_s_is_the_same_bound(engine: sa.Engine, entity: str) -> None:
    with entity_lock(engine, entity):
        with pytest.raises(EntityLocked, match=r"within 0\.1 s"), entity_lock(engine, entity, timeout_s=0.1):
            pass
        with pytest.raises(ValueError, match="not both"), entity_lock(engine, entity, timeout=1, timeout_s=1):
            pass
