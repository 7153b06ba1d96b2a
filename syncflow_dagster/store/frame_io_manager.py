"""The Postgres frame IO manager: each stage's frame per entity × date, as Arrow IPC chunks.

It follows the shape of Dagster's own `DbIOManager` (a client that knows the
database, type handlers that know the frame library) for Postgres, which has
no maintained first-party one:

* `PostgresFrameClient` owns the SQL: one UNLOGGED table per asset × entity in
  schema `syncflow_stage` (stage frames can always be rebuilt, so they skip
  the WAL). A frame is stored as chunks of `CHUNK_ROWS` rows, each one Arrow
  IPC stream (LZ4-compressed buffers) in a `bytea`, with its `_partition_date`,
  sequence number and row count; the catalog table `_frames` holds each
  table's exact Arrow schema, so dtypes (decimal scale, 16-byte hashes, int16,
  tz-aware timestamps) come back exactly as they went in. Writing a partition
  deletes its slice and COPYs the new chunks in ONE transaction, which also
  records the slice's row count per date in the logged table `_slices`: crash
  recovery (an immediate stop, a power loss) empties UNLOGGED tables, and a
  read that finds other than the rows written refuses the frame rather than
  hand a stage an empty one.

  Why chunks rather than one table row per frame row (the first design):
  at 1M rows a row-per-row frame cost about 2 s of this process's CPU and 3 s
  of Postgres's to write (binary COPY of every value, numeric conversion,
  tuple formation) and 6 s to read back, and the nine stages write eight
  frames; on two cores that was the largest consumer of the whole sync, and
  every out-of-process step (the multiprocess executor, re-execution) paid
  the read. Chunks cost about 0.8 s and 0.5 s to write and 0.5 s to read.
  The frames stay in Postgres, under the same retention and crash checks;
  read one with `PostgresFrameClient.select_slice` (or the IO manager).
* `ArrowFrameHandler` and `PandasFrameHandler` convert frames to and from Arrow.
* `PostgresFrameIOManager` maps Dagster partitions onto slices: one
  (entity, date) key, or a contiguous range of dates for one entity, so
  single-run backfills over a date range load and store exactly that range.
  A run over several entities (a single-run backfill of a few days × many
  entities groups by date) hands over `EntityFrames`, one frame per entity,
  and each is stored in and loaded from its entity's own table.
"""

from __future__ import annotations

import atexit
import datetime as dt
import hashlib
import re
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any, Protocol

import dagster as dg
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from syncflow_dagster.store.database import libpq_url

PARTITION_COLUMN = "_partition_date"
STAGE_SCHEMA = "syncflow_stage"
_FRAMES_TABLE = "_frames"
_SLICES_TABLE = "_slices"
_IDENT = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
# Stage tables are replaced wholesale (TRUNCATE) or by date (DELETE); autovacuum on
# them only competed with the pipeline for CPU after every million-row write, and a
# TRUNCATE that met it waited deadlock_timeout (1 s) before Postgres cancelled it:
# about 3 s of a 1M-row incremental run. `prune` vacuums what it deleted instead.
_NO_AUTOVACUUM = "autovacuum_enabled = false, toast.autovacuum_enabled = false"


class FrameStoreError(RuntimeError):
    """A frame could not be stored or loaded; the message names the table and why."""


class FrameLostError(FrameStoreError):
    """A stored slice has fewer rows than were written: crash recovery emptied its UNLOGGED table."""


def _quote(identifier: str, pattern: re.Pattern[str] = _IDENT) -> str:
    if not pattern.match(identifier):
        raise FrameStoreError(f"refusing unsafe SQL identifier {identifier!r}")
    return f'"{identifier}"'


def stage_table_name(asset_name: str, entity: str) -> str:
    """`<asset>__<entity>`, shortened with a digest when over Postgres's 63 bytes."""
    name = f"{asset_name}__{entity}".lower()
    if len(name) <= 63:
        return name
    digest = hashlib.blake2b(name.encode(), digest_size=4).hexdigest()
    return f"{name[:54]}_{digest}"


# A stored chunk: its date, its place in the slice, its rows and their Arrow IPC stream.
_SEQ, _ROWS, _IPC = "seq", "rows", "ipc"
CHUNK_ROWS = 65_536
_IPC_OPTIONS = pa.ipc.IpcWriteOptions(compression="lz4")
_CHUNK_FIELDS: list[Any] = [
    pa.field(PARTITION_COLUMN, pa.date32(), nullable=False),
    pa.field(_SEQ, pa.int32(), nullable=False),
    pa.field(_ROWS, pa.int32(), nullable=False),
    pa.field(_IPC, pa.binary(), nullable=False),
]
_CHUNK_SCHEMA = pa.schema(_CHUNK_FIELDS)


