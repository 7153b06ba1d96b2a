"""The Postgres frame IO manager: slices replaced atomically, every catalog type round-trips."""

import datetime as dt
import decimal
import uuid
from collections.abc import Iterator

import dagster as dg
import pandas as pd
import psycopg
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from syncflow_dagster.catalog import FieldType, default_catalog
from syncflow_dagster.engine import columns as c
from syncflow_dagster.engine.normalize import target_type
from syncflow_dagster.store.database import libpq_url
from syncflow_dagster.store.frames.client import FrameSlice, PostgresFrameClient, stage_table_name
from syncflow_dagster.store.frames.codec import PARTITION_COLUMN, FrameLostError, FrameStoreError
from syncflow_dagster.store.frames.io_manager import PostgresFrameIOManager, partition_scope, partition_scopes

DAY1 = dt.date(2026, 11, 27)
DAY2 = dt.date(2026, 11, 28)


def _sample(field_type: FieldType) -> list[object]:
    return {
        FieldType.INT: [1, None, -(2**62)],
        FieldType.DECIMAL: [decimal.Decimal("1.230"), None, decimal.Decimal("-0.001")],
        FieldType.BOOL: [True, None, False],
        FieldType.DATE: [dt.date(2026, 1, 1), None, dt.date(1999, 12, 31)],
        FieldType.DATETIME: [
            dt.datetime(2026, 1, 1, 12, 0, 0, 123000, tzinfo=dt.UTC),
            None,
            dt.datetime(1970, 1, 1, tzinfo=dt.UTC),
        ],
        FieldType.STRING: ["Grüße", None, ""],
        FieldType.ENUM: ["OPEN", None, "CLOSED"],
    }[field_type]


def _every_catalog_type() -> pa.Table:
    """One column per distinct Arrow type the catalog's fields normalise to, plus SyncFlow's own."""
    columns: dict[str, pa.Array] = {}
    for entity in default_catalog().entities:
        for spec in entity.fields:
            arrow_type = target_type(spec)
            name = (
                f"{spec.type.value}_{str(arrow_type).replace('(', '_').replace(')', '').replace(', ', '_')}"
            )
            name = "".join(ch if ch.isalnum() or ch == "_" else "_" for ch in name).lower()
            if name not in columns:
                values = _sample(spec.type)
                if spec.type is FieldType.DECIMAL:
                    values = [
                        None if v is None else v.quantize(decimal.Decimal(1).scaleb(-arrow_type.scale))
                        for v in values
                    ]
                columns[name] = pa.array(values, arrow_type)
    columns[c.BK_HASH] = pa.array([b"\x00" * 16, None, b"\xff" * 16], c.BK_HASH_TYPE)
    columns[c.DATA_HASH] = pa.array([b"\x01" * 32, None, b"\x02" * 32], c.DATA_HASH_TYPE)
    columns[c.ROWVERSION] = pa.array([1, 2, None], c.ROWVERSION_TYPE)
    columns[c.RECIPE] = pa.array([1, None, 1], c.RECIPE_TYPE)
    columns[c.CHANGED_AT] = pa.array([dt.datetime(2026, 1, 1, tzinfo=dt.UTC), None, None], c.CHANGED_AT_TYPE)
    return pa.table(columns)


def dated_frame(day: dt.date, values: list[int]) -> pa.Table:
    """A one-column frame of `values`, every row on `day`."""
    return pa.table(
        {"v": pa.array(values, pa.int64()), PARTITION_COLUMN: pa.array([day] * len(values), pa.date32())}
    )


@pytest.fixture
def client(database_url: str) -> Iterator[PostgresFrameClient]:
    with PostgresFrameClient(database_url, schema="syncflow_stage_test") as client:
        yield client


def test_every_catalog_type_round_trips_with_its_dtype(client: PostgresFrameClient) -> None:
    frame = _every_catalog_type()
    frame = frame.append_column(PARTITION_COLUMN, pa.array([DAY1] * frame.num_rows, pa.date32()))
    where = FrameSlice(stage_table_name("normalized", "roundtrip"), "roundtrip", (DAY1,))
    assert client.replace_slice(where, frame) is True
    back = client.select_slice(where)
    assert back is not None
    assert back.schema == frame.schema
    assert back.to_pylist() == frame.to_pylist()


