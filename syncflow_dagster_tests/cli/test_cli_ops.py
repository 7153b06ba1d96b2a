"""The operator commands: output, exit codes, one-line errors.

They run in process (`cli_runner.run_syncflow`: the console script's own `app`
with argv and an environment of the test's); the first test runs the installed
`syncflow` console script as a user does, which proves the script and the
one-line error path of a real process.
"""

from __future__ import annotations

import datetime as dt
import decimal
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from syncflow_dagster.store.database import make_engine
from syncflow_dagster.store.frame_io_manager import (
    PARTITION_COLUMN,
    FrameSlice,
    PostgresFrameClient,
    stage_table_name,
)
from syncflow_dagster.store.migrate import upgrade
from syncflow_dagster_tests._service_fixtures import insert_batch, insert_failure, insert_pending
from syncflow_dagster_tests.cli_runner import CliResult, run_syncflow
from syncflow_dagster_tests.processes import venv_bin


def syncflow(*args: str, database_url: str | None = None, **env: str) -> CliResult:
    """`syncflow ARGS` in process, SYNCFLOW_DATABASE_URL only if given, 200 columns unless COLUMNS is."""
    columns = int(env.pop("COLUMNS", "200"))
    return run_syncflow(*args, env={"SYNCFLOW_DATABASE_URL": database_url, **env}, columns=columns)


