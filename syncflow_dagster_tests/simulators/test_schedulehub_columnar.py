"""The ScheduleHub stand-in decides an Arrow batch column by column exactly as it would row by row."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from syncflow_dagster.simulators.arrow_json import json_objects, json_references
from syncflow_dagster.simulators.hub_store import HubStore
from syncflow_dagster.simulators.hub_wire import clean_rows, result_tuples, rows_from_arrow, upsert_columns


def _batch(keys: list[Any], qty: list[Any], site: list[Any]) -> pa.Table:
    return pa.table(
        {
            "external_key": pa.array(keys, pa.string()),
            "quantity": pa.array(qty, pa.float64()),
            "note": pa.array([f"n{i}" for i in range(len(keys))], pa.string()),
            "ref.sites": pa.array(site, pa.string()),
        }
    )


@pytest.fixture
def stores(tmp_path: Path) -> Iterator[tuple[HubStore, HubStore]]:
    with HubStore(tmp_path / "columnar") as columnar, HubStore(tmp_path / "rows") as rows:
        for store in (columnar, rows):
            store.upsert("sites", [("S1", {"name": "one"}, {})])
        yield columnar, rows


def _columnar(store: HubStore, batch: pa.Table) -> list[Any]:
    clean = clean_rows(batch)
    assert clean is not None
    decided = upsert_columns(store, "items", batch, clean)
    assert decided is not None, "the batch should be decided column by column"
    return result_tuples(decided)


def test_columnar_upsert_matches_row_by_row_for_every_kind_of_row(stores: tuple[HubStore, HubStore]) -> None:
    first = _batch(
        ["A", "B", "", "C", "D", "E" * 600, "F", None],
        [1.0, 2.0, 3.0, float("inf"), None, 5.0, 6.0, 1.0],
        ["S1", None, "S1", "S1", "S9", "S1", "", "S1"],
    )
    # The same keys again: unchanged, updated (new quantity), and still-missing parent.
    second = _batch(["A", "B", "D"], [1.0, 7.0, 4.0], ["S1", None, "S9"])
    columnar, rows = stores
    got = [_columnar(columnar, b) for b in (first, second)]
    expected = [rows.upsert("items", rows_from_arrow(b)) for b in (first, second)]
    assert got == expected
    outcomes = [(r[1], r[3] or r[4]) for r in got[0] + got[1]]
    assert ("accepted", "created") in outcomes
    assert ("accepted", "updated") in outcomes
    assert ("accepted", "unchanged") in outcomes
    assert ("rejected", "parent_missing") in outcomes
    assert ("rejected", "invalid_record") in outcomes
    assert columnar.counts() == rows.counts() == {"items": 2, "sites": 1}
    held = [list(store.iter_records("items")) for store in stores]
    assert held[0] == held[1]
    assert [(r.external_key, r.attributes["quantity"], r.references) for r in held[0]] == [
        ("A", 1.0, {"sites": "S1"}),
        ("B", 7.0, {}),
    ]
    assert columnar.child_counts("sites", ["S1"]) == rows.child_counts("sites", ["S1"]) == {"S1": 1}


def test_a_batch_with_a_key_twice_or_a_reference_to_itself_is_decided_row_by_row(
    stores: tuple[HubStore, HubStore],
) -> None:
    columnar, _ = stores
    twice = _batch(["A", "A"], [1.0, 2.0], ["S1", "S1"])
    assert upsert_columns(columnar, "items", twice, [True, True]) is None
    own = pa.table({"external_key": ["T1", "T2"], "ref.items": [None, "T1"]})
    assert upsert_columns(columnar, "items", own, [True, True]) is None


def test_every_attribute_type_is_stored_as_the_json_path_stores_it(tmp_path: Path) -> None:
    batch = pa.table(
        {
            "external_key": ["K1", "K2"],
            "text": ['quote " and \\ and \x01 and é', None],
            "count": pa.array([3, None], pa.int64()),
            "ratio": pa.array([1.0, 1e20], pa.float64()),
            "flag": [True, False],
            "price": pa.array([Decimal("-0.50"), None], pa.decimal128(10, 2)),
            "at": pa.array([datetime(2025, 3, 1, 8, 0, 1, tzinfo=UTC), None], pa.timestamp("us", tz="UTC")),
            "nothing": pa.nulls(2),
        }
    )
    with HubStore(tmp_path / "a") as columnar, HubStore(tmp_path / "b") as rows:
        got = _columnar(columnar, batch)
        assert got == rows.upsert("items", rows_from_arrow(batch))
        assert list(columnar.iter_records("items")) == list(rows.iter_records("items"))
        # Sending the batch again row by row finds nothing changed: the stored texts are equal.
        assert [r[3] for r in columnar.upsert("items", rows_from_arrow(batch))] == ["unchanged"] * 2


_SCALAR = st.one_of(st.none(), st.text(max_size=12))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(_SCALAR, _SCALAR, st.integers(-(2**63), 2**63 - 1) | st.none()), max_size=20))
def test_arrow_json_writes_what_orjson_writes(values: list[tuple[Any, Any, Any]]) -> None:
    names = ["b", "a\u00e9", "n"]
    columns = [
        pa.array([v[0] for v in values], pa.string()),
        pa.array([v[1] for v in values], pa.string()),
        pa.array([v[2] for v in values], pa.int64()),
    ]
    written = json_objects(names, columns, len(values)).to_pylist()
    expected = [
        orjson.dumps(dict(zip(names, v, strict=True)), option=orjson.OPT_SORT_KEYS).decode() for v in values
    ]
    assert written == expected
    refs = json_references(names[:2], columns[:2], len(values)).to_pylist()
    for (first, second, _), text in zip(values, refs, strict=True):
        present = {k: v for k, v in zip(names[:2], (first, second), strict=True) if v is not None}
        assert text == (orjson.dumps(present, option=orjson.OPT_SORT_KEYS).decode() if present else None)


def test_a_read_back_page_parsed_by_arrow_equals_the_one_built_from_python(tmp_path: Path) -> None:
    from syncflow_dagster.simulators.hub_store import records_of
    from syncflow_dagster.simulators.hub_wire import records_arrow, records_table

    rows = [
        ("K1", {"due": "2025-03-01", "at": "2025-03-01T08:00:01.000005Z", "n": 1, "ok": True, "x": None}, {}),
        ("K2", {"due": "2025-03-02", "n": 2.5, "ok": False, "late": "2024-05-10 12:00:00"}, {"sites": "S1"}),
        ("K3", {"note": 'é " \\ \x01'}, {"sites": "S1", "items": "I1"}),
    ]
    mixed = [("M1", {"v": 1}, {}), ("M2", {"v": "one"}, {})]
    with HubStore(tmp_path) as store:
        store.upsert("sites", [("S1", {}, {})])
        store.upsert("items", [("I1", {}, {})])
        for resource, batch in (("things", rows), ("mixed", mixed)):
            store.upsert(resource, batch)
            seqs, keys, attributes, refs, _ = store.page_texts(resource, 0, 100)
            fast = records_arrow(resource, seqs, keys, attributes, refs)
            slow = records_table(records_of(seqs, keys, attributes, refs), resource)
            assert fast.to_pylist() == slow.to_pylist()
            assert fast.schema.names == slow.schema.names
            assert [f.type for f in fast.schema] == [f.type for f in slow.schema], resource
