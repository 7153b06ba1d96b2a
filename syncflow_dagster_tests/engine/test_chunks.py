"""Chunking: chunk bounds, and hashes and normalised rows unchanged whatever the chunk size."""

from __future__ import annotations

import pyarrow as pa
import pytest

from syncflow_dagster.catalog import default_catalog
from syncflow_dagster.engine.chunks import DEFAULT_CHUNK_SIZE, chunk_starts
from syncflow_dagster.engine.identity import (
    add_identity,
    canonical_key_text,
    canonical_payload,
    data_hash_of,
    identity_hashes,
    key_hash_of,
)
from syncflow_dagster.engine.normalize import normalize
from syncflow_dagster.simulators.datagen import generate_dataset


def test_chunk_starts_cover_every_row_once() -> None:
    assert list(chunk_starts(0, 10)) == []
    assert list(chunk_starts(25, 10)) == [(0, 10), (10, 10), (20, 5)]
    assert list(chunk_starts(20, 10)) == [(0, 10), (10, 10)]
    with pytest.raises(ValueError, match="at least 1"):
        list(chunk_starts(5, 0))


def test_data_hashes_are_the_same_for_any_chunk_size() -> None:
    catalog = default_catalog()
    entity = catalog.entity("work_orders")
    raw = generate_dataset(catalog, 3000, seed=5)[entity.source]
    rows = normalize(entity, raw).rows
    whole = data_hash_of(canonical_payload(entity, rows))
    for size in (1, 7, 1000, rows.num_rows - 1, rows.num_rows, rows.num_rows + 1):
        part = rows.slice(0, 50) if size == 1 else rows
        _, data = identity_hashes(entity, part, canonical_key_text(entity, part), size)
        assert data.equals(whole.slice(0, 50) if size == 1 else whole), size
    # `add_identity` hashes in chunks of the size it is given, and by default in one chunk here.
    assert rows.num_rows < DEFAULT_CHUNK_SIZE
    for size in (512, DEFAULT_CHUNK_SIZE):
        assert add_identity(entity, rows, size)["_data_hash"].combine_chunks().equals(whole), size


def test_key_hashes_taken_beside_the_payloads_are_the_same_for_any_chunk_size() -> None:
    catalog = default_catalog()
    entity = catalog.entity("work_orders")
    rows = normalize(entity, generate_dataset(catalog, 3000, seed=6)[entity.source]).rows
    key = canonical_key_text(entity, rows)
    whole_keys, whole_data = key_hash_of(key), data_hash_of(canonical_payload(entity, rows))
    assert len(whole_keys) == rows.num_rows > 1000
    for size in (7, 1000, rows.num_rows - 1, rows.num_rows, rows.num_rows + 1):
        keys, data = identity_hashes(entity, rows, key, size)
        assert keys.equals(whole_keys), size
        assert data.equals(whole_data), size


def test_normalize_gives_the_same_rows_and_rejections_for_any_chunk_size() -> None:
    catalog = default_catalog()
    entity = catalog.entity("work_orders")
    raw = generate_dataset(catalog, 3000, seed=5)[entity.source]
    n = raw.num_rows
    whole = normalize(entity, raw, size=n)
    assert whole.rejected.num_rows > 0, "the generated data should hold some dirty rows"

    def rejected_rows(table: pa.Table) -> list[tuple[object, ...]]:
        return sorted(tuple(row.values()) for row in table.to_pylist())

    for size in (250, 1000, n - 1):
        chunked = normalize(entity, raw, size=size)
        assert chunked.rows.schema == whole.rows.schema
        assert chunked.rows.combine_chunks().equals(whole.rows.combine_chunks()), size
        assert rejected_rows(chunked.rejected) == rejected_rows(whole.rejected), size
    assert normalize(entity, raw, size=600).rows.column(0).num_chunks == 5
    assert normalize(entity, raw).rows.column(0).num_chunks == 1  # the default: one chunk of 3 000 rows
