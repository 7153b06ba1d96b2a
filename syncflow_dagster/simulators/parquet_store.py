"""The APISmith stand-in's data read from Parquet on disk, for sources too large to hold in memory.

A source folder holds, per catalog entity, `<Source>.parquet` or a directory
`<Source>/` of Parquet files, each with the entity's source columns plus
`RowVersion` (integer) and `ModifiedAt` (a timestamp, or ISO-8601 text). At
start only the files' metadata is read: one entry per row group with its
RowVersion and ModifiedAt range from the Parquet statistics. A page of
`/changes` reads just the row groups whose ranges can hold it, in RowVersion
order, each with a pyarrow.dataset filter on RowVersion (and ModifiedAt when
it is a timestamp), and stops as soon as no unread row group can hold a
smaller RowVersion than the page's last; so memory follows the page size, not
the source. The watermark comes from the same metadata (O(1) per request).

Change sets are appended, never rewritten: each one becomes a directory
`<folder>/_changes/<NNNNNN>/` with, per source, the upserted records
(`<Source>.upserts.parquet`, new rowversions), the tombstones
(`<Source>.tombstones.parquet`) and the rowversions they supersede
(`<Source>.superseded.parquet`: the old versions of updated and deleted
records, which reads skip). The directory is written under a temporary name
and renamed, so a crash leaves a change set applied whole or not at all; a
restart replays `_changes/`, and `POST /admin/reset` removes it. A generated
change set draws from `DiskRecords`, which reads only the columns and rows it
asks for.
"""

from __future__ import annotations

import shutil
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from syncflow_dagster.catalog.models import KEY_SEPARATOR, Catalog, EntitySpec
from syncflow_dagster.simulators.changes import ChangeSet, ChangeSetError, joined_keys, key_sources
from syncflow_dagster.simulators.datagen import iso_millis
from syncflow_dagster.simulators.erp_store import (
    DELETED_AT,
    Page,
    SourceCatalog,
    SourceDataError,
    parse_changed_at,
)

CHANGES_DIR = "_changes"
# Decoded row groups kept for the next page (each about 10 MB at 65 536 rows of an ERP entity).
DECODED_GROUPS = 4
_compute: Any = pc
_UTC_US = pa.timestamp("us", tz="UTC")


def changed_text(column: Any) -> pa.Array | pa.ChunkedArray:
    """A change-time column as the API serves it: ISO-8601 text with milliseconds and +00:00.

    Text stays as it is; a timestamp (naive = UTC) is written like generated data's ModifiedAt.
    """
    if not pa.types.is_timestamp(column.type):
        result: pa.Array = column if column.type == pa.string() else column.cast(pa.string())
        return result
    return iso_millis(column)


def _micros(column: Any, entity: EntitySpec, name: str) -> np.ndarray:
    """Epoch microseconds of a change-time column (timestamp or ISO text)."""
    if pa.types.is_timestamp(column.type):
        if column.type.tz is None:
            column = pc.assume_timezone(column, "UTC")
        values = pc.cast(column, _UTC_US).cast(pa.int64())
        if values.null_count:
            raise SourceDataError(f"entity {entity.name!r}, field {name!r}: a row has no value")
        return np.asarray(values.to_numpy(zero_copy_only=False), dtype=np.int64)
    return parse_changed_at(entity, column, name)


def _stat_micros(value: Any) -> int | None:
    if isinstance(value, datetime):
        moment = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
        return int(moment.timestamp() * 1_000_000)
    return None


@dataclass(frozen=True)
class RowGroup:
    """One Parquet row group: where it is, and the RowVersion / change-time range its statistics give."""

    fragment: ds.ParquetFileFragment
    rows: int
    min_rv: int
    max_rv: int
    # From the statistics of a timestamp column; for text change times, read once at start.
    min_us: int | None
    max_us: int | None
    timestamp_changes: bool


