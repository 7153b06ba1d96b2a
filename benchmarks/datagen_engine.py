"""Generated APISmith records for the engine benchmark: one 15-column entity with realistic dirt.

Everything is built columnar (numpy + pyarrow.compute), so generating a million
records takes a moment and never dominates the measurement.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as _compute

from syncflow_dagster.catalog import parse_catalog
from syncflow_dagster.catalog.models import EntitySpec

pc: Any = _compute

BENCH_CATALOG = """
version: 1
entities:
  bench_work_orders:
    source: ProductionOrders
    resource: bench_work_orders
    business_key: [work_order_no]
    fields:
      - {source: ProdOrderNo, target: work_order_no, type: string, required: true, case: upper,
         max_length: 24}
      - {source: ItemNo, target: item_no, type: string, required: true, case: upper, max_length: 32}
      - {source: Site, target: site_code, type: string, required: true, case: upper, max_length: 16}
      - {source: Qty, target: quantity, type: decimal, scale: 3}
      - {source: UoM, target: uom, type: string, case: upper, max_length: 8}
      - {source: Status, target: status, type: enum, values: [PLANNED, FIRM, RELEASED, STARTED, FINISHED],
         aliases: {P: PLANNED, F: FIRM, R: RELEASED, S: STARTED}, case: upper}
      - {source: Priority, target: priority, type: int}
      - {source: PlannedStart, target: planned_start, type: datetime, timezone: Europe/Berlin,
         formats: ["%d.%m.%Y %H:%M"]}
      - {source: PlannedEnd, target: planned_end, type: datetime, timezone: Europe/Berlin}
      - {source: DueDate, target: due_date, type: date, formats: ["%d.%m.%Y"]}
      - {source: Released, target: released, type: bool}
      - {source: Description, target: description, type: string, max_length: 200}
      - {source: StdCost, target: standard_cost, type: decimal, scale: 4, rounding: half_up}
      - {source: Weight, target: weight_kg, type: decimal, scale: 2}
      - {source: Notes, target: notes, type: string}
"""


def bench_entity() -> EntitySpec:
    return parse_catalog(BENCH_CATALOG, origin="(benchmark)").entity("bench_work_orders")


def _text(values: Any) -> Any:
    return pc.cast(pa.array(values), pa.string())


def _pick(rng: np.random.Generator, choices: list[str | None], n: int) -> pa.Array:
    picked: pa.Array = pc.take(pa.array(choices, pa.string()), pa.array(rng.integers(0, len(choices), n)))
    return picked


def raw_records(ids: np.ndarray, rowversions: np.ndarray, seed: int, bad_share: float = 0.0001) -> pa.Table:
    """APISmith records for work orders `ids`: strings with padding, lower case, aliases, NFD, nulls."""
    rng = np.random.default_rng(seed)
    n = len(ids)
    order_no = pc.binary_join_element_wise(_pick(rng, ["wo-", " WO-", "Wo-"], n), _text(ids), "")
    item = pc.binary_join_element_wise("it-", _text(rng.integers(0, 50_000, n)), "")
    qty = _text(np.round(rng.uniform(0, 5000, n), 4))
    bad = rng.random(n) < bad_share
    qty = pc.if_else(pa.array(bad), "n/a", qty)
    start_s = 1_704_067_200 + rng.integers(0, 365 * 86400, n)
    start = pa.array(start_s * 1_000_000, pa.timestamp("us"))
    berlin_form = rng.random(n) < 0.5
    start_text = pc.if_else(
        pa.array(berlin_form),
        pc.strftime(start, format="%d.%m.%Y %H:%M"),
        pc.strftime(pc.cast(start, pa.timestamp("s")), format="%Y-%m-%dT%H:%M:%S"),
    )
    end = pa.array((start_s + rng.integers(3600, 30 * 86400, n)) * 1_000_000, pa.timestamp("us", tz="UTC"))
    end_text = pc.strftime(pc.cast(end, pa.timestamp("s", tz="UTC")), format="%Y-%m-%dT%H:%M:%S+00:00")
    due = pc.strftime(
        pa.array(start_s * 1_000_000 + 86400 * 10**6 * 14, pa.timestamp("us")), format="%d.%m.%Y"
    )
    description = pc.binary_join_element_wise(
        _pick(rng, ["Gehäuse ", "Gehause\u0308 ", "  Bracket ", "Shaft "], n), _text(ids % 997), ""
    )
    return pa.table(
        {
            "ProdOrderNo": order_no,
            "ItemNo": item,
            "Site": _pick(rng, ["s01", "S02 ", "s03"], n),
            "Qty": qty,
            "UoM": _pick(rng, ["pcs", "KG", " m "], n),
            "Status": _pick(rng, ["p", "FIRM", "r", "Started", "finished"], n),
            "Priority": pa.array(rng.integers(1, 10, n)),
            "PlannedStart": start_text,
            "PlannedEnd": end_text,
            "DueDate": due,
            "Released": _pick(rng, ["Y", "n", "true", "0", None], n),
            "Description": description,
            "StdCost": pa.array(np.round(rng.uniform(0, 900, n), 5)),
            "Weight": _text(np.round(rng.uniform(0, 80, n), 3)),
            "Notes": _pick(rng, [None, "", "urgent", " call customer "], n),
            "RowVersion": pa.array(rowversions, pa.int64()),
            "ModifiedAt": pc.strftime(
                pc.cast(
                    pa.array(start_s * 1_000_000, pa.timestamp("us", tz="UTC")), pa.timestamp("s", tz="UTC")
                ),
                format="%Y-%m-%dT%H:%M:%SZ",
            ),
        }
    )
