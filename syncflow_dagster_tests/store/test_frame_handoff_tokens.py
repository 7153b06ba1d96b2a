"""The in-process hand-off of streamed slices (store/frames/handoff.py): a reader in the writer's process
serves the committed write from memory, and only while Postgres holds that very write (its token)."""

import datetime as dt
from collections.abc import Iterator
from typing import Any

import dagster as dg
import psycopg
import pyarrow as pa
import pytest
from dagster import AssetExecutionContext

from syncflow_dagster.store.frames.client import FrameConnections, FrameSlice, PostgresFrameClient
from syncflow_dagster.store.frames.codec import PARTITION_COLUMN
from syncflow_dagster.store.frames.handoff import HandedSlices
from syncflow_dagster.store.frames.io_manager import PostgresFrameIOManager
from syncflow_dagster.store.frames.stream import EntityFrames, EntityStreams
from syncflow_dagster_tests.store.test_frame_handoff import DecodeCounter

DAY1 = dt.date(2026, 11, 27)
DAY2 = dt.date(2026, 11, 28)
SCHEMA = "syncflow_stage_tokens"


@pytest.fixture
def client(database_url: str) -> Iterator[PostgresFrameClient]:
    with PostgresFrameClient(database_url, SCHEMA) as client:
        yield client


def _frame(values: list[int], day: dt.date = DAY1) -> pa.Table:
    return pa.table(
        {
            "v": pa.array(values, pa.int64()),
            "t": pa.array([f"row {v}" for v in values], pa.string()),
            PARTITION_COLUMN: pa.array([day] * len(values), pa.date32()),
        }
    )


def _values(reader: Any) -> list[int]:
    return [int(v) for v in reader.read_all()["v"].to_pylist()]


