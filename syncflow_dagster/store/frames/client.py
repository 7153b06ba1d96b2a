"""The SQL side of the frame store: stage tables in schema `syncflow_stage`, their slices, pruning.

One UNLOGGED table per asset × entity (stage frames can always be rebuilt, so
they skip the WAL) holds a frame as chunks (codec.py). The catalog table
`_frames` holds each table's exact Arrow schema, so dtypes (decimal scale,
16-byte hashes, int16, tz-aware timestamps) come back exactly as they went
in. Writing a slice clears its dates and appends its chunks in ONE
transaction (`SliceWriter`, stream.py), which also records the slice's row
count per date in the logged table `_slices`: crash recovery (an immediate
stop, a power loss) empties UNLOGGED tables, and a read that finds other than
the rows written refuses the frame rather than hand a stage an empty one.

Why chunks rather than one table row per frame row: docs/benchmarks.md
("frame store") has the figures; in short, the row layout cost seconds per
stage at a million rows, to write and to read back.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from syncflow_dagster.store.database import libpq_url
from syncflow_dagster.store.frames.codec import IPC, PARTITION_COLUMN, ROWS, SEQ, FrameStoreError

STAGE_SCHEMA = "syncflow_stage"
FRAMES_TABLE = "_frames"
SLICES_TABLE = "_slices"
_IDENT = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_TOKEN = re.compile(r"^[0-9a-f]{32}$")
# Stage tables are replaced wholesale (TRUNCATE) or by date (DELETE); autovacuum on
# them only competed with the pipeline for CPU after every large write, and a
# TRUNCATE that met it waited deadlock_timeout before Postgres cancelled it.
# `prune` vacuums what it deleted instead.
_NO_AUTOVACUUM = "autovacuum_enabled = false, toast.autovacuum_enabled = false"


def quote(identifier: str, pattern: re.Pattern[str] = _IDENT) -> str:
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


def dates_sql(dates: Sequence[dt.date]) -> str:
    if not dates:
        raise FrameStoreError("a frame slice needs at least one partition date")
    return ", ".join(f"'{d.isoformat()}'::date" for d in dates)


@dataclass(frozen=True)
class FrameSlice:
    """Where one output or input lives: a table and the dates of its partition slice."""

    table: str
    entity: str
    dates: tuple[dt.date, ...]


class FrameConnections:
    """Idle ADBC connections per URL (opening one reads the type catalog: ~0.1 s each), and the
    stage tables whose layout and autovacuum setting were checked through them.

    Owned by whoever owns the client: the IO manager for one run
    (`setup_for_execution` to `teardown_after_execution`), a `PostgresFrameClient`
    used as a context manager for its `with` block. A connection is handed to
    one user at a time; a streaming writer holds one for its whole transaction
    while others are taken or opened beside it. `close` closes the idle ones
    while the driver is loaded (its finalizer complains about a connection
    left to it), and a closed pool keeps nothing: a connection given back
    after it is closed too.
    """

    def __init__(self) -> None:
        self._idle: dict[str, list[Any]] = {}
        self._lock = threading.Lock()
        self._closed = False
        # (URL, table) of each stage table checked: the check is made once per table per pool.
        self.settled: set[tuple[str, str]] = set()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def idle(self) -> int:
        """How many connections wait to be taken again."""
        with self._lock:
            return sum(len(conns) for conns in self._idle.values())

    def take(self, url: str) -> Any:
        with self._lock:
            if self._closed:
                raise FrameStoreError(
                    "the frame store's connections are closed: the run that owned them ended, "
                    "or the client's `with` block did"
                )
            idle = self._idle.get(url)
            if idle:
                return idle.pop()
        import adbc_driver_postgresql.dbapi as adbc  # the binary COPY path

        return adbc.connect(url)

    def give_back(self, url: str, conn: Any) -> None:
        with self._lock:
            if not self._closed:
                self._idle.setdefault(url, []).append(conn)
                return
        with suppress(Exception):
            conn.close()

    def close(self) -> None:
        """Close the idle connections; what is given back later is closed, not kept."""
        with self._lock:
            self._closed = True
            idle = [conn for conns in self._idle.values() for conn in conns]
            self._idle.clear()
            self.settled.clear()
        for conn in idle:
            with suppress(Exception):
                conn.close()

    def __enter__(self) -> FrameConnections:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class PostgresFrameClient:
    """Ensure tables, write and read slices, prune.

    Its connections are `connections` (their owner closes them), or, given
    none, its own for the length of a `with` block:

        with PostgresFrameClient(url) as client:
            frame = client.select_slice(where)
    """

    def __init__(
        self,
        database_url: str,
        schema: str = STAGE_SCHEMA,
        unlogged: bool = True,
        connections: FrameConnections | None = None,
    ) -> None:
        self._url = libpq_url(database_url)
        self.schema = schema
        self.unlogged = unlogged
        quote(schema)
        self._owns_connections = connections is None
        self._connections = connections

    def __enter__(self) -> PostgresFrameClient:
        if self._owns_connections:
            if self._connections is not None:
                raise FrameStoreError("a PostgresFrameClient's `with` block is not re-entrant")
            self._connections = FrameConnections()
        return self

    def __exit__(self, *_: object) -> None:
        if self._owns_connections and self._connections is not None:
            self._connections.close()
            self._connections = None

    @property
    def url(self) -> str:
        return self._url

    @property
    def connections(self) -> FrameConnections:
        if self._connections is None:
            raise FrameStoreError(
                "this PostgresFrameClient has no connections: given none, it opens its own inside "
                "`with PostgresFrameClient(url) as client:` and closes them when the block ends"
            )
        return self._connections

    @contextmanager
    def connect(self) -> Iterator[Any]:
        """A pooled ADBC connection; one that failed is discarded rather than returned."""
        connections = self.connections
        conn = connections.take(self._url)
        try:
            yield conn
        except BaseException:
            with suppress(Exception):
                conn.rollback()
            conn.close()
            raise
        else:
            connections.give_back(self._url, conn)

    def qualified(self, table: str) -> str:
        return f"{quote(self.schema)}.{quote(table)}"

    def ensure_catalog(self, cur: Any) -> None:
        cur.execute(f"CREATE SCHEMA IF NOT EXISTS {quote(self.schema)}")
        cur.execute(
            f"CREATE TABLE IF NOT EXISTS {self.qualified(FRAMES_TABLE)} ("
            " table_name text PRIMARY KEY, arrow_schema bytea NOT NULL, updated_at timestamptz NOT NULL)"
        )
        # Logged, unlike the stage tables: it survives the crash recovery that empties them.
        cur.execute(
            f"CREATE TABLE IF NOT EXISTS {self.qualified(SLICES_TABLE)} ("
            " table_name text NOT NULL, partition_date date NOT NULL, row_count bigint NOT NULL,"
            " written_at timestamptz NOT NULL, write_token text, PRIMARY KEY (table_name, partition_date))"
        )
        self._ensure_write_token(cur)

    def _ensure_write_token(self, cur: Any) -> None:
        """Give a `_slices` table created by an earlier release its `write_token` column (once per pool).

        The token says which committed write a slice's rows are (the in-process
        hand-off, handoff.py); rows of an earlier release have none, which
        matches no write. Checked in the catalog first: ALTER TABLE would wait
        for every open write transaction that recorded a slice.
        """
        marker = (self._url, f"{self.qualified(SLICES_TABLE)}.write_token")
        if marker in self.connections.settled:
            return
        cur.execute(
            "SELECT count(*) FROM pg_attribute WHERE attrelid = "
            f"'{self.schema}.{SLICES_TABLE}'::regclass AND attname = 'write_token' AND NOT attisdropped"
        )
        row = cur.fetchone()
        if row is None or not row[0]:
            cur.execute(
                f"ALTER TABLE {self.qualified(SLICES_TABLE)} ADD COLUMN IF NOT EXISTS write_token text"
            )
        self.connections.settled.add(marker)

    def stored_schema(self, cur: Any, table: str) -> pa.Schema | None:
        cur.execute(f"SELECT arrow_schema FROM {self.qualified(FRAMES_TABLE)} WHERE table_name = '{table}'")
        row = cur.fetchone()
        if row is None:
            return None
        return pa.ipc.read_schema(pa.py_buffer(bytes(row[0])))

    def record_schema(self, cur: Any, table: str, schema: pa.Schema) -> None:
        blob = schema.serialize().to_pybytes().hex()
        cur.execute(
            f"INSERT INTO {self.qualified(FRAMES_TABLE)} (table_name, arrow_schema, updated_at) "
            f"VALUES ('{table}', '\\x{blob}'::bytea, now()) ON CONFLICT (table_name) DO UPDATE "
            "SET arrow_schema = EXCLUDED.arrow_schema, updated_at = now()"
        )

    def create(self, cur: Any, table: str) -> None:
        """(Re)create an empty stage table of the chunk layout; its slices' records go with it."""
        qualified = self.qualified(table)
        kind = "UNLOGGED TABLE" if self.unlogged else "TABLE"
        cur.execute(f"DROP TABLE IF EXISTS {qualified}")
        cur.execute(f"DELETE FROM {self.qualified(SLICES_TABLE)} WHERE table_name = '{table}'")
        cur.execute(
            f"CREATE {kind} {qualified} ({quote(PARTITION_COLUMN)} date NOT NULL, {SEQ} integer NOT NULL,"
            f" {ROWS} integer NOT NULL, {IPC} bytea NOT NULL) WITH ({_NO_AUTOVACUUM})"
        )
        # The chunks are LZ4-compressed already: TOAST stores them out of line as they are.
        cur.execute(f"ALTER TABLE {qualified} ALTER COLUMN {IPC} SET STORAGE EXTERNAL")
        cur.execute(f"CREATE INDEX ON {qualified} ({quote(PARTITION_COLUMN)}, {SEQ})")
        self.connections.settled.add((self._url, qualified))

    def has_chunk_layout(self, cur: Any, table: str) -> bool:
        """Whether an existing stage table holds chunks (an earlier release wrote one row per frame row)."""
        if (self._url, self.qualified(table)) in self.connections.settled:
            return True
        cur.execute(
            "SELECT count(*) FROM pg_attribute WHERE attrelid = "
            f"'{self.schema}.{table}'::regclass AND attname = '{IPC}' AND NOT attisdropped"
        )
        row = cur.fetchone()
        return row is not None and bool(row[0])

    def settle(self, cur: Any, table: str) -> bool:
        """Whether an existing stage table can be written as it is; if so, autovacuum goes off (once per pool).

        Tables of the row layout are reported as not reusable, and the write re-creates them.
        """
        qualified = self.qualified(table)
        if (self._url, qualified) in self.connections.settled:
            return True
        if not self.has_chunk_layout(cur, table):
            return False
        cur.execute(f"ALTER TABLE {qualified} SET ({_NO_AUTOVACUUM})")
        self.connections.settled.add((self._url, qualified))
        return True

    def record_slice(self, cur: Any, where: FrameSlice, rows: dict[dt.date, int], token: str) -> None:
        """Record the rows written per date and the write's token, in the transaction of the write."""
        if not _TOKEN.match(token):
            raise FrameStoreError(f"refusing unsafe write token {token!r}")
        values = ", ".join(
            f"('{where.table}', '{day.isoformat()}'::date, {count}, now(), '{token}')"
            for day, count in rows.items()
        )
        cur.execute(
            f"INSERT INTO {self.qualified(SLICES_TABLE)} "
            "(table_name, partition_date, row_count, written_at, write_token) "
            f"VALUES {values} ON CONFLICT (table_name, partition_date) DO UPDATE "
            "SET row_count = EXCLUDED.row_count, written_at = EXCLUDED.written_at, "
            "write_token = EXCLUDED.write_token"
        )

    def keep_only(self, cur: Any, where: FrameSlice) -> None:
        """Drop every date but the slice's (their chunks were written in another schema)."""
        cur.execute(
            f"DELETE FROM {self.qualified(where.table)} "
            f"WHERE {quote(PARTITION_COLUMN)} NOT IN ({dates_sql(where.dates)})"
        )
        cur.execute(
            f"DELETE FROM {self.qualified(SLICES_TABLE)} WHERE table_name = '{where.table}' "
            f"AND partition_date NOT IN ({dates_sql(where.dates)})"
        )

    def clear_slice(self, cur: Any, table: str, dates: Sequence[dt.date]) -> None:
        """Remove the slice's rows; TRUNCATE when the table holds nothing else.

        Deleting a large slice row by row costs seconds per stage table and
        made an incremental run pay for the size of the run before it. When the
        stored dates (their min and max, two probes of the partition-date index)
        lie inside the slice's contiguous range, TRUNCATE does the same in
        constant time, inside the same transaction.
        """
        qualified = self.qualified(table)
        column = quote(PARTITION_COLUMN)
        cur.execute(f"SELECT min({column}), max({column}) FROM {qualified}")
        row = cur.fetchone()
        if row is None or row[0] is None:
            return  # empty table
        first, last = min(dates), max(dates)
        contiguous = len(set(dates)) == (last - first).days + 1
        if contiguous and first <= row[0] and row[1] <= last:
            cur.execute(f"TRUNCATE {qualified}")
        else:
            cur.execute(f"DELETE FROM {qualified} WHERE {column} IN ({dates_sql(dates)})")

    def writer(self, where: FrameSlice, schema: pa.Schema | None = None, handoff: Any = None) -> Any:
        """A `SliceWriter` that replaces the slice in one transaction (use it as a context manager);
        with `handoff` (a `HandedSlices`), a small slice is kept for a reader in this process."""
        from syncflow_dagster.store.frames.stream import SliceWriter

        return SliceWriter(self, where, schema, handoff=handoff)

    def reader(self, where: FrameSlice, handoff: Any = None) -> Any:
        """A `SliceReader` of the slice (None if the table was never written); checks its row counts.
        With `handoff`, it serves the tables kept there when they are the committed write."""
        from syncflow_dagster.store.frames.stream import SliceReader

        return SliceReader.open(self, where, handoff=handoff)

    def replace_slice(self, where: FrameSlice, frame: pa.Table, handoff: Any = None) -> bool:
        """Replace the slice with `frame` in one transaction; True when the table took a new schema.

        Stage tables are rebuildable, so a schema change replaces the table's
        other dates rather than failing the run.
        """
        dates_sql(where.dates)  # refuses an empty slice before anything is touched
        with self.writer(where, frame.schema, handoff) as writer:
            writer.write(frame)
        stored: bool = writer.stored.recreated
        return stored

    def schema_differs(self, where: FrameSlice, schema: pa.Schema) -> bool:
        """True when a write of `schema` will replace the table's stored schema."""
        with self.connect() as conn:
            cur = conn.cursor()
            self.ensure_catalog(cur)
            conn.commit()
            stored = self.stored_schema(cur, where.table)
            reusable = stored is not None and stored.equals(schema) and self.settle(cur, where.table)
            conn.commit()  # an idle pooled session holds no lock on the catalog
            cur.close()
        return not reusable

    def select_slice(self, where: FrameSlice) -> pa.Table | None:
        """Rows of the slice's dates with their stored Arrow types; None if never written."""
        reader = self.reader(where)
        if reader is None:
            return None
        table: pa.Table = reader.read_all()
        return table

    def written_slices(self, where: FrameSlice) -> dict[dt.date, tuple[int, dt.datetime]]:
        """(rows, written at) of each of the slice's dates a write recorded; a date absent was never
        written (or was pruned), which an empty frame alone cannot tell from a date written empty."""
        with self.connect() as conn:
            cur = conn.cursor()
            self.ensure_catalog(cur)
            cur.execute(
                f"SELECT partition_date, row_count, written_at FROM {self.qualified(SLICES_TABLE)} "
                f"WHERE table_name = '{where.table}' AND partition_date IN ({dates_sql(where.dates)})"
            )
            found = {day: (int(count), at) for day, count, at in cur.fetchall()}
            conn.commit()
            cur.close()
        return found

    def prune(self, older_than: dt.date) -> dict[str, int]:
        """Delete stage frames' rows whose partition date is before `older_than`; frame rows per table."""
        removed: dict[str, int] = {}
        with self.connect() as conn:
            cur = conn.cursor()
            self.ensure_catalog(cur)
            cur.execute(f"SELECT table_name FROM {self.qualified(FRAMES_TABLE)}")
            tables = [row[0] for row in cur.fetchall()]
            for table in tables:
                cur.execute(
                    f"WITH gone AS (DELETE FROM {self.qualified(table)} "
                    f"WHERE {quote(PARTITION_COLUMN)} < '{older_than.isoformat()}'::date RETURNING {ROWS}) "
                    "SELECT coalesce(sum(rows), 0)::bigint FROM gone"
                )
                row = cur.fetchone()
                removed[table] = int(row[0]) if row is not None else 0
            cur.execute(
                f"DELETE FROM {self.qualified(SLICES_TABLE)} "
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
                conn.execute(f"VACUUM (ANALYZE) {self.qualified(table)}")
