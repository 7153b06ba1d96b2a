"""COPY helpers: every supported type survives Arrow → binary COPY → Postgres → binary SELECT → Arrow."""

from __future__ import annotations

import datetime as dt
import os
import uuid
from collections.abc import Iterator

import numpy as np
import psycopg
import pyarrow as pa
import pytest
from psycopg import sql

from syncflow_dagster.store.copy import (
    PgColumn,
    arrow_type,
    copy_in,
    create_staging,
    encode_binary,
    select_arrow,
    select_table,
)

COLUMNS = [
    PgColumn("key", "uuid"),
    PgColumn("digest", "bytea", width=32),
    PgColumn("label", "text"),
    PgColumn("big", "int8"),
    PgColumn("small", "int2"),
    PgColumn("medium", "int4"),
    PgColumn("at", "timestamptz"),
    PgColumn("day", "date"),
    PgColumn("doc", "jsonb"),
    PgColumn("ratio", "float8"),
    PgColumn("flag", "bool"),
    PgColumn("blob", "bytea"),
]


@pytest.fixture
def cursor(database_url: str) -> Iterator[psycopg.Cursor]:
    with psycopg.connect(database_url) as conn:
        yield conn.cursor()
        conn.rollback()


def _sample() -> pa.Table:
    utc = dt.UTC
    return pa.table(
        {
            "key": pa.array([os.urandom(16), os.urandom(16), None], pa.binary(16)),
            "digest": pa.array([os.urandom(32), b"\x00" * 32, b"\xff" * 32], pa.binary(32)),
            "label": ['héllo, "world"\nnext', "", None],
            "big": pa.array([1, None, -(2**62)], pa.int64()),
            "small": pa.array([1, -2, None], pa.int16()),
            "medium": pa.array([None, 2**31 - 1, -(2**31)], pa.int32()),
            "at": pa.array(
                [
                    dt.datetime(2024, 1, 1, tzinfo=utc),
                    None,
                    dt.datetime(1990, 5, 6, 7, 8, 9, 123456, tzinfo=utc),
                ],
                pa.timestamp("us", tz="UTC"),
            ),
            "day": pa.array([dt.date(2024, 2, 29), dt.date(1970, 1, 1), None]),
            "doc": ['{"a": 1}', None, '["x,y", null]'],
            "ratio": [1.5, None, -0.25],
            "flag": [True, None, False],
            "blob": [b"a\x00b", None, b""],
        }
    )


def test_every_type_round_trips_including_nulls_and_empty_strings(cursor: psycopg.Cursor) -> None:
    table = _sample()
    create_staging(cursor, "copy_roundtrip", COLUMNS)
    assert copy_in(cursor, "copy_roundtrip", table, COLUMNS) == 3
    back = select_table(cursor, sql.SQL("SELECT * FROM copy_roundtrip"), COLUMNS)
    for column in COLUMNS:
        if column.name == "doc":
            # jsonb normalises spacing; the values are what must survive.
            assert back.column("doc").to_pylist() == ['{"a": 1}', None, '["x,y", null]']
            continue
        expected = table.column(column.name).combine_chunks()
        got = back.column(column.name).combine_chunks().cast(expected.type)
        assert got.equals(expected), column.name
    # '' and NULL stay distinct on the way back.
    assert back.column("label").to_pylist()[1:] == ["", None]


def test_select_arrow_reads_every_type_like_select_table(database_url: str) -> None:
    table = _sample()
    name = f"copy_select_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(database_url, autocommit=True) as conn:
        cursor = conn.cursor()
        # A real table: select_arrow reads on a connection of its own, which sees no TEMP table.
        cursor.execute(
            sql.SQL("CREATE TABLE {} ({})").format(
                sql.Identifier(name),
                sql.SQL(", ").join(
                    sql.SQL("{} {}").format(sql.Identifier(c.name), sql.SQL(c.pg_type)) for c in COLUMNS
                ),
            )
        )
        try:
            with conn.transaction():
                copy_in(cursor, name, table, COLUMNS)
            query = sql.SQL("SELECT {} FROM {}").format(
                sql.SQL(", ").join(sql.Identifier(c.name) for c in COLUMNS), sql.Identifier(name)
            )
            back = select_arrow(database_url, query.as_string(None), COLUMNS)
            assert back.schema == pa.schema([(c.name, arrow_type(c)) for c in COLUMNS])
            assert back.equals(select_table(cursor, query, COLUMNS))
            assert back.column("label").to_pylist()[1:] == ["", None]
            assert back.column("key").equals(table.column("key"))
            # A bytea whose stored width is not the declared one is refused, naming the column.
            cursor.execute(sql.SQL("UPDATE {} SET digest = '\\x01'").format(sql.Identifier(name)))
            with pytest.raises(ValueError, match="digest"):
                select_arrow(database_url, query.as_string(None), COLUMNS)
        finally:
            cursor.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(name)))


def test_postgres_sees_the_values_it_was_sent(cursor: psycopg.Cursor) -> None:
    table = _sample()
    create_staging(cursor, "copy_values", COLUMNS)
    copy_in(cursor, "copy_values", table, COLUMNS)
    cursor.execute(
        "SELECT big, label, at, day, doc->>'a', encode(digest, 'hex'), flag"
        " FROM copy_values ORDER BY medium NULLS FIRST"
    )
    first = cursor.fetchone()
    assert first is not None
    assert first[0] == 1
    assert first[1] == 'héllo, "world"\nnext'
    assert first[2] == dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
    assert first[3] == dt.date(2024, 2, 29)
    assert first[4] == "1"
    assert first[5] == table.column("digest")[0].as_py().hex()
    assert first[6] is True