def _chunks(frame: pa.Table, counts: dict[dt.date, int]) -> Iterator[pa.RecordBatch]:
    """The frame as stored chunks: per date, runs of CHUNK_ROWS rows, each one IPC stream.

    `counts` is the frame's rows per date (`_rows_per_date`).
    """
    for day, rows in _by_date(frame, counts):
        for seq, start in enumerate(range(0, rows.num_rows, CHUNK_ROWS)):
            piece = rows.slice(start, CHUNK_ROWS)
            sink = pa.BufferOutputStream()
            with pa.ipc.new_stream(sink, frame.schema, options=_IPC_OPTIONS) as writer:
                writer.write_table(piece)
            blob = sink.getvalue()
            offsets = pa.py_buffer(np.array([0, blob.size], dtype=np.int32).tobytes())
            yield pa.record_batch(
                [
                    pa.array([day], pa.date32()),
                    pa.array([seq], pa.int32()),
                    pa.array([piece.num_rows], pa.int32()),
                    pa.Array.from_buffers(pa.binary(), 1, [None, offsets, blob]),
                ],
                schema=_CHUNK_SCHEMA,
            )


def _by_date(frame: pa.Table, counts: dict[dt.date, int]) -> Iterator[tuple[dt.date, pa.Table]]:
    """(date, that date's rows) for each date with rows; no copy when there is one date."""
    counts = {day: rows for day, rows in counts.items() if rows}
    if len(counts) <= 1:
        for day in counts:
            yield day, frame
        return
    ordered = frame.take(pc.sort_indices(frame[PARTITION_COLUMN]))
    start = 0
    for day in sorted(counts):
        yield day, ordered.slice(start, counts[day])
        start += counts[day]


def _read_chunks(blobs: pa.ChunkedArray, schema: pa.Schema, table: str) -> pa.Table:
    """The stored chunks' rows, in order, as one table of the stored schema."""
    parts = []
    for chunk in blobs.chunks:
        for index in range(len(chunk)):
            part = pa.ipc.open_stream(chunk[index].as_buffer()).read_all()
            if not part.schema.equals(schema):
                raise FrameStoreError(f"stage table {table} holds a chunk of another schema: {part.schema}")
            parts.append(part)
    return pa.concat_tables(parts) if parts else schema.empty_table()


class FrameHandler(Protocol):
    """Converts one frame library's objects to and from Arrow (Dagster's type handler role)."""

    supported_types: tuple[type, ...]

    def to_arrow(self, obj: Any) -> pa.Table: ...

    def from_arrow(self, table: pa.Table) -> Any: ...


class ArrowFrameHandler:
    supported_types: tuple[type, ...] = (pa.Table,)

    def to_arrow(self, obj: Any) -> pa.Table:
        return obj

    def from_arrow(self, table: pa.Table) -> Any:
        return table


class PandasFrameHandler:
    supported_types: tuple[type, ...] = (pd.DataFrame,)

    def to_arrow(self, obj: Any) -> pa.Table:
        return pa.Table.from_pandas(obj, preserve_index=False)

    def from_arrow(self, table: pa.Table) -> Any:
        return table.to_pandas(types_mapper=pd.ArrowDtype)


@dataclass(frozen=True)
class FrameSlice:
    """Where one output or input lives: a table and the dates of its partition slice."""

    table: str
    entity: str
    dates: tuple[dt.date, ...]


_POOL: dict[str, Any] = {}
# Stage tables whose autovacuum setting this process has checked (see `_settle`).
_SETTLED: set[tuple[str, str]] = set()
_POOL_LOCK = threading.RLock()


def _close_pool() -> None:
    """Close pooled connections at exit, while the driver is still loaded (else its
    finalizer complains at interpreter shutdown)."""
    with _POOL_LOCK:
        while _POOL:
            _, conn = _POOL.popitem()
            with suppress(Exception):
                conn.close()


atexit.register(_close_pool)


