"""The APISmith stand-in's data: live records and tombstones per source, versioned by RowVersion.

Each source's state is an immutable `SourceState` (Arrow tables sorted by
RowVersion plus numpy copies of RowVersion and the parsed change time); a
change set builds new states and swaps them in under a lock, so a request that
took a state keeps a consistent view while changes land. Reads are keyset
pages over (RowVersion > after, RowVersion <= snapshot, changed in
[from, to)), answered with a zero-copy slice when the matching rows are
contiguous. RowVersion is one counter across all sources: unique, increasing.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from syncflow_dagster.catalog.models import Catalog, EntitySpec
from syncflow_dagster.simulators.changes import (
    ChangeSet,
    ChangeSetError,
    TableRecords,
    joined_keys,
    key_sources,
)
from syncflow_dagster.simulators.datagen import format_changed_at

DELETED_AT = "DeletedAt"
# Rows per Arrow batch of a streamed listing (keys, snapshot).
BATCH_ROWS = 65_536


class SourceDataError(ValueError):
    """Records the store cannot serve (names entity, field and value)."""


@dataclass(frozen=True)
class Page:
    """One keyset page: the rows, where the next page starts, and whether there is one."""

    rows: pa.Table
    next_after_rowversion: int
    snapshot_rowversion: int
    has_more: bool


@dataclass(frozen=True)
class SourceState:
    """An immutable view of one source: live records and tombstones, both ordered by RowVersion."""

    entity: EntitySpec
    records: pa.Table
    record_rowversions: np.ndarray
    record_changed_us: np.ndarray
    tombstones: pa.Table
    tombstone_rowversions: np.ndarray
    tombstone_changed_us: np.ndarray

    @property
    def max_rowversion(self) -> int:
        highest = [int(a[-1]) for a in (self.record_rowversions, self.tombstone_rowversions) if a.size]
        return max(highest, default=0)

    @property
    def max_changed_us(self) -> int | None:
        highest = [int(a.max()) for a in (self.record_changed_us, self.tombstone_changed_us) if a.size]
        return max(highest) if highest else None


def parse_changed_at(entity: EntitySpec, column: pa.ChunkedArray | pa.Array, name: str) -> np.ndarray:
    """Epoch microseconds (UTC) of ISO-8601 change times; refuses a missing or unparsable one."""
    try:
        parsed = pc.cast(column, pa.timestamp("us", tz="UTC"))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise SourceDataError(
            f"entity {entity.name!r}, field {name!r}: not an ISO-8601 time ({exc})"
        ) from None
    if parsed.null_count:
        position = pc.index(pc.is_null(parsed), True).as_py()
        raise SourceDataError(f"entity {entity.name!r}, field {name!r}: row {position} has no value")
    return np.asarray(parsed.cast(pa.int64()).to_numpy(zero_copy_only=False), dtype=np.int64)


def _tombstone_schema(entity: EntitySpec) -> pa.Schema:
    return pa.schema(
        [(source, pa.string()) for source in key_sources(entity)]
        + [(entity.rowversion, pa.int64()), (DELETED_AT, pa.string())]
    )


def build_state(entity: EntitySpec, records: pa.Table, tombstones: pa.Table | None = None) -> SourceState:
    """Validate and index one source's records (utf8 payload, int64 RowVersion, ISO ModifiedAt)."""
    payload = [spec.source for spec in entity.fields]
    expected = [*payload, entity.rowversion, entity.changed_at]
    missing = [c for c in expected if c not in records.column_names]
    if missing:
        raise SourceDataError(
            f"entity {entity.name!r}: source data lacks column(s) {missing}; it has {records.column_names}"
        )
    columns = []
    for source in payload:
        column = records.column(source)
        columns.append(column if column.type == pa.string() else pc.cast(column, pa.string()))
    rowversion = records.column(entity.rowversion)
    if not pa.types.is_integer(rowversion.type):
        raise SourceDataError(
            f"entity {entity.name!r}, field {entity.rowversion!r}: expected integers, got {rowversion.type}"
        )
    if rowversion.null_count:
        raise SourceDataError(f"entity {entity.name!r}, field {entity.rowversion!r}: null rowversion")
    changed = records.column(entity.changed_at)
    changed_text = changed if changed.type == pa.string() else pc.cast(changed, pa.string())
    table = pa.table(
        [*columns, pc.cast(rowversion, pa.int64()), changed_text],
        names=expected,
    )
    rowversions = np.asarray(table.column(entity.rowversion).to_numpy(), dtype=np.int64)
    if rowversions.size > 1 and not bool(np.all(rowversions[1:] > rowversions[:-1])):
        order = np.argsort(rowversions, kind="stable")
        table = table.take(order)
        rowversions = rowversions[order]
        duplicate = np.flatnonzero(rowversions[1:] == rowversions[:-1])
        if duplicate.size:
            twice = int(rowversions[duplicate[0]])
            raise SourceDataError(
                f"entity {entity.name!r}, field {entity.rowversion!r}: value {twice} "
                "appears twice (rowversions must be unique)"
            )
    table = table.combine_chunks()
    changed_us = parse_changed_at(entity, table.column(entity.changed_at), entity.changed_at)
    if tombstones is None:
        tombstones = _tombstone_schema(entity).empty_table()
    tomb_rv = np.asarray(tombstones.column(entity.rowversion).to_numpy(), dtype=np.int64)
    tomb_us = parse_changed_at(entity, tombstones.column(DELETED_AT), DELETED_AT)
    return SourceState(entity, table, rowversions, changed_us, tombstones.combine_chunks(), tomb_rv, tomb_us)


