"""The streamed delta's first pass: a slice whose keys are all distinct is told so from 8 bytes a row."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pytest

from syncflow_dagster.defs.streamed import _keys_distinct
from syncflow_dagster.engine import columns as c
from syncflow_dagster.store.frames import codec
from syncflow_dagster.store.frames.client import FrameSlice, PostgresFrameClient
from syncflow_dagster.store.frames.codec import PARTITION_COLUMN
from syncflow_dagster.store.frames.stream import SliceReader

DAY = dt.date(2026, 12, 6)


@pytest.fixture
def client(database_url: str) -> Iterator[PostgresFrameClient]:
    with PostgresFrameClient(database_url, "syncflow_stage_keys_distinct") as client:
        yield client


def _reader(client: PostgresFrameClient, name: str, keys: Sequence[bytes | None]) -> SliceReader:
    where = FrameSlice(f"s__{name}", name, (DAY,))
    with client.writer(where) as writer:
        writer.write(
            pa.table(
                {
                    c.BK_HASH: pa.array(keys, c.BK_HASH_TYPE),
                    PARTITION_COLUMN: pa.array([DAY] * len(keys), pa.date32()),
                }
            )
        )
    reader = client.reader(where)
    assert reader is not None
    return reader


def test_distinct_repeated_shared_first_words_and_nulls(
    client: PostgresFrameClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(codec, "CHUNK_ROWS", 7)  # the keys span several stored chunks
    rng = np.random.default_rng(3)
    keys = [rng.bytes(16) for _ in range(50)]
    assert _keys_distinct(_reader(client, "distinct", keys), 7)
    assert not _keys_distinct(_reader(client, "repeated", [*keys, keys[3]]), 7)
    # Distinct keys sharing their first word: not told distinct (batch_winners decides exactly).
    shared = [*keys, keys[10][:8] + bytes(8)]
    assert not _keys_distinct(_reader(client, "shared", shared), 7)
    assert not _keys_distinct(_reader(client, "nulls", [*keys, None]), 7)
    assert _keys_distinct(_reader(client, "empty", []), 7)