def _one_line_error(result: CliResult | subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines, result.stdout
    assert lines[0].startswith("error:")
    return " ".join(lines)


@pytest.mark.subprocess
def test_missing_database_url_is_one_line() -> None:
    environ = {k: v for k, v in os.environ.items() if k != "SYNCFLOW_DATABASE_URL"}
    result = subprocess.run(
        [venv_bin("syncflow"), "status"],
        capture_output=True,
        text=True,
        env={**environ, "COLUMNS": "200"},
        timeout=120,
        check=False,
    )
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


def test_unreachable_dagster_is_one_line(fresh_database_url: str) -> None:
    upgrade(fresh_database_url)
    engine = make_engine(fresh_database_url)
    try:
        with engine.begin() as conn:
            past = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
            insert_failure(conn, "items", "IT-1", "transient_failure", next_retry_at=past)
    finally:
        engine.dispose()
    # Nothing due for sites: the command says so and asks Dagster nothing.
    idle = syncflow("failed", "retry", "--entity", "sites", database_url=fresh_database_url)
    assert idle.returncode == 0, idle.stderr
    assert "nothing to retry for: sites" in idle.stdout
    result = syncflow(
        "failed", "retry", database_url=fresh_database_url, SYNCFLOW_DAGSTER_URL="http://127.0.0.1:1"
    )
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
    assert "4.3k" in customers  # short numbers in the table; --json has them exact
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
    empty_day = dt.date(2026, 11, 22)
    with PostgresFrameClient(database_url) as client:
        client.replace_slice(FrameSlice(stage_table_name("normalized", "items"), "items", (day,)), frame)
        client.replace_slice(
            FrameSlice(stage_table_name("normalized", "items"), "items", (empty_day,)), frame.slice(0, 0)
        )
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

    # The table exists (2026-11-20 was written) but not this date: not "0 rows".
    other_day = syncflow("frame", "show", "normalized", "items", "2026-11-21", database_url=database_url)
    assert other_day.returncode == 2
    assert "normalized × items × 2026-11-21 is not kept: never materialized for that date" in _one_line_error(
        other_day
    )
    # A date materialized with no rows is empty, and says so.
    empty = syncflow("frame", "show", "normalized", "items", "2026-11-22", database_url=database_url)
    assert empty.returncode == 0, empty.stderr
    flat = " ".join(empty.stdout.split())
    assert "0 rows, 4 columns" in flat
    assert "the stage kept no rows for this date" in flat


def _json(result: CliResult) -> Any:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _fits(output: str, width: int = 80) -> None:
    too_wide = [line for line in output.splitlines() if len(line.rstrip()) > width]
    assert too_wide == [], too_wide
    assert "…" not in output  # nothing cut


def test_status_totals_the_window_across_kinds_under_one_name_and_fits_80_columns(
    fresh_database_url: str,
) -> None:
    upgrade(fresh_database_url)
    engine = make_engine(fresh_database_url)
    try:
        with engine.begin() as conn:
            insert_batch(
                conn, "sales_order_lines", {"fetched": 1_234_567, "insert": 1_234_560, "delivered": 1_234_560}
            )
            insert_batch(conn, "sales_order_lines", {"fetched": 7, "update": 7, "delivered": 7})
            # A reconcile's deletes are deletes, counted with the syncs' ones.
            insert_batch(conn, "sales_order_lines", {"delete": 301, "delivered": 301}, kind="reconcile")
            insert_batch(conn, "sales_order_lines", {"retried": 3, "delivered": 2, "failed": 1}, kind="retry")
            insert_batch(conn, "sales_order_lines", {"fetched": 9}, status="failed")
            # Two days ago: outside today's window.
            insert_batch(conn, "sales_order_lines", {"fetched": 50, "delete": 5}, started_days_ago=2)
    finally:
        engine.dispose()
    today = _json(
        syncflow("status", "--json", "--entity", "sales_order_lines", database_url=fresh_database_url)
    )
    (lines,) = today["entities"]
    assert lines["batches"] == {"sync": 3, "reconcile": 1, "retry": 1}
    assert lines["statuses"] == {"succeeded": 4, "failed": 1}
    assert lines["counts"]["fetched"] == 1_234_567 + 7 + 9
    assert lines["counts"]["delete"] == 301
    assert lines["counts"]["delivered"] == 1_234_560 + 7 + 301 + 2
    assert lines["counts"]["retried"] == 3
    earlier = (dt.datetime.now(dt.UTC).date() - dt.timedelta(days=3)).isoformat()
    wider = _json(
        syncflow(
            "status",
            "--json",
            "--entity",
            "sales_order_lines",
            "--since",
            earlier,
            database_url=fresh_database_url,
        )
    )
    assert wider["entities"][0]["counts"]["delete"] == 306

    table = syncflow("status", database_url=fresh_database_url, COLUMNS="80")
    assert table.returncode == 0, table.stderr
    _fits(table.stdout)
    row = next(line for line in table.stdout.splitlines() if line.startswith("sales_order_lines"))
    assert row.split()[1:3] == ["5", "1✗"]  # five runs, one failed
    assert "1.2M" in row
    assert " 301 " in row


def test_status_checks_the_catalog_before_the_database(tmp_path: Path) -> None:
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(
        "entities:\n  sites: {source: Sites, resource: sites, business_key: [code], fields: []}\n"
    )
    result = syncflow(
        "status", database_url="postgresql://u@127.0.0.1:1/unreachable", SYNCFLOW_CATALOG_PATH=str(catalog)
    )
    assert result.returncode == 2
    assert "catalog" in _one_line_error(result)


def test_status_watch_refreshes_and_stops_after_count(database_url: str) -> None:
    upgrade(database_url)
    result = syncflow("status", "--json", "--watch", "0.2", "--count", "2", database_url=database_url)
    assert result.returncode == 0, result.stderr
    documents = [json.loads("{" + part) for part in result.stdout.strip().lstrip("{").split("\n{") if part]
    assert len(documents) == 2
    assert all("entities" in d for d in documents)


CATALOG_OK = """
entities:
  sites:
    source: Sites
    resource: sites
    business_key: [site_code]
    fields:
      - {source: SiteCode, target: site_code, required: true}
  work_centers:
    source: WorkCenters
    resource: work_centers
    business_key: [site_code, wc]
    fields:
      - {source: Site, target: site_code}
      - {source: WC, target: wc}
    parents:
      - {entity: sites, fields: [site_code]}
"""


def test_catalog_check_needs_no_database_and_says_each_mistake_once(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(CATALOG_OK)
    ok = syncflow("catalog", "check", str(good))
    assert ok.returncode == 0, ok.stderr
    assert "valid, 2 entities (parents first: sites, work_centers)" in ok.stdout

    # One mistake: one line, about that field only (not about `fields` being empty, nor the others).
    one = tmp_path / "one.yaml"
    one.write_text(
        CATALOG_OK.replace(
            "{source: SiteCode, target: site_code, required: true}",
            "{source: SiteCode, target: site_code, type: strin}",
        )
    )
    result = syncflow("catalog", "check", str(one))
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1, errors
    assert "entity 'sites', field 'SiteCode', key type" in errors[0]

    # Three mistakes in two entities (one of them in a relation): three lines.
    three = tmp_path / "three.yaml"
    three.write_text(
        CATALOG_OK.replace(
            "{source: SiteCode, target: site_code, required: true}",
            "{source: SiteCode, target: site_code, type: decimal}",
        )
        .replace("{source: WC, target: wc}", "{source: WC, target: wc, colour: red}")
        .replace("{entity: sites, fields: [site_code]}", "{entity: plants, fields: [site_code]}")
    )
    many = syncflow("catalog", "check", str(three), "--json")
    assert many.returncode == 2
    report = json.loads(many.stdout)
    assert report["valid"] is False
    assert report["errors"] == [
        "entity 'sites', field 'SiteCode': a decimal field needs a fixed 'scale'",
        "entity 'work_centers', field 'WC', key colour: unknown key (not part of the catalog schema)",
        "entity 'work_centers', parent 'plants': unknown entity (not declared in this catalog)",
    ]


def test_failed_and_pending_lists_print_keys_visibly_whole_details_and_json(fresh_database_url: str) -> None:
    upgrade(fresh_database_url)
    detail = "ScheduleHub refused the record: work center 'WC-17' is unknown at site 'S-3'. " * 4
    engine = make_engine(fresh_database_url)
    try:
        with engine.begin() as conn:
            insert_failure(conn, "operations", "WO-0728\x1f10", "invalid_record", detail=detail)
            insert_pending(conn, "operations", "WO-0729\x1f20", "work_orders", "WO-0729")
    finally:
        engine.dispose()
    listed = syncflow("failed", "list", database_url=fresh_database_url, COLUMNS="80")
    assert listed.returncode == 0, listed.stderr
    _fits(listed.stdout)
    assert "WO-0728␟10" in listed.stdout
    assert " ".join(listed.stdout.split()).count("is unknown at site") == 4  # the whole detail, wrapped
    as_json = _json(syncflow("failed", "list", "--json", database_url=fresh_database_url))
    (item,) = as_json["items"]
    assert item["key"] == ["WO-0728", "10"]
    assert item["bk"] == "WO-0728\x1f10"
    assert "payload" not in item
    pending = _json(syncflow("pending", "list", "--json", database_url=fresh_database_url))
    assert pending["items"][0]["key"] == ["WO-0729", "20"]
    table = syncflow("pending", "list", database_url=fresh_database_url, COLUMNS="80")
    _fits(table.stdout)
    assert "WO-0729␟20" in table.stdout

    resolved = syncflow(
        "failed",
        "resolve",
        "--entity",
        "operations",
        "--key",
        "WO-0728␟10",
        "--reason",
        "fixed by hand",
        "--by",
        "ana",
        "--json",
        database_url=fresh_database_url,
    )
    closed = _json(resolved)
    assert closed["closed"] == 1
    assert (closed["items"][0]["state"], closed["items"][0]["state_by"]) == ("resolved", "ana")
    assert _json(syncflow("failed", "list", "--json", database_url=fresh_database_url))["total"] == 0
    history = _json(
        syncflow("failed", "list", "--json", "--state", "resolved", database_url=fresh_database_url)
    )
    assert history["items"][0]["state_reason"] == "fixed by hand"
    nothing = syncflow("failed", "dismiss", "--reason", "x", database_url=fresh_database_url)
    assert nothing.returncode == 2
    assert "choose failed records" in _one_line_error(nothing)