def test_many_rows_span_several_chunks(cursor: psycopg.Cursor) -> None:
    n = 300_001
    rng = np.random.default_rng(7)
    table = pa.table(
        {
            "key": pa.FixedSizeBinaryArray.from_buffers(
                pa.binary(16), n, [None, pa.py_buffer(rng.bytes(16 * n))]
            ),
            "big": pa.array(np.arange(n, dtype=np.int64)),
            "label": pa.array([f"K-{i}" for i in range(n)]),
        }
    )
    columns = [PgColumn("key", "uuid"), PgColumn("big", "int8"), PgColumn("label", "text")]
    create_staging(cursor, "copy_many", columns)
    copy_in(cursor, "copy_many", table, columns)
    cursor.execute("SELECT count(*), sum(big), count(DISTINCT key), max(label) FROM copy_many")
    assert cursor.fetchone() == (n, n * (n - 1) // 2, n, "K-99999")
    back = select_table(cursor, sql.SQL("SELECT * FROM copy_many ORDER BY big"), columns)
    assert back.column("key").combine_chunks().equals(table.column("key").combine_chunks())


def test_constants_fill_every_row_including_null(cursor: psycopg.Cursor) -> None:
    n = 200_000  # two chunks
    columns = [
        PgColumn("owner", "text"),
        PgColumn("big", "int8"),
        PgColumn("batch", "uuid"),
        PgColumn("at", "timestamptz"),
        PgColumn("note", "text"),
    ]
    at = dt.datetime(2026, 11, 29, 14, 15, 16, 123456, tzinfo=dt.UTC)
    batch = os.urandom(16)
    create_staging(cursor, "copy_constants", columns)
    sent = copy_in(
        cursor,
        "copy_constants",
        pa.table({"big": pa.array(np.arange(n, dtype=np.int64)), "owner": pa.array(["ignored"] * n)}),
        columns,
        constants={
            "owner": pa.scalar("wörk_orders", pa.string()),
            "batch": pa.scalar(batch, pa.binary(16)),
            "at": pa.scalar(at, pa.timestamp("us", tz="UTC")),
            "note": pa.scalar(None, pa.string()),
        },
    )
    assert sent == n
    cursor.execute(
        "SELECT count(*), sum(big), count(DISTINCT (owner, batch, at)), min(owner), min(batch::text),"
        " min(at), count(note) FROM copy_constants"
    )
    assert cursor.fetchone() == (
        n,
        n * (n - 1) // 2,
        1,
        "wörk_orders",
        str(uuid.UUID(bytes=batch)),
        at,
        0,
    )


def test_constants_must_name_a_column_and_leave_one_to_the_frame() -> None:
    table = pa.table({"big": pa.array([1], pa.int64())})
    one = pa.scalar(1, pa.int64())
    with pytest.raises(ValueError, match=r"constant\(s\) \['nope'\]"):
        encode_binary(table, [PgColumn("big", "int8")], {"nope": one})
    with pytest.raises(ValueError, match="every column is a constant"):
        encode_binary(table, [PgColumn("big", "int8")], {"big": one})


def test_a_bad_value_in_a_later_chunk_fails_the_copy_in_the_callers_thread(cursor: psycopg.Cursor) -> None:
    # The chunks after the first are encoded by a worker thread; its error must reach the caller.
    values = np.zeros(300_000, dtype=np.int64)
    values[-1] = 70_000
    create_staging(cursor, "copy_late_error", [PgColumn("small", "int2")])
    with pytest.raises(ValueError, match=r"column 'small'.*out of range for int2"):
        copy_in(cursor, "copy_late_error", pa.table({"small": pa.array(values)}), [PgColumn("small", "int2")])


def test_binary_stream_has_header_and_trailer_even_when_empty() -> None:
    chunks = list(encode_binary(pa.table({"big": pa.array([], pa.int64())}), [PgColumn("big", "int8")]))
    assert chunks[0].startswith(b"PGCOPY\n\xff\r\n\x00")
    assert chunks[-1] == b"\xff\xff"


def test_wrong_arrow_type_names_the_column() -> None:
    table = pa.table({"key": pa.array([b"short"], pa.binary())})
    with pytest.raises(ValueError, match=r"column 'key'.*uuid"):
        list(encode_binary(table, [PgColumn("key", "uuid")]))


def test_out_of_range_integer_is_refused() -> None:
    table = pa.table({"small": pa.array([70_000], pa.int64())})
    with pytest.raises(ValueError, match=r"column 'small'.*out of range for int2"):
        list(encode_binary(table, [PgColumn("small", "int2")]))


def test_unknown_postgres_type_is_refused() -> None:
    with pytest.raises(ValueError, match=r"column 'x'.*'money'"):
        PgColumn("x", "money")


def test_select_table_names_the_column_whose_values_do_not_fit(cursor: psycopg.Cursor) -> None:
    cursor.execute("CREATE TEMP TABLE short_digest (digest bytea)")
    cursor.execute("INSERT INTO short_digest VALUES ('\\x0102'::bytea)")
    with pytest.raises(ValueError, match=r"column 'digest'.*fixed_size_binary\[32\]"):
        select_table(cursor, sql.SQL("SELECT * FROM short_digest"), [PgColumn("digest", "bytea", width=32)])
