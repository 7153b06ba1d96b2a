"""Bulk transfer between Arrow tables and Postgres with COPY, never a row at a time.

In: `copy_in` streams a pyarrow Table into a table (usually a TEMP staging
table) as binary COPY. The binary rows are built column by column with numpy
and Arrow kernels (big-endian values, length prefixes, one
`binary_join_element_wise` per batch), so no Python code runs per row.
Binary beat CSV written by pyarrow.csv (bytea as \\x hex) into a TEMP table
(benchmarks/store_copy_formats.py; the figures are in docs/benchmarks.md):
Postgres parses no text and decodes no hex.

Out: `select_table` runs a SELECT in the caller's transaction (so it sees
the staged rows) in the binary protocol: psycopg decodes the one result set
in C and each column goes into Arrow in one call. uuid travels as its 16
bytes, timestamps as epoch microseconds. (A `COPY ... TO STDOUT` read, used
before, paid psycopg's Python-level round per row.)

Out of a whole table (no staging to share a transaction with): `select_arrow`
runs the SELECT on an ADBC connection, whose driver reads the binary COPY
stream in C straight into Arrow, and casts to the types `select_table`
gives: at 1M entity_state rows, a fraction of any row-by-row read.

While Postgres parses one chunk of the binary stream, a worker thread
encodes the next (the Arrow and numpy kernels release the GIL), so the
encoding mostly hides behind the server's own work. Columns whose value is
the same on every row (an entity name, a batch id, a timestamp) are encoded
once and repeated by the join, not materialised as arrays.

All functions take a psycopg 3 cursor, so the COPY runs inside whatever
transaction the caller opened (typically the one of a SQLAlchemy
`engine.begin()` block via `conn.connection.driver_connection`) and the merge
statement that follows sees the staged rows.
"""

from __future__ import annotations

import struct
from collections.abc import Generator, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass
from typing import Any

import numpy as np
import psycopg
import pyarrow as pa
import pyarrow.compute as pc
from psycopg import sql

# Postgres epochs: timestamps count microseconds and dates count days from 2000-01-01.
_PG_EPOCH_US = 946_684_800_000_000
_PG_EPOCH_DAYS = 10_957

_HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)
_TRAILER = struct.pack(">h", -1)
_NULL_FIELD = pa.scalar(struct.pack(">i", -1), pa.binary())
_EMPTY = pa.scalar(b"", pa.binary())

# Rows per encoded chunk: bounds the memory of the encoded copy (~25 MB for a
# typical state row) while keeping Arrow's per-call overhead negligible.
CHUNK_ROWS = 131_072

# Postgres types copy_in and select_table understand, with the fixed byte width of
# the binary value (None: variable width).
PG_TYPES: dict[str, int | None] = {
    "bool": 1,
    "int2": 2,
    "int4": 4,
    "int8": 8,
    "float8": 8,
    "date": 4,
    "timestamptz": 8,
    "uuid": 16,
    "bytea": None,
    "text": None,
    "jsonb": None,
}


@dataclass(frozen=True)
class PgColumn:
    """A column of a COPY: its name, Postgres type and (out only) fixed bytea width."""

    name: str
    pg_type: str
    width: int | None = None  # bytes of a fixed-width bytea column, e.g. 32 for data_hash

    def __post_init__(self) -> None:
        if self.pg_type not in PG_TYPES:
            raise ValueError(
                f"column {self.name!r}: unsupported Postgres type {self.pg_type!r}; "
                f"supported: {sorted(PG_TYPES)}"
            )


def create_staging(cursor: psycopg.Cursor, table: str, columns: Sequence[PgColumn]) -> None:
    """A TEMP table that disappears at the end of the current transaction."""
    cols = sql.SQL(", ").join(
        sql.SQL("{} {}").format(sql.Identifier(c.name), sql.SQL(c.pg_type)) for c in columns
    )
    cursor.execute(sql.SQL("CREATE TEMP TABLE {} ({}) ON COMMIT DROP").format(sql.Identifier(table), cols))


def copy_in(
    cursor: psycopg.Cursor,
    table: str,
    data: pa.Table,
    columns: Sequence[PgColumn],
    *,
    schema: str | None = None,
    constants: Mapping[str, pa.Scalar] | None = None,
) -> int:
    """Binary-COPY the Arrow columns named in `columns` into `table`; returns rows sent.

    Each PgColumn names an Arrow column of `data` and the Postgres type of the
    target column; the Arrow type must fit (e.g. fixed_size_binary(16) for uuid).
    A column named in `constants` takes that value on every row instead of a
    column of `data`.
    """
    statement = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT binary)").format(
        sql.Identifier(schema, table) if schema else sql.Identifier(table),
        sql.SQL(", ").join(sql.Identifier(c.name) for c in columns),
    )
    # Checked here, before COPY starts: a refused frame leaves the transaction usable.
    chunks = encode_binary(data, columns, constants, table=table)
    with cursor.copy(statement) as copy, closing(_one_ahead(chunks)) as ahead:
        for chunk in ahead:
            copy.write(chunk)
    return data.num_rows


