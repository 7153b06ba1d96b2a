"""The stage-frame chunk codec: rows of one date as LZ4 Arrow IPC streams, and back.

A stored chunk is one table row (`_partition_date`, `seq`, `rows`, `ipc`):
at most `CHUNK_ROWS` frame rows of one date, as one Arrow IPC stream with
LZ4-compressed buffers. A slice's chunks may have been written by different
appends of a streaming writer whose tables differ slightly (a chunk of
tombstones only lacks payload columns): `conform` reads each of them in the
slice's one schema, recorded when the write committed.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

PARTITION_COLUMN = "_partition_date"
SEQ, ROWS, IPC = "seq", "rows", "ipc"
CHUNK_ROWS = 65_536
_IPC_OPTIONS = pa.ipc.IpcWriteOptions(compression="lz4")
_CHUNK_FIELDS: list[Any] = [
    pa.field(PARTITION_COLUMN, pa.date32(), nullable=False),
    pa.field(SEQ, pa.int32(), nullable=False),
    pa.field(ROWS, pa.int32(), nullable=False),
    pa.field(IPC, pa.binary(), nullable=False),
]
CHUNK_SCHEMA = pa.schema(_CHUNK_FIELDS)


class FrameStoreError(RuntimeError):
    """A frame could not be stored or loaded; the message names the table and why."""


class FrameLostError(FrameStoreError):
    """A stored slice has fewer rows than were written: crash recovery emptied its UNLOGGED table."""


def encode(piece: pa.Table) -> pa.Buffer:
    """One IPC stream of `piece` (LZ4 buffers)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, piece.schema, options=_IPC_OPTIONS) as writer:
        writer.write_table(piece)
    return sink.getvalue()


def decode(blob: Any, columns: Sequence[str] | None = None) -> pa.Table:
    """The rows of one stored IPC stream (`blob`: bytes or an Arrow buffer); with `columns`, only
    those of them the chunk holds, the others' buffers left compressed and unread."""
    buffer = blob if isinstance(blob, pa.Buffer) else pa.py_buffer(blob)
    if columns is None:
        return pa.ipc.open_stream(buffer).read_all()
    names = pa.ipc.open_stream(buffer).schema.names  # reads the schema message only
    wanted = [index for index, name in enumerate(names) if name in set(columns)]
    options = pa.ipc.IpcReadOptions(included_fields=wanted)
    return pa.ipc.open_stream(buffer, options=options).read_all()


def chunk_batch(day: dt.date, seq: int, piece: pa.Table) -> pa.RecordBatch:
    """The stored row of one chunk (CHUNK_SCHEMA), ready for COPY."""
    blob = encode(piece)
    offsets = pa.py_buffer(np.array([0, blob.size], dtype=np.int32).tobytes())
    return pa.record_batch(
        [
            pa.array([day], pa.date32()),
            pa.array([seq], pa.int32()),
            pa.array([piece.num_rows], pa.int32()),
            pa.Array.from_buffers(pa.binary(), 1, [None, offsets, blob]),
        ],
        schema=CHUNK_SCHEMA,
    )


def by_date(frame: pa.Table, counts: dict[dt.date, int]) -> Iterator[tuple[dt.date, pa.Table]]:
    """(date, that date's rows) for each date with rows; no copy when there is one date.

    `counts` is the frame's rows per date (`rows_per_date`).
    """
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


def rows_per_date(frame: pa.Table, dates: tuple[dt.date, ...] | list[dt.date]) -> dict[dt.date, int]:
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


def unify(first: pa.Schema | None, second: pa.Schema) -> pa.Schema:
    """The schema that holds chunks of both (columns of either; a null-typed column takes the other's type)."""
    if first is None or first.equals(second):
        return second
    try:
        return pa.unify_schemas([first, second], promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise FrameStoreError(f"a stage wrote chunks of incompatible schemas: {exc}") from exc


def conform(part: pa.Table, schema: pa.Schema, table: str) -> pa.Table:
    """`part` in `schema`'s columns and types (a column it lacks is all nulls)."""
    if part.schema.equals(schema):
        return part
    columns = []
    for field in schema:
        if field.name in part.column_names:
            column = part[field.name]
            try:
                columns.append(column if column.type == field.type else column.cast(field.type))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise FrameStoreError(
                    f"stage table {table} holds a chunk whose column {field.name!r} is {column.type}, "
                    f"not {field.type}"
                ) from exc
        else:
            columns.append(pa.nulls(part.num_rows, field.type))
    extra = [name for name in part.column_names if name not in schema.names]
    if extra:
        raise FrameStoreError(f"stage table {table} holds a chunk with columns {extra} outside its schema")
    return pa.Table.from_arrays(columns, schema=schema)