class PostgresFrameClient:
    """The SQL side of the IO manager: ensure tables, replace and select slices, prune."""

    def __init__(self, database_url: str, schema: str = STAGE_SCHEMA, unlogged: bool = True) -> None:
        self._url = libpq_url(database_url)
        self.schema = schema
        self.unlogged = unlogged
        _quote(schema)

    @contextmanager
    def connect(self) -> Any:
        """A pooled ADBC connection (opening one reads the type catalog: ~0.1 s each).

        One connection per process and URL is kept and handed out under a lock;
        a connection that failed is discarded rather than returned.
        """
        with _POOL_LOCK:
            conn = _POOL.pop(self._url, None)
            if conn is None:
                import adbc_driver_postgresql.dbapi as adbc  # the binary COPY path

                conn = adbc.connect(self._url)
            try:
                yield conn
            except BaseException:
                with suppress(Exception):
                    conn.rollback()
                conn.close()
                raise
            else:
                _POOL[self._url] = conn

    def _qualified(self, table: str) -> str:
        return f"{_quote(self.schema)}.{_quote(table)}"

    def _ensure_catalog(self, cur: Any) -> None:
        cur.execute(f"CREATE SCHEMA IF NOT EXISTS {_quote(self.schema)}")
        cur.execute(
            f"CREATE TABLE IF NOT EXISTS {self._qualified(_FRAMES_TABLE)} ("
            " table_name text PRIMARY KEY, arrow_schema bytea NOT NULL, updated_at timestamptz NOT NULL)"
        )
        # Logged, unlike the stage tables: it survives the crash recovery that empties them.
        cur.execute(
            f"CREATE TABLE IF NOT EXISTS {self._qualified(_SLICES_TABLE)} ("
            " table_name text NOT NULL, partition_date date NOT NULL, row_count bigint NOT NULL,"
            " written_at timestamptz NOT NULL, PRIMARY KEY (table_name, partition_date))"
        )

    def stored_schema(self, cur: Any, table: str) -> pa.Schema | None:
        cur.execute(f"SELECT arrow_schema FROM {self._qualified(_FRAMES_TABLE)} WHERE table_name = '{table}'")
        row = cur.fetchone()
        if row is None:
            return None
        return pa.ipc.read_schema(pa.py_buffer(bytes(row[0])))

    def _create(self, cur: Any, table: str, schema: pa.Schema) -> None:
        qualified = self._qualified(table)
        kind = "UNLOGGED TABLE" if self.unlogged else "TABLE"
        cur.execute(f"DROP TABLE IF EXISTS {qualified}")
        cur.execute(f"DELETE FROM {self._qualified(_SLICES_TABLE)} WHERE table_name = '{table}'")
        cur.execute(
            f"CREATE {kind} {qualified} ({_quote(PARTITION_COLUMN)} date NOT NULL, {_SEQ} integer NOT NULL,"
            f" {_ROWS} integer NOT NULL, {_IPC} bytea NOT NULL) WITH ({_NO_AUTOVACUUM})"
        )
        # The chunks are LZ4-compressed already: TOAST stores them out of line as they are.
        cur.execute(f"ALTER TABLE {qualified} ALTER COLUMN {_IPC} SET STORAGE EXTERNAL")
        cur.execute(f"CREATE INDEX ON {qualified} ({_quote(PARTITION_COLUMN)}, {_SEQ})")
        blob = schema.serialize().to_pybytes().hex()
        cur.execute(
            f"INSERT INTO {self._qualified(_FRAMES_TABLE)} (table_name, arrow_schema, updated_at) "
            f"VALUES ('{table}', '\\x{blob}'::bytea, now()) ON CONFLICT (table_name) DO UPDATE "
            "SET arrow_schema = EXCLUDED.arrow_schema, updated_at = now()"
        )
        _SETTLED.add((self._url, qualified))

    def _reusable(self, cur: Any, table: str, stored: pa.Schema | None, schema: pa.Schema) -> bool:
        """Whether `table` can take a frame of `schema` as it is (else it is re-created)."""
        return stored is not None and stored.equals(schema) and self._settle(cur, table)

    def schema_differs(self, where: FrameSlice, schema: pa.Schema) -> bool:
        """True when the next replace_slice will (re)create the table for this schema."""
        with self.connect() as conn:
            cur = conn.cursor()
            self._ensure_catalog(cur)
            conn.commit()
            reusable = self._reusable(cur, where.table, self.stored_schema(cur, where.table), schema)
            conn.commit()  # an idle pooled session holds no lock on the catalog
            cur.close()
        return not reusable

    def replace_slice(self, where: FrameSlice, frame: pa.Table) -> bool:
        """Delete the slice's dates and COPY `frame`'s chunks in, in one transaction.

        Returns True when the table was (re)created because the frame's schema
        differs from the stored one (or the table predates the chunk layout):
        stage tables are rebuildable, so a schema change replaces the table
        rather than failing the run.
        """
        _dates_sql(where.dates)  # refuses an empty slice before anything is touched
        rows = _rows_per_date(frame, where.dates)
        with self.connect() as conn:
            cur = conn.cursor()
            self._ensure_catalog(cur)
            conn.commit()
            recreated = not self._reusable(
                cur, where.table, self.stored_schema(cur, where.table), frame.schema
            )
            if recreated:
                self._create(cur, where.table, frame.schema)
            else:
                self._clear_slice(cur, where.table, where.dates)
            if frame.num_rows:
                # Chunks are encoded as the driver streams them: one in memory at a time.
                chunks = pa.RecordBatchReader.from_batches(_CHUNK_SCHEMA, _chunks(frame, rows))
                cur.adbc_ingest(where.table, chunks, mode="append", db_schema_name=self.schema)
            self._record_slice(cur, where, rows)
            conn.commit()
            cur.close()
        return recreated

    def _has_chunk_layout(self, cur: Any, table: str) -> bool:
        """Whether an existing stage table holds chunks (an earlier release wrote one row per frame row)."""
        if (self._url, self._qualified(table)) in _SETTLED:
            return True
        cur.execute(
            "SELECT count(*) FROM pg_attribute WHERE attrelid = "
            f"'{self.schema}.{table}'::regclass AND attname = '{_IPC}' AND NOT attisdropped"
        )
        row = cur.fetchone()
        return row is not None and bool(row[0])

    def _settle(self, cur: Any, table: str) -> bool:
        """Whether an existing stage table can be written as it is; if so, autovacuum goes off (once per process).

        Tables of the row layout are reported as not reusable, and the write re-creates them.
        """
        qualified = self._qualified(table)
        if (self._url, qualified) in _SETTLED:
            return True
        if not self._has_chunk_layout(cur, table):
            return False
        cur.execute(f"ALTER TABLE {qualified} SET ({_NO_AUTOVACUUM})")
        _SETTLED.add((self._url, qualified))
        return True

    def _record_slice(self, cur: Any, where: FrameSlice, rows: dict[dt.date, int]) -> None:
        """Record the rows written per date, in the transaction of the write."""
        slices = self._qualified(_SLICES_TABLE)
        values = ", ".join(
            f"('{where.table}', '{day.isoformat()}'::date, {count}, now())" for day, count in rows.items()
        )
        cur.execute(
            f"INSERT INTO {slices} (table_name, partition_date, row_count, written_at) VALUES {values} "
            "ON CONFLICT (table_name, partition_date) DO UPDATE "
            "SET row_count = EXCLUDED.row_count, written_at = EXCLUDED.written_at"
        )

    def written_slices(self, where: FrameSlice) -> dict[dt.date, tuple[int, dt.datetime]]:
        """(rows, written at) of each of the slice's dates a write recorded; a date absent was never
        written (or was pruned), which an empty frame alone cannot tell from a date written empty."""
        with self.connect() as conn:
            cur = conn.cursor()
            self._ensure_catalog(cur)
            cur.execute(
                f"SELECT partition_date, row_count, written_at FROM {self._qualified(_SLICES_TABLE)} "
                f"WHERE table_name = '{where.table}' AND partition_date IN ({_dates_sql(where.dates)})"
            )
            found = {day: (int(count), at) for day, count, at in cur.fetchall()}
            conn.commit()
            cur.close()
        return found

    def _recorded_rows(self, cur: Any, where: FrameSlice) -> dict[dt.date, int]:
        cur.execute(
            f"SELECT partition_date, row_count FROM {self._qualified(_SLICES_TABLE)} "
            f"WHERE table_name = '{where.table}' AND partition_date IN ({_dates_sql(where.dates)})"
        )
        return {day: int(count) for day, count in cur.fetchall()}

    def _clear_slice(self, cur: Any, table: str, dates: Sequence[dt.date]) -> None:
        """Remove the slice's rows; TRUNCATE when the table holds nothing else.

        Deleting a 1M-row slice row by row costs seconds per stage table and
        made an incremental run pay for the size of the run before it. When the
        stored dates (their min and max, two probes of the partition-date index)
        lie inside the slice's contiguous range, TRUNCATE does the same in
        constant time, inside the same transaction.
        """
        qualified = self._qualified(table)
        column = _quote(PARTITION_COLUMN)
        cur.execute(f"SELECT min({column}), max({column}) FROM {qualified}")
        row = cur.fetchone()
        if row is None or row[0] is None:
            return  # empty table
        first, last = min(dates), max(dates)
        contiguous = len(set(dates)) == (last - first).days + 1
        if contiguous and first <= row[0] and row[1] <= last:
            cur.execute(f"TRUNCATE {qualified}")
        else:
            cur.execute(f"DELETE FROM {qualified} WHERE {column} IN ({_dates_sql(dates)})")

    def select_slice(self, where: FrameSlice) -> pa.Table | None:
        """Rows of the slice's dates with their stored Arrow types; None if never written."""
        with self.connect() as conn:
            cur = conn.cursor()
            self._ensure_catalog(cur)
            conn.commit()
            schema = self.stored_schema(cur, where.table)
            if schema is None:
                cur.close()
                return None
            if not self._has_chunk_layout(cur, where.table):
                conn.commit()
                cur.close()
                raise FrameStoreError(
                    f"stage table {self.schema}.{where.table} was written by an earlier SyncFlow in the "
                    "row layout; materialize the partition again from its first stage"
                )
            cur.execute(
                f"SELECT {_IPC} FROM {self._qualified(where.table)} "
                f"WHERE {_quote(PARTITION_COLUMN)} IN ({_dates_sql(where.dates)}) "
                f"ORDER BY {_quote(PARTITION_COLUMN)}, {_SEQ}"
            )
            blobs = cur.fetch_arrow_table().column(0)
            recorded = self._recorded_rows(cur, where)
            conn.commit()  # ends the read: an idle pooled session holds no lock on the stage tables
            cur.close()
        table = _read_chunks(blobs, schema, f"{self.schema}.{where.table}")
        del blobs
        found = _rows_per_date(table, where.dates)
        # Dates never written through `_slices` (none, or written before it existed) are not checked.
        short = {day: (count, found[day]) for day, count in recorded.items() if found[day] != count}
        if short:
            detail = ", ".join(
                f"{day}: {wrote} written, {got} found" for day, (wrote, got) in sorted(short.items())
            )
            raise FrameLostError(
                f"stage frame {self.schema}.{where.table} of {where.entity} lost rows ({detail}): "
                "Postgres crash recovery (an immediate stop, a power loss) empties UNLOGGED stage tables. "
                "Run the partition again from its first stage; re-executing later stages cannot rebuild it"
            )
        return table

    def prune(self, older_than: dt.date) -> dict[str, int]:
        """Delete stage frames' rows whose partition date is before `older_than`; frame rows per table."""
        removed: dict[str, int] = {}
        with self.connect() as conn:
            cur = conn.cursor()
            self._ensure_catalog(cur)
            cur.execute(f"SELECT table_name FROM {self._qualified(_FRAMES_TABLE)}")
            tables = [row[0] for row in cur.fetchall()]
            for table in tables:
                cur.execute(
                    f"WITH gone AS (DELETE FROM {self._qualified(table)} "
                    f"WHERE {_quote(PARTITION_COLUMN)} < '{older_than.isoformat()}'::date RETURNING {_ROWS}) "
                    "SELECT coalesce(sum(rows), 0)::bigint FROM gone"
                )
                row = cur.fetchone()
                removed[table] = int(row[0]) if row is not None else 0
            cur.execute(
                f"DELETE FROM {self._qualified(_SLICES_TABLE)} "
                f"WHERE partition_date < '{older_than.isoformat()}'::date"
            )
            conn.commit()
            cur.close()
        self._vacuum([table for table, rows in removed.items() if rows])
        return removed

    def _vacuum(self, tables: Sequence[str]) -> None:
        """VACUUM stage tables rows were deleted from (autovacuum is off on them)."""
        if not tables:
            return
        import psycopg  # VACUUM cannot run inside a transaction: an autocommit session of its own

        with psycopg.connect(self._url, autocommit=True) as conn:
            for table in tables:
                conn.execute(f"VACUUM (ANALYZE) {self._qualified(table)}")


