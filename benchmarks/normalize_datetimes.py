"""CPU seconds per 1M values of normalize's datetime and date columns (a short micro-benchmark).

`python -m benchmarks datetimes [--rows N]`: the default catalog's work orders
(`generate_dataset(default_catalog(), N, 7)`) and the engine benchmark's entity;
each figure is the median of 3 runs of process CPU time on one Arrow thread.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from typing import Any

import numpy as np
import pyarrow as pa

from benchmarks.datagen_engine import bench_entity, raw_records
from syncflow_dagster.catalog import default_catalog
from syncflow_dagster.catalog.models import EntitySpec, Precision
from syncflow_dagster.engine import normalize as nm
from syncflow_dagster.engine.datetimes import coerce_datetime
from syncflow_dagster.simulators.datagen import generate_dataset

DATETIME_COLUMNS = ("PlannedStart", "PlannedEnd", "DueDate")


def _cpu_per_million(job: Callable[[], Any], rows: int) -> float:
    runs = []
    for _ in range(3):
        started = time.process_time()
        job()
        runs.append(time.process_time() - started)
    return statistics.median(runs) * 1_000_000 / rows


def _report(label: str, entity: EntitySpec, table: pa.Table) -> None:
    rows = table.num_rows
    for source in DATETIME_COLUMNS:
        spec = next(spec for spec in entity.fields if spec.source == source)
        column = nm._combined(table.column(source))
        seconds = _cpu_per_million(partial(nm._coerce_field, entity, spec, column), rows)
        print(f"{label} {source:<14} {seconds:6.3f}")
    changed_at = nm._combined(table.column(entity.changed_at))
    seconds = _cpu_per_million(
        lambda: coerce_datetime(changed_at, formats=(), timezone="UTC", precision=Precision.MICROSECOND),
        rows,
    )
    print(f"{label} {'changed_at':<14} {seconds:6.3f}")
    print(f"{label} {'normalize':<14} {_cpu_per_million(lambda: nm.normalize(entity, table), rows):6.3f}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks datetimes", description=__doc__)
    parser.add_argument("--rows", type=int, default=200_000, help="work orders to generate (default 200000)")
    args = parser.parse_args(argv)
    if args.rows < 1:
        parser.error(f"--rows must be at least 1, got {args.rows}")
    pa.set_cpu_count(1)  # CPU time of the work itself, not of normalize's column threads
    catalog = default_catalog()
    dataset = generate_dataset(catalog, args.rows, 7, as_of=datetime(2026, 6, 1, tzinfo=UTC))
    _report("work_orders", catalog.entity("work_orders"), dataset["ProductionOrders"])
    ids = np.arange(args.rows)
    _report("bench      ", bench_entity(), raw_records(ids, ids + 1, 7))
    return 0
