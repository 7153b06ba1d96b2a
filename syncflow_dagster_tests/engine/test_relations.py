"""Relations: parent hashes from FK fields, ready/pending split, expiry, order."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pyarrow as pa
import pytest

from syncflow_dagster.catalog import default_catalog
from syncflow_dagster.engine.columns import ACTION, BK_HASH, REASON
from syncflow_dagster.engine.delta import plan_delta
from syncflow_dagster.engine.identity import add_identity, key_hash_of, key_text_of
from syncflow_dagster.engine.normalize import normalize
from syncflow_dagster.engine.relations import (
    MISSING_PARENT,
    PENDING_SINCE,
    delivery_order,
    expire_pending,
    parent_key_hashes,
    split_ready_pending,
)

CATALOG = default_catalog()


def identify(entity: str, columns: dict[str, list[object]]) -> pa.Table:
    spec = CATALOG.entity(entity)
    n = len(next(iter(columns.values())))
    raw = pa.table(
        {**columns, "RowVersion": list(range(1, n + 1)), "ModifiedAt": ["2024-01-01T00:00:00Z"] * n}
    )
    result = normalize(spec, raw)
    assert result.rejected.num_rows == 0, result.rejected.to_pylist()
    return add_identity(spec, result.rows)


def test_parent_hash_from_fk_equals_the_parents_own_bk_hash() -> None:
    lines = identify("sales_order_lines", {"OrderNo": ["so-1"], "LineNo": ["10"], "ItemNo": ["it-1"]})
    work_orders = identify(
        "work_orders",
        {
            "ProdOrderNo": ["wo-1", "wo-2"],
            "ItemNo": ["it-1", "it-1"],
            "Site": ["s1", "s1"],
            "SalesOrderNo": ["so-1", None],
            "SalesOrderLine": ["10", None],
        },
    )
    hashes = parent_key_hashes(CATALOG, "work_orders", work_orders)
    assert set(hashes) == {"items", "sites", "sales_order_lines"}
    assert hashes["sales_order_lines"].to_pylist() == [lines.column(BK_HASH)[0].as_py(), None]


def test_split_ready_pending_and_release() -> None:
    items = identify("items", {"ItemNo": ["it-1"]})
    sites = identify("sites", {"SiteCode": ["s1"], "SiteName": ["Plant"]})
    lines = identify("sales_order_lines", {"OrderNo": ["so-1"], "LineNo": ["10"], "ItemNo": ["it-1"]})
    orders = identify(
        "work_orders",
        {
            "ProdOrderNo": ["wo-1", "wo-2", "wo-3"],
            "ItemNo": ["it-1", "it-9", "it-1"],
            "Site": ["s1"] * 3,
            "SalesOrderNo": [None, None, "so-1"],
            "SalesOrderLine": [None, None, "10"],
        },
    )
    plan = plan_delta(orders, None)
    known: dict[str, Any] = {
        "items": set(items.column(BK_HASH).to_pylist()),
        "sites": sites.column(BK_HASH),
        "sales_order_lines": set(),
    }
    ready, pending = split_ready_pending(CATALOG, "work_orders", plan, known)
    assert ready.column("work_order_no").to_pylist() == ["WO-1"]
    waiting = dict(
        zip(
            pending.column("work_order_no").to_pylist(),
            pending.column(MISSING_PARENT).to_pylist(),
            strict=True,
        )
    )
    assert waiting == {"WO-2": "items", "WO-3": "sales_order_lines"}
    assert set(pending.column(REASON).to_pylist()) == {"parent_missing"}
    # The line lands later in the run: WO-3 is released, WO-2 still waits.
    known["sales_order_lines"] = set(lines.column(BK_HASH).to_pylist())
    released, still = split_ready_pending(CATALOG, "work_orders", pending, known)
    assert released.column("work_order_no").to_pylist() == ["WO-3"]
    assert MISSING_PARENT not in released.column_names
    assert still.column("work_order_no").to_pylist() == ["WO-2"]


def test_deletes_are_always_ready_and_known_parents_must_be_complete() -> None:
    plan = plan_delta(identify("items", {"ItemNo": ["it-1"]}), None)
    ops = identify("work_centers", {"Site": ["s1"], "WorkCenter": ["wc"]})
    plan = plan_delta(ops, None)
    plan = plan.set_column(plan.column_names.index(ACTION), ACTION, pa.array(["delete"]))
    ready, pending = split_ready_pending(CATALOG, "work_centers", plan, {"sites": set()})
    assert (ready.num_rows, pending.num_rows) == (1, 0)
    with pytest.raises(ValueError, match="no entry for parent entity 'sites'"):
        split_ready_pending(CATALOG, "work_centers", plan, {})


def test_expire_pending() -> None:
    now = dt.datetime(2024, 1, 2, tzinfo=dt.UTC)
    pending = pa.table(
        {
            "k": ["old", "new", "unknown"],
            PENDING_SINCE: pa.array(
                [now - dt.timedelta(hours=30), now - dt.timedelta(hours=1), None],
                pa.timestamp("us", tz="UTC"),
            ),
        }
    )
    still, failed = expire_pending(pending, now, dt.timedelta(hours=24))
    assert failed.column("k").to_pylist() == ["old"]
    assert still.column("k").to_pylist() == ["new", "unknown"]
    with pytest.raises(ValueError, match="timezone-aware"):
        expire_pending(pending, now.replace(tzinfo=None), dt.timedelta(hours=1))


def test_delivery_order_puts_parents_first() -> None:
    order = delivery_order(CATALOG)
    assert set(order) == set(CATALOG.by_name)
    for name in order:
        for parent in CATALOG.entity(name).parent_entities:
            assert order.index(parent) < order.index(name)


def test_parent_key_hashes_equal_hashing_every_row() -> None:
    # Hashed once per distinct foreign key and spread back: the same as per row, nulls kept.
    catalog = default_catalog()
    spec = catalog.entity("work_orders")
    rows = pa.table(
        {
            "item_no": ["IT-1", "IT-2", "IT-1", None, "IT-3", "IT-2"],
            "site_code": ["S1", "S1", "S1", "S2", "S2", "S1"],
            "order_no": ["SO-1", None, "SO-1", "SO-2", "SO-2", "SO-1"],
            "line_no": pa.array([1, 2, 1, 1, None, 2], pa.int32()),
        }
    )
    hashes = parent_key_hashes(catalog, spec, rows)
    assert set(hashes) == {"items", "sites", "sales_order_lines"}
    for relation in spec.parents:
        expected = key_hash_of(key_text_of([rows.column(f) for f in relation.fields]))
        assert hashes[relation.entity].equals(expected), relation.entity
    assert hashes["items"].null_count == 1
    assert hashes["sales_order_lines"].null_count == 2