def _rows_per_date(frame: pa.Table, dates: Sequence[dt.date]) -> dict[dt.date, int]:
    """How many of the frame's rows carry each of the slice's dates (0 for a date without rows)."""
    counts = dict.fromkeys(dates, 0)
    if PARTITION_COLUMN not in frame.column_names:
        if len(dates) != 1:
            raise FrameStoreError(f"a frame covering several dates must carry a {PARTITION_COLUMN} column")
        counts[dates[0]] = frame.num_rows
    elif frame.num_rows:
        tally = pc.value_counts(frame[PARTITION_COLUMN])
        days, rows = tally.field("values").to_pylist(), tally.field("counts").to_pylist()
        for day, count in zip(days, rows, strict=True):
            if day in counts and count is not None:
                counts[day] += int(count)
    return counts


def _dates_sql(dates: Sequence[dt.date]) -> str:
    if not dates:
        raise FrameStoreError("a frame slice needs at least one partition date")
    return ", ".join(f"'{d.isoformat()}'::date" for d in dates)


class EntityFrames(dict[str, pa.Table]):
    """One stage frame per entity, for a run over several entities (entity name → frame).

    A stage asset of such a run returns it and its downstream stage receives
    it; the IO manager stores and loads each frame in its entity's own table,
    exactly as a single-entity run's frame.
    """


