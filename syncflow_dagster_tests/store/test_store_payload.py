"""Payload JSON: an Arrow row to JSON text and back with the entity's types, exactly."""

from __future__ import annotations

import datetime as dt
import decimal

import pyarrow as pa
import pytest

from syncflow_dagster.store.payload import payload_json, payload_table

SCHEMA = pa.schema(
    [
        ("work_order_no", pa.string()),
        ("quantity", pa.decimal128(18, 3)),
        ("priority", pa.int64()),
        ("released", pa.bool_()),
        ("due_date", pa.date32()),
        ("planned_start", pa.timestamp("ms", tz="UTC")),
    ]
)


def _rows() -> pa.Table:
    return pa.table(
        {
            "work_order_no": ["WO-1", "", None],
            "quantity": pa.array(
                [decimal.Decimal("12.500"), decimal.Decimal("-0.001"), None], pa.decimal128(18, 3)
            ),
            "priority": [1, None, 3],
            "released": [True, False, None],
            "due_date": [dt.date(2025, 3, 1), None, dt.date(1999, 12, 31)],
            "planned_start": pa.array(
                [dt.datetime(2025, 3, 1, 6, 30, 0, 123000, tzinfo=dt.UTC), None, None],
                pa.timestamp("ms", tz="UTC"),
            ),
            "_rowversion": [7, 8, 9],
        },
        schema=SCHEMA.append(pa.field("_rowversion", pa.int64())),
    )


def test_round_trip_keeps_types_nulls_and_decimal_scale() -> None:
    rows = _rows()
    texts = payload_json(rows)
    assert texts.type == pa.string()
    assert '"quantity":"12.500"' in texts[0].as_py()
    assert "_rowversion" not in texts[0].as_py()  # SyncFlow's own columns are not payload
    back = payload_table(texts, SCHEMA, entity="work_orders")
    assert back.equals(rows.select(SCHEMA.names))


def test_unknown_key_and_wrong_value_are_named() -> None:
    with pytest.raises(ValueError, match=r"entity 'work_orders', payload #0: field\(s\) \['colour'\]"):
        payload_table(pa.array(['{"colour": "red"}']), SCHEMA, entity="work_orders")
    with pytest.raises(ValueError, match="entity 'work_orders', field 'priority': payload value 'high'"):
        payload_table(pa.array(['{"priority": "high"}']), SCHEMA, entity="work_orders")


def test_selected_columns_only() -> None:
    texts = payload_json(_rows(), ["work_order_no", "priority"])
    assert texts.to_pylist()[0] == '{"work_order_no":"WO-1","priority":1}'
    with pytest.raises(ValueError, match=r"no column\(s\) \['nope'\]"):
        payload_json(_rows(), ["nope"])
