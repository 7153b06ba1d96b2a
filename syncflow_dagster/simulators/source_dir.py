"""Load a user's extract for the APISmith stand-in: a folder of <source>.parquet or <source>.csv files.

One file per catalog entity, named by the entity's SOURCE name, with the
source column names. The folder may hold files for only some of the
entities (your new one and its parents, say): an entity without a file is
served with no records. A folder with no file for any entity is refused. Payload columns are read as text (as the ERP serves
them). `RowVersion` and `ModifiedAt` are optional: without them the records get
rowversions in file order (one counter across entities, in the catalog's
parent-first order) and the load time as their change time. A missing file or
column is refused with the entity, the file and the column named.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from syncflow_dagster.catalog.models import Catalog, EntitySpec
from syncflow_dagster.simulators.datagen import format_changed_at


class SourceDirError(ValueError):
    """The folder does not hold what the catalog describes (names entity, file and column)."""


def _read(entity: EntitySpec, folder: Path) -> tuple[pa.Table, Path] | None:
    parquet = folder / f"{entity.source}.parquet"
    csv = folder / f"{entity.source}.csv"
    if parquet.is_file():
        return pq.read_table(parquet), parquet
    if csv.is_file():
        # Every column as text except the rowversion: the ERP's JSON carries text.
        names = [spec.source for spec in entity.fields] + [entity.changed_at]
        options = pacsv.ConvertOptions(
            column_types={**dict.fromkeys(names, pa.string()), entity.rowversion: pa.int64()},
            strings_can_be_null=True,
            null_values=[""],
        )
        try:
            return pacsv.read_csv(csv, convert_options=options), csv
        except pa.ArrowInvalid as exc:
            raise SourceDirError(f"entity {entity.name!r}, file {csv}: cannot read CSV ({exc})") from None
    return None


def _no_records(entity: EntitySpec, folder: Path) -> tuple[pa.Table, Path]:
    """An entity the folder has no file for: its columns, no rows."""
    names = [spec.source for spec in entity.fields] + [entity.changed_at]
    columns: dict[str, pa.Array] = {name: pa.array([], pa.string()) for name in names}
    columns[entity.rowversion] = pa.array([], pa.int64())
    return pa.table(columns), folder / f"{entity.source}.csv"


def load_source_dir(catalog: Catalog, folder: Path, as_of: datetime | None = None) -> dict[str, pa.Table]:
    """One table per source, payload as utf8, plus int64 RowVersion and ISO ModifiedAt."""
    if not folder.is_dir():
        raise SourceDirError(f"source folder {folder} does not exist or is not a directory")
    as_of_ms = int((as_of or datetime.now(UTC)).timestamp() * 1000)
    counter = 0
    dataset: dict[str, pa.Table] = {}
    found = {name: _read(catalog.entity(name), folder) for name in catalog.topological_order}
    if not any(found.values()):
        expected = ", ".join(f"{catalog.entity(name).source}.csv" for name in catalog.topological_order)
        raise SourceDirError(
            f"source folder {folder} holds no file for any catalog entity "
            f"(expected one or more of {expected}, or .parquet)"
        )
    tables = {name: read or _no_records(catalog.entity(name), folder) for name, read in found.items()}
    # Files that carry rowversions set the floor for the ones that get assigned.
    for name, (table, _path) in tables.items():
        entity = catalog.entity(name)
        if entity.rowversion in table.column_names and table.num_rows:
            counter = max(counter, int(pc.max(table.column(entity.rowversion)).as_py() or 0))
    for name in catalog.topological_order:
        entity = catalog.entity(name)
        table, path = tables[name]
        columns: dict[str, Any] = {}
        for spec in entity.fields:
            if spec.source not in table.column_names:
                raise SourceDirError(
                    f"entity {entity.name!r}, file {path}: column {spec.source!r} missing; "
                    f"the file has {table.column_names}"
                )
            column = table.column(spec.source)
            columns[spec.source] = column if column.type == pa.string() else pc.cast(column, pa.string())
        if entity.rowversion in table.column_names:
            columns[entity.rowversion] = pc.cast(table.column(entity.rowversion), pa.int64())
        else:
            columns[entity.rowversion] = pa.array(
                np.arange(counter + 1, counter + 1 + table.num_rows, dtype=np.int64)
            )
            counter += table.num_rows
        if entity.changed_at in table.column_names:
            changed: Any = table.column(entity.changed_at)
            if pa.types.is_timestamp(changed.type):
                changed = pc.strftime(
                    pc.cast(changed, pa.timestamp("ms", tz="UTC")), format="%Y-%m-%dT%H:%M:%S"
                )
                changed = pc.binary_join_element_wise(changed, "+00:00", "")
            columns[entity.changed_at] = changed
        else:
            columns[entity.changed_at] = format_changed_at(np.full(table.num_rows, as_of_ms, dtype=np.int64))
        dataset[entity.source] = pa.table(columns)
    return dataset