def partition_scopes(keys: Iterable[str]) -> dict[str, tuple[dt.date, ...]]:
    """entity → its dates, for a set of `date|entity` multi-partition keys (entities in first-seen order)."""
    scopes: dict[str, set[dt.date]] = {}
    for key in keys:
        by_dimension = getattr(key, "keys_by_dimension", None)
        if by_dimension is None:
            # Dagster's multi-partition key string holds the values in the
            # alphabetical order of the dimension names: "date|entity".
            day, _, name = str(key).partition("|")
            by_dimension = {"date": day, "entity": name}
        scopes.setdefault(by_dimension["entity"], set()).add(dt.date.fromisoformat(by_dimension["date"]))
    return {entity: tuple(sorted(dates)) for entity, dates in scopes.items()}


def partition_scope(keys: Iterable[str]) -> tuple[str, tuple[dt.date, ...]]:
    """(entity, dates) of a set of `entity|date` multi-partition keys for ONE entity."""
    scopes = partition_scopes(keys)
    if len(scopes) != 1:
        raise FrameStoreError(
            f"a single stage frame covers one entity at a time, this run selects {sorted(scopes)}; "
            "hand over EntityFrames (one frame per entity) for a run over several entities"
        )
    ((entity, dates),) = scopes.items()
    return entity, dates