def page_of(
    rows: pa.Table,
    rowversions: np.ndarray,
    changed_us: np.ndarray,
    *,
    changed_from_us: int | None,
    changed_to_us: int | None,
    after_rowversion: int,
    snapshot_rowversion: int,
    limit: int,
    rowversion_to: int | None = None,
) -> Page:
    """Rows with after < RowVersion <= min(snapshot, rowversion_to), changed in [from, to), by RowVersion."""
    upper = snapshot_rowversion if rowversion_to is None else min(snapshot_rowversion, rowversion_to)
    lo = int(np.searchsorted(rowversions, after_rowversion, side="right"))
    hi = int(np.searchsorted(rowversions, upper, side="right"))
    window = changed_us[lo:hi]
    if changed_from_us is None and changed_to_us is None:
        selected = np.arange(lo, min(hi, lo + limit + 1))
    else:
        mask = np.ones(window.size, dtype=bool)
        if changed_from_us is not None:
            mask &= window >= changed_from_us
        if changed_to_us is not None:
            mask &= window < changed_to_us
        selected = lo + np.flatnonzero(mask)[: limit + 1]
    has_more = selected.size > limit
    selected = selected[:limit]
    if selected.size == 0:
        return Page(rows.slice(0, 0), after_rowversion, snapshot_rowversion, False)
    first, last = int(selected[0]), int(selected[-1])
    contiguous = last - first + 1 == selected.size  # the common case: a zero-copy slice
    page_rows = rows.slice(first, selected.size) if contiguous else rows.take(selected)
    return Page(page_rows, int(rowversions[last]), snapshot_rowversion, has_more)


class SourceCatalog:
    """What both source stores share: the catalog's sources by name and the current rowversion."""

    catalog: Catalog
    _by_source: dict[str, EntitySpec]
    _rowversion: int

    @property
    def sources(self) -> list[str]:
        return [self.catalog.entity(name).source for name in self.catalog.topological_order]

    @property
    def current_rowversion(self) -> int:
        return self._rowversion

    def entity(self, source: str) -> EntitySpec:
        try:
            return self._by_source[source]
        except KeyError:
            raise KeyError(source) from None


