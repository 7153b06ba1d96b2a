"""Watermarks only move forward."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterator

import pytest

from syncflow_dagster.store.database import make_engine
from syncflow_dagster.store.migrate import upgrade
from syncflow_dagster.store.watermarks import WatermarkRepository


@pytest.fixture(scope="module")
def repo(database_url: str) -> Iterator[WatermarkRepository]:
    engine = make_engine(database_url)
    upgrade(engine)
    yield WatermarkRepository(engine)
    engine.dispose()


def test_watermark_never_goes_backwards(repo: WatermarkRepository) -> None:
    entity = f"sites_{uuid.uuid4().hex[:8]}"
    assert repo.get(entity) is None
    t1 = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
    t2 = dt.datetime(2025, 2, 1, tzinfo=dt.UTC)
    assert repo.set_if_higher(entity, 10, t1).rowversion == 10
    lower = repo.set_if_higher(entity, 3, t2)
    assert (lower.rowversion, lower.changed_at) == (10, t1)  # nothing moved
    same = repo.set_if_higher(entity, 10)
    assert same.rowversion == 10
    higher = repo.set_if_higher(entity, 11)
    assert (higher.rowversion, higher.changed_at) == (11, t1)  # no changed_at given: the known one stays
    top = repo.set_if_higher(entity, 12, t2)
    assert (top.rowversion, top.changed_at) == (12, t2)
    assert entity in {w.entity for w in repo.all()}


@pytest.mark.parametrize("bad", [-1, 1.5, True, "7"])
def test_bad_rowversion_is_refused_naming_entity_and_value(repo: WatermarkRepository, bad: object) -> None:
    with pytest.raises(ValueError, match=rf"entity 'items', field 'rowversion': {bad!r}"):
        repo.set_if_higher("items", bad)  # type: ignore[arg-type]