class PostgresFrameIOManager(dg.ConfigurableIOManager):
    """Stores each stage asset's frame (Arrow or pandas) in Postgres, per entity × date."""

    database_url: str = Field(description="Postgres URL of SyncFlow's database (SYNCFLOW_DATABASE_URL).")
    schema_name: str = Field(default=STAGE_SCHEMA, description="Schema that holds the stage tables.")
    unlogged: bool = Field(default=True, description="Create stage tables UNLOGGED (they are rebuildable).")
    retention_days: int = Field(
        default=14,
        description="Stage partitions older than this many days are pruned by the maintenance job.",
    )

    def _client(self) -> PostgresFrameClient:
        return PostgresFrameClient(self.database_url, self.schema_name, self.unlogged)

    @staticmethod
    def _handler_for(obj_or_type: Any) -> FrameHandler:
        for handler in (ArrowFrameHandler(), PandasFrameHandler()):
            if isinstance(obj_or_type, type):
                if issubclass(obj_or_type, handler.supported_types):
                    return handler
            elif isinstance(obj_or_type, handler.supported_types):
                return handler
        raise FrameStoreError(
            f"the frame IO manager stores pyarrow.Table or pandas.DataFrame, not {obj_or_type!r}"
        )

    def _slices(self, asset_key: dg.AssetKey, partition_keys: Iterable[str]) -> list[FrameSlice]:
        return [
            FrameSlice(stage_table_name(asset_key.path[-1], entity), entity, dates)
            for entity, dates in partition_scopes(partition_keys).items()
        ]

    def _key(self, where: FrameSlice) -> tuple[str, str, str, tuple[dt.date, ...]]:
        return (self.database_url, self.schema_name, where.table, where.dates)

    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        if obj is None:
            return
        if not context.has_asset_partitions:
            raise FrameStoreError(f"{context.asset_key.to_user_string()}: stage frames must be partitioned")
        slices = self._slices(context.asset_key, context.asset_partition_keys)
        name = context.asset_key.to_user_string()
        if isinstance(obj, EntityFrames):
            wanted = {where.entity for where in slices}
            if set(obj) != wanted:
                raise FrameStoreError(
                    f"{name}: the run covers entities {sorted(wanted)}, the frames are for {sorted(obj)}"
                )
            frames = [(where, obj[where.entity]) for where in slices]
        elif len(slices) == 1:
            frames = [(slices[0], obj)]
        else:
            raise FrameStoreError(
                f"{name}: this run covers entities {sorted(w.entity for w in slices)}; "
                "a stage over several entities returns EntityFrames (one frame per entity)"
            )
        stored = [(where, *self._store(context, where, frame)) for where, frame in frames]
        _forget_captured_output(context)
        # The stage's temporaries are gone by now: give their pages back.
        return_freed_memory()
        if len(stored) == 1:
            where, frame, recreated = stored[0]
            context.add_output_metadata(
                {
                    "dagster/table_name": f"{self.schema_name}.{where.table}",
                    "dagster/row_count": frame.num_rows,
                    "dagster/column_schema": _column_schema(frame.schema),
                    "partition_dates": ", ".join(d.isoformat() for d in where.dates),
                    "table_recreated": recreated,
                    # The table holds Arrow IPC chunks: how to look at the rows themselves.
                    "read_back": _read_back(context.asset_key, where),
                }
            )
            return
        context.add_output_metadata(
            {
                "dagster/row_count": sum(frame.num_rows for _, frame, _ in stored),
                "tables": dg.MetadataValue.json(
                    {
                        where.entity: {
                            "table": f"{self.schema_name}.{where.table}",
                            "rows": frame.num_rows,
                            "dates": [d.isoformat() for d in where.dates],
                            "table_recreated": recreated,
                        }
                        for where, frame, recreated in stored
                    }
                ),
                "read_back": " ; ".join(_read_back(context.asset_key, where) for where, _, _ in stored[:3])
                + (" ; ..." if len(stored) > 3 else ""),
            }
        )

    def _store(self, context: dg.OutputContext, where: FrameSlice, obj: Any) -> tuple[pa.Table, bool]:
        """Write one entity's frame into its slice; returns the stored frame and whether the table was re-created."""
        frame = self._handler_for(obj).to_arrow(obj)
        frame = _with_partition_column(frame, where)
        # Written and committed before the step can report success, under every
        # executor: a downstream step in another process (multiprocess, Celery),
        # or a re-execution after this process died, reads exactly this frame.
        recreated = self._client().replace_slice(where, frame)
        _HANDED.put(self._key(where), context.run_id, frame)
        return frame, recreated

    def load_input(self, context: dg.InputContext) -> Any:
        if not context.has_asset_partitions:
            raise FrameStoreError(f"{context.asset_key.to_user_string()}: stage frames must be partitioned")
        slices = self._slices(context.asset_key, context.asset_partition_keys)
        expected = context.dagster_type.typing_type if context.dagster_type else pa.Table
        if isinstance(expected, type) and issubclass(expected, EntityFrames):
            return EntityFrames(
                {where.entity: self._load(context, where, ArrowFrameHandler()) for where in slices}
            )
        if len(slices) != 1:
            raise FrameStoreError(
                f"{context.asset_key.to_user_string()}: this run covers entities "
                f"{sorted(w.entity for w in slices)}; load them as EntityFrames (one frame per entity)"
            )
        handler = self._handler_for(expected if isinstance(expected, type) else pa.Table)
        return self._load(context, slices[0], handler)

    def _load(self, context: dg.InputContext, where: FrameSlice, handler: FrameHandler) -> Any:
        upstream_run = context.upstream_output.run_id if context.upstream_output is not None else None
        handed = _HANDED.take(self._key(where), upstream_run)
        if handed is not None:
            return handler.from_arrow(handed)
        try:
            table = self._client().select_slice(where)
        except FrameLostError as lost:
            # No retry of this step can bring the rows back: fail it now, with the way out.
            raise dg.Failure(description=str(lost), allow_retries=False) from lost
        if table is None:
            raise FrameStoreError(
                f"{context.asset_key.to_user_string()} has never been materialized for {where.entity} "
                f"(table {self.schema_name}.{where.table} does not exist); materialize it first"
            )
        return handler.from_arrow(table)


