"""The operator commands, run as a user runs them (a subprocess): output, exit codes, one-line errors."""

from __future__ import annotations

import datetime as dt
import decimal
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from syncflow_dagster.store.database import make_engine
from syncflow_dagster.store.frame_io_manager import (
    PARTITION_COLUMN,
    FrameSlice,
    PostgresFrameClient,
    stage_table_name,
)
from syncflow_dagster.store.migrate import upgrade
from syncflow_dagster_tests._service_fixtures import insert_batch, insert_failure, insert_pending


def syncflow(*args: str, database_url: str | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k != "SYNCFLOW_DATABASE_URL"}
    environ.update({"COLUMNS": "200", **env})
    if database_url is not None:
        environ["SYNCFLOW_DATABASE_URL"] = database_url
    return subprocess.run(
        [sys.executable, "-m", "syncflow_dagster.cli.main", *args],
        capture_output=True,
        text=True,
        env=environ,
        timeout=120,
        check=False,
    )


def _one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines, result.stdout
    assert lines[0].startswith("error:")
    return " ".join(lines)


def test_missing_database_url_is_one_line() -> None:
    result = syncflow("status")
    assert result.returncode == 2
    assert "SYNCFLOW_DATABASE_URL" in _one_line_error(result)


def test_unreachable_database_is_one_line_without_the_password() -> None:
    result = syncflow("status", database_url="postgresql://someone:hunter2-pw@127.0.0.1:1/nowhere")
    assert result.returncode == 3
    message = _one_line_error(result)
    assert "database unreachable" in message
    assert "hunter2-pw" not in result.stderr + result.stdout


def test_bad_url_scheme_and_bad_catalog_are_one_line(tmp_path: Path) -> None:
    result = syncflow("pending", "list", database_url="mysql://u@127.0.0.1/x")
    assert result.returncode == 2
    assert "postgresql://" in _one_line_error(result)
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text("entities: [{name: 1}]\n")
    result = syncflow(
        "failed",
        "list",
        "--entity",
        "items",
        database_url="postgresql://u@127.0.0.1:1/x",
        SYNCFLOW_CATALOG_PATH=str(catalog),
    )
    assert result.returncode == 2
    assert "catalog" in _one_line_error(result)


def test_unreachable_dagster_is_one_line(database_url: str) -> None:
    result = syncflow("failed", "retry", database_url=database_url, SYNCFLOW_DAGSTER_URL="http://127.0.0.1:1")
    assert result.returncode == 3
    assert "Dagster" in _one_line_error(result)


def test_db_upgrade_then_status_failed_and_pending(database_url: str) -> None:
    first = syncflow("db", "upgrade", database_url=database_url)
    assert first.returncode == 0, first.stderr
    again = syncflow("db", "upgrade", database_url=database_url)
    assert again.returncode == 0, again.stderr
    assert "already at" in again.stdout

    upgrade(database_url)
    engine = make_engine(database_url)
    try:
        with engine.begin() as conn:
            insert_batch(
                conn, "customers", {"fetched": 4321, "insert": 4300, "delivered": 4300, "failed": 21}
            )
            insert_failure(conn, "customers", "CUST-cli-1", "invalid_record")
            insert_pending(conn, "sales_orders", "SO-cli-1", "customers", "CUST-404")
    finally:
        engine.dispose()

    status = syncflow("status", database_url=database_url)
    assert status.returncode == 0, status.stderr
    customers = next(line for line in status.stdout.splitlines() if "customers" in line)
    assert "4321" in customers
    assert "4300" in customers
    assert "operations" in status.stdout  # never-synced entities are listed too

    failed = syncflow("failed", "list", "--entity", "customers", database_url=database_url)
    assert failed.returncode == 0, failed.stderr
    assert "CUST-cli-1" in failed.stdout
    assert "invalid_record" in failed.stdout
    pending = syncflow("pending", "list", "--entity", "sales_orders", database_url=database_url)
    assert pending.returncode == 0, pending.stderr
    assert "SO-cli-1" in pending.stdout
    assert "CUST-404" in pending.stdout

    unknown = syncflow("pending", "list", "--entity", "widgets", database_url=database_url)
    assert unknown.returncode == 2
    assert "widgets" in _one_line_error(unknown)


def test_frame_show_prints_a_stage_frame_and_writes_it_to_parquet(database_url: str, tmp_path: Path) -> None:
    day = dt.date(2026, 11, 20)
    frame = pa.table(
        {
            "item_no": ["IT-1", "IT-2", "IT-3"],
            "weight_kg": pa.array(
                [decimal.Decimal("1.50"), None, decimal.Decimal("2.25")], pa.decimal128(9, 2)
            ),
            "_bk_hash": pa.array([bytes([i]) * 16 for i in range(3)], pa.binary(16)),
            PARTITION_COLUMN: pa.array([day] * 3, pa.date32()),
        }
    )
    client = PostgresFrameClient(database_url)
    client.replace_slice(FrameSlice(stage_table_name("normalized", "items"), "items", (day,)), frame)
    out = tmp_path / "normalized.parquet"
    result = syncflow(
        "frame",
        "show",
        "normalized",
        "items",
        "2026-11-20",
        "--limit",
        "2",
        "--parquet",
        str(out),
        database_url=database_url,
    )
    assert result.returncode == 0, result.stderr
    assert "3 rows, 4 columns" in result.stdout
    assert "IT-2" in result.stdout
    assert "IT-3" not in result.stdout  # --limit 2
    assert "decimal128(9, 2)" in result.stdout
    assert pq.read_table(out).equals(frame)

    unknown = syncflow("frame", "show", "normalised", "items", "2026-11-20", database_url=database_url)
    assert unknown.returncode == 2
    assert "unknown stage asset 'normalised'" in _one_line_error(unknown)
    never = syncflow("frame", "show", "delivered", "sites", "2026-11-20", database_url=database_url)
    assert never.returncode == 2
    assert "delivered has never been materialized for sites" in _one_line_error(never)
