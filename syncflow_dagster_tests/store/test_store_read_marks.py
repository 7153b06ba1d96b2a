"""Read-through marks: a batch's noted snapshot becomes the entity's mark once, and a mark never goes back."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from syncflow_dagster.store.database import make_engine
from syncflow_dagster.store.migrate import upgrade
from syncflow_dagster.store.read_marks import ReadMarkRepository


@pytest.fixture(scope="module")
def repo(database_url: str) -> Iterator[ReadMarkRepository]:
    engine = make_engine(database_url)
    upgrade(engine)
    yield ReadMarkRepository(engine)
    engine.dispose()


def test_a_batch_snapshot_becomes_the_mark_once_and_the_mark_never_goes_back(
    repo: ReadMarkRepository,
) -> None:
    entity = f"items_{uuid.uuid4().hex[:8]}"
    assert repo.get(entity) is None
    first, late, failed = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    repo.note_snapshot(first, entity, 0, 40)
    repo.note_snapshot(first, entity, 0, 50)  # the fetch ran again (a retried step): the newer note holds
    assert repo.snapshot_of(first) == 50
    repo.note_snapshot(failed, entity, 50, 90)
    assert repo.get(entity) is None  # noted, not yet accounted for
    assert repo.advance_from_batch(first) == 50
    assert repo.get(entity) == 50
    assert repo.snapshot_of(first) is None  # consumed
    assert repo.advance_from_batch(first) is None  # a second persist of the batch moves nothing
    # A batch that read an older snapshot finishes late: the mark stays where it is.
    repo.note_snapshot(late, entity, 0, 30)
    assert repo.advance_from_batch(late) == 50
    assert repo.get(entity) == 50
    # The batch that failed never advanced: its read is repeated by the next catch-up run.
    assert repo.snapshot_of(failed) == 90
    assert repo.all()[entity] == 50
    assert repo.advance_from_batch(uuid.uuid4()) is None  # a closed window's run made no catch-up read


def test_a_negative_or_boolean_rowversion_is_refused(repo: ReadMarkRepository) -> None:
    with pytest.raises(ValueError, match="snapshot_rowversion"):
        repo.note_snapshot(uuid.uuid4(), "items", 0, -1)
    with pytest.raises(ValueError, match="after_rowversion"):
        repo.note_snapshot(uuid.uuid4(), "items", True, 3)
    with pytest.raises(ValueError, match="entity name is empty"):
        repo.note_snapshot(uuid.uuid4(), "", 0, 3)
