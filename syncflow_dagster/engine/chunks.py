"""Chunking: how many rows the engine's row-wise work handles at a time.

Stages keep whole frames (the frame contract), but work that needs per-row
temporaries runs chunk by chunk, so those temporaries are bounded by the chunk
size rather than by the entity's size: normalize (the combined source columns,
every coercion layer's intermediate columns, the copy without rejected rows)
and identity (the canonical payload text, one Python bytes object per row for
the hash). The size is the caller's: a sync's stages pass the run's chunk size
(the `tuning` resource's `chunk_size`, SYNCFLOW_CHUNK_SIZE), and the engine
reads no environment.
"""

from __future__ import annotations

from collections.abc import Iterator

DEFAULT_CHUNK_SIZE = 100_000


def chunk_starts(rows: int, size: int) -> Iterator[tuple[int, int]]:
    """(offset, length) of each chunk of `rows` rows; nothing for zero rows."""
    if size < 1:
        raise ValueError(f"chunk size must be at least 1, got {size}")
    for start in range(0, rows, size):
        yield start, min(size, rows - start)
