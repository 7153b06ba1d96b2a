"""Chunking: how many rows the engine's row-wise work handles at a time (SYNCFLOW_CHUNK_SIZE).

Stages keep whole frames (the frame contract), but work that needs per-row
temporaries runs chunk by chunk, so those temporaries are bounded by the chunk
size rather than by the entity's size: normalize (the combined source columns,
every coercion layer's intermediate columns, the copy without rejected rows)
and identity (the canonical payload text, one Python bytes object per row for
the hash).
"""

from __future__ import annotations

from collections.abc import Iterator

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_CHUNK_SIZE = 100_000


class ChunkSettings(BaseSettings):
    """SYNCFLOW_CHUNK_SIZE: rows per chunk of the engine's row-wise work (default 100 000)."""

    model_config = SettingsConfigDict(env_prefix="SYNCFLOW_", extra="ignore")

    chunk_size: int = Field(default=DEFAULT_CHUNK_SIZE, ge=1, description="Rows per chunk.")


def chunk_size() -> int:
    """The configured chunk size (read from the environment each time, so a test can change it)."""
    return ChunkSettings().chunk_size


def chunk_starts(rows: int, size: int) -> Iterator[tuple[int, int]]:
    """(offset, length) of each chunk of `rows` rows; nothing for zero rows."""
    if size < 1:
        raise ValueError(f"chunk size must be at least 1, got {size}")
    for start in range(0, rows, size):
        yield start, min(size, rows - start)
