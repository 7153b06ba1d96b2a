"""The API's state routes that need no Dagster: recent syncs with live progress, closing failed records.

The API runs over real HTTP on loopback against a real Postgres; rows are
written by the store's own repositories, the way a run writes them.
"""

from __future__ import annotations

import datetime as dt
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pyarrow as pa
import pytest
from pydantic import SecretStr

from syncflow_dagster.defs import bookkeeping
from syncflow_dagster.defs.resources import SyncDatabase
from syncflow_dagster.engine.columns import BK, BK_HASH
from syncflow_dagster.service.app import create_app
from syncflow_dagster.service.settings import ServiceSettings
from syncflow_dagster.simulators.serve import start_server
from syncflow_dagster_tests import loopback_http


@dataclass
class Api:
    url: str
    token: str
    database: SyncDatabase

    def get(self, path: str, **params: object) -> httpx.Response:
        return loopback_http.get(
            f"{self.url}{path}", params=params, headers={"Authorization": f"Bearer {self.token}"}, timeout=30
        )

    def post(self, path: str, body: object) -> httpx.Response:
        return loopback_http.post(
            f"{self.url}{path}", json=body, headers={"Authorization": f"Bearer {self.token}"}, timeout=30
        )


@pytest.fixture(scope="module")
def api(pg_server_url: str) -> Iterator[Api]:
    from syncflow_dagster_tests.conftest import scratch_database

    with scratch_database(pg_server_url) as url:
        database = SyncDatabase(url=url)
        database.batches()  # migrates
        _ = database.engine
        token = secrets.token_urlsafe(16)
        settings = ServiceSettings(
            database_url=SecretStr(url),
            api_token=SecretStr(token),
            # No Dagster: these routes never ask it.
            dagster_graphql_url="http://127.0.0.1:1",
        )
        with start_server(create_app(settings)) as server:
            yield Api(server.url, token, database)


def test_a_running_batch_shows_the_stages_that_finished_and_a_cancelled_one_keeps_them(api: Api) -> None:
    database = api.database
    run_id = f"run-{secrets.token_hex(4)}"
    batch = bookkeeping.batch_for_run(database, "work_centers", dt.date(2026, 1, 5), run_id)
    bookkeeping.record_stage(
        database, batch, "work_centers", "fetch", 120, 1.25, {"fetched": 118, "tombstones": 2}
    )
    bookkeeping.record_stage(
        database, batch, "work_centers", "normalize", 119, 0.5, {"normalized": 117, "rejected": 1}
    )

    page = api.get("/sync", entity="work_centers", status="running").json()
    assert page["total"] == 1
    (item,) = page["items"]
    assert (item["run_id"], item["kind"], item["status"]) == (run_id, "sync", "running")
    # Counts reach sync_batches only at the report stage; the finished stages say them now.
    assert (item["fetched"], item["tombstones"], item["normalized"], item["rejected"]) == (118, 2, 117, 1)
    assert item["delivered"] == 0
    assert [s["stage"] for s in item["stages"]] == ["fetch", "normalize"]
    assert item["stages"][0]["counts"] == {"fetched": 118, "tombstones": 2}
    assert item["stages"][0]["seconds"] == 1.25
    assert item["stage_seconds"] == {"fetch": 1.25, "normalize": 0.5}

    # The delta stage then failed, and the operator cancelled the run.
    with pytest.raises(RuntimeError), database.events().stage(batch, "work_centers", "delta"):
        raise RuntimeError("out of memory")
    assert database.batches().close_running(run_id, "cancelled") == [batch]
    (stopped,) = api.get("/sync", entity="work_centers").json()["items"]
    assert stopped["status"] == "cancelled"
    assert (stopped["fetched"], stopped["normalized"]) == (118, 117)
    assert [s["stage"] for s in stopped["stages"]] == ["fetch", "normalize", "delta"]
    assert stopped["stages"][-1]["status"] == "failed"
    assert "out of memory" in stopped["stages"][-1]["error"]
    assert api.get("/sync", status="cancelled").json()["total"] >= 1
    assert api.get("/sync", status="paused").status_code == 422


def test_a_retry_runs_own_counts_are_listed(api: Api) -> None:
    database = api.database
    run_id = f"retry-{secrets.token_hex(4)}"
    batch = bookkeeping.batch_for_run(database, "items", None, run_id, kind="retry")
    bookkeeping.record_stage(
        database,
        batch,
        "items",
        "retry",
        7,
        0.4,
        {"retried": 7, "gave_up": 1, "expired_pending": 0, "delivered": 6, "failed": 1},
    )
    bookkeeping.finish_from_events(database, batch)
    page = api.get("/sync", kind="retry", entity="items").json()
    (item,) = page["items"]
    assert item["kind"] == "retry"
    assert item["status"] == "succeeded"
    assert item["counts"]["retried"] == 7
    assert item["counts"]["gave_up"] == 1
    assert (item["delivered"], item["failed"]) == (6, 1)