def _read_back(asset_key: dg.AssetKey, where: FrameSlice) -> str:
    """The `syncflow frame show` commands that print a stored slice (its first three dates)."""
    return " ; ".join(
        f"syncflow frame show {asset_key.path[-1]} {where.entity} {day.isoformat()}"
        for day in where.dates[:3]
    ) + (" ; ..." if len(where.dates) > 3 else "")


def return_freed_memory() -> None:
    """Hand the pages Arrow's allocator keeps after frees back to the OS.

    Arrow's pool (mimalloc here) keeps freed pages for reuse, so after a stage
    the process's RSS still counted its temporaries (150 MB after normalising
    and hashing 300 000 rows). Returning them at each stage boundary (about
    10 ms) makes RSS show what is really held.
    """
    pa.default_memory_pool().release_unused()


def _column_schema(schema: pa.Schema) -> dg.TableSchema:
    """A frame's columns as Dagster metadata, built where no frame is in scope.

    Dagster compiles a record class's constructor on its first use in a process
    and keeps a copy of the calling function's locals as that constructor's
    globals. Built inside `handle_output`, the process's first TableSchema kept
    that call's frame (`obj`, `frame`) alive for as long as the process lived.
    """
    return dg.TableSchema(columns=[dg.TableColumn(name=f.name, type=str(f.type)) for f in schema])