@dataclass
class DiskSource:
    """One source: its record and tombstone row groups and the rowversions change sets superseded."""

    entity: EntitySpec
    records: list[RowGroup] = field(default_factory=list)
    tombstones: list[RowGroup] = field(default_factory=list)
    superseded: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    # Kept as the row groups come in (`add`), so a watermark is O(1).
    max_rowversion: int = 0
    max_changed_us: int | None = None
    record_rows: int = 0

    def add(self, groups: list[RowGroup], *, tombstones: bool = False) -> None:
        (self.tombstones if tombstones else self.records).extend(groups)
        for group in groups:
            self.max_rowversion = max(self.max_rowversion, group.max_rv)
            if group.max_us is not None:
                self.max_changed_us = max(self.max_changed_us or group.max_us, group.max_us)
            if not tombstones:
                self.record_rows += group.rows

    @property
    def row_count(self) -> int:
        return self.record_rows - int(self.superseded.size)


def _row_groups(entity: EntitySpec, path: Path, changed: str) -> list[RowGroup]:
    """The row groups of one Parquet file with their ranges; refuses a file SyncFlow cannot page."""
    try:
        metadata = pq.read_metadata(path)
    except (OSError, pa.ArrowInvalid) as exc:
        raise SourceDataError(
            f"entity {entity.name!r}, file {path}: not a readable Parquet file ({exc})"
        ) from None
    schema = metadata.schema.to_arrow_schema()
    for name in (entity.rowversion, changed):
        if name not in schema.names:
            raise SourceDataError(
                f"entity {entity.name!r}, file {path}: column {name!r} missing; the file has {schema.names}"
            )
    if not pa.types.is_integer(schema.field(entity.rowversion).type):
        raise SourceDataError(
            f"entity {entity.name!r}, file {path}, field {entity.rowversion!r}: expected integers, "
            f"got {schema.field(entity.rowversion).type}"
        )
    timestamp_changes = pa.types.is_timestamp(schema.field(changed).type)
    rv_index = schema.names.index(entity.rowversion)
    changed_index = schema.names.index(changed)
    fragment = next(iter(ds.dataset(path, format="parquet").get_fragments()))
    reader = pq.ParquetFile(path)
    groups = []
    for index in range(metadata.num_row_groups):
        group = metadata.row_group(index)
        if group.num_rows == 0:
            continue
        rv_stats: Any = group.column(rv_index).statistics
        if rv_stats is None or not rv_stats.has_min_max or rv_stats.null_count:
            raise SourceDataError(
                f"entity {entity.name!r}, file {path}, field {entity.rowversion!r}: row group {index} has "
                "no min/max statistics or null rowversions; rewrite the file with statistics"
            )
        min_us = max_us = None
        changed_stats = group.column(changed_index).statistics
        if timestamp_changes and changed_stats is not None and changed_stats.has_min_max:
            min_us, max_us = _stat_micros(changed_stats.min), _stat_micros(changed_stats.max)
        if min_us is None or max_us is None:
            # Text change times (or no statistics): their range is read once, at start.
            micros = _micros(reader.read_row_group(index, columns=[changed]).column(0), entity, changed)
            min_us, max_us = int(micros.min()), int(micros.max())
        groups.append(
            RowGroup(
                fragment.subset(row_group_ids=[index]),
                group.num_rows,
                int(rv_stats.min),
                int(rv_stats.max),
                min_us,
                max_us,
                timestamp_changes,
            )
        )
    return groups


def _source_files(entity: EntitySpec, folder: Path) -> list[Path]:
    single = folder / f"{entity.source}.parquet"
    many = folder / entity.source
    if single.is_file():
        return [single]
    if many.is_dir():
        files = sorted(p for p in many.rglob("*.parquet") if p.is_file())
        if files:
            return files
    raise SourceDataError(
        f"entity {entity.name!r}: neither {single.name} nor a folder {many.name}/ of Parquet files in {folder}"
    )


def is_disk_source(catalog: Catalog, folder: Path) -> bool:
    """Whether every entity of `catalog` is Parquet in `folder` with RowVersion and ModifiedAt columns."""
    for entity in catalog.entities:
        try:
            files = _source_files(entity, folder)
        except SourceDataError:
            return False
        for path in files:
            names = pq.read_schema(path).names
            if entity.rowversion not in names or entity.changed_at not in names:
                return False
    return True