def test_pages_of_recent_syncs_are_newest_first(api: Api) -> None:
    database = api.database
    ids = []
    for n in range(3):
        batch = bookkeeping.batch_for_run(database, "customers", None, f"page-{n}-{secrets.token_hex(3)}")
        bookkeeping.finish_from_events(database, batch)
        ids.append(str(batch))
    first = api.get("/sync", entity="customers", limit=2).json()
    second = api.get("/sync", entity="customers", limit=2, offset=2).json()
    assert first["total"] == second["total"] == 3
    assert [i["batch_id"] for i in first["items"] + second["items"]] == ids[::-1]


def _fail(database: SyncDatabase, entity: str, bks: list[str], reason_class: str) -> None:
    database.failures().record_failures(
        entity,
        None,
        pa.table(
            {
                BK_HASH: pa.array([os.urandom(16) for _ in bks], pa.binary(16)),
                BK: bks,
                "reason_code": ["invalid_record"] * len(bks),
                "reason_class": [reason_class] * len(bks),
                "detail": ["rejected"] * len(bks),
                "payload": ["{}"] * len(bks),
            }
        ),
    )


def test_resolve_and_dismiss_record_who_and_why(api: Api) -> None:
    _fail(api.database, "operations", ["WO-1\x1f10", "WO-1\x1f20", "WO-2\x1f10"], "permanent")
    resolved = api.post(
        "/failed-records/resolve",
        {"entity": "operations", "keys": [["WO-1", "10"]], "reason": "fixed by hand", "by": "ana"},
    )
    assert resolved.status_code == 200, resolved.text
    body = resolved.json()
    assert body["closed"] == 1
    (item,) = body["items"]
    assert (item["bk"], item["state"], item["state_by"], item["state_reason"]) == (
        "WO-1\x1f10",
        "resolved",
        "ana",
        "fixed by hand",
    )
    assert item["state_at"] is not None
    held = api.get("/failed-records", entity="operations").json()
    assert sorted(i["bk"] for i in held["items"]) == ["WO-1\x1f20", "WO-2\x1f10"]
    ids = [i["id"] for i in held["items"]]
    dismissed = api.post("/failed-records/dismiss", {"ids": ids, "reason": "test rows", "by": "ben"}).json()
    assert dismissed["closed"] == 2
    assert api.get("/failed-records", entity="operations").json()["total"] == 0
    assert api.get("/failed-records", entity="operations", state="dismissed").json()["total"] == 2
    history = api.get("/failed-records", entity="operations", include_resolved="true").json()
    assert {i["state"] for i in history["items"]} == {"resolved", "dismissed"}

    # Who and why are required; so is a choice of records.
    assert api.post("/failed-records/resolve", {"ids": ids, "by": "ana"}).status_code == 422
    blank = api.post("/failed-records/resolve", {"ids": ids, "by": "ana", "reason": "   "})
    assert blank.status_code == 422
    assert "'reason'" in blank.json()["detail"]
    no_choice = api.post("/failed-records/resolve", {"entity": "operations", "reason": "x", "by": "ana"})
    assert no_choice.status_code == 422
    assert "choose failed records" in no_choice.json()["detail"]
    unknown = api.post(
        "/failed-records/dismiss", {"entity": "widgets", "keys": ["W"], "reason": "x", "by": "a"}
    )
    assert unknown.status_code == 422
    assert "widgets" in unknown.json()["detail"]


def _text_parameters(openapi: dict[str, object]) -> list[tuple[str, str, str]]:
    """(path, in, name) of every GET route's text parameter (query or path) in the API's own OpenAPI."""
    found = []
    for path, operations in openapi["paths"].items():  # type: ignore[attr-defined]
        for parameter in operations.get("get", {}).get("parameters", []):
            schema = parameter["schema"]
            types = [s.get("type") for s in schema.get("anyOf", [schema]) if "enum" not in s]
            if "string" in types:
                found.append((path, parameter["in"], parameter["name"]))
    return found


def test_a_nul_character_in_any_text_parameter_is_refused_naming_it(api: Api) -> None:
    """PostgreSQL text cannot hold NUL: it is a 422 naming the parameter, never a 500 from the driver
    (the OpenAPI fuzzer once found GET /failed-records?entity=%00 answering 500)."""
    openapi = loopback_http.get(f"{api.url}/openapi.json", timeout=30).json()
    parameters = _text_parameters(openapi)
    assert ("/failed-records", "query", "entity") in parameters
    assert ("/failed-records", "query", "reason") in parameters
    for path, where, name in parameters:
        if where == "path":
            answer = api.get(path.replace("{" + name + "}", "%00"))
        else:
            answer = api.get(path, **{name: "a\x00b"})
        assert answer.status_code == 422, f"{path} {name}: {answer.status_code} {answer.text[:300]}"
        assert [where, name] in [e["loc"] for e in answer.json()["detail"]], answer.text

    base = {"entity": "operations", "keys": ["WO-1"], "reason": "fixed", "by": "ana"}
    for field, value in (
        ("by", "a\x00"),
        ("reason", "\x00"),
        ("reason_code", "parent\x00missing"),
        ("keys", ["WO\x001"]),
        ("keys", [["WO-1", "1\x000"]]),
    ):
        answer = api.post("/failed-records/resolve", {**base, field: value})
        assert answer.status_code == 422, f"{field}={value!r}: {answer.status_code} {answer.text[:300]}"
        assert any(e["loc"][:2] == ["body", field] for e in answer.json()["detail"]), answer.text