def test_the_committed_write_is_served_from_memory_and_equals_what_postgres_holds(
    client: PostgresFrameClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    handoff = HandedSlices()
    where = FrameSlice("served__items", "items", (DAY1, DAY2))
    with client.writer(where, handoff=handoff) as writer:
        # Interleaved dates and a chunk lacking a column: read back in date order, in the slice's schema.
        writer.write(_frame([1, 2], DAY2))
        writer.write(_frame([3], DAY1))
        writer.write(_frame([4, 5], DAY2).drop_columns(["t"]))
    decodes = DecodeCounter(monkeypatch)
    handed = client.reader(where, handoff)
    assert handed.handed
    from_memory = handed.read_all()
    keys = handed.read_all(["v", PARTITION_COLUMN])
    chunks = list(handed.chunks(2))
    assert decodes.count == 0, "the slice committed in this process was decoded from Postgres"
    stored = client.reader(where)  # no hand-off: Postgres
    assert not stored.handed
    from_postgres = stored.read_all()
    assert decodes.count > 0
    assert from_memory.schema.equals(from_postgres.schema)
    assert from_memory.equals(from_postgres)
    assert keys.equals(from_postgres.select(["v", PARTITION_COLUMN]))
    assert pa.concat_tables(chunks).equals(from_postgres)
    assert [c.num_rows for c in chunks] == [2, 2, 1]
    assert _values(stored) == [3, 1, 2, 4, 5]
    assert handoff.served == 1


def test_a_second_write_of_the_slice_elsewhere_is_read_from_postgres(client: PostgresFrameClient) -> None:
    handoff = HandedSlices()
    where = FrameSlice("rewritten__items", "items", (DAY1,))
    client.replace_slice(where, _frame([1, 2, 3]), handoff)
    # Another process (or run) writes the slice again: same rows, same schema, other values.
    client.replace_slice(where, _frame([7, 8, 9]))
    reader = client.reader(where, handoff)
    assert not reader.handed
    assert _values(reader) == [7, 8, 9]


def test_a_new_write_in_this_process_replaces_what_was_kept(client: PostgresFrameClient) -> None:
    handoff = HandedSlices()
    where = FrameSlice("again__items", "items", (DAY1,))
    client.replace_slice(where, _frame([1, 2, 3]), handoff)
    client.replace_slice(where, _frame([4, 5]), handoff)
    reader = client.reader(where, handoff)
    assert reader.handed
    assert _values(reader) == [4, 5]
    # Taken: a second reader of the slice reads Postgres, and finds the same.
    again = client.reader(where, handoff)
    assert not again.handed
    assert _values(again) == [4, 5]


def _failed_write(client: PostgresFrameClient, where: FrameSlice, handoff: HandedSlices | None) -> None:
    with client.writer(where, handoff=handoff) as writer:
        writer.write(_frame([66, 67, 68]))
        raise RuntimeError("stage failed")


def test_a_write_rolled_back_is_never_served(client: PostgresFrameClient) -> None:
    handoff = HandedSlices()
    where = FrameSlice("rolled_back__items", "items", (DAY1,))
    client.replace_slice(where, _frame([1, 2, 3]), handoff)
    with pytest.raises(RuntimeError, match="stage failed"):
        _failed_write(client, where, handoff)
    reader = client.reader(where, handoff)
    assert not reader.handed
    assert _values(reader) == [1, 2, 3]
    assert len(handoff) == 0
    # A write rolled back elsewhere leaves Postgres with the kept write's token: that one is served.
    client.replace_slice(where, _frame([4, 5]), handoff)
    with pytest.raises(RuntimeError, match="stage failed"):
        _failed_write(client, where, None)
    kept = client.reader(where, handoff)
    assert kept.handed
    assert _values(kept) == [4, 5]


def test_a_reader_that_finds_another_token_reads_postgres(
    client: PostgresFrameClient, database_url: str
) -> None:
    handoff = HandedSlices()
    where = FrameSlice("token__items", "items", (DAY1, DAY2))
    client.replace_slice(where, _frame([1, 2]), handoff)
    with psycopg.connect(database_url, autocommit=True) as conn:
        # One date's token differs (its row written by another write): the whole slice reads Postgres.
        conn.execute(
            f"UPDATE {SCHEMA}._slices SET write_token = %s WHERE table_name = %s AND partition_date = %s",
            ("0" * 32, where.table, DAY2),
        )
    reader = client.reader(where, handoff)
    assert not reader.handed
    assert _values(reader) == [1, 2]
    # A hand-off of another run (a re-run of the partition in this process) holds nothing of it.
    client.replace_slice(where, _frame([3]), handoff)
    assert not client.reader(where, HandedSlices()).handed


def test_a_slice_over_the_limit_is_not_kept_and_entries_nobody_takes_are_bounded(
    client: PostgresFrameClient,
) -> None:
    handoff = HandedSlices(max_rows=3)
    large = FrameSlice("large__items", "items", (DAY1,))
    client.replace_slice(large, _frame([1, 2, 3, 4]), handoff)
    assert len(handoff) == 0
    assert not client.reader(large, handoff).handed
    for name in ("a", "b", "c"):
        client.replace_slice(FrameSlice(f"small_{name}__items", "items", (DAY1,)), _frame([1, 2]), handoff)
    assert len(handoff) == 1  # 2 + 2 rows would pass the limit: the oldest went
    assert client.reader(FrameSlice("small_c__items", "items", (DAY1,)), handoff).handed


def test_an_old_slices_table_gets_its_token_column(database_url: str) -> None:
    schema = "syncflow_stage_old_slices"
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
        conn.execute(
            f"CREATE TABLE {schema}._slices (table_name text NOT NULL, partition_date date NOT NULL,"
            " row_count bigint NOT NULL, written_at timestamptz NOT NULL, PRIMARY KEY (table_name, partition_date))"
        )
    handoff = HandedSlices()
    where = FrameSlice("old__items", "items", (DAY1,))
    with PostgresFrameClient(database_url, schema) as client:
        client.replace_slice(where, _frame([1, 2]), handoff)
        reader = client.reader(where, handoff)
        assert reader.handed
        assert _values(reader) == [1, 2]
        assert _values(client.reader(where)) == [1, 2]


# ------------------------------------------------------------------------------------------------
# Through Dagster: streamed stages in one process hand their slices over; the IO manager owns them


def _streamed_assets(seen: dict[str, Any]) -> list[dg.AssetsDefinition]:
    partitions = dg.MultiPartitionsDefinition(
        {
            "entity": dg.StaticPartitionsDefinition(["items"]),
            "date": dg.DailyPartitionsDefinition("2026-11-01"),
        }
    )

    @dg.asset(partitions_def=partitions, io_manager_key="frames", required_resource_keys={"frames"})
    def streamed_upstream(context: AssetExecutionContext) -> EntityFrames:
        manager: PostgresFrameIOManager = context.resources.frames
        seen["handoff"] = manager.handoff
        seen["connections"] = manager.connections
        with manager.writer("streamed_upstream", "items", (DAY2,)) as writer:
            writer.write(pa.table({"v": pa.array(range(1000), pa.int64())}))
        return EntityFrames({"items": writer.stored})

    @dg.asset(partitions_def=partitions, io_manager_key="frames", required_resource_keys={"frames"})
    def streamed_downstream(context: AssetExecutionContext, streamed_upstream: EntityStreams) -> pa.Table:
        manager: PostgresFrameIOManager = context.resources.frames
        seen["same_connections"] = manager.connections is seen["connections"]
        seen["idle_in_run"] = manager.connections.idle
        reader = streamed_upstream["items"]
        seen["handed"] = reader.handed
        total = sum(int(chunk["v"].to_numpy().sum()) for chunk in reader.chunks(300))
        return pa.table({"total": [total]})

    return [streamed_upstream, streamed_downstream]


def test_streamed_stages_in_one_process_hand_over_without_decoding(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    decodes = DecodeCounter(monkeypatch)
    seen: dict[str, Any] = {}
    manager = PostgresFrameIOManager(database_url=database_url, schema_name="syncflow_stage_streamed_handoff")
    key = dg.MultiPartitionKey({"entity": "items", "date": DAY2.isoformat()})
    result = dg.materialize(_streamed_assets(seen), partition_key=key, resources={"frames": manager})
    assert result.success
    assert seen["handed"] is True
    assert decodes.count == 0
    # The run's hand-off ended with the run: nothing stays held, and a new run starts empty.
    assert isinstance(seen["handoff"], HandedSlices)
    assert len(seen["handoff"]) == 0
    assert manager.handoff is None
    # One pool of connections for the run: reused from stage to stage, closed by the teardown.
    assert seen["same_connections"] is True
    assert seen["idle_in_run"] >= 1, "the upstream's connection was not kept for the rest of the run"
    assert isinstance(seen["connections"], FrameConnections)
    assert seen["connections"].closed
    assert seen["connections"].idle == 0
    monkeypatch.undo()
    with PostgresFrameClient(database_url, "syncflow_stage_streamed_handoff") as reading:
        stored = reading.select_slice(FrameSlice("streamed_downstream__items", "items", (DAY2,)))
    assert stored is not None
    assert stored["total"].to_pylist() == [sum(range(1000))]