class ParquetErpStore(SourceCatalog):
    """All sources of a folder of Parquet files, served without loading them (see module doc)."""

    def __init__(self, catalog: Catalog, folder: Path) -> None:
        if not folder.is_dir():
            raise SourceDataError(f"source folder {folder} does not exist or is not a directory")
        self.catalog = catalog
        self.folder = folder
        self._by_source = {entity.source: entity for entity in catalog.entities}
        self._lock = threading.Lock()
        self._cache_lock = threading.Lock()
        self._cache: OrderedDict[tuple[str, int, bool], tuple[pa.Table, np.ndarray, np.ndarray]] = (
            OrderedDict()
        )
        self._sources: dict[str, DiskSource] = {}
        self._rowversion = 0
        self.reset(remove_changes=False)

    # --- opening ------------------------------------------------------------------------------------

    def reset(self, remove_changes: bool = True) -> None:
        """Back to the folder's own files: change sets (the `_changes` directory) are removed."""
        changes = self.folder / CHANGES_DIR
        if remove_changes:
            shutil.rmtree(changes, ignore_errors=True)
        sources: dict[str, DiskSource] = {}
        for entity in self.catalog.entities:
            source = DiskSource(entity)
            for path in _source_files(entity, self.folder):
                source.add(_row_groups(entity, path, entity.changed_at))
            sources[entity.source] = source
        if changes.is_dir():
            for applied in sorted(p for p in changes.iterdir() if p.is_dir() and not p.name.startswith(".")):
                self._load_change_set(sources, applied)
        with self._lock:
            self._sources = sources
            self._rowversion = max((s.max_rowversion for s in sources.values()), default=0)
        with self._cache_lock:
            self._cache.clear()

    def _load_change_set(self, sources: dict[str, DiskSource], folder: Path) -> None:
        for source in sources.values():
            entity = source.entity
            upserts = folder / f"{entity.source}.upserts.parquet"
            tombstones = folder / f"{entity.source}.tombstones.parquet"
            superseded = folder / f"{entity.source}.superseded.parquet"
            if upserts.is_file():
                source.add(_row_groups(entity, upserts, entity.changed_at))
            if tombstones.is_file():
                source.add(_row_groups(entity, tombstones, DELETED_AT), tombstones=True)
            if superseded.is_file():
                gone = pq.read_table(superseded).column(entity.rowversion).to_numpy()
                source.superseded = np.union1d(source.superseded, np.asarray(gone, dtype=np.int64))

    # --- the store interface the API uses -------------------------------------------------------------

    def watermark(self, source: str) -> tuple[int, int, int | None]:
        """(max_rowversion, row_count, max_changed_us) from the row groups' statistics."""
        state = self._sources[self.entity(source).source]
        return state.max_rowversion, state.row_count, state.max_changed_us

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
        state = self._sources[self.entity(source).source]
        entity = state.entity
        tombstones = kind == "tombstones"
        groups = state.tombstones if tombstones else state.records
        candidates = sorted(
            (
                g
                for g in groups
                if g.max_rv > after_rowversion
                and g.min_rv <= upper_rowversion
                and not (changed_from_us is not None and g.max_us is not None and g.max_us < changed_from_us)
                and not (changed_to_us is not None and g.min_us is not None and g.min_us >= changed_to_us)
            ),
            key=lambda g: g.min_rv,
        )
        parts: list[pa.Table] = []
        ready = 0
        for index, group in enumerate(candidates):
            table, rowversions, micros = self._decoded(group, entity, tombstones)
            lo = int(np.searchsorted(rowversions, after_rowversion, side="right"))
            hi = int(np.searchsorted(rowversions, upper_rowversion, side="right"))
            keep = np.ones(hi - lo, dtype=bool)
            if changed_from_us is not None:
                keep &= micros[lo:hi] >= changed_from_us
            if changed_to_us is not None:
                keep &= micros[lo:hi] < changed_to_us
            if not tombstones:
                keep &= ~_superseded(rowversions[lo:hi], state.superseded)
            # The common case is a zero-copy slice of the cached group.
            part = table.slice(lo, hi - lo) if keep.all() else table.take(lo + np.flatnonzero(keep))
            if part.num_rows:
                parts.append(part)
            # Rows below the next group's smallest rowversion can no longer be preceded by an unread one.
            bound = candidates[index + 1].min_rv if index + 1 < len(candidates) else None
            ready = sum(
                t.num_rows
                if bound is None
                else int(np.count_nonzero(t.column(entity.rowversion).to_numpy() < bound))
                for t in parts
            )
            if ready > limit:
                break
        if not parts:
            rows = self._served_schema(entity, tombstones).empty_table()
        elif len(parts) == 1:
            rows = parts[0]
        else:
            rows = pa.concat_tables(parts)
        if rows.num_rows:
            rowversions = np.asarray(rows.column(entity.rowversion).to_numpy(), dtype=np.int64)
            if rowversions.size > 1 and not bool(np.all(rowversions[1:] > rowversions[:-1])):
                rows = rows.take(np.argsort(rowversions, kind="stable")[: limit + 1])
        has_more = rows.num_rows > limit
        rows = rows.slice(0, limit)
        served = rows
        if served.num_rows == 0:
            return Page(served, after_rowversion, snapshot_rowversion, False)
        last = int(served.column(entity.rowversion)[-1].as_py())
        return Page(served, last, snapshot_rowversion, has_more)

    def key_batches(self, source: str) -> tuple[pa.Schema, Iterator[pa.RecordBatch]]:
        """Every live record's key columns and RowVersion, a row group at a time."""
        state = self._sources[self.entity(source).source]
        entity = state.entity
        names = [*key_sources(entity), entity.rowversion]
        schema = pa.schema(
            [(k, pa.string()) for k in key_sources(entity)] + [(entity.rowversion, pa.int64())]
        )

        def batches() -> Iterator[pa.RecordBatch]:
            for group in sorted(state.records, key=lambda g: g.min_rv):
                table = self._live(group.fragment.to_table(columns=names), entity, state.superseded)
                if table.num_rows:
                    yield from table.cast(schema).to_batches()

        return schema, batches()

    def record_batches(self, source: str) -> tuple[pa.Schema, Iterator[pa.RecordBatch]]:
        """Every live record as the API serves it, a row group at a time (RowVersion order per group)."""
        state = self._sources[self.entity(source).source]
        entity = state.entity
        columns = self._columns(entity, False)
        schema = self._served_schema(entity, False)

        def batches() -> Iterator[pa.RecordBatch]:
            for group in sorted(state.records, key=lambda g: g.min_rv):
                table = self._live(group.fragment.to_table(columns=columns), entity, state.superseded)
                if table.num_rows:
                    order = np.argsort(table.column(entity.rowversion).to_numpy(), kind="stable")
                    yield from self._served(table.take(order), entity, entity.changed_at).to_batches()

        return schema, batches()

    # --- reading helpers ----------------------------------------------------------------------------

    def _decoded(
        self, group: RowGroup, entity: EntitySpec, tombstones: bool
    ) -> tuple[pa.Table, np.ndarray, np.ndarray]:
        """One row group as served (RowVersion order), its rowversions and change times, cached.

        Consecutive pages mostly continue in the same row group: the last few
        decoded groups are kept (`DECODED_GROUPS`), so paging decodes each once.
        """
        key = (group.fragment.path, group.fragment.row_groups[0].id, tombstones)
        with self._cache_lock:
            found = self._cache.get(key)
            if found is not None:
                self._cache.move_to_end(key)
                return found
        changed = DELETED_AT if tombstones else entity.changed_at
        try:
            table = group.fragment.to_table(columns=self._columns(entity, tombstones))
        except (pa.ArrowInvalid, OSError) as exc:
            raise SourceDataError(
                f"entity {entity.name!r}: cannot read {group.fragment.path} ({exc})"
            ) from None
        micros = _micros(table.column(changed), entity, changed)
        rowversions = np.asarray(
            pc.cast(table.column(entity.rowversion), pa.int64()).to_numpy(), dtype=np.int64
        )
        served = self._served(table, entity, changed)
        if rowversions.size > 1 and not bool(np.all(rowversions[1:] >= rowversions[:-1])):
            order = np.argsort(rowversions, kind="stable")
            served, rowversions, micros = served.take(order), rowversions[order], micros[order]
        decoded = (served.combine_chunks(), rowversions, micros)
        with self._cache_lock:
            self._cache[key] = decoded
            while len(self._cache) > DECODED_GROUPS:
                self._cache.popitem(last=False)
        return decoded

    @staticmethod
    def _columns(entity: EntitySpec, tombstones: bool) -> list[str]:
        if tombstones:
            return [*key_sources(entity), entity.rowversion, DELETED_AT]
        return [*(spec.source for spec in entity.fields), entity.rowversion, entity.changed_at]

    @staticmethod
    def _served_schema(entity: EntitySpec, tombstones: bool) -> pa.Schema:
        names = ParquetErpStore._columns(entity, tombstones)
        return pa.schema(
            [(n, pa.string()) for n in names[:-2]] + [(names[-2], pa.int64()), (names[-1], pa.string())]
        )

    @staticmethod
    def _live(table: pa.Table, entity: EntitySpec, superseded: np.ndarray) -> pa.Table:
        if table.num_rows == 0 or superseded.size == 0:
            return table
        rowversions = np.asarray(table.column(entity.rowversion).to_numpy(), dtype=np.int64)
        at = np.minimum(np.searchsorted(superseded, rowversions), superseded.size - 1)
        dead = superseded[at] == rowversions
        return table.filter(pa.array(~dead)) if dead.any() else table

    @staticmethod
    def _served(table: pa.Table, entity: EntitySpec, changed: str) -> pa.Table:
        columns: list[Any] = []
        for name in table.column_names:
            column = table.column(name)
            if name == entity.rowversion:
                columns.append(pc.cast(column, pa.int64()))
            elif name == changed:
                columns.append(changed_text(column))
            else:
                columns.append(column if column.type == pa.string() else pc.cast(column, pa.string()))
        return pa.table(columns, names=table.column_names)

    # --- change sets -------------------------------------------------------------------------------

    def _live_rowversions_of(self, state: DiskSource, keys: pa.Array) -> tuple[pa.Array, np.ndarray]:
        """The joined keys among `keys` that are live, and their current rowversions (one scan of the keys)."""
        entity = state.entity
        names = [*key_sources(entity), entity.rowversion]
        found_keys: list[pa.Array] = []
        found_rv: list[np.ndarray] = []
        if len(keys) == 0:
            return pa.array([], pa.string()), np.zeros(0, dtype=np.int64)
        for group in state.records:
            table = self._live(group.fragment.to_table(columns=names), entity, state.superseded)
            if table.num_rows == 0:
                continue
            joined = joined_keys(
                table.cast(
                    pa.schema(
                        [(k, pa.string()) for k in key_sources(entity)] + [(entity.rowversion, pa.int64())]
                    )
                ),
                key_sources(entity),
            )
            hit = pc.is_in(joined, value_set=keys)
            if _compute.any(hit).as_py():
                found_keys.append(joined.filter(hit))
                found_rv.append(
                    np.asarray(table.column(entity.rowversion).filter(hit).to_numpy(), dtype=np.int64)
                )
        if not found_keys:
            return pa.array([], pa.string()), np.zeros(0, dtype=np.int64)
        # In RowVersion order, as the records are: tombstones take their rowversions in that order.
        rowversions = np.concatenate(found_rv)
        order = np.argsort(rowversions, kind="stable")
        return pa.concat_arrays(found_keys).take(order), rowversions[order]

    def apply(self, change_set: ChangeSet, now: datetime | None = None) -> dict[str, dict[str, int]]:
        """Deletes then upserts per source, each taking the next rowversions; appended as one change-set directory."""
        for source in (*change_set.upserts, *change_set.deletes):
            if source not in self._by_source:
                raise ChangeSetError(
                    f"unknown source {source!r}; known sources are {sorted(self._by_source)}"
                )
        with self._lock:
            counter = self._rowversion
            latest_us = max((s.max_changed_us or 0 for s in self._sources.values()), default=0)
            now_us = max(int((now or datetime.now(UTC)).timestamp() * 1_000_000), latest_us)
            now_ms = now_us // 1000
            changes = self.folder / CHANGES_DIR
            changes.mkdir(exist_ok=True)
            number = 1 + max((int(p.name) for p in changes.iterdir() if p.name.isdigit()), default=0)
            staging = changes / f".{number:06d}"
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir()
            summary: dict[str, dict[str, int]] = {}
            try:
                for name in self.catalog.topological_order:
                    entity = self.catalog.entity(name)
                    source = entity.source
                    if source not in change_set.upserts and source not in change_set.deletes:
                        continue
                    counts, counter = self._stage(staging, self._sources[source], change_set, counter, now_ms)
                    summary[source] = counts
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            staging.rename(changes / f"{number:06d}")
            self._load_change_set(self._sources, changes / f"{number:06d}")
            self._rowversion = counter
        return summary

    def _stage(
        self, staging: Path, state: DiskSource, change_set: ChangeSet, counter: int, now_ms: int
    ) -> tuple[dict[str, int], int]:
        entity = state.entity
        source = entity.source
        keys = key_sources(entity)
        counts = {"updated": 0, "inserted": 0, "deleted": 0, "delete_not_found": 0}
        wanted_delete = (
            joined_keys(change_set.deletes[source], keys)
            if source in change_set.deletes
            else pa.array([], pa.string())
        )
        incoming = change_set.upserts.get(source)
        incoming_keys = joined_keys(incoming, keys) if incoming is not None else pa.array([], pa.string())
        if incoming is not None and len(pc.unique(incoming_keys)) != incoming.num_rows:
            raise ChangeSetError(f"entity {entity.name!r}: the upserts list one key twice")
        lookup = pc.unique(
            pa.concat_arrays([wanted_delete.cast(pa.string()), incoming_keys.cast(pa.string())])
        )
        found_keys, found_rv = self._live_rowversions_of(state, lookup)
        superseded: list[np.ndarray] = []
        stamp = pa.array(np.full(1, now_ms, dtype=np.int64), pa.timestamp("ms", tz="UTC"))
        if len(wanted_delete):
            hit = np.asarray(
                pc.is_in(found_keys, value_set=wanted_delete).to_numpy(zero_copy_only=False), dtype=bool
            )
            gone_keys = found_keys.filter(pa.array(hit))
            counts["deleted"] = len(gone_keys)
            counts["delete_not_found"] = len(pc.unique(wanted_delete)) - len(gone_keys)
            if len(gone_keys):
                superseded.append(found_rv[hit])
                rowversions = np.arange(counter + 1, counter + 1 + len(gone_keys), dtype=np.int64)
                counter += len(gone_keys)
                parts = _split_keys(gone_keys, len(keys))
                tombs = pa.table(
                    [
                        *parts,
                        pa.array(rowversions),
                        changed_text(stamp.take(np.zeros(len(gone_keys), dtype=np.int64))),
                    ],
                    names=[*keys, entity.rowversion, DELETED_AT],
                )
                pq.write_table(tombs, staging / f"{source}.tombstones.parquet")
            remaining = ~hit
            found_keys, found_rv = found_keys.filter(pa.array(remaining)), found_rv[remaining]
        if incoming is not None and incoming.num_rows:
            replaced = np.asarray(
                pc.is_in(found_keys, value_set=incoming_keys).to_numpy(zero_copy_only=False), dtype=bool
            )
            counts["updated"] = int(replaced.sum())
            counts["inserted"] = incoming.num_rows - counts["updated"]
            superseded.append(found_rv[replaced])
            rowversions = np.arange(counter + 1, counter + 1 + incoming.num_rows, dtype=np.int64)
            counter += incoming.num_rows
            payload = [spec.source for spec in entity.fields]
            rows = pa.table(
                [
                    *(pc.cast(incoming.column(c), pa.string()) for c in payload),
                    pa.array(rowversions),
                    stamp.take(np.zeros(incoming.num_rows, dtype=np.int64)),
                ],
                names=[*payload, entity.rowversion, entity.changed_at],
            )
            pq.write_table(rows, staging / f"{source}.upserts.parquet")
        if superseded:
            gone = np.sort(np.concatenate(superseded))
            pq.write_table(
                pa.table({entity.rowversion: pa.array(gone)}), staging / f"{source}.superseded.parquet"
            )
        return counts, counter

    def live_records(self) -> DiskRecords:
        """What a generated change set draws from, read column by column as it asks (bounded memory)."""
        return DiskRecords(self)