def _one_ahead(chunks: Iterator[Any]) -> Generator[Any, None, None]:
    """Yield `chunks`, the next one computed by a worker thread while the caller uses this one.

    At most two chunks are alive at once. If the caller stops early, the one
    chunk in progress is finished and dropped; an error while computing a
    chunk is raised here, in the caller's thread.
    """
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="copy-encode") as worker:
        pending = worker.submit(next, chunks, None)
        while (chunk := pending.result()) is not None:
            pending = worker.submit(next, chunks, None)
            yield chunk


def encode_binary(
    data: pa.Table,
    columns: Sequence[PgColumn],
    constants: Mapping[str, pa.Scalar] | None = None,
    *,
    table: str = "table",
) -> Iterator[bytes]:
    """The Postgres binary COPY stream of `data`'s columns, in chunks of CHUNK_ROWS rows.

    Columns named in `constants` are not read from `data`: their one value is
    encoded once and repeated on every row.
    """
    constants = constants or {}
    unknown = sorted(set(constants) - {c.name for c in columns})
    if unknown:
        raise ValueError(f"copy into {table!r}: constant(s) {unknown} name no column of the copy")
    for column in columns:
        if column.name not in constants and column.name not in data.column_names:
            raise ValueError(f"copy into {table!r}: the frame has no column {column.name!r}")
    if len(constants) == len(columns):
        raise ValueError(f"copy into {table!r}: every column is a constant; the frame gives no rows")
    # Encoded once: a one-row array through the same encoder as the columns.
    repeat: Any = pa.repeat
    fixed = {
        c.name: _encode_field(repeat(constants[c.name], 1), c)[0] for c in columns if c.name in constants
    }
    return _encode_chunks(data.select([c.name for c in columns if c.name not in fixed]), columns, fixed)


def _encode_chunks(
    selected: pa.Table, columns: Sequence[PgColumn], fixed: Mapping[str, Any]
) -> Iterator[bytes]:
    yield _HEADER
    field_count = pa.scalar(struct.pack(">h", len(columns)), pa.binary())
    join: Any = pc.binary_join_element_wise
    for batch in selected.to_batches(max_chunksize=CHUNK_ROWS):
        if batch.num_rows == 0:
            continue
        fields = [
            fixed[col.name] if col.name in fixed else _encode_field(batch.column(col.name), col)
            for col in columns
        ]
        rows = join(field_count, *fields, _EMPTY)
        yield _contiguous_bytes(rows)
    yield _TRAILER


def _contiguous_bytes(rows: Any) -> bytes:
    """The data buffer of a binary array from its first to its last value, without a copy."""
    offsets = np.frombuffer(_buffer(rows, 1), dtype=np.int32, count=len(rows) + 1, offset=rows.offset * 4)
    start, end = int(offsets[0]), int(offsets[-1])
    # psycopg's copy.write takes any buffer; a memoryview slice avoids copying ~100 MB.
    view: Any = memoryview(_buffer(rows, 2))[start:end]
    return view


def _buffer(array: Any, index: int) -> Any:
    """Buffer `index` of an Arrow array (1: values or offsets, 2: data of a binary array)."""
    buffer = array.buffers()[index]
    if buffer is None:  # pragma: no cover - only arrays with values reach here
        raise ValueError(f"Arrow array of type {array.type} has no buffer {index}")
    return buffer


def _fixed_width_values(values: Any, width: int) -> Any:
    """Prefix every big-endian value of width `width` with its int32 length, as a binary array."""
    n = values.size // width
    matrix = np.empty((n, 4 + width), dtype=np.uint8)
    matrix[:, :4] = np.frombuffer(struct.pack(">i", width), dtype=np.uint8)
    matrix[:, 4:] = values.reshape(n, width)
    data: Any = matrix
    fixed = pa.FixedSizeBinaryArray.from_buffers(pa.binary(4 + width), n, [None, pa.py_buffer(data)])
    return fixed.cast(pa.binary())


