"""A source folder holding one entity's history: N work orders whose changes spread over a year.

`write_history_source(catalog, folder, rows=N)` writes what the APISmith
stand-in serves from disk (`parquet_store.py`): `ProductionOrders/` as Parquet
files of `chunk_rows` rows each (row groups of 65 536, RowVersion int64,
ModifiedAt timestamp[ms, UTC] so a day's window prunes to its row groups),
the ancestors a work order references (items, sites, sales orders and their
lines, customers) sized as `datagen.entity_sizes` sizes them for N, and an
empty file for every other entity of the catalog.

Change times: the ancestors changed in the 30 days before `start` (the first
partition day); `before_share` of the work orders changed in the 90 days
before `start` (history older than the partitions, which the first day's run
takes), the rest uniformly over [start, start + days). RowVersion follows the
change time (parents first), so ModifiedAt never decreases in RowVersion. The
payload is `datagen`'s (realistic dirt, `bad_row_fraction` uncoercible
values), drawn a chunk at a time with numpy and Arrow `take`: memory follows
`chunk_rows`, and 10M rows take minutes, not hours.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from syncflow_dagster.catalog.models import Catalog
from syncflow_dagster.simulators.datagen import (
    DEFAULT_BAD_ROW_FRACTION,
    DatagenError,
    _Ctx,
    _entity_payload,
    entity_sizes,
    key_codes,
    key_prefix,
)

ENTITY = "work_orders"
ROW_GROUP_ROWS = 65_536
DEFAULT_CHUNK_ROWS = 1_000_000
PARENT_DAYS = 30
BEFORE_DAYS = 90
_DAY_MS = 86_400_000
_CHANGED = pa.timestamp("ms", tz="UTC")


@dataclass(frozen=True)
class HistorySource:
    """What was written: rows per source, the files, and the span of the entity's change times."""

    folder: Path
    rows: dict[str, int]
    files: list[Path]
    first_changed_at: datetime
    last_changed_at: datetime
    max_rowversion: int


def _ms(day: date) -> int:
    return int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp() * 1000)


def _write(table: pa.Table, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=ROW_GROUP_ROWS, compression="zstd", write_statistics=True)
    return path


def write_history_source(
    catalog: Catalog,
    folder: Path,
    *,
    rows: int,
    start: date = date(2025, 1, 1),
    days: int = 365,
    before_share: float = 0.05,
    seed: int = 0,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    bad_row_fraction: float = DEFAULT_BAD_ROW_FRACTION,
) -> HistorySource:
    """Write the folder (it must not hold a previous source); see the module doc."""
    if ENTITY not in catalog.by_name:
        raise DatagenError(f"the catalog has no entity {ENTITY!r}; the history source is made of work orders")
    if rows < 1 or days < 1 or chunk_rows < 1:
        raise DatagenError(f"rows, days and chunk_rows must be at least 1, got {rows}, {days}, {chunk_rows}")
    if not 0.0 <= before_share <= 1.0:
        raise DatagenError(f"before_share must be within [0, 1], got {before_share}")
    if folder.exists() and any(folder.iterdir()):
        raise DatagenError(f"{folder} is not empty; write a history source into a new folder")
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ctx = _Ctx(rng=rng, as_of=datetime(start.year, start.month, start.day, tzinfo=UTC) + timedelta(days=days))
    entity = catalog.entity(ENTITY)
    ancestors = set(catalog.ancestors_of(ENTITY))
    sizes = entity_sizes(catalog, rows)
    start_ms = _ms(start)
    files: list[Path] = []
    counts: dict[str, int] = {}
    done: dict[str, pa.Table] = {}
    rowversion = 0
    for name in catalog.topological_order:
        spec = catalog.entity(name)
        if name not in ancestors:
            continue
        payload = _entity_payload(ctx, catalog, spec, sizes[name], done, bad_row_fraction)
        done[name] = payload
        changed = np.sort(rng.integers(start_ms - PARENT_DAYS * _DAY_MS, start_ms, payload.num_rows))
        table = payload.append_column(
            spec.rowversion,
            pa.array(np.arange(rowversion + 1, rowversion + 1 + payload.num_rows), pa.int64()),
        ).append_column(spec.changed_at, pa.array(changed, _CHANGED))
        rowversion += payload.num_rows
        files.append(_write(table, folder / f"{spec.source}.parquet"))
        counts[spec.source] = payload.num_rows

    before = round(rows * before_share)
    changed_all = np.sort(
        np.concatenate(
            [
                rng.integers(start_ms - BEFORE_DAYS * _DAY_MS, start_ms, before),
                rng.integers(start_ms, start_ms + days * _DAY_MS, rows - before),
            ]
        )
    )
    width = max(6, len(str(rows)))
    keys = next(s for s in entity.fields if s.target == entity.business_key[0])
    for part, first in enumerate(range(0, rows, chunk_rows)):
        size = min(chunk_rows, rows - first)
        payload = _entity_payload(ctx, catalog, entity, size, done, bad_row_fraction)
        numbers = np.arange(first + 1, first + 1 + size, dtype=np.int64)
        payload = payload.set_column(
            payload.schema.get_field_index(keys.source),
            keys.source,
            key_codes(key_prefix(entity), numbers, width),
        )
        table = payload.append_column(
            entity.rowversion, pa.array(rowversion + numbers, pa.int64())
        ).append_column(entity.changed_at, pa.array(changed_all[first : first + size], _CHANGED))
        files.append(_write(table, folder / entity.source / f"part-{part:05d}.parquet"))
    counts[entity.source] = rows

    for name in catalog.topological_order:
        spec = catalog.entity(name)
        if name in ancestors or name == ENTITY:
            continue
        empty = pa.schema(
            [(f.source, pa.string()) for f in spec.fields]
            + [(spec.rowversion, pa.int64()), (spec.changed_at, _CHANGED)]
        ).empty_table()
        files.append(_write(empty, folder / f"{spec.source}.parquet"))
        counts[spec.source] = 0
    return HistorySource(
        folder,
        counts,
        files,
        datetime.fromtimestamp(int(changed_all[0]) / 1000, UTC),
        datetime.fromtimestamp(int(changed_all[-1]) / 1000, UTC),
        rowversion + rows,
    )


def day_counts(folder: Path, catalog: Catalog) -> dict[date, int]:
    """Work orders per change day (UTC), read from the folder's ModifiedAt column only."""
    entity = catalog.entity(ENTITY)
    counts: dict[date, int] = {}
    for path in sorted((folder / entity.source).glob("*.parquet")):
        days = pc.cast(pq.read_table(path, columns=[entity.changed_at]).column(0), pa.date32())
        tally: Any = pc.value_counts(days)
        for row in tally.to_pylist():
            counts[row["values"]] = counts.get(row["values"], 0) + int(row["counts"])
    return dict(sorted(counts.items()))
