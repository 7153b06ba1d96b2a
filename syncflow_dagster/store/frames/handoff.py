"""The in-process hand-off: a small slice a stage just committed, served to its reader from memory.

Every stage reads its input slice from Postgres (stream.py), which costs a
decode of every stored chunk and a round trip per stage. When the writer and
the reader of a slice run in the same process (in-process execution, or the
stages of one run worker), the writer can keep what it wrote and the reader
can take it instead, provided that it is exactly what Postgres holds:

* A `SliceWriter` given a `HandedSlices` keeps the tables it writes, per
  date in write order (the order the reader reads stored chunks in), only
  while the slice has at most `limit()` rows; beyond that it keeps nothing,
  so the memory held follows the chunk size, not the partition's size.
* Each write records a fresh token (a uuid) on the slice's `_slices` rows in
  the transaction that commits it; only after that commit are the tables
  put here, under that token.
* A `SliceReader` opened with the same `HandedSlices` reads the slice's
  tokens from `_slices` as it opens it (its row counts are checked as for
  any read) and takes the tables only if every date of the slice carries the
  kept entry's token. Any other write of the slice since (a re-run, another
  process, the same process without the entry) recorded another token; a
  write rolled back recorded none and put nothing here; a reader in another
  process has no entry. Each of those reads Postgres.

Taking removes the entry (the reader holds it while its stage runs); entries
nobody takes go, oldest first, once the rows held pass `limit()`, and all go
when the owner (the IO manager, for one run) clears it.
"""

from __future__ import annotations

import datetime as dt
import threading
from dataclasses import dataclass

import pyarrow as pa

from syncflow_dagster.engine.chunks import DEFAULT_CHUNK_SIZE

# A slice is kept for its reader while it has at most this many chunks' rows
# (the run's chunk size, SYNCFLOW_CHUNK_SIZE): the stage holds about one chunk of
# input and one of output anyway, and a partition of a few chunks is the common
# in-process case. Each stage's writer sets the bound from the run's chunk size.
HANDOFF_CHUNKS = 2
DEFAULT_HANDOFF_ROWS = HANDOFF_CHUNKS * DEFAULT_CHUNK_SIZE

SliceKey = tuple[str, str, str, tuple[dt.date, ...]]


@dataclass(frozen=True)
class HeldSlice:
    """The tables of a committed write: per date, in the order they were written."""

    token: str
    schema: pa.Schema
    parts: tuple[pa.Table, ...]
    num_rows: int


class HandedSlices:
    """Slices committed in this process, held for their reader (see the module's docstring)."""

    def __init__(self, max_rows: int = DEFAULT_HANDOFF_ROWS) -> None:
        self._max_rows = max_rows
        self._held: dict[SliceKey, HeldSlice] = {}
        self._lock = threading.Lock()
        self.served = 0  # slices a reader took from memory (tests, diagnostics)

    def bound(self, max_rows: int) -> None:
        """Keep slices of at most `max_rows` rows from now on (the run's stages set it from their chunk size)."""
        if max_rows < 0:
            raise ValueError(f"the hand-off's bound must be at least 0 rows, got {max_rows}")
        self._max_rows = max_rows

    def limit(self) -> int:
        """Most rows a slice may have to be kept (and most rows held by entries not taken)."""
        return self._max_rows

    def forget(self, key: SliceKey) -> None:
        """A write of the slice begins: what was kept of an earlier one is not kept any longer."""
        with self._lock:
            self._held.pop(key, None)

    def put(self, key: SliceKey, held: HeldSlice) -> None:
        """Keep a committed write (call only after its commit) under the token it recorded."""
        limit = self.limit()
        if held.num_rows > limit:
            return
        with self._lock:
            self._held.pop(key, None)
            self._held[key] = held
            total = sum(entry.num_rows for entry in self._held.values())
            while total > limit and len(self._held) > 1:
                oldest = next(iter(self._held))
                total -= self._held.pop(oldest).num_rows

    def take(self, key: SliceKey, tokens: dict[dt.date, str | None]) -> HeldSlice | None:
        """The kept write if every date of the slice carries its token in Postgres; removed either way."""
        with self._lock:
            held = self._held.pop(key, None)
        if held is None:
            return None
        dates = key[3]
        if any(tokens.get(day) != held.token for day in dates):
            return None
        with self._lock:
            self.served += 1
        return held

    def clear(self) -> None:
        with self._lock:
            self._held.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._held)