def test_replacing_a_slice_leaves_other_dates_alone(client: PostgresFrameClient) -> None:
    one = FrameSlice("t__slices", "slices", (DAY1,))
    two = FrameSlice("t__slices", "slices", (DAY2,))
    client.replace_slice(one, dated_frame(DAY1, [1, 2, 3]))
    client.replace_slice(two, dated_frame(DAY2, [10]))
    assert client.replace_slice(one, dated_frame(DAY1, [4])) is False  # same schema: no re-create
    both = client.select_slice(FrameSlice("t__slices", "slices", (DAY1, DAY2)))
    assert sorted(both["v"].to_pylist()) == [4, 10]
    pruned = client.prune(DAY2)
    assert pruned["t__slices"] == 1
    assert client.select_slice(one).num_rows == 0


def test_partition_scope_reads_one_entity_and_its_dates() -> None:
    keys = [dg.MultiPartitionKey({"entity": "items", "date": d.isoformat()}) for d in (DAY2, DAY1)]
    assert partition_scope(keys) == ("items", (DAY1, DAY2))
    assert partition_scope(["2026-11-28|items"]) == ("items", (DAY2,))
    with pytest.raises(FrameStoreError, match="one entity at a time"):
        partition_scope(["2026-11-28|items", "2026-11-28|sites"])


def test_partition_scopes_read_each_entity_and_its_dates() -> None:
    keys = ["2026-11-28|sites", "2026-11-27|items", "2026-11-27|sites", "2026-11-28|items"]
    assert partition_scopes(keys) == {"sites": (DAY1, DAY2), "items": (DAY1, DAY2)}
    assert list(partition_scopes(keys)) == ["sites", "items"]


def test_io_manager_stores_and_loads_partitions_through_dagster(database_url: str) -> None:
    partitions = dg.MultiPartitionsDefinition(
        {
            "entity": dg.StaticPartitionsDefinition(["items"]),
            "date": dg.DailyPartitionsDefinition("2026-11-01"),
        }
    )

    @dg.asset(partitions_def=partitions, io_manager_key="frames")
    def upstream(context: dg.AssetExecutionContext) -> pd.DataFrame:
        day = context.partition_key.keys_by_dimension["date"]
        return pd.DataFrame({"n": [1, 2], "day": [day, day]})

    @dg.asset(partitions_def=partitions, io_manager_key="frames")
    def downstream(upstream: pa.Table) -> pa.Table:
        return upstream.append_column("double", pc.multiply(upstream["n"], 2))

    manager = PostgresFrameIOManager(database_url=database_url, schema_name="syncflow_stage_dg")
    key = dg.MultiPartitionKey({"entity": "items", "date": "2026-11-28"})
    result = dg.materialize([upstream, downstream], partition_key=key, resources={"frames": manager})
    assert result.success
    metadata = result.asset_materializations_for_node("downstream")[0].metadata
    assert metadata["dagster/row_count"].value == 2
    assert metadata["dagster/table_name"].value == "syncflow_stage_dg.downstream__items"
    assert metadata["read_back"].value == "syncflow frame show downstream items 2026-11-28"
    with PostgresFrameClient(database_url, "syncflow_stage_dg") as reading:
        stored = reading.select_slice(FrameSlice("downstream__items", "items", (DAY2,)))
    assert stored["double"].to_pylist() == [2, 4]


def test_unsafe_table_names_are_refused_and_any_column_name_round_trips(client: PostgresFrameClient) -> None:
    frame = pa.table({'bad "name"; --': [1], PARTITION_COLUMN: pa.array([DAY1], pa.date32())})
    with pytest.raises(FrameStoreError, match="unsafe SQL identifier"):
        client.replace_slice(FrameSlice('t__bad"; drop', "bad", (DAY1,)), frame)
    # Column names never become SQL: the source system's own spelling is kept as it is.
    where = FrameSlice("t__names", "names", (DAY1,))
    client.replace_slice(where, frame)
    assert client.select_slice(where) == frame