class DiskRecords:
    """`changes.LiveRecords` over a Parquet store: each question reads only the columns it needs.

    Live records are addressed by position in RowVersion order, as in memory;
    an entity's live rowversions (8 bytes a record) are read once and kept
    for the change set being drawn.
    """

    def __init__(self, store: ParquetErpStore) -> None:
        self.store = store
        self._rowversions: dict[str, np.ndarray] = {}

    def _state(self, entity: EntitySpec) -> DiskSource:
        return self.store._sources[entity.source]

    def live_rowversions(self, entity: EntitySpec) -> np.ndarray:
        found = self._rowversions.get(entity.source)
        if found is None:
            state = self._state(entity)
            parts = [
                np.asarray(
                    pc.cast(
                        g.fragment.to_table(columns=[entity.rowversion]).column(0), pa.int64()
                    ).to_numpy(),
                    dtype=np.int64,
                )
                for g in state.records
            ]
            every = np.sort(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)
            found = every[~_superseded(every, state.superseded)]
            self._rowversions[entity.source] = found
        return found

    def count(self, entity: EntitySpec) -> int:
        return self._state(entity).row_count

    def hits(self, entity: EntitySpec, columns: list[str], values: pa.Array) -> np.ndarray:
        live = self.live_rowversions(entity)
        mask = np.zeros(live.size, dtype=bool)
        for group in self._state(entity).records:
            table = group.fragment.to_table(columns=[*columns, entity.rowversion])
            text = pa.table([pc.cast(table.column(c), pa.string()) for c in columns], names=columns)
            hit: Any = pc.is_in(joined_keys(text, columns), value_set=values)
            hit = np.asarray(hit.fill_null(False).to_numpy(zero_copy_only=False), dtype=bool)
            if hit.any():
                rowversions = np.asarray(
                    pc.cast(table.column(entity.rowversion), pa.int64()).to_numpy(), dtype=np.int64
                )
                found = rowversions[hit]
                at = np.searchsorted(live, found)
                inside = at < live.size
                at, found = at[inside], found[inside]
                mask[at[live[at] == found]] = True
        return mask

    def rows(self, entity: EntitySpec, positions: np.ndarray, columns: list[str]) -> pa.Table:
        wanted = self.live_rowversions(entity)[positions]
        if wanted.size == 0:
            return pa.schema([(c, pa.string()) for c in columns]).empty_table()
        parts: list[pa.Table] = []
        for group in self._state(entity).records:
            lo = int(np.searchsorted(wanted, group.min_rv, side="left"))
            hi = int(np.searchsorted(wanted, group.max_rv, side="right"))
            if hi <= lo:
                continue
            table = group.fragment.to_table(columns=[*columns, entity.rowversion])
            rowversions = np.asarray(
                pc.cast(table.column(entity.rowversion), pa.int64()).to_numpy(), dtype=np.int64
            )
            at = np.minimum(np.searchsorted(wanted, rowversions), wanted.size - 1)
            keep = wanted[at] == rowversions
            if keep.any():
                parts.append(table.filter(pa.array(keep)))
        schema = pa.schema([(c, pa.string()) for c in columns] + [(entity.rowversion, pa.int64())])
        if not parts:
            return pa.schema([(c, pa.string()) for c in columns]).empty_table()
        found = pa.concat_tables([t.cast(schema) for t in parts])
        order = np.argsort(
            np.asarray(found.column(entity.rowversion).to_numpy(), dtype=np.int64), kind="stable"
        )
        return found.take(order).select(columns)

    def max_rowversion(self) -> int:
        highest = [self.live_rowversions(e) for e in self.store.catalog.entities]
        return max((int(r[-1]) for r in highest if r.size), default=0)


def _superseded(rowversions: np.ndarray, superseded: np.ndarray) -> np.ndarray:
    """Which of `rowversions` a change set superseded (`superseded` is sorted)."""
    if superseded.size == 0 or rowversions.size == 0:
        return np.zeros(rowversions.size, dtype=bool)
    at = np.minimum(np.searchsorted(superseded, rowversions), superseded.size - 1)
    found: np.ndarray = superseded[at] == rowversions
    return found


def _split_keys(joined: pa.Array, parts: int) -> list[pa.Array]:
    """Joined key texts back into their key columns (the unit separator of `joined_keys`)."""
    if parts == 1:
        return [joined]
    split = _compute.split_pattern(joined, KEY_SEPARATOR)
    return [_compute.list_element(split, i) for i in range(parts)]
