"""verify.compare classifies every key: matched, lost, different, extra, duplicated, held, refused;
verify.doubly_held finds a key held both as an open failed record and as a parked child."""

from __future__ import annotations

import uuid

import pyarrow as pa
import sqlalchemy as sa

from syncflow_dagster.store.database import make_engine
from syncflow_dagster.store.schema import failed_records, pending_children
from syncflow_dagster.store.state import StateRepository
from syncflow_dagster_tests.verify import INVALID_VALUE, Holding, SourceView, compare, doubly_held

VIEW = SourceView(
    "sites",
    ("name",),
    {"A": ("a",), "B": ("b",), "C": ("c",), "D": ("d",)},
    {"R": "field Active: not a bool (value 'maybe')", "S": "field Active: not a bool"},
)


def _hub(keys: list[str], names: list[str | None]) -> pa.Table:
    return pa.table({"id": [f"id{k}" for k in keys], "external_key": keys, "name": names})


def test_compare_classifies_every_key() -> None:
    hub = _hub(["A", "B", "B", "Z", "Y", "R"], ["a", "x", "x", "z", "y", "old"])
    held = {"C": Holding("transient_failure", "retryable"), "Y": Holding("http_503", "retryable")}
    held["R"] = Holding(INVALID_VALUE, "permanent")
    verdict = compare("sites", VIEW, hub, held)
    assert verdict.matched == 1
    assert verdict.duplicated == ["B"]
    assert verdict.different == ["B"]
    assert verdict.lost == ["D"]
    assert verdict.extra == ["Z"]
    assert verdict.unrecorded_refusals == ["S"]
    assert set(verdict.held) == {"C", "Y", "R"}
    assert set(verdict.explained) == {"R"}
    assert len(verdict.defects()) == 5


def test_compare_equal() -> None:
    verdict = compare(
        "sites",
        SourceView("sites", ("name",), {"A": ("a",)}, {}),
        _hub(["A"], ["a"]),
        {},
    )
    assert verdict.defects() == []
    assert verdict.matched == 1


def test_null_differs_from_empty_text() -> None:
    verdict = compare("sites", SourceView("sites", ("name",), {"A": ("",)}, {}), _hub(["A"], [None]), {})
    assert verdict.different == ["A"]


def test_a_key_held_twice_is_a_defect(database_url: str) -> None:
    engine = make_engine(database_url)
    entity = f"work_centers_{uuid.uuid4().hex[:8]}"
    try:
        StateRepository(engine).ensure_schema()
        # Written directly, as a database from before the store kept a key in one place could hold them.
        with engine.begin() as conn:
            for bk, both in (("WC-1", True), ("WC-2", False)):
                key = uuid.uuid4()
                conn.execute(
                    sa.insert(pending_children).values(
                        id=uuid.uuid4(),
                        entity=entity,
                        bk_hash=key,
                        bk=bk,
                        missing_parent_entity="sites",
                        missing_parent_bk="S-1",
                        missing_parent_bk_hash=uuid.uuid4(),
                    )
                )
                conn.execute(
                    sa.insert(failed_records).values(
                        id=uuid.uuid4(),
                        entity=entity,
                        bk_hash=key if both else uuid.uuid4(),
                        bk=bk if both else "WC-3",
                        reason_code="parent_missing",
                        reason_class="retryable",
                        detail="parent sites S-1 still missing",
                    )
                )
        assert doubly_held(engine, entity) == ["WC-1"]
    finally:
        engine.dispose()
    verdict = compare(entity, SourceView(entity, ("name",), {}, {}), _hub([], []), {})
    verdict.doubly_held = ["WC-1"]
    assert verdict.defects() == [f"{entity}: 1 doubly_held (e.g. ['WC-1'])"]
    assert verdict.summary()["doubly_held"] == 1
