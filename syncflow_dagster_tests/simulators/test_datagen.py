"""The synthetic ERP dataset: deterministic, FK-consistent, versioned, and dirty the way ERPs are."""

from __future__ import annotations

import unicodedata
from datetime import UTC, datetime, timedelta

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from syncflow_dagster.catalog import default_catalog, parse_catalog
from syncflow_dagster.catalog.models import FieldType
from syncflow_dagster.simulators.changes import joined_keys, key_sources
from syncflow_dagster.simulators.datagen import (
    DatagenError,
    entity_sizes,
    generate_dataset,
    uncoercible_value,
)

AS_OF = datetime(2024, 5, 10, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def dataset() -> dict[str, pa.Table]:
    return generate_dataset(default_catalog(), 4000, seed=11, as_of=AS_OF, history_days=5)


def _values(table: pa.Table, column: str) -> list[str | None]:
    return table.column(column).to_pylist()


def test_same_seed_same_data_other_seed_other_data() -> None:
    catalog = default_catalog()
    first = generate_dataset(catalog, 500, seed=3, as_of=AS_OF, history_days=2)
    again = generate_dataset(catalog, 500, seed=3, as_of=AS_OF, history_days=2)
    other = generate_dataset(catalog, 500, seed=4, as_of=AS_OF, history_days=2)
    assert list(first) == list(again)
    for source in first:
        assert first[source].equals(again[source]), source
    assert not first["ProductionOrders"].equals(other["ProductionOrders"])


def test_keyed_by_source_with_source_columns_as_text(dataset: dict[str, pa.Table]) -> None:
    catalog = default_catalog()
    sizes = entity_sizes(catalog, 4000)
    assert set(dataset) == {e.source for e in catalog.entities}
    for entity in catalog.entities:
        table = dataset[entity.source]
        assert table.num_rows == sizes[entity.name]
        expected = [*(f.source for f in entity.fields), entity.rowversion, entity.changed_at]
        assert table.column_names == expected
        for spec in entity.fields:
            assert table.schema.field(spec.source).type == pa.string(), (entity.name, spec.source)
        assert table.schema.field(entity.rowversion).type == pa.int64()
        assert table.schema.field(entity.changed_at).type == pa.string()
    assert sizes["work_orders"] == 4000
    assert sizes["sales_order_lines"] == 500
    assert 5 <= sizes["sites"] <= 20


def test_rowversions_unique_increasing_and_change_times_follow_them(dataset: dict[str, pa.Table]) -> None:
    rowversions = np.concatenate([t.column("RowVersion").to_numpy() for t in dataset.values()])
    changed = np.concatenate(
        [
            pc.cast(t.column("ModifiedAt"), pa.timestamp("us", tz="UTC")).cast(pa.int64()).to_numpy()
            for t in dataset.values()
        ]
    )
    assert np.unique(rowversions).size == rowversions.size
    assert sorted(rowversions.tolist()) == list(range(1, rowversions.size + 1))
    order = np.argsort(rowversions)
    assert np.all(np.diff(changed[order]) >= 0), "ModifiedAt must not go back as RowVersion grows"
    low = int((AS_OF - timedelta(days=5)).timestamp() * 1_000_000)
    high = int(AS_OF.timestamp() * 1_000_000)
    assert changed.min() >= low
    assert changed.max() == high
    for table in dataset.values():  # each table is served in rowversion order
        values = table.column("RowVersion").to_numpy()
        assert np.all(np.diff(values) > 0)
    # Entities are interleaved in time, not one after the other.
    first_lines = dataset["SalesOrderLines"].column("RowVersion")[0].as_py()
    assert first_lines < dataset["Sites"].column("RowVersion")[-1].as_py()


def test_history_days_zero_puts_every_change_at_as_of() -> None:
    data = generate_dataset(default_catalog(), 100, seed=1, as_of=AS_OF)
    stamps = {value for t in data.values() for value in _values(t, "ModifiedAt")}
    assert stamps == {"2024-05-10T12:00:00.000+00:00"}


def test_keys_unique_and_foreign_keys_point_at_parents(dataset: dict[str, pa.Table]) -> None:
    catalog = default_catalog()
    for entity in catalog.entities:
        table = dataset[entity.source]
        keys = joined_keys(table, key_sources(entity))
        assert len(pc.unique(keys)) == table.num_rows, entity.name
        for column in key_sources(entity):
            assert table.column(column).null_count == 0
        for relation in entity.parents:
            parent = catalog.entity(relation.entity)
            child_cols = [entity.field_by_target[f].source for f in relation.fields]
            parent_cols = key_sources(parent)
            refs = table.select(child_cols)
            present = pc.is_valid(refs.column(0))
            refs = refs.filter(present)
            parent_keys = joined_keys(dataset[parent.source], parent_cols)
            found = pc.is_in(joined_keys(refs, child_cols), value_set=parent_keys)
            assert pc.all(found).as_py(), (entity.name, relation.entity)
    # Optional FKs are sometimes null (make-to-stock work orders), required ones never.
    orders = dataset["ProductionOrders"]
    assert 0 < orders.column("SalesOrderNo").null_count < orders.num_rows
    assert orders.column("ItemNo").null_count == 0
    # A child's own integer key counts within its parent.
    lines = dataset["SalesOrderLines"]
    first_of_each = pc.min_max(pc.cast(lines.column("LineNo"), pa.int64()))
    assert first_of_each["min"].as_py() == 1


def test_values_carry_realistic_dirt(dataset: dict[str, pa.Table]) -> None:
    orders = dataset["ProductionOrders"]
    descriptions = [v for v in _values(orders, "Description") if v]
    statuses = set(_values(orders, "Status"))
    released = {v for v in _values(orders, "Released") if v is not None}
    due = [v for v in _values(orders, "DueDate") if v]
    quantities = set(_values(orders, "Qty"))
    uoms = {v for v in _values(orders, "UoM") if v}

    assert any(v != v.strip() for v in descriptions), "stray whitespace"
    assert any(v.islower() for v in uoms), "wrong case in an upper-case field"
    assert {"P", "F", "FIN"} & statuses, "enum aliases"
    assert "PLANNED" in statuses
    assert any(s and s.strip() != s for s in statuses if s), "whitespace around an enum"
    assert {v.strip().lower() for v in released} >= {"true", "false", "y", "0"}, "bool spellings"
    assert any(v != v.lower() for v in released)
    for separator in ".-/":  # the field's three date formats
        assert any(separator in v for v in due), separator
    assert "-0.00" in quantities
    assert any(q and "." in q and len(q.split(".")[1]) > 3 for q in quantities), "more digits than the scale"
    assert None in quantities, "nulls"
    assert "" in quantities, "empty strings"
    text = " ".join(descriptions)
    assert any("\u4e00" <= ch <= "\u9fff" for ch in text), "CJK"
    nfd = [v for v in descriptions if unicodedata.normalize("NFC", v) != v]
    assert nfd, "NFD text"
    assert any(unicodedata.normalize("NFC", v) == v and not v.isascii() for v in descriptions), "NFC text"
    requested = [v for v in _values(dataset["SalesOrders"], "RequestedShip") if v]
    assert any(v.endswith(("+0100", "+0200")) for v in requested), "offset in the text"
    assert any(" " in v for v in requested), "space-separated local time"


def test_a_small_share_of_rows_cannot_be_coerced(dataset: dict[str, pa.Table]) -> None:
    catalog = default_catalog()
    entity = catalog.entity("work_orders")
    table = dataset[entity.source]
    spoiled = np.zeros(table.num_rows, dtype=bool)
    for spec in entity.fields:
        bad = uncoercible_value(spec)
        if bad is not None:
            spoiled |= pc.fill_null(pc.equal(table.column(spec.source), bad), False).to_numpy()
    assert spoiled.sum() == round(table.num_rows * 0.001)
    assert "31.02.2024" in _values(table, "DueDate") or "12,5x" in _values(table, "Qty")
    clean = generate_dataset(catalog, 1000, seed=11, as_of=AS_OF, bad_row_fraction=0.0)
    assert "12,5x" not in _values(clean["ProductionOrders"], "Qty")


def test_generates_any_catalog_from_field_types() -> None:
    catalog = parse_catalog(
        """
entities:
  plants:
    source: Plant
    resource: plants
    business_key: [plant_id]
    fields:
      - {source: Id, target: plant_id, type: string, required: true}
      - {source: Opened, target: opened, type: date}
  machines:
    source: Machine
    resource: machines
    business_key: [plant_id, machine_no]
    fields:
      - {source: PlantId, target: plant_id, type: string, required: true}
      - {source: MachineNo, target: machine_no, type: int, required: true}
      - {source: Rate, target: rate, type: decimal, scale: 2}
      - {source: Kind, target: kind, type: enum, values: [A, B]}
    parents:
      - {entity: plants, fields: [plant_id]}
"""
    )
    data = generate_dataset(catalog, 300, seed=2, as_of=AS_OF)
    assert data["Machine"].num_rows == 300
    assert data["Plant"].num_rows == 15
    plants = set(_values(data["Plant"], "Id"))
    assert set(_values(data["Machine"], "PlantId")) <= plants
    kinds = {v.strip().upper() for v in _values(data["Machine"], "Kind") if v}
    assert kinds <= {"A", "B", "NOT-A-STATUS"}
    assert {spec.type for spec in catalog.entity("machines").fields} >= {FieldType.INT, FieldType.DECIMAL}


def test_refuses_what_it_cannot_generate() -> None:
    only_fk = parse_catalog(
        """
entities:
  a: {source: A, resource: a, business_key: [id], fields: [{source: Id, target: id, required: true}]}
  b:
    source: B
    resource: b
    business_key: [a_id]
    fields: [{source: AId, target: a_id, required: true}]
    parents: [{entity: a, fields: [a_id]}]
"""
    )
    with pytest.raises(DatagenError, match=r"entity 'b'.*only of FK"):
        generate_dataset(only_fk, 10, seed=1)
    with pytest.raises(DatagenError, match="rows must be at least 1"):
        generate_dataset(default_catalog(), 0, seed=1)
    with pytest.raises(DatagenError, match="history_days"):
        generate_dataset(default_catalog(), 10, seed=1, history_days=-1)
