"""Streaming a stage frame: read a stored slice chunk by chunk, write one chunk by chunk.

A stage never needs its whole input or output in memory:

* `SliceReader` is a stored slice opened for reading: its schema and row
  count are known up front (the row counts per date checked against what the
  write recorded), and `chunks(size)` yields it `size` rows at a time,
  optionally only some columns, from a server-side cursor over the stored
  chunks (one stored chunk decoded at a time).
* `SliceWriter` replaces a slice in ONE transaction: it clears the slice's
  dates when opened, appends each table it is given as stored chunks, and at
  `close` records the slice's schema and per-date row counts and commits.
  Nothing is visible to readers before that commit; an exception rolls the
  whole write back, and the previous slice stays as it was.
* `StoredFrame` is what a closed writer leaves: the small handle a stage
  returns instead of a frame, which the IO manager records without writing
  anything again.

Given a `HandedSlices` (handoff.py), a writer keeps a small slice it
committed and a reader in the same process serves it without decoding it,
when the token Postgres holds for the slice is that write's.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterator, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from syncflow_dagster.store.frames import codec
from syncflow_dagster.store.frames.client import SLICES_TABLE, FrameSlice, dates_sql, quote
from syncflow_dagster.store.frames.codec import (
    CHUNK_SCHEMA,
    IPC,
    PARTITION_COLUMN,
    ROWS,
    SEQ,
    FrameLostError,
    FrameStoreError,
    by_date,
    chunk_batch,
    conform,
    decode,
    rows_per_date,
    unify,
)
from syncflow_dagster.store.frames.handoff import HandedSlices, HeldSlice, SliceKey

if TYPE_CHECKING:
    from syncflow_dagster.store.frames.client import PostgresFrameClient


@dataclass(frozen=True)
class StoredFrame:
    """A slice a stage has written and committed: where, how many rows, in which schema."""

    where: FrameSlice
    num_rows: int
    schema: pa.Schema
    recreated: bool = False
    rows_per_date: dict[dt.date, int] = field(default_factory=dict)


class EntityFrames(dict[str, Any]):
    """One stage frame per entity, for a run over several entities (entity name → frame).

    A stage asset returns it (values: `pa.Table`, or `StoredFrame` handles of
    frames it streamed into the store) and a downstream stage that asks for
    `EntityFrames` receives whole tables; the IO manager stores and loads
    each frame in its entity's own table.
    """


class EntityStreams(dict[str, "SliceReader"]):
    """One `SliceReader` per entity: what a streaming stage asks for as its input."""


def with_partition_column(frame: pa.Table, where: FrameSlice) -> pa.Table:
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


class SliceWriter:
    """Replaces one slice in one transaction, chunk by chunk (see the module's docstring)."""

    def __init__(
        self,
        client: PostgresFrameClient,
        where: FrameSlice,
        schema: pa.Schema | None = None,
        handoff: HandedSlices | None = None,
    ) -> None:
        dates_sql(where.dates)  # refuses an empty slice before anything is touched
        self.where = where
        self._client = client
        self._handoff = handoff
        # What this write records in `_slices`; the hand-off serves the tables kept under it only.
        self.token = uuid.uuid4().hex
        self._kept: dict[dt.date, list[pa.Table]] | None = {} if handoff is not None else None
        self._fallback = schema
        self._schema: pa.Schema | None = None
        self._rows = dict.fromkeys(where.dates, 0)
        self._seq = dict.fromkeys(where.dates, 0)
        self._conn: Any = None
        self._cur: Any = None
        self._stored_schema: pa.Schema | None = None
        self._created = False
        self.stored: StoredFrame | None = None

    def __enter__(self) -> SliceWriter:
        self.open()
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    @property
    def num_rows(self) -> int:
        return sum(self._rows.values())

    def open(self) -> None:
        client, table = self._client, self.where.table
        if self._handoff is not None:
            self._handoff.forget(slice_key(client, self.where))
        self._conn = client.connections.take(client.url)
        try:
            cur = self._cur = self._conn.cursor()
            client.ensure_catalog(cur)
            self._conn.commit()
            self._stored_schema = client.stored_schema(cur, table)
            if self._stored_schema is None or not client.settle(cur, table):
                client.create(cur, table)
                self._created = True
            else:
                client.clear_slice(cur, table, self.where.dates)
        except BaseException:
            self.abort()
            raise

    def write(self, frame: pa.Table) -> None:
        """Append `frame`'s rows (an empty frame still tells the slice's schema)."""
        if self._cur is None:
            raise FrameStoreError(f"{self.where.table}: the writer is not open")
        frame = with_partition_column(frame, self.where)
        self._schema = unify(self._schema, frame.schema)
        if not frame.num_rows:
            return
        counts = rows_per_date(frame, self.where.dates)
        # Chunks are encoded as the driver streams them: one in memory at a time.
        chunks = pa.RecordBatchReader.from_batches(CHUNK_SCHEMA, self._chunks(frame, counts))
        try:
            self._cur.adbc_ingest(self.where.table, chunks, mode="append", db_schema_name=self._client.schema)
        except BaseException:
            self.abort()
            raise
        for day, rows in counts.items():
            self._rows[day] += rows
        if self._kept is not None and self._handoff is not None and self.num_rows > self._handoff.limit():
            self._kept = None  # too large to hold: its reader reads Postgres

    def _chunks(self, frame: pa.Table, counts: dict[dt.date, int]) -> Iterator[pa.RecordBatch]:
        for day, rows in by_date(frame, counts):
            if self._kept is not None:
                self._kept.setdefault(day, []).append(rows)
            size = codec.CHUNK_ROWS
            for start in range(0, rows.num_rows, size):
                yield chunk_batch(day, self._seq[day], rows.slice(start, size))
                self._seq[day] += 1

    def close(self) -> StoredFrame:
        """Record the slice's schema and row counts and commit; returns the handle."""
        if self._schema is None:
            fallback = self._fallback or self._stored_schema or pa.schema([])
            self.write(fallback.empty_table())
        schema = self._schema
        assert schema is not None
        client, cur = self._client, self._cur
        try:
            recreated = self._created or self._stored_schema is None or not self._stored_schema.equals(schema)
            if recreated:
                if not self._created:
                    client.keep_only(cur, self.where)  # other dates hold chunks of the old schema
                client.record_schema(cur, self.where.table, schema)
            client.record_slice(cur, self.where, self._rows, self.token)
            self._conn.commit()
            cur.close()
        except BaseException:
            self.abort()
            raise
        client.connections.give_back(client.url, self._conn)
        self._conn = self._cur = None
        kept, self._kept = self._kept, None
        if kept is not None and self._handoff is not None:
            # Only now, committed: the token in `_slices` is this write's.
            parts = tuple(part for day in sorted(kept) for part in kept[day])
            self._handoff.put(
                slice_key(client, self.where), HeldSlice(self.token, schema, parts, self.num_rows)
            )
        self.stored = StoredFrame(self.where, self.num_rows, schema, recreated, dict(self._rows))
        return self.stored

    def abort(self) -> None:
        """Roll the write back and discard the connection (the previous slice stays)."""
        conn, cur, self._conn, self._cur = self._conn, self._cur, None, None
        self._kept = None
        if conn is not None:
            with suppress(Exception):  # the connection is closed next either way
                conn.rollback()
            if cur is not None:
                with suppress(Exception):  # else the driver's finalizer complains of it later
                    cur.close()
            with suppress(Exception):
                conn.close()


class SliceReader:
    """A stored slice, read chunk by chunk (see the module's docstring)."""

    def __init__(
        self,
        client: PostgresFrameClient,
        where: FrameSlice,
        schema: pa.Schema,
        rows: dict[dt.date, int],
        held: HeldSlice | None = None,
    ) -> None:
        self.where = where
        self.schema = schema
        self.rows_per_date = rows
        self._client = client
        self._held = held

    @property
    def handed(self) -> bool:
        """Whether this reader serves the write committed in this process from memory (handoff.py)."""
        return self._held is not None

    @property
    def num_rows(self) -> int:
        return sum(self.rows_per_date.values())

    @property
    def name(self) -> str:
        return f"{self._client.schema}.{self.where.table}"

    @classmethod
    def open(
        cls, client: PostgresFrameClient, where: FrameSlice, handoff: HandedSlices | None = None
    ) -> SliceReader | None:
        """The slice, or None when its table was never written; refuses a slice that lost rows.

        With `handoff`, the slice's write tokens are read too, and the tables
        kept there are served if they are the write Postgres holds."""
        with client.connect() as conn:
            cur = conn.cursor()
            client.ensure_catalog(cur)
            conn.commit()
            schema = client.stored_schema(cur, where.table)
            if schema is None:
                cur.close()
                return None
            if not client.has_chunk_layout(cur, where.table):
                conn.commit()
                cur.close()
                raise FrameStoreError(
                    f"stage table {client.schema}.{where.table} was written by an earlier SyncFlow in the "
                    "row layout; materialize the partition again from its first stage"
                )
            cur.execute(
                f"SELECT {quote(PARTITION_COLUMN)}, sum({ROWS})::bigint FROM {client.qualified(where.table)} "
                f"WHERE {quote(PARTITION_COLUMN)} IN ({dates_sql(where.dates)}) GROUP BY 1"
            )
            found = {day: int(count) for day, count in cur.fetchall()}
            cur.execute(
                f"SELECT partition_date, row_count, write_token FROM {client.qualified(SLICES_TABLE)} "
                f"WHERE table_name = '{where.table}' AND partition_date IN ({dates_sql(where.dates)})"
            )
            recorded_rows = cur.fetchall()
            recorded = {day: int(count) for day, count, _ in recorded_rows}
            tokens = {day: token for day, _, token in recorded_rows}
            conn.commit()  # ends the read: an idle pooled session holds no lock on the stage tables
            cur.close()
        rows = {day: found.get(day, 0) for day in where.dates}
        # Dates never written through `_slices` (none, or written before it existed) are not checked.
        short = {day: (count, rows[day]) for day, count in recorded.items() if rows[day] != count}
        if short:
            detail = ", ".join(
                f"{day}: {wrote} written, {got} found" for day, (wrote, got) in sorted(short.items())
            )
            raise FrameLostError(
                f"stage frame {client.schema}.{where.table} of {where.entity} lost rows ({detail}): "
                "Postgres crash recovery (an immediate stop, a power loss) empties UNLOGGED stage tables. "
                "Run the partition again from its first stage; re-executing later stages cannot rebuild it"
            )
        held = handoff.take(slice_key(client, where), tokens) if handoff is not None else None
        if held is not None and (held.num_rows != sum(rows.values()) or not held.schema.equals(schema)):
            held = None  # cannot be, with the same token; Postgres decides
        return cls(client, where, schema, rows, held)

    def stored_chunks(self, columns: Sequence[str] | None = None) -> Iterator[pa.Table]:
        """The stored chunks in order (date, then sequence), one decoded at a time, in the slice's schema."""
        if not self.num_rows:
            return
        wanted = list(columns) if columns is not None else None
        if self._held is not None:
            yield from self._held_chunks(wanted)
            return
        import psycopg  # a server-side cursor: the chunks arrive a few at a time

        query = (
            f"SELECT {IPC} FROM {self._client.qualified(self.where.table)} "
            f"WHERE {quote(PARTITION_COLUMN)} IN ({dates_sql(self.where.dates)}) "
            f"ORDER BY {quote(PARTITION_COLUMN)}, {SEQ}"
        )
        with psycopg.connect(self._client.url) as conn, conn.cursor(name="stage_frame_chunks") as cur:
            cur.itersize = 2
            cur.execute(query)
            schema = self.schema if wanted is None else pa.schema([self.schema.field(n) for n in wanted])
            for (blob,) in cur:
                part = conform(decode(blob, wanted), schema, self.name)
                del blob
                yield part

    def _held_chunks(self, wanted: list[str] | None) -> Iterator[pa.Table]:
        """The kept tables of the write, as `stored_chunks` would decode them from its stored chunks."""
        assert self._held is not None
        schema = self.schema if wanted is None else pa.schema([self.schema.field(n) for n in wanted])
        for part in self._held.parts:
            if wanted is not None:
                part = part.select([name for name in wanted if name in part.column_names])
            yield conform(part, schema, self.name)

    def chunks(self, size: int, columns: Sequence[str] | None = None) -> Iterator[pa.Table]:
        """The slice `size` rows at a time (the last chunk may be shorter); nothing for an empty slice."""
        if size < 1:
            raise ValueError(f"chunk size must be at least 1, got {size}")
        pending: list[pa.Table] = []
        held = 0
        for part in self.stored_chunks(columns):
            pending.append(part)
            held += part.num_rows
            if held < size:
                continue
            joined = pa.concat_tables(pending)
            start = 0
            while held - start >= size:
                yield joined.slice(start, size)
                start += size
            pending = [joined.slice(start)] if start < held else []
            held -= start
        if held:
            yield pa.concat_tables(pending)

    def read_all(self, columns: Sequence[str] | None = None) -> pa.Table:
        """The whole slice as one table (for small frames, checks and tools; stages use `chunks`)."""
        parts = list(self.stored_chunks(columns))
        if parts:
            return pa.concat_tables(parts)
        schema = self.schema
        if columns is not None:
            schema = pa.schema([schema.field(name) for name in columns])
        return schema.empty_table()


def slice_key(client: PostgresFrameClient, where: FrameSlice) -> SliceKey:
    """The hand-off's key of a slice: the database, the schema, the table and the dates."""
    return (client.url, client.schema, where.table, where.dates)