def _fixed_binary_matrix(array: Any, width: int) -> Any:
    """The raw bytes of a fixed_size_binary array as an (n, width) uint8 matrix (zero-copy)."""
    return np.frombuffer(
        _buffer(array, 1), dtype=np.uint8, count=len(array) * width, offset=array.offset * width
    ).reshape(len(array), width)


def _encode_field(array: Any, column: PgColumn) -> Any:
    # Typed loosely: pyarrow-stubs cannot follow kernels over arrays whose type is known only at run time.
    kind = column.pg_type
    typ: Any = array.type
    has_nulls = array.null_count > 0

    def fail(expected: str) -> ValueError:
        return ValueError(
            f"column {column.name!r}: cannot COPY Arrow type {typ} as {kind} (expected {expected})"
        )

    encoded: Any
    values: Any
    if kind in ("int2", "int4", "int8", "float8"):
        dtype = {"int2": ">i2", "int4": ">i4", "int8": ">i8", "float8": ">f8"}[kind]
        if kind == "float8" and not pa.types.is_floating(typ):
            raise fail("a floating-point column")
        if kind != "float8" and not pa.types.is_integer(typ):
            raise fail("an integer column")
        filled = pc.fill_null(array, 0) if has_nulls else array
        numbers = filled.to_numpy(zero_copy_only=False)
        if kind != "float8":
            info = np.iinfo(np.dtype(dtype))
            if len(numbers) and (numbers.min() < info.min or numbers.max() > info.max):
                raise ValueError(f"column {column.name!r}: a value is out of range for {kind}")
        encoded = _fixed_width_values(numbers.astype(dtype).view(np.uint8), np.dtype(dtype).itemsize)
    elif kind == "bool":
        if not pa.types.is_boolean(typ):
            raise fail("a boolean column")
        filled = pc.fill_null(array, False) if has_nulls else array
        encoded = _fixed_width_values(filled.to_numpy(zero_copy_only=False).astype(np.uint8), 1)
    elif kind == "timestamptz":
        if not pa.types.is_timestamp(typ):
            raise fail("a timestamp column")
        micros = array.cast(pa.timestamp("us", tz=typ.tz)).cast(pa.int64())
        micros = pc.fill_null(micros, 0) if has_nulls else micros
        values = (micros.to_numpy(zero_copy_only=False) - _PG_EPOCH_US).astype(">i8")
        encoded = _fixed_width_values(values.view(np.uint8), 8)
    elif kind == "date":
        if not pa.types.is_date32(typ):
            raise fail("a date32 column")
        days = array.cast(pa.int32())
        days = pc.fill_null(days, 0) if has_nulls else days
        values = (days.to_numpy(zero_copy_only=False) - _PG_EPOCH_DAYS).astype(">i4")
        encoded = _fixed_width_values(values.view(np.uint8), 4)
    elif kind == "uuid":
        if not (pa.types.is_fixed_size_binary(typ) and typ.byte_width == 16):
            raise fail("fixed_size_binary(16)")
        encoded = _fixed_width_values(_fixed_binary_matrix(array, 16), 16)
    elif kind == "bytea" and pa.types.is_fixed_size_binary(typ):
        width = typ.byte_width
        encoded = _fixed_width_values(_fixed_binary_matrix(array, width), width)
    elif kind in ("bytea", "text", "jsonb"):
        if kind == "bytea" and not (pa.types.is_binary(typ) or pa.types.is_large_binary(typ)):
            raise fail("a binary column")
        if kind != "bytea" and not (pa.types.is_string(typ) or pa.types.is_large_string(typ)):
            raise fail("a string column")
        values = array.cast(pa.binary())
        if has_nulls:
            values = pc.fill_null(values, _EMPTY)
        lengths = pc.binary_length(values).to_numpy(zero_copy_only=False).astype(np.int64)
        if kind == "jsonb":
            lengths = lengths + 1  # jsonb's binary form is a version byte (1) and the text
        prefix = pa.FixedSizeBinaryArray.from_buffers(
            pa.binary(4), len(values), [None, pa.py_buffer(lengths.astype(">i4"))]
        ).cast(pa.binary())
        parts = [prefix, pa.scalar(b"\x01", pa.binary()), values] if kind == "jsonb" else [prefix, values]
        join: Any = pc.binary_join_element_wise
        encoded = join(*parts, _EMPTY)
    else:  # pragma: no cover - PgColumn validates the type
        raise fail("a supported type")
    if has_nulls:
        encoded = pc.if_else(pc.is_valid(array), encoded, _NULL_FIELD)
    return encoded


# -- out ----------------------------------------------------------------------------------------