def _forget_captured_output(context: dg.OutputContext) -> None:
    """Drop the in-process run result's reference to a frame this IO manager stored.

    `materialize` and `execute_in_process` keep every step's output value in
    the run result (`ExecuteInProcessResult.output_for_node`) until the run
    ends, so a run of the nine stages held all nine frames at once: at a
    million rows that was most of the peak RSS. The frame is in Postgres and
    handed to its downstream stage, so that copy is dropped here (read a stage
    frame from its table instead of `result.asset_value`). Executors in other
    processes capture nothing, and if Dagster ever stops exposing the capture
    this does nothing.
    """
    try:
        step_context = context.step_context
    except dg.DagsterInvariantViolationError:
        return
    captured = getattr(step_context, "output_capture", None)
    if not isinstance(captured, dict):
        return
    for handle in [h for h in captured if h.step_key == context.step_key and h.output_name == context.name]:
        del captured[handle]


class _HandedFrames:
    """The frame each stage handed over in this process, until its downstream stage takes it.

    In-process execution (materialize, the in-process executor) runs a stage
    right after the one it reads, in the same process: it gets the very frame
    that was stored, without reading it back. The frame is the one written to
    Postgres (partition column included, same schema), so the result is the
    same as a read. Any other case (another process, a re-execution whose
    upstream ran in an earlier run) misses and reads Postgres. Taking removes
    the entry, so memory holds at most the frames not consumed yet.
    """

    def __init__(self) -> None:
        self._frames: dict[tuple[Any, ...], tuple[str, pa.Table]] = {}
        self._lock = threading.Lock()

    # A frame nobody reads in this process (the last stage's, or one whose
    # reader runs elsewhere) must not stay forever: the oldest entries go.
    MAX_FRAMES = 4

    def put(self, key: tuple[Any, ...], run_id: str, frame: pa.Table) -> None:
        with self._lock:
            # A frame of another run is never handed over (`take` checks the
            # run), so holding it would only hold memory.
            for stale in [k for k, (owner, _) in self._frames.items() if owner != run_id]:
                del self._frames[stale]
            self._frames.pop(key, None)
            self._frames[key] = (run_id, frame)
            while len(self._frames) > self.MAX_FRAMES:
                self._frames.pop(next(iter(self._frames)))

    def take(self, key: tuple[Any, ...], run_id: str | None) -> pa.Table | None:
        with self._lock:
            entry = self._frames.pop(key, None)
        if entry is None or run_id is None or entry[0] != run_id:
            return None
        return entry[1]


_HANDED = _HandedFrames()


def _with_partition_column(frame: pa.Table, where: FrameSlice) -> pa.Table:
    """Every stored row carries its partition date; one date fills it, a range must bring it."""
    if PARTITION_COLUMN in frame.column_names:
        column = frame[PARTITION_COLUMN]
        if column.type != pa.date32():
            frame = frame.set_column(
                frame.schema.get_field_index(PARTITION_COLUMN), PARTITION_COLUMN, column.cast(pa.date32())
            )
        if frame.num_rows:
            allowed = pa.array(list(where.dates), pa.date32())
            inside = pc.is_in(frame[PARTITION_COLUMN], value_set=allowed)
            outside = len(inside) - pc.count(pc.filter(inside, inside)).as_py()
            if outside:
                raise FrameStoreError(
                    f"{where.table}: {outside} rows carry a {PARTITION_COLUMN} outside the run's partitions"
                )
        return frame
    if len(where.dates) != 1:
        raise FrameStoreError(
            f"{where.table}: a frame covering several dates must carry a {PARTITION_COLUMN} column"
        )
    dates = pa.array([where.dates[0]] * frame.num_rows, pa.date32())
    return frame.append_column(PARTITION_COLUMN, dates)