class ErpStore(SourceCatalog):
    """All sources of one stand-in, with change sets applied atomically."""

    def __init__(self, catalog: Catalog, dataset: Mapping[str, pa.Table]) -> None:
        self.catalog = catalog
        self._by_source = {entity.source: entity for entity in catalog.entities}
        self._lock = threading.Lock()
        self._initial = dict(dataset)
        self._states: dict[str, SourceState] = {}
        self._rowversion = 0
        self.reset()

    def reset(self) -> None:
        """Back to the data the store was created with; tombstones and change sets are forgotten."""
        states = {}
        for entity in self.catalog.entities:
            table = self._initial.get(entity.source)
            if table is None:
                raise SourceDataError(f"entity {entity.name!r}: no data for source {entity.source!r}")
            states[entity.source] = build_state(entity, table)
        with self._lock:
            self._states = states
            self._rowversion = max((s.max_rowversion for s in states.values()), default=0)

    def state(self, source: str) -> SourceState:
        return self._states[self.entity(source).source]

    def live_dataset(self) -> dict[str, pa.Table]:
        return {source: state.records for source, state in self._states.items()}

    def live_records(self) -> TableRecords:
        """What a generated change set draws from."""
        return TableRecords(self.live_dataset(), self.catalog)

    # The interface the API uses, shared with `parquet_store.ParquetErpStore`.

    def watermark(self, source: str) -> tuple[int, int, int | None]:
        """(max_rowversion, row_count, max_changed_us) of one source."""
        state = self.state(source)
        return state.max_rowversion, state.records.num_rows, state.max_changed_us

    def window(
        self,
        source: str,
        kind: str,
        *,
        after_rowversion: int,
        upper_rowversion: int,
        changed_from_us: int | None,
        changed_to_us: int | None,
        limit: int,
        snapshot_rowversion: int,
    ) -> Page:
        """Rows with after < RowVersion <= upper, changed in [from, to), in RowVersion order (one page)."""
        state = self.state(source)
        if kind == "changes":
            rows, rowversions, changed = state.records, state.record_rowversions, state.record_changed_us
        else:
            rows, rowversions, changed = (
                state.tombstones,
                state.tombstone_rowversions,
                state.tombstone_changed_us,
            )
        return page_of(
            rows,
            rowversions,
            changed,
            changed_from_us=changed_from_us,
            changed_to_us=changed_to_us,
            after_rowversion=after_rowversion,
            snapshot_rowversion=snapshot_rowversion,
            limit=limit,
            rowversion_to=upper_rowversion,
        )

    def key_batches(self, source: str) -> tuple[pa.Schema, Iterator[pa.RecordBatch]]:
        """Every live record's key columns and RowVersion."""
        entity = self.entity(source)
        keys = self.state(source).records.select([*key_sources(entity), entity.rowversion])
        return keys.schema, iter(keys.to_batches(max_chunksize=BATCH_ROWS))

    def record_batches(self, source: str) -> tuple[pa.Schema, Iterator[pa.RecordBatch]]:
        """Every live record as the API serves it, in RowVersion order."""
        records = self.state(source).records
        return records.schema, iter(records.to_batches(max_chunksize=BATCH_ROWS))

    def apply(self, change_set: ChangeSet, now: datetime | None = None) -> dict[str, dict[str, int]]:
        """Apply deletes then upserts, each bumping the rowversion; returns counts per source."""
        for source in (*change_set.upserts, *change_set.deletes):
            if source not in self._by_source:
                raise ChangeSetError(
                    f"unknown source {source!r}; known sources are {sorted(self._by_source)}"
                )
        summary: dict[str, dict[str, int]] = {}
        with self._lock:
            states = dict(self._states)
            counter = self._rowversion
            # Change times never go backwards, even if the data was generated with a future as_of.
            latest_us = max((s.max_changed_us or 0 for s in states.values()), default=0)
            now_us = max(int((now or datetime.now(UTC)).timestamp() * 1_000_000), latest_us)
            changed_text = format_changed_at(np.array([now_us // 1000], dtype=np.int64))[0].as_py()
            for name in self.catalog.topological_order:
                entity = self.catalog.entity(name)
                source = entity.source
                if source not in change_set.upserts and source not in change_set.deletes:
                    continue
                state = states[source]
                counts = {"updated": 0, "inserted": 0, "deleted": 0, "delete_not_found": 0}
                records = state.records
                tombstones = state.tombstones
                keys = key_sources(entity)
                record_keys = joined_keys(records, keys)
                if source in change_set.deletes:
                    wanted = joined_keys(change_set.deletes[source], keys)
                    hit = pc.is_in(record_keys, value_set=wanted)
                    found = records.filter(hit)
                    counts["deleted"] = found.num_rows
                    counts["delete_not_found"] = len(pc.unique(wanted)) - found.num_rows
                    if found.num_rows:
                        rowversions = np.arange(counter + 1, counter + 1 + found.num_rows, dtype=np.int64)
                        counter += found.num_rows
                        new_tombs = pa.table(
                            [
                                *(found.column(k) for k in keys),
                                pa.array(rowversions),
                                pa.array([changed_text] * found.num_rows, pa.string()),
                            ],
                            schema=tombstones.schema,
                        )
                        tombstones = pa.concat_tables([tombstones, new_tombs])
                        records = records.filter(pc.invert(hit))
                        record_keys = joined_keys(records, keys)
                if source in change_set.upserts:
                    incoming = change_set.upserts[source]
                    incoming_keys = joined_keys(incoming, keys)
                    if len(pc.unique(incoming_keys)) != incoming.num_rows:
                        raise ChangeSetError(f"entity {entity.name!r}: the upserts list one key twice")
                    replaced = pc.is_in(record_keys, value_set=incoming_keys)
                    counts["updated"] = int(np.count_nonzero(replaced.to_numpy(zero_copy_only=False)))
                    counts["inserted"] = incoming.num_rows - counts["updated"]
                    rowversions = np.arange(counter + 1, counter + 1 + incoming.num_rows, dtype=np.int64)
                    counter += incoming.num_rows
                    payload = [spec.source for spec in entity.fields]
                    new_rows = pa.table(
                        [
                            *(pc.cast(incoming.column(c), pa.string()) for c in payload),
                            pa.array(rowversions),
                            pa.array([changed_text] * incoming.num_rows, pa.string()),
                        ],
                        schema=records.schema,
                    )
                    records = pa.concat_tables([records.filter(pc.invert(replaced)), new_rows])
                states[source] = build_state(entity, records, tombstones)
                summary[source] = counts
            self._states = states
            self._rowversion = counter
        return summary