def _select_expression(column: PgColumn) -> sql.Composable:
    """How a column travels to `select_table`: uuid as its 16 bytes, time as epoch microseconds.

    Every expression yields a type psycopg's C loaders turn into a plain
    Python value (bytes, int, float, bool, str), which Arrow takes in bulk.
    """
    ident = sql.Identifier("q", column.name)
    if column.pg_type == "uuid":
        return sql.SQL("uuid_send({})").format(ident)
    if column.pg_type == "timestamptz":
        return sql.SQL("(extract(epoch FROM {}) * 1000000)::int8").format(ident)
    if column.pg_type == "date":
        return sql.SQL("({} - DATE '1970-01-01')").format(ident)
    if column.pg_type == "jsonb":
        return sql.SQL("{}::text").format(ident)
    return ident


# The Arrow type each column's `_select_expression` arrives as, before its final cast.
_WIRE_TYPES: dict[str, pa.DataType] = {
    "bool": pa.bool_(),
    "int2": pa.int16(),
    "int4": pa.int32(),
    "int8": pa.int64(),
    "float8": pa.float64(),
    "date": pa.int32(),
    "timestamptz": pa.int64(),
    "uuid": pa.binary(16),
    "bytea": pa.binary(),
    "text": pa.string(),
    "jsonb": pa.string(),
}


def arrow_type(column: PgColumn) -> pa.DataType:
    """The Arrow type select_table and select_arrow return for a column."""
    if column.pg_type == "bytea":
        return pa.binary(column.width) if column.width else pa.binary()
    if column.pg_type == "timestamptz":
        return pa.timestamp("us", tz="UTC")
    if column.pg_type == "date":
        return pa.date32()
    return _WIRE_TYPES[column.pg_type]


def select_table(
    cursor: psycopg.Cursor,
    query: sql.Composable,
    columns: Sequence[PgColumn],
) -> pa.Table:
    """Run `query` (a SELECT yielding at least `columns`) in the cursor's transaction; an Arrow table.

    The result comes back in the binary protocol as one result set, which
    psycopg decodes in C, and each column goes into Arrow in one call. A
    `COPY ... TO STDOUT` read paid psycopg's Python-level round per row,
    which this does not (figures: docs/benchmarks.md, "Where the figures
    behind the code's choices come from"). Reads of a whole table go through
    `select_arrow` instead.
    """
    statement = sql.SQL("SELECT {} FROM ({}) AS q").format(
        sql.SQL(", ").join(_select_expression(c) for c in columns), query
    )
    cursor.execute(statement, binary=True)
    rows = cursor.fetchall()
    schema = pa.schema([(c.name, arrow_type(c)) for c in columns])
    if not rows:
        return schema.empty_table()
    values = list(zip(*rows, strict=True))
    del rows
    arrays = []
    for column, field, part in zip(columns, schema, values, strict=True):
        wire_type = _WIRE_TYPES[column.pg_type] if column.pg_type in ("date", "timestamptz") else field.type
        try:
            wire = pa.array(part, wire_type)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
            raise ValueError(
                f"column {column.name!r}: cannot read the values as {wire_type}: {error}"
            ) from None
        arrays.append(wire if wire.type == field.type else wire.cast(field.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def select_arrow(url: str, query: str, columns: Sequence[PgColumn]) -> pa.Table:
    """Run `query` (a SELECT of exactly `columns`, in order) on its own ADBC connection.

    The result has the types `arrow_type` names, one chunk per column, like
    `select_table`'s. The connection is opened and closed here (opening one
    reads the type catalog, docs/benchmarks.md): the read runs in its own
    transaction, outside any the caller holds, so it is for reads that need no
    staged rows. `url` is a libpq URL.
    """
    import adbc_driver_postgresql.dbapi as adbc  # imported on first use: loads the C driver

    with closing(adbc.connect(url)) as conn, closing(conn.cursor()) as cursor:
        cursor.execute(query)
        fetched = cursor.fetch_arrow_table()
        conn.rollback()
    if fetched.num_columns != len(columns):
        raise ValueError(f"query returned {fetched.num_columns} column(s), expected {len(columns)}")
    schema = pa.schema([(c.name, arrow_type(c)) for c in columns])
    arrays = []
    for column, field, raw in zip(columns, schema, fetched.columns, strict=True):
        values: Any = raw.combine_chunks()
        if isinstance(values, pa.ExtensionArray):  # uuid arrives as arrow.uuid over fixed_size_binary(16)
            values = values.storage
        try:
            arrays.append(values.cast(field.type))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as error:
            raise ValueError(
                f"column {column.name!r}: cannot read {values.type} as {field.type}: {error}"
            ) from None
    return pa.Table.from_arrays(arrays, schema=schema)
