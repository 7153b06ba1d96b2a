"""The APISmith stand-in over real HTTP: paging under change, tombstones, keys, faults, contract."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from syncflow_dagster.catalog import default_catalog
from syncflow_dagster.simulators.apismith import ARROW_STREAM, create_app
from syncflow_dagster.simulators.datagen import generate_dataset
from syncflow_dagster.simulators.serve import RunningServer, start_server
from syncflow_dagster_tests import loopback_http

AS_OF = datetime(2024, 5, 10, 12, 0, tzinfo=UTC)
CLIENT = {"syncflow-test": "apismith-test-secret"}
CONTRACT = Path(__file__).resolve().parents[2] / "docs" / "contracts" / "apismith.md"
ARROW = {"Accept": ARROW_STREAM}


@pytest.fixture(scope="module")
def dataset() -> dict[str, pa.Table]:
    return generate_dataset(default_catalog(), 3000, seed=5, as_of=AS_OF, history_days=4)


@pytest.fixture
def server(dataset: dict[str, pa.Table]) -> Iterator[RunningServer]:
    app = create_app(dataset=dataset, clients=CLIENT, secret="s" * 32)
    with start_server(app) as running:
        yield running


@pytest.fixture
def http(server: RunningServer) -> Iterator[httpx.Client]:
    with loopback_http.client(base_url=server.url, timeout=30.0) as client:
        token = client.post(
            "/oauth/token",
            data={
                "grant_type": "client_credentials",
                "client_id": "syncflow-test",
                "client_secret": CLIENT["syncflow-test"],
            },
        ).json()["access_token"]
        client.headers["Authorization"] = f"Bearer {token}"
        yield client


def read_all(
    http: httpx.Client, source: str, kind: str = "changes", *, arrow: bool = True, **params: Any
) -> tuple[list[dict[str, Any]], int, int]:
    """Every record of one read (pinned snapshot); returns records, snapshot, pages."""
    records: list[dict[str, Any]] = []
    query = dict(params)
    for pages in range(1, 10_001):  # bounded
        response = http.get(f"/v1/entities/{source}/{kind}", params=query, headers=ARROW if arrow else None)
        assert response.status_code == 200, response.text
        if arrow:
            table = pa.ipc.open_stream(response.content).read_all()
            assert int(response.headers["x-row-count"]) == table.num_rows
            records.extend(table.to_pylist())
            nxt = int(response.headers["x-next-after-rowversion"])
            snapshot = int(response.headers["x-snapshot-rowversion"])
            more = response.headers["x-has-more"] == "true"
        else:
            body = orjson.loads(response.content)
            records.extend(body["records"])
            nxt, snapshot, more = body["next_after_rowversion"], body["snapshot_rowversion"], body["has_more"]
        if not more:
            return records, snapshot, pages
        query["after_rowversion"] = nxt
        query["snapshot_rowversion"] = snapshot
    raise AssertionError("paging did not end")


def test_api_needs_a_token_and_bad_credentials_are_refused(server: RunningServer) -> None:
    with loopback_http.client(base_url=server.url) as client:
        response = client.get("/v1/entities")
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == 'Bearer error="invalid_token"'
        refused = client.post(
            "/oauth/token",
            data={"grant_type": "client_credentials", "client_id": "syncflow-test", "client_secret": "wrong"},
        )
        assert refused.status_code == 401
        assert refused.json() == {"error": "invalid_client"}
        assert client.get("/health").json() == {"status": "ok"}


def test_entities_and_watermark(http: httpx.Client, dataset: dict[str, pa.Table]) -> None:
    listed = {e["source"]: e for e in http.get("/v1/entities").json()["entities"]}
    assert set(listed) == set(dataset)
    orders = dataset["ProductionOrders"]
    mark = http.get("/v1/entities/ProductionOrders/watermark").json()
    assert mark == {
        "source": "ProductionOrders",
        "max_rowversion": orders.column("RowVersion")[-1].as_py(),
        "row_count": orders.num_rows,
        "max_changed_at": mark["max_changed_at"],
    }
    assert datetime.fromisoformat(mark["max_changed_at"]) <= AS_OF
    assert listed["ProductionOrders"]["entity"] == "work_orders"
    missing = http.get("/v1/entities/Nope/watermark")
    assert missing.status_code == 404
    assert missing.json()["error"] == "unknown_entity"
    assert "Nope" in missing.json()["detail"]


def test_pages_cover_every_record_once_in_rowversion_order(
    http: httpx.Client, dataset: dict[str, pa.Table]
) -> None:
    records, snapshot, pages = read_all(http, "ProductionOrders", limit=137)
    rowversions = [r["RowVersion"] for r in records]
    assert rowversions == sorted(set(rowversions))
    assert records == dataset["ProductionOrders"].to_pylist()
    assert pages == -(-len(records) // 137) or pages == len(records) // 137 + 1
    assert snapshot == max(t.column("RowVersion")[-1].as_py() for t in dataset.values())


def test_json_and_arrow_give_the_same_records(http: httpx.Client) -> None:
    as_arrow, _, _ = read_all(http, "SalesOrderLines", arrow=True, limit=100)
    as_json, _, _ = read_all(http, "SalesOrderLines", arrow=False, limit=100)
    assert as_json == as_arrow
    assert len(as_json) == 375


def test_window_filters_on_change_time(http: httpx.Client, dataset: dict[str, pa.Table]) -> None:
    start = AS_OF - timedelta(days=2)
    end = AS_OF - timedelta(days=1)
    records, _, _ = read_all(
        http, "ProductionOrders", changed_from=start.isoformat(), changed_to=end.isoformat(), limit=50
    )
    table = dataset["ProductionOrders"]
    changed = pc.cast(table.column("ModifiedAt"), pa.timestamp("us", tz="UTC"))
    in_window = pc.and_(pc.greater_equal(changed, pa.scalar(start)), pc.less(changed, pa.scalar(end)))
    expected = table.filter(in_window).to_pylist()
    assert 0 < len(expected) < table.num_rows
    assert records == expected
    # A cursor from the future returns nothing.
    future, _, pages = read_all(http, "ProductionOrders", after_rowversion=10**12)
    assert future == []
    assert pages == 1


def test_records_changed_while_paging_are_neither_skipped_nor_repeated(http: httpx.Client) -> None:
    first = http.get("/v1/entities/Items/changes", params={"limit": 40}).json()
    snapshot = first["snapshot_rowversion"]
    served = {r["ItemNo"] for r in first["records"]}
    already = first["records"][0]
    remaining = http.get(
        "/v1/entities/Items/changes", params={"after_rowversion": first["next_after_rowversion"], "limit": 1}
    ).json()["records"][0]
    # One record already paged and one not yet paged change; one record is inserted; one deleted.
    changed = {
        **{k: v for k, v in remaining.items() if k not in ("RowVersion", "ModifiedAt")},
        "Description": "changed",
    }
    paged = {
        **{k: v for k, v in already.items() if k not in ("RowVersion", "ModifiedAt")},
        "Description": "again",
    }
    inserted = {**paged, "ItemNo": "IT-NEW-1"}
    applied = http.post(
        "/admin/changesets",
        json={
            "upserts": {"Items": [changed, paged, inserted]},
            "deletes": {"Items": [{"ItemNo": "IT-0100"}]},
        },
    )
    assert applied.status_code == 200, applied.text
    assert applied.json()["applied"]["Items"] == {
        "updated": 2,
        "inserted": 1,
        "deleted": 1,
        "delete_not_found": 0,
    }

    rest, rest_snapshot, _ = read_all(
        http,
        "Items",
        arrow=False,
        after_rowversion=first["next_after_rowversion"],
        snapshot_rowversion=snapshot,
        limit=40,
    )
    assert rest_snapshot == snapshot
    this_read = [r["ItemNo"] for r in first["records"]] + [r["ItemNo"] for r in rest]
    assert len(this_read) == len(set(this_read)), "a record repeated within one read"
    assert remaining["ItemNo"] not in this_read  # its old version is gone, its new one is above the snapshot
    assert "IT-NEW-1" not in this_read
    assert already["ItemNo"] in served

    following, _, _ = read_all(http, "Items", arrow=False, after_rowversion=snapshot)
    by_key = {r["ItemNo"]: r for r in following}
    assert set(by_key) == {remaining["ItemNo"], already["ItemNo"], "IT-NEW-1"}
    assert by_key[remaining["ItemNo"]]["Description"] == "changed"
    assert all(r["RowVersion"] > snapshot for r in following)
    tombs, _, _ = read_all(http, "Items", "tombstones", arrow=False, after_rowversion=snapshot)
    assert [t["ItemNo"] for t in tombs] == ["IT-0100"]
    # Every live key is in this read or the next one: nothing lost.
    live = {r["ItemNo"] for r in orjson.loads(http.get("/admin/snapshot/Items").content)["records"]}
    assert live == (set(this_read) | set(by_key)) - {"IT-0100"}


def test_tombstones_page_like_changes(http: httpx.Client) -> None:
    summary = http.post(
        "/admin/changesets", json={"deleted_pct": 10, "seed": 3, "entities": ["ProductionOrders"]}
    ).json()
    counts = summary["applied"]["ProductionOrders"]
    assert counts["deleted"] == 300
    tombs, _, _ = read_all(http, "ProductionOrders", "tombstones", limit=64)
    assert len(tombs) == 300
    assert set(tombs[0]) == {"ProdOrderNo", "RowVersion", "DeletedAt"}
    assert [t["RowVersion"] for t in tombs] == sorted(t["RowVersion"] for t in tombs)
    # The operations of deleted work orders went with them.
    assert summary["applied"]["ProductionOrderOperations"]["cascaded_deletes"] > 0
    mark = http.get("/v1/entities/ProductionOrders/watermark").json()
    assert mark["row_count"] == 2700
    assert mark["max_rowversion"] >= tombs[-1]["RowVersion"]
    live, _, _ = read_all(http, "ProductionOrders")
    assert not {t["ProdOrderNo"] for t in tombs} & {r["ProdOrderNo"] for r in live}
    in_json, _, _ = read_all(http, "ProductionOrders", "tombstones", arrow=False, limit=1000)
    assert in_json == tombs


def test_generated_change_set_shape(http: httpx.Client, dataset: dict[str, pa.Table]) -> None:
    before = {s: t.num_rows for s, t in dataset.items()}
    summary = http.post(
        "/admin/changesets", json={"updated_pct": 2, "inserted_pct": 1, "deleted_pct": 0.5, "seed": 9}
    ).json()["applied"]
    lines = summary["SalesOrderLines"]
    assert lines["updated"] == round(before["SalesOrderLines"] * 0.02)
    assert lines["inserted"] == round(before["SalesOrderLines"] * 0.01)
    assert lines["deleted"] >= round(before["SalesOrderLines"] * 0.005)
    # Inserted children point at live parents.
    orders = {r["OrderNo"] for r in orjson.loads(http.get("/admin/snapshot/SalesOrders").content)["records"]}
    snapshot = pa.ipc.open_stream(
        http.get("/admin/snapshot/SalesOrderLines", headers=ARROW).content
    ).read_all()
    assert set(snapshot.column("OrderNo").to_pylist()) <= orders
    assert snapshot.num_rows == before["SalesOrderLines"] + lines["inserted"] - lines["deleted"]
    reset = http.post("/admin/reset").json()
    assert http.get("/v1/entities/SalesOrderLines/watermark").json()["row_count"] == before["SalesOrderLines"]
    assert reset["current_rowversion"] == sum(before.values())


def test_bad_requests_name_what_is_wrong(http: httpx.Client) -> None:
    too_big = http.get("/v1/entities/Sites/changes", params={"limit": 50_001})
    assert too_big.status_code == 400
    assert too_big.json()["error"] == "limit_out_of_range"
    assert http.get("/v1/entities/Sites/changes", params={"limit": 0}).status_code == 400
    assert http.get("/v1/entities/Sites/changes", params={"limit": 50_000}).status_code == 200
    bad_time = http.get("/v1/entities/Sites/changes", params={"changed_from": "yesterday"})
    assert bad_time.status_code == 400
    assert "changed_from='yesterday'" in bad_time.json()["detail"]
    future = http.get("/v1/entities/Sites/changes", params={"snapshot_rowversion": 10**12})
    assert future.json()["error"] == "bad_snapshot"
    unknown_field = http.post(
        "/admin/changesets", json={"upserts": {"Sites": [{"SiteCode": "S1", "Colour": "red"}]}}
    )
    assert unknown_field.status_code == 400
    assert "field 'Colour'" in unknown_field.json()["detail"]
    assert "'red'" in unknown_field.json()["detail"]
    no_key = http.post("/admin/changesets", json={"deletes": {"Sites": [{"SiteCode": " "}]}})
    assert "field 'SiteCode': key value missing" in no_key.json()["detail"]
    unknown = http.post("/admin/changesets", json={"updated_pct": 1, "entities": ["Nope"]})
    assert "unknown entity 'Nope'" in unknown.json()["detail"]


def test_keys_stream_every_live_key_unless_the_partial_read_fault_drops_some(
    http: httpx.Client, dataset: dict[str, pa.Table]
) -> None:
    orders = dataset["ProductionOrders"]
    lines = http.get("/v1/entities/ProductionOrders/keys").content.splitlines()
    as_json = [orjson.loads(line) for line in lines]
    assert as_json == orders.select(["ProdOrderNo", "RowVersion"]).to_pylist()
    as_arrow = pa.ipc.open_stream(
        http.get("/v1/entities/ProductionOrders/keys", headers=ARROW).content
    ).read_all()
    assert as_arrow.to_pylist() == as_json
    composite = pa.ipc.open_stream(
        http.get("/v1/entities/SalesOrderLines/keys", headers=ARROW).content
    ).read_all()
    assert composite.column_names == ["OrderNo", "LineNo", "RowVersion"]

    http.put("/admin/faults", json={"keys_drop_fraction": 0.1, "seed": 4})
    partial = [
        orjson.loads(line) for line in http.get("/v1/entities/ProductionOrders/keys").content.splitlines()
    ]
    assert len(partial) == orders.num_rows - 300
    assert {r["ProdOrderNo"] for r in partial} < {r["ProdOrderNo"] for r in as_json}
    assert http.get("/admin/faults").json()["faults_served"] == {"keys_dropped": 300}


def test_malformed_rows_and_garbage_pages(http: httpx.Client) -> None:
    http.put("/admin/faults", json={"malformed_row_probability": 0.05, "seed": 1})
    records, _, _ = read_all(http, "ProductionOrders", limit=500)
    assert len(records) == 3000
    spoiled = [
        r
        for r in records
        if "12,5x" in r.values()
        or "12a" in r.values()
        or "NOT-A-STATUS" in r.values()
        or "31.02.2024" in r.values()
        or "maybe" in r.values()
        or "2024-02-30 25:61:00" in r.values()
        or any(isinstance(v, str) and v.startswith("XXXXXXXXXX") for v in r.values())
    ]
    served = http.get("/admin/faults").json()["faults_served"]["malformed_row"]
    assert served > 50
    assert len(spoiled) >= served - 10  # rows generated with an uncoercible value add a few of their own

    http.put("/admin/faults", json={"garbage_page_probability": 1.0, "max_faults": 2})
    broken = http.get("/v1/entities/Sites/changes", headers=ARROW)
    assert broken.status_code == 200
    with pytest.raises(pa.ArrowInvalid):
        pa.ipc.open_stream(broken.content).read_all()
    broken_json = http.get("/v1/entities/Sites/changes")
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(broken_json.content)
    healthy = http.get("/v1/entities/Sites/changes")  # the budget of two is spent
    assert len(orjson.loads(healthy.content)["records"]) == 5


def test_serves_a_folder_of_parquet_and_csv(tmp_path: Path, dataset: dict[str, pa.Table]) -> None:
    catalog = default_catalog()
    for index, (source, table) in enumerate(dataset.items()):
        if index % 2:
            pq.write_table(table, tmp_path / f"{source}.parquet")
        else:
            pacsv.write_csv(table.drop_columns(["RowVersion"]), tmp_path / f"{source}.csv")
    app = create_app(source_dir=tmp_path, catalog=catalog, clients=CLIENT, secret="s" * 32)
    with start_server(app) as running, loopback_http.client(base_url=running.url) as client:
        token = client.post(
            "/oauth/token",
            data={
                "grant_type": "client_credentials",
                "client_id": "syncflow-test",
                "client_secret": CLIENT["syncflow-test"],
            },
        ).json()["access_token"]
        client.headers["Authorization"] = f"Bearer {token}"
        for source, table in dataset.items():
            mark = client.get(f"/v1/entities/{source}/watermark").json()
            assert mark["row_count"] == table.num_rows
        records, _, _ = read_all(client, "SalesOrders", arrow=False, limit=1000)
        keys = sorted(r["OrderNo"] for r in records)
        assert keys == sorted(dataset["SalesOrders"].column("OrderNo").to_pylist())
    # A folder may hold a subset of the entities: the others are served with no records.
    (tmp_path / "Sites.csv").unlink(missing_ok=True)
    (tmp_path / "Sites.parquet").unlink(missing_ok=True)
    subset = create_app(source_dir=tmp_path, catalog=catalog, clients=CLIENT, secret="s" * 32)
    with start_server(subset) as running, loopback_http.client(base_url=running.url) as client:
        token = client.post(
            "/oauth/token",
            data={
                "grant_type": "client_credentials",
                "client_id": "syncflow-test",
                "client_secret": CLIENT["syncflow-test"],
            },
        ).json()["access_token"]
        client.headers["Authorization"] = f"Bearer {token}"
        assert client.get("/v1/entities/Sites/watermark").json()["row_count"] == 0
        records, _, _ = read_all(client, "Sites", arrow=False)
        assert records == []
        mark = client.get("/v1/entities/SalesOrders/watermark").json()
        assert mark["row_count"] == dataset["SalesOrders"].num_rows
    # A folder with no file for any entity is a mistake, not an empty ERP.
    for file in tmp_path.iterdir():
        file.unlink()
    with pytest.raises(
        ValueError, match=r"holds no file for any catalog entity \(expected one or more of .*Sites\.csv"
    ):
        create_app(source_dir=tmp_path, catalog=catalog, clients=CLIENT, secret="s" * 32)


ENDPOINT_LINE = re.compile(r"^\|\s*`(GET|POST|PUT|PATCH|DELETE) (/[^`]*)`")


def test_contract_lists_exactly_the_servers_endpoints(dataset: dict[str, pa.Table]) -> None:
    documented = set()
    for line in CONTRACT.read_text("utf-8").splitlines():
        match = ENDPOINT_LINE.match(line)
        if match:
            documented.add((match.group(1), match.group(2)))
    app = create_app(dataset=dataset, clients=CLIENT, secret="s" * 32)
    served = {
        (method.upper(), path)
        for path, operations in app.openapi()["paths"].items()
        for method in operations
        if method in {"get", "post", "put", "patch", "delete"}
    }
    assert documented == served
