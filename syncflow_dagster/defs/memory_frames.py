"""Stage frames held in memory, read and written the way a streamed stage reads and writes a stored slice.

The streamed stages (`streamed.py`) take a `FrameReader` and a `FrameWriter`.
A sync's assets hand them the frame store's `SliceReader` and `SliceWriter`
(Postgres); the maintenance jobs (retry, reconcile, the audit's repair), whose
frames have no partition and are small (a retry batch, a list of deletes),
hand them a `TableReader` and a `TableWriter` instead: the same stage code,
chunk by chunk, over an Arrow table.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import pyarrow as pa


class FrameReader(Protocol):
    """A stage's input: schema and row count up front, then chunks (`SliceReader` is one)."""

    @property
    def schema(self) -> pa.Schema: ...

    @property
    def num_rows(self) -> int: ...

    def chunks(self, size: int, columns: Sequence[str] | None = None) -> Iterator[pa.Table]: ...

    def read_all(self, columns: Sequence[str] | None = None) -> pa.Table: ...


class FrameWriter(Protocol):
    """A stage's output, written chunk by chunk inside `with` (`SliceWriter` is one).

    `stored` is what the stage returns as its frame once the `with` block
    ended without an exception.
    """

    stored: Any

    def __enter__(self) -> Any: ...

    def __exit__(self, exc_type: Any, *rest: Any) -> None: ...

    def write(self, frame: pa.Table) -> None: ...


class TableReader:
    """An Arrow table read as a stored slice is: `size` rows at a time, optionally some columns."""

    def __init__(self, table: pa.Table) -> None:
        self.table = table

    @property
    def schema(self) -> pa.Schema:
        return self.table.schema

    @property
    def num_rows(self) -> int:
        return int(self.table.num_rows)

    def chunks(self, size: int, columns: Sequence[str] | None = None) -> Iterator[pa.Table]:
        """The table `size` rows at a time (the last chunk may be shorter); nothing for no rows."""
        if size < 1:
            raise ValueError(f"chunk size must be at least 1, got {size}")
        table = self.read_all(columns)
        for start in range(0, table.num_rows, size):
            yield table.slice(start, size)

    def read_all(self, columns: Sequence[str] | None = None) -> pa.Table:
        return self.table if columns is None else self.table.select(list(columns))


class TableWriter:
    """Collects what a stage writes; `stored` is the whole output as one table once the block ended.

    Chunks of different columns (a chunk of tombstones lacks the payload) are
    joined as the frame store joins them: missing columns become nulls.
    """

    def __init__(self) -> None:
        self._parts: list[pa.Table] = []
        self.stored: pa.Table | None = None

    def __enter__(self) -> TableWriter:
        self._parts = []
        self.stored = None
        return self

    def __exit__(self, exc_type: Any, *rest: Any) -> None:
        if exc_type is None:
            self.stored = (
                pa.concat_tables(self._parts, promote_options="default") if self._parts else pa.table({})
            )
        self._parts = []

    def write(self, frame: pa.Table) -> None:
        self._parts.append(frame)
