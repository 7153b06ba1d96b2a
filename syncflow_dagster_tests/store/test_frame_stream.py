"""Streaming a stage frame: a slice written chunk by chunk in one transaction, read back in chunks of any size."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator

import pyarrow as pa
import pytest

from syncflow_dagster.store.frames import codec
from syncflow_dagster.store.frames.client import FrameSlice, PostgresFrameClient
from syncflow_dagster.store.frames.codec import PARTITION_COLUMN

DAY1 = dt.date(2026, 11, 27)
DAY2 = dt.date(2026, 11, 28)


@pytest.fixture
def client(database_url: str) -> Iterator[PostgresFrameClient]:
    with PostgresFrameClient(database_url, "syncflow_stage_stream") as client:
        yield client


def _part(values: list[int], day: dt.date, *, text: bool = True) -> pa.Table:
    columns: dict[str, pa.Array] = {"v": pa.array(values, pa.int64())}
    if text:
        columns["t"] = pa.array([str(v) for v in values], pa.string())
    columns[PARTITION_COLUMN] = pa.array([day] * len(values), pa.date32())
    return pa.table(columns)


def test_appends_of_differing_columns_read_back_in_one_schema_in_any_chunk_size(
    client: PostgresFrameClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(codec, "CHUNK_ROWS", 3)
    where = FrameSlice("s__mixed", "mixed", (DAY1, DAY2))
    with client.writer(where) as writer:
        writer.write(_part([1, 2, 3, 4], DAY1))
        writer.write(_part([5, 6], DAY2, text=False))  # a chunk without the text column (tombstones, say)
        writer.write(_part([], DAY1))
        writer.write(_part([7, 8, 9, 10, 11], DAY1))
    stored = writer.stored
    assert stored is not None
    assert stored.num_rows == 11
    assert stored.rows_per_date == {DAY1: 9, DAY2: 2}
    reader = client.reader(where)
    assert reader is not None
    assert reader.num_rows == 11
    assert reader.schema.names == ["v", "t", PARTITION_COLUMN]
    whole = reader.read_all()
    assert whole["v"].to_pylist() == [1, 2, 3, 4, 7, 8, 9, 10, 11, 5, 6]  # by date, then as written
    assert whole["t"].to_pylist()[-2:] == [None, None]
    for size in (1, 2, 7, 100):
        chunks = list(reader.chunks(size, columns=["v"]))
        assert all(chunk.num_rows == size for chunk in chunks[:-1])
        assert [v for chunk in chunks for v in chunk["v"].to_pylist()] == whole["v"].to_pylist()
        assert all(chunk.column_names == ["v"] for chunk in chunks)


def test_a_failed_write_leaves_the_previous_slice_and_an_empty_one_keeps_its_schema(
    client: PostgresFrameClient,
) -> None:
    where = FrameSlice("s__atomic", "atomic", (DAY1,))
    client.replace_slice(where, _part([1, 2], DAY1))

    def failing_stage() -> None:
        with client.writer(where) as writer:
            writer.write(_part([3, 4, 5], DAY1))
            raise RuntimeError("stage failed")

    with pytest.raises(RuntimeError, match="stage failed"):
        failing_stage()
    reader = client.reader(where)
    assert reader is not None
    assert reader.read_all()["v"].to_pylist() == [1, 2]
    with client.writer(where):
        pass  # a stage that wrote nothing: the slice is empty, in the stored schema
    empty = client.reader(where)
    assert empty is not None
    assert empty.num_rows == 0
    assert list(empty.chunks(5)) == []
    assert empty.read_all().column_names == ["v", "t", PARTITION_COLUMN]
