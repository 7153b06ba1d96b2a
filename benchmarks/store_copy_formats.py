"""Measure the state store's bulk paths (a script, not a test): COPY formats, commit and lookups.

    python benchmarks/store_copy_formats.py --url postgresql://postgres@127.0.0.1:5432/test --rows 1000000

Creates a scratch database next to the one in --url, and drops it afterwards. Prints:
- binary COPY (copy.encode_binary) vs CSV COPY (pyarrow.csv with bytea as \\x hex) of the
  entity_state staging frame into a TEMP table;
- StateRepository.commit_delivered of --rows into an empty entity;
- stored_for_keys of 17K keys against those rows (three runs);
- load_state of the whole entity; commit of a 1% update.
"""

from __future__ import annotations

import argparse
import io
import os
import time
import uuid
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import psycopg
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from syncflow_dagster.defs.configuration import settings_from
from syncflow_dagster.engine.columns import BK, BK_HASH, DATA_HASH, RECIPE, ROWVERSION
from syncflow_dagster.store.copy import PgColumn, copy_in, create_staging
from syncflow_dagster.store.database import StoreSettings, make_engine
from syncflow_dagster.store.state import StateRepository

COLUMNS = [
    PgColumn("bk_hash", "uuid"),
    PgColumn("bk", "text"),
    PgColumn("data_hash", "bytea"),
    PgColumn("rowversion", "int8"),
    PgColumn("recipe", "int2"),
]


def _random_fixed(rng: np.random.Generator, n: int, width: int) -> pa.Array:
    return pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(width), n, [None, pa.py_buffer(rng.bytes(n * width))]
    )


def _hex(array: pa.Array, width: int, prefix: str) -> pa.Array:
    table = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
    raw = np.frombuffer(array.buffers()[1], dtype=np.uint8, count=len(array) * width).reshape(-1, width)
    chars = np.empty((len(array), 2 * width), dtype=np.uint8)
    chars[:, 0::2] = table[raw >> 4]
    chars[:, 1::2] = table[raw & 15]
    text = pa.FixedSizeBinaryArray.from_buffers(pa.binary(2 * width), len(array), [None, pa.py_buffer(chars)])
    return pc.binary_join_element_wise(
        pa.scalar(prefix.encode(), pa.binary()), text.cast(pa.binary()), b""
    ).cast(pa.string())


def csv_copy(cursor: psycopg.Cursor, table: str, frame: pa.Table) -> None:
    csv_frame = pa.table(
        {
            "bk_hash": _hex(frame["bk_hash"].combine_chunks(), 16, ""),
            "bk": frame["bk"],
            "data_hash": _hex(frame["data_hash"].combine_chunks(), 32, "\\x"),
            "rowversion": frame["rowversion"],
            "recipe": frame["recipe"],
        }
    )
    buffer = io.BytesIO()
    pacsv.write_csv(csv_frame, buffer, pacsv.WriteOptions(include_header=False, quoting_style="needed"))
    with cursor.copy(f"COPY {table} FROM STDIN (FORMAT csv)") as copy:
        copy.write(buffer.getbuffer())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args()
    n = args.rows
    parts = urlsplit(args.url)
    name = f"syncflow_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(args.url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, parts.fragment))
    try:
        rng = np.random.default_rng(1)
        frame = pa.table(
            {
                "bk_hash": _random_fixed(rng, n, 16),
                "bk": pa.array([f"WO-{i:08d}" for i in range(n)]),
                "data_hash": _random_fixed(rng, n, 32),
                "rowversion": pa.array(np.arange(n, dtype=np.int64)),
                "recipe": pa.array(np.ones(n, dtype=np.int16)),
            }
        )
        with psycopg.connect(url) as conn:
            cursor = conn.cursor()
            for label, load in (
                ("binary COPY", lambda t: copy_in(cursor, t, frame, COLUMNS)),
                ("CSV COPY   ", lambda t: csv_copy(cursor, t, frame)),
            ):
                best = float("inf")
                for round_ in range(3):
                    table = f"bench_{round_}_{label[:3].strip().lower()}"
                    create_staging(cursor, table, COLUMNS)
                    started = time.perf_counter()
                    load(table)
                    best = min(best, time.perf_counter() - started)
                    conn.rollback()
                print(f"{label} {n:>9} rows into a TEMP table: best of 3 {best:6.2f} s")

        engine = make_engine(url)
        # The shell's SYNCFLOW_STORE_MERGE_WORK_MEM, as the code location's database resource would have it.
        repo = StateRepository(engine, settings_from(StoreSettings, os.environ).merge_work_mem)
        repo.ensure_schema()
        accepted = frame.rename_columns([BK_HASH, BK, DATA_HASH, ROWVERSION, RECIPE])
        started = time.perf_counter()
        repo.commit_delivered("bench", uuid.uuid4(), accepted)
        print(f"commit_delivered {n} rows into an empty entity: {time.perf_counter() - started:6.2f} s")
        keys = accepted[BK_HASH].combine_chunks().take(pa.array(rng.choice(n, 17_000, replace=False)))
        for _ in range(3):
            started = time.perf_counter()
            found = repo.stored_for_keys("bench", keys)
            print(
                f"stored_for_keys 17000 keys of {n}: {time.perf_counter() - started:6.3f} s ({found.num_rows} found)"
            )
        started = time.perf_counter()
        state = repo.load_state("bench")
        print(f"load_state {state.num_rows} rows: {time.perf_counter() - started:6.2f} s")
        update = accepted.slice(0, n // 100)
        started = time.perf_counter()
        repo.commit_delivered("bench", uuid.uuid4(), update)
        print(f"commit_delivered {update.num_rows} updates: {time.perf_counter() - started:6.2f} s")
        engine.dispose()
    finally:
        with psycopg.connect(args.url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    main()
