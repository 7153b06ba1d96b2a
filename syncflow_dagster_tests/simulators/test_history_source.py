"""The history source: one entity's changes over a year, written as a folder APISmith serves from disk."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import closing
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from syncflow_dagster.catalog import default_catalog
from syncflow_dagster.simulators.apismith import ARROW_STREAM, create_app
from syncflow_dagster.simulators.datagen import DatagenError
from syncflow_dagster.simulators.history_source import day_counts, write_history_source
from syncflow_dagster.simulators.parquet_store import ParquetErpStore
from syncflow_dagster.simulators.serve import start_server
from syncflow_dagster_tests import loopback_http

START = date(2025, 1, 1)
CLIENT = {"c": "history-secret"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("history") / "source"
    written = write_history_source(
        default_catalog(), target, rows=20_000, start=START, days=365, chunk_rows=7_000
    )
    assert written.rows["ProductionOrders"] == 20_000
    assert written.rows["ProductionOrderOperations"] == 0
    assert len(list((target / "ProductionOrders").glob("*.parquet"))) == 3
    return target


@pytest.fixture
def http(folder: Path) -> Iterator[httpx.Client]:
    app = create_app(source_dir=folder, clients=CLIENT, secret="h" * 32)
    assert isinstance(app.state.apismith.store, ParquetErpStore)
    with (
        start_server(app) as server,
        closing(loopback_http.client(base_url=server.url, timeout=60)) as client,
    ):
        token = client.post(
            "/oauth/token",
            data={"grant_type": "client_credentials", "client_id": "c", "client_secret": CLIENT["c"]},
        ).json()["access_token"]
        client.headers["Authorization"] = f"Bearer {token}"
        yield client


def test_changes_spread_over_the_year_with_some_history_before_the_start(folder: Path) -> None:
    days = day_counts(folder, default_catalog())
    before = sum(n for day, n in days.items() if day < START)
    inside = {day: n for day, n in days.items() if START <= day < START + timedelta(days=365)}
    assert before == 1000  # 5 % of 20 000
    assert sum(inside.values()) == 19_000
    assert len(inside) == 365  # every day of the year has changes
    assert max(days) < START + timedelta(days=365)
    orders = pq.read_table(folder / "ProductionOrders").combine_chunks()
    rowversions = orders.column("RowVersion").to_numpy()
    changed = orders.column("ModifiedAt").cast(pa.int64()).to_numpy()
    order = rowversions.argsort()
    assert (changed[order][1:] >= changed[order][:-1]).all(), "ModifiedAt must not decrease in RowVersion"
    assert len(set(orders.column("ProdOrderNo").to_pylist())) == 20_000


def test_apismith_serves_one_day_and_the_whole_history_exactly(http: httpx.Client, folder: Path) -> None:
    day = START + timedelta(days=100)
    start = datetime(day.year, day.month, day.day, tzinfo=UTC)
    rows: list[dict[str, object]] = []
    params: dict[str, object] = {
        "changed_from": start.isoformat(),
        "changed_to": (start + timedelta(days=1)).isoformat(),
        "limit": 17,
    }
    for _ in range(1000):
        response = http.get(
            "/v1/entities/ProductionOrders/changes", params=params, headers={"Accept": ARROW_STREAM}
        )
        rows.extend(pa.ipc.open_stream(response.content).read_all().to_pylist())
        if response.headers["x-has-more"] != "true":
            break
        params["after_rowversion"] = int(response.headers["x-next-after-rowversion"])
        params["snapshot_rowversion"] = int(response.headers["x-snapshot-rowversion"])
    assert len(rows) == day_counts(folder, default_catalog())[day]
    assert all(str(r["ModifiedAt"]).startswith(day.isoformat()) for r in rows)
    mark = http.get("/v1/entities/ProductionOrders/watermark").json()
    assert mark["row_count"] == 20_000
    assert mark["max_changed_at"] < (START + timedelta(days=365)).isoformat()
    keys = pa.ipc.open_stream(
        http.get("/v1/entities/ProductionOrders/keys", headers={"Accept": ARROW_STREAM}).content
    ).read_all()
    assert keys.num_rows == 20_000
    # Parents are there for every reference a work order makes.
    items = {r["ItemNo"] for r in http.get("/admin/snapshot/Items").json()["records"]}
    orders = pq.read_table(folder / "ProductionOrders", columns=["ItemNo"]).column(0).to_pylist()
    assert set(orders) <= items


def test_a_folder_that_is_not_empty_is_refused(folder: Path) -> None:
    with pytest.raises(DatagenError, match="is not empty"):
        write_history_source(default_catalog(), folder, rows=10)
