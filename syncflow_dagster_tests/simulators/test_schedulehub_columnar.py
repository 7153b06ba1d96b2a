"""The ScheduleHub stand-in's columnar upsert gives the same outcome per row as the row-by-row path."""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from syncflow_dagster.simulators.schedulehub import (
    RESULT_SCHEMA,
    HubStore,
    _rows_from_arrow,
)


def _batch(keys: list[Any], qty: list[Any], site: list[Any]) -> pa.Table:
    return pa.table(
        {
            "external_key": pa.array(keys, pa.string()),
            "quantity": pa.array(qty, pa.float64()),
            "note": pa.array([f"n{i}" for i in range(len(keys))], pa.string()),
            "ref.sites": pa.array(site, pa.string()),
        }
    )


def _row_by_row(store: HubStore, batch: pa.Table) -> list[dict[str, Any]]:
    table = store.table("items")
    out = []
    for key, attributes, references in _rows_from_arrow(batch):
        result = store.upsert_one("items", table, key, attributes, references)
        out.append(
            {name: result.get(name) for name in RESULT_SCHEMA.names}
            | {"retryable": bool(result.get("retryable", False))}
        )
    return out


def _stores() -> tuple[HubStore, HubStore]:
    stores = (HubStore(), HubStore())
    for store in stores:
        sites = store.table("sites")
        store.upsert_one("sites", sites, "S1", {"name": "one"}, {})
    return stores


def test_columnar_upsert_matches_row_by_row_for_every_kind_of_row() -> None:
    first = _batch(
        ["A", "B", "", "C", "D", "E" * 600, "F"],
        [1.0, 2.0, 3.0, float("inf"), None, 5.0, 6.0],
        ["S1", None, "S1", "S1", "S9", "S1", ""],
    )
    # The same keys again: unchanged, updated (new quantity), and still-missing parent.
    second = _batch(["A", "B", "D"], [1.0, 7.0, 4.0], ["S1", None, "S9"])
    columnar, rows = _stores()
    got = [columnar.upsert_arrow("items", columnar.table("items"), b).to_pylist() for b in (first, second)]
    expected = [_row_by_row(rows, b) for b in (first, second)]
    assert got == expected
    outcomes = [(r["status"], r["outcome"] or r["reason_code"]) for r in got[0] + got[1]]
    assert ("accepted", "created") in outcomes
    assert ("accepted", "updated") in outcomes
    assert ("accepted", "unchanged") in outcomes
    assert ("rejected", "parent_missing") in outcomes
    assert ("rejected", "invalid_record") in outcomes
    assert columnar.counts() == rows.counts()
    assert {k: (r.attributes, r.references) for k, r in columnar.table("items").records.items()} == {
        k: (r.attributes, r.references) for k, r in rows.table("items").records.items()
    }
    assert columnar.child_counts == rows.child_counts
