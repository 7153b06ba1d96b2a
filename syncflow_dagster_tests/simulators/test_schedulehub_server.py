"""Tests of the ScheduleHub stand-in over real HTTP, and of its contract document."""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pyarrow as pa
import pytest

from syncflow_dagster.simulators.hub_store import DataDirInUseError, HubStore
from syncflow_dagster.simulators.schedulehub import ARROW_STREAM, create_app
from syncflow_dagster.simulators.serve import start_server
from syncflow_dagster_tests import loopback_http

CONTRACT = Path(__file__).resolve().parents[2] / "docs" / "contracts" / "schedulehub.md"
SECRET = "hub-client-secret-123"


@pytest.fixture
def hub() -> Iterator[httpx.Client]:
    app = create_app(clients={"syncflow": SECRET}, secret="t" * 32, max_batch_rows=50)
    with start_server(app) as server, loopback_http.client(base_url=server.url, timeout=30) as client:
        token = client.post(
            "/oauth/token",
            data={"grant_type": "client_credentials", "client_id": "syncflow", "client_secret": SECRET},
        ).json()["access_token"]
        client.headers["Authorization"] = f"Bearer {token}"
        yield client


def upsert(hub: httpx.Client, resource: str, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    response = hub.put(f"/v1/resources/{resource}/records:batch-upsert", json={"records": records})
    assert response.status_code == 200, response.text
    results: list[dict[str, Any]] = response.json()["results"]
    assert len(results) == len(records)
    return results


def _base(hub: httpx.Client) -> str:
    return str(hub.base_url).rstrip("/") + "/"


def rec(key: str, refs: dict[str, str] | None = None, **attrs: Any) -> dict[str, Any]:
    return {"external_key": key, "attributes": attrs, "references": refs or {}}


def test_contract_lists_exactly_the_served_endpoints() -> None:
    documented = set(re.findall(r"^\| `([A-Z]+) (/[^`]*)` \|", CONTRACT.read_text(), flags=re.MULTILINE))
    served = {
        (method.upper(), path) for path, item in create_app().openapi()["paths"].items() for method in item
    }
    assert documented, "the contract has no endpoint table"
    assert documented == served, {"undocumented": served - documented, "not served": documented - served}


def test_api_requires_a_token(hub: httpx.Client) -> None:
    response = loopback_http.get(f"{_base(hub)}v1/resources")
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == 'Bearer error="invalid_token"'
    bad = loopback_http.get(f"{_base(hub)}v1/resources", headers={"Authorization": "Bearer nonsense"})
    assert bad.status_code == 401
    wrong = loopback_http.post(
        f"{_base(hub)}oauth/token",
        data={"grant_type": "client_credentials", "client_id": "syncflow", "client_secret": "nope"},
    )
    assert wrong.status_code == 401
    assert wrong.json() == {"error": "invalid_client"}


def test_upsert_is_idempotent_with_stable_ids(hub: httpx.Client) -> None:
    first = upsert(hub, "sites", [rec("S1", name="North"), rec("S2", name="South")])
    assert [r["outcome"] for r in first] == ["created", "created"]
    again = upsert(hub, "sites", [rec("S1", name="North"), rec("S2", name="South!")])
    assert [r["outcome"] for r in again] == ["unchanged", "updated"]
    assert [r["id"] for r in again] == [r["id"] for r in first]
    assert hub.get("/v1/resources").json() == {"resources": [{"resource": "sites", "count": 2}]}
    one = hub.get("/v1/resources/sites/records/S2").json()
    assert one["attributes"] == {"name": "South!"}
    assert hub.get("/v1/resources/sites/records/S9").status_code == 404


def test_child_before_parent_is_rejected_with_parent_missing(hub: httpx.Client) -> None:
    results = upsert(hub, "items", [rec("I1", {"sites": "S1"}, sku="a")])
    assert results[0]["status"] == "rejected"
    assert results[0]["reason_code"] == "parent_missing"
    assert results[0]["retryable"] is False
    upsert(hub, "sites", [rec("S1")])
    assert upsert(hub, "items", [rec("I1", {"sites": "S1"}, sku="a")])[0]["outcome"] == "created"
    # A parent earlier in the same batch counts.
    same_batch = upsert(hub, "tasks", [rec("T1"), rec("T2", {"tasks": "T1"})])
    assert [r["outcome"] for r in same_batch] == ["created", "created"]


def test_invalid_records_are_rejected_per_row(hub: httpx.Client) -> None:
    results = upsert(
        hub,
        "sites",
        [rec("", name="x"), {"external_key": "S3", "attributes": {"nested": {"a": 1}}}, rec("S4", name="ok")],
    )
    assert [r["status"] for r in results] == ["rejected", "rejected", "accepted"]
    assert results[0]["reason_code"] == results[1]["reason_code"] == "invalid_record"
    assert "nested" in results[1]["detail"]


def test_batch_limit_and_bad_bodies(hub: httpx.Client) -> None:
    too_many = hub.put(
        "/v1/resources/sites/records:batch-upsert", json={"records": [rec(f"S{i}") for i in range(51)]}
    )
    assert too_many.status_code == 413
    assert too_many.json()["detail"]["limit"] == 50
    garbage = hub.put(
        "/v1/resources/sites/records:batch-upsert",
        content=b"{not json",
        headers={"Content-Type": "application/json"},
    )
    assert garbage.status_code == 400
    assert hub.put("/v1/resources/Bad-Name/records:batch-upsert", json={"records": []}).status_code == 404


def test_delete_is_idempotent_and_can_be_restricted(hub: httpx.Client) -> None:
    upsert(hub, "sites", [rec("S1"), rec("S2")])
    upsert(hub, "items", [rec("I1", {"sites": "S1"})])
    base = _base(hub)
    loopback_http.put(
        f"{base}admin/settings", json={"restrict_referenced_deletes": True, "max_batch_rows": 50}
    )
    response = hub.post(
        "/v1/resources/sites/records:batch-delete", json={"external_keys": ["S1", "S2", "S9"]}
    )
    results = response.json()["results"]
    assert [(r["status"], r.get("outcome") or r.get("reason_code")) for r in results] == [
        ("rejected", "has_children"),
        ("accepted", "deleted"),
        ("accepted", "not_found"),
    ]
    loopback_http.put(f"{base}admin/settings", json={"restrict_referenced_deletes": False})
    results = hub.post("/v1/resources/sites/records:batch-delete", json={"external_keys": ["S1"]}).json()[
        "results"
    ]
    assert results[0]["outcome"] == "deleted"


def test_read_back_pages_by_cursor_in_json_and_arrow(hub: httpx.Client) -> None:
    for start in range(0, 120, 40):
        upsert(hub, "items", [rec(f"I{i:03d}", qty=i) for i in range(start, start + 40)])
    hub.post("/v1/resources/items/records:batch-delete", json={"external_keys": ["I005"]})
    keys: list[str] = []
    cursor = None
    for _ in range(20):
        params: dict[str, Any] = {"limit": 25, **({"cursor": cursor} if cursor else {})}
        page = hub.get("/v1/resources/items/records", params=params).json()
        keys.extend(r["external_key"] for r in page["records"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert keys == [f"I{i:03d}" for i in range(120) if i != 5]
    arrow = hub.get("/v1/resources/items/records", params={"limit": 10000}, headers={"Accept": ARROW_STREAM})
    table = pa.ipc.open_stream(arrow.content).read_all()
    assert table.column("external_key").to_pylist() == keys
    assert table.column("qty").to_pylist()[:3] == [0, 1, 2]
    assert "x-next-cursor" not in arrow.headers


def test_arrow_upsert_with_references_and_arrow_results(hub: httpx.Client) -> None:
    upsert(hub, "sites", [rec("S1")])
    batch = pa.table({"external_key": ["I1", "I2"], "ref.sites": ["S1", "S7"], "qty": [1, 2]})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_table(batch)
    response = hub.put(
        "/v1/resources/items/records:batch-upsert",
        content=sink.getvalue().to_pybytes(),
        headers={"Content-Type": ARROW_STREAM, "Accept": ARROW_STREAM},
    )
    results = pa.ipc.open_stream(response.content).read_all().to_pylist()
    assert [(r["status"], r["outcome"], r["reason_code"]) for r in results] == [
        ("accepted", "created", None),
        ("rejected", None, "parent_missing"),
    ]
    assert hub.get("/v1/resources/items/records/I1").json()["references"] == {"sites": "S1"}


def test_rate_limit_answers_429_with_retry_after(hub: httpx.Client) -> None:
    base = _base(hub)
    # A refill far slower than the test: the second call cannot get a token.
    loopback_http.put(f"{base}admin/settings", json={"rate_limit_per_s": 0.01})
    assert hub.get("/v1/resources").status_code == 200
    limited = hub.get("/v1/resources")
    assert limited.status_code == 429
    assert int(limited.headers["retry-after"]) >= 1


def test_partial_failure_fault_rejects_rows_as_retryable(hub: httpx.Client) -> None:
    base = _base(hub)
    loopback_http.put(f"{base}admin/faults", json={"partial_failure_probability": 0.5, "seed": 3})
    results = upsert(hub, "sites", [rec(f"S{i}") for i in range(40)])
    failed = {r["external_key"] for r in results if r["status"] == "rejected"}
    assert failed
    assert all(
        r["reason_code"] == "transient_failure" and r["retryable"]
        for r in results
        if r["status"] == "rejected"
    )
    held = {r["external_key"] for r in hub.get("/v1/resources/sites/records").json()["records"]}
    assert held == {f"S{i}" for i in range(40)} - failed
    assert loopback_http.get(f"{base}admin/faults").json()["faults_served"]["partial_failure"] == len(failed)


def test_revoked_tokens_and_reset(hub: httpx.Client) -> None:
    upsert(hub, "sites", [rec("S1")])
    base = _base(hub)
    assert loopback_http.post(f"{base}admin/reset").status_code == 200
    assert hub.get("/v1/resources").json() == {"resources": []}
    loopback_http.post(f"{base}admin/tokens:revoke")
    assert hub.get("/v1/resources").status_code == 401


def _token(client: httpx.Client) -> None:
    token = client.post(
        "/oauth/token",
        data={"grant_type": "client_credentials", "client_id": "c", "client_secret": SECRET},
    ).json()["access_token"]
    client.headers["Authorization"] = f"Bearer {token}"


def _read_back(client: httpx.Client, resource: str) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    cursor = None
    for _ in range(1000):  # bounded
        params: dict[str, Any] = {"limit": 7, **({"cursor": cursor} if cursor else {})}
        page = client.get(f"/v1/resources/{resource}/records", params=params).json()
        records.extend(page["records"])
        cursor = page["next_cursor"]
        if cursor is None:
            return records
    raise AssertionError("read-back did not end")


def test_a_restart_with_the_same_data_dir_keeps_every_record(tmp_path: Path) -> None:
    data_dir = tmp_path / "hub"
    first = create_app(clients={"c": SECRET}, data_dir=data_dir)
    with start_server(first) as server, loopback_http.client(base_url=server.url, timeout=30) as client:
        _token(client)
        sites = [rec(f"S{i}", name=f"site {i}", open=i % 2 == 0) for i in range(30)]
        assert (
            client.put("/v1/resources/sites/records:batch-upsert", json={"records": sites}).status_code == 200
        )
        items = [rec(f"I{i}", {"sites": f"S{i % 30}"}, qty=i, price=i / 4) for i in range(120)]
        upsert(client, "items", items[:60])
        upsert(client, "items", items[60:])
        upsert(client, "items", [rec("I5", {"sites": "S1"}, qty=-5, price=None)])  # an update
        client.post("/v1/resources/items/records:batch-delete", json={"external_keys": ["I7", "I8"]})
        before = {r: _read_back(client, r) for r in ("sites", "items")}
        counts = client.get("/v1/resources").json()
    assert counts == {"resources": [{"resource": "items", "count": 118}, {"resource": "sites", "count": 30}]}

    again = create_app(clients={"c": SECRET}, data_dir=data_dir)
    with start_server(again) as server, loopback_http.client(base_url=server.url, timeout=30) as client:
        _token(client)
        assert client.get("/v1/resources").json() == counts
        assert {r: _read_back(client, r) for r in ("sites", "items")} == before
        assert client.get("/v1/resources/items/records/I5").json() == {
            "id": "sh_items_6",
            "external_key": "I5",
            "attributes": {"qty": -5, "price": None},
            "references": {"sites": "S1"},
        }
        # Same content again is unchanged, ids and the sequence carry on, parents are still known.
        again_results = upsert(
            client, "items", [items[0], rec("I7", {"sites": "S7"}, qty=7), rec("I999", {"sites": "S99"})]
        )
        assert [r.get("outcome") or r.get("reason_code") for r in again_results] == [
            "unchanged",
            "created",
            "parent_missing",
        ]
        assert again_results[0]["id"] == "sh_items_1"
        assert again_results[1]["id"] == "sh_items_121"  # a deleted key comes back with a new id
        storage = loopback_http.get(f"{server.url}/admin/storage").json()
        assert storage["data_dir"] == str(data_dir)
        assert storage["temporary"] is False
        assert storage["disk_bytes"] > 0


def test_a_second_stand_in_on_the_same_data_dir_is_refused(tmp_path: Path) -> None:
    with HubStore(tmp_path).open(), pytest.raises(DataDirInUseError, match=f"{tmp_path} is in use"):
        HubStore(tmp_path).open()
    HubStore(tmp_path).open().close()  # free again once the first one closed


def test_without_a_data_dir_records_live_in_a_temporary_directory_removed_at_stop() -> None:
    with start_server(create_app(clients={"c": SECRET})) as server:
        storage = loopback_http.get(f"{server.url}/admin/storage").json()
        folder = Path(storage["data_dir"])
        assert storage["temporary"] is True
        assert folder.is_dir()
    assert not folder.exists()


def test_a_client_gone_mid_body_leaves_no_error_trace_and_nothing_applied(
    hub: httpx.Client, caplog: pytest.LogCaptureFixture
) -> None:
    # A step killed while it uploads a batch: the stand-in must not log an ASGI
    # exception for it, and no row of the half-sent batch may be applied.
    url = urlsplit(str(hub.base_url))
    head = (
        f"PUT /v1/resources/items/records:batch-upsert HTTP/1.1\r\nHost: {url.hostname}\r\n"
        f"Authorization: {hub.headers['Authorization']}\r\nContent-Type: application/json\r\n"
        "Content-Length: 100000\r\n\r\n"
    )
    with caplog.at_level("INFO"), socket.create_connection((url.hostname, url.port), timeout=10) as raw:
        raw.sendall(head.encode() + b'{"records": [{"external_key": "IT-GONE", "attributes": {}')
        raw.shutdown(socket.SHUT_WR)
        raw.recv(1024)  # the server closes its side once it has seen the disconnect
    listed = hub.get("/v1/resources/items/records").json()
    assert "IT-GONE" not in str(listed)
    assert upsert(hub, "items", [rec("IT-AFTER", name="x")])[0]["status"] == "accepted"
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")], caplog.text