def test_a_frame_over_several_dates_is_stored_in_chunks_and_read_by_any_dates(
    client: PostgresFrameClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    from syncflow_dagster.store.frames import codec

    monkeypatch.setattr(codec, "CHUNK_ROWS", 7)
    days = [DAY1, DAY2, DAY1] * 10 + [DAY2]  # interleaved: 20 rows of DAY1, 11 of DAY2
    frame = pa.table(
        {
            "v": pa.array(range(len(days)), pa.int64()),
            "amount": pa.array([decimal.Decimal(f"{i}.25") for i in range(len(days))], pa.decimal128(12, 2)),
            PARTITION_COLUMN: pa.array(days, pa.date32()),
        }
    )
    both = FrameSlice("t__chunked", "chunked", (DAY1, DAY2))
    client.replace_slice(both, frame)
    back = client.select_slice(both)
    assert back.schema == frame.schema
    assert sorted(back.to_pylist(), key=lambda row: row["v"]) == frame.to_pylist()
    first = client.select_slice(FrameSlice("t__chunked", "chunked", (DAY1,)))
    assert first["v"].to_pylist() == [v for v, day in enumerate(days) if day == DAY1]
    assert client.prune(DAY2)["t__chunked"] == 20  # frame rows, not stored chunks
    assert client.select_slice(FrameSlice("t__chunked", "chunked", (DAY2,))).num_rows == 11


def test_a_table_of_the_row_layout_is_replaced_on_write_and_refused_on_read(
    client: PostgresFrameClient, database_url: str
) -> None:
    written = dated_frame(DAY1, [1, 2])
    where = FrameSlice("t__legacy", "legacy", (DAY1,))
    client.replace_slice(where, written)
    # What an earlier release left: one table row per frame row.
    with psycopg.connect(libpq_url(database_url), autocommit=True) as conn:
        conn.execute('DROP TABLE "syncflow_stage_test"."t__legacy"')
        conn.execute('CREATE TABLE "syncflow_stage_test"."t__legacy" (v bigint, "_partition_date" date)')
    # The next run's connections check the table again (this client's checked it once).
    with PostgresFrameClient(database_url, client.schema) as next_run:
        with pytest.raises(FrameStoreError, match="row layout; materialize the partition again"):
            next_run.select_slice(where)
        assert next_run.replace_slice(where, written) is True  # re-created
        assert next_run.select_slice(where) == written


def test_a_slice_emptied_under_the_manager_is_refused_not_read_as_empty(
    client: PostgresFrameClient, database_url: str
) -> None:
    """Crash recovery empties UNLOGGED stage tables; a stage must not take that for "no rows"."""

    one = FrameSlice("t__lost", "lost", (DAY1,))
    both = FrameSlice("t__lost", "lost", (DAY1, DAY2))
    client.replace_slice(one, dated_frame(DAY1, [1, 2, 3]))
    client.replace_slice(FrameSlice("t__lost", "lost", (DAY2,)), dated_frame(DAY2, []))
    assert client.select_slice(both)["v"].to_pylist() == [1, 2, 3]
    # What crash recovery does to an UNLOGGED table: its rows are gone, the logged catalog is not.
    with psycopg.connect(libpq_url(database_url), autocommit=True) as conn:
        conn.execute('TRUNCATE "syncflow_stage_test"."t__lost"')
    with pytest.raises(FrameLostError, match=r"t__lost of lost lost rows \(2026-11-27: 3 written, 0 found\)"):
        client.select_slice(one)
    with pytest.raises(FrameLostError, match="Run the partition again from its first stage"):
        client.select_slice(both)
    # A date written empty, or never written, is read as empty: nothing was lost there.
    assert client.select_slice(FrameSlice("t__lost", "lost", (DAY2,))).num_rows == 0
    assert client.select_slice(FrameSlice("t__lost", "lost", (dt.date(2026, 11, 1),))).num_rows == 0
    # Writing the slice again (the partition's rerun) makes it readable again.
    client.replace_slice(one, dated_frame(DAY1, [7]))
    assert client.select_slice(both)["v"].to_pylist() == [7]
    # Pruning forgets the recorded counts with the rows.
    client.prune(DAY2)
    assert client.select_slice(one).num_rows == 0


def test_a_lost_input_frame_fails_the_step_without_retries(database_url: str) -> None:
    """A retry cannot bring lost rows back: the step fails at once, saying to rerun the partition."""
    partitions = dg.MultiPartitionsDefinition(
        {
            "entity": dg.StaticPartitionsDefinition(["items"]),
            "date": dg.DailyPartitionsDefinition("2026-11-01"),
        }
    )

    @dg.asset(partitions_def=partitions, io_manager_key="frames")
    def written(context: dg.AssetExecutionContext) -> pa.Table:
        return pa.table({"n": pa.array([1, 2, 3], pa.int64())})

    @dg.asset(
        partitions_def=partitions,
        io_manager_key="frames",
        retry_policy=dg.RetryPolicy(max_retries=3, delay=0.01),
    )
    def reader(written: pa.Table) -> pa.Table:
        return written

    manager = PostgresFrameIOManager(database_url=database_url, schema_name="syncflow_stage_lost")
    key = dg.MultiPartitionKey({"entity": "items", "date": "2026-11-28"})
    assert dg.materialize([written], partition_key=key, resources={"frames": manager}).success
    with psycopg.connect(libpq_url(database_url), autocommit=True) as conn:
        conn.execute('TRUNCATE "syncflow_stage_lost"."written__items"')
    result = dg.materialize(
        [written, reader],
        selection=[reader],
        partition_key=key,
        resources={"frames": manager},
        raise_on_error=False,
    )
    assert not result.success
    assert [e for e in result.all_events if e.is_step_up_for_retry] == []
    (failure,) = [e for e in result.all_events if e.is_step_failure]
    message = str(failure.step_failure_data.error)
    assert "written__items of items lost rows (2026-11-28: 3 written, 0 found)" in message
    assert "Run the partition again from its first stage" in message


def _table_state(database_url: str, schema: str, table: str) -> tuple[list[str], object]:
    with psycopg.connect(libpq_url(database_url)) as conn:
        row = conn.execute(
            "SELECT c.reloptions, s.last_vacuum FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "JOIN pg_stat_user_tables s ON s.relid = c.oid WHERE n.nspname = %s AND c.relname = %s",
            (schema, table),
        ).fetchone()
    assert row is not None, table
    return list(row[0] or []), row[1]


def test_stage_tables_skip_autovacuum_and_prune_vacuums_them(
    client: PostgresFrameClient, database_url: str
) -> None:
    # Autovacuum on a freshly written million-row stage table made the next run's
    # TRUNCATE wait deadlock_timeout for it to be cancelled; prune cleans up instead.
    table = f"t__vacuum_{uuid.uuid4().hex[:8]}"  # a new table: last_vacuum starts empty
    client.replace_slice(FrameSlice(table, "vacuum", (DAY1,)), dated_frame(DAY1, [1, 2]))
    options, _ = _table_state(database_url, client.schema, table)
    assert "autovacuum_enabled=false" in options

    # A table made before this setting existed gets it on its next write.
    with psycopg.connect(libpq_url(database_url), autocommit=True) as conn:
        conn.execute(f'ALTER TABLE "{client.schema}"."{table}" RESET (autovacuum_enabled)')
    client.replace_slice(FrameSlice(table, "vacuum", (DAY2,)), dated_frame(DAY2, [3]))
    options, _ = _table_state(database_url, client.schema, table)
    assert "autovacuum_enabled=false" not in options  # checked once per pool: not again by this one
    with PostgresFrameClient(database_url, client.schema) as next_run:
        next_run.replace_slice(FrameSlice(table, "vacuum", (DAY2,)), dated_frame(DAY2, [3]))
    options, last_vacuum = _table_state(database_url, client.schema, table)
    assert "autovacuum_enabled=false" in options
    assert last_vacuum is None

    assert client.prune(DAY2)[table] == 2
    _, last_vacuum = _table_state(database_url, client.schema, table)
    assert last_vacuum is not None
    with psycopg.connect(libpq_url(database_url), autocommit=True) as conn:
        conn.execute(f'DROP TABLE "{client.schema}"."{table}"')
        conn.execute(f'DELETE FROM "{client.schema}"."_frames" WHERE table_name = %s', (table,))
