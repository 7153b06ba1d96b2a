"""The monitoring & sync API over real HTTP, against a real Dagster webserver, Postgres and both stand-ins.

`dagster-webserver` runs in a subprocess on a free loopback port, with a temp
DAGSTER_HOME (default run coordinator: launched runs start at once) and the
repo's workspace.yaml (`_service_fixtures.dagster_webserver`). Every wait is
bounded; the subprocess is always ended.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import schemathesis
import sqlalchemy as sa
from hypothesis import HealthCheck, settings
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr

from syncflow_dagster.service.app import create_app
from syncflow_dagster.service.settings import ServiceSettings
from syncflow_dagster.simulators import apismith, schedulehub
from syncflow_dagster.simulators.serve import RunningServer, start_server
from syncflow_dagster.store.database import make_engine
from syncflow_dagster.store.migrate import upgrade
from syncflow_dagster.store.schema import sync_batches
from syncflow_dagster_tests import loopback_http
from syncflow_dagster_tests._service_fixtures import (
    TERMINAL,
    dagster_webserver,
    insert_failure,
    insert_pending,
    poll_run,
)
from syncflow_dagster_tests.conftest import scratch_database
from syncflow_dagster_tests.waiting import WaitTimeout, wait_until_async


@dataclass
class Stack:
    url: str
    token: str
    database_url: str
    apismith: RunningServer
    schedulehub: RunningServer

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def get(self, path: str, **kw: object) -> httpx.Response:
        return loopback_http.get(f"{self.url}{path}", headers=self.auth, timeout=60, **kw)  # type: ignore[arg-type]

    def post(self, path: str, json: object = None) -> httpx.Response:
        return loopback_http.post(f"{self.url}{path}", headers=self.auth, json=json, timeout=60)


@pytest.fixture(scope="module")
def module_database_url(pg_server_url: str) -> Iterator[str]:
    """A database of this module's own: other modules' syncs of the same seeded keys would make
    this module's first sync see them as already delivered."""
    with scratch_database(pg_server_url) as url:
        yield url


@pytest.fixture(scope="module")
def stack(module_database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    database_url = module_database_url
    upgrade(database_url)
    secret_a, secret_s, token = (secrets.token_urlsafe(16) for _ in range(3))
    api = start_server(apismith.create_app(rows=300, seed=3, clients={"syncflow": secret_a}))
    hub = start_server(schedulehub.create_app(clients={"syncflow": secret_s}))
    home = tmp_path_factory.mktemp("dagster_home")
    env = {
        **os.environ,
        "SYNCFLOW_DATABASE_URL": database_url,
        "APISMITH_BASE_URL": api.url,
        "APISMITH_CLIENT_ID": "syncflow",
        "APISMITH_CLIENT_SECRET": secret_a,
        "SCHEDULEHUB_BASE_URL": hub.url,
        "SCHEDULEHUB_CLIENT_ID": "syncflow",
        "SCHEDULEHUB_CLIENT_SECRET": secret_s,
        # Failed records are due for a retry at once: the retry test retries them.
        "SYNCFLOW_STORE_RETRY_BASE_SECONDS": "0.01",
        "SYNCFLOW_STORE_RETRY_JITTER": "0",
    }
    try:
        with dagster_webserver(home, env) as dagster_url:
            service_settings = ServiceSettings(
                database_url=SecretStr(database_url),
                api_token=SecretStr(token),
                dagster_graphql_url=dagster_url,
                # Launching a run loads the code location; on a loaded 2-core box that outlasts 30 s.
                dagster_timeout_s=180.0,
                apismith_base_url=api.url,
                schedulehub_base_url=hub.url,
            )
            with start_server(create_app(service_settings)) as service:
                yield Stack(service.url, token, database_url, api, hub)
    finally:
        api.stop()
        hub.stop()


def _poll(stack: Stack, run_id: str, until: frozenset[str] | set[str]) -> dict[str, Any]:
    return poll_run(stack.url, stack.auth, run_id, until)


def test_protected_routes_refuse_without_the_token(stack: Stack) -> None:
    assert loopback_http.get(f"{stack.url}/stats", timeout=30).status_code == 401
    wrong = loopback_http.get(f"{stack.url}/stats", headers={"Authorization": "Bearer nope"}, timeout=30)
    assert wrong.status_code == 401
    assert wrong.headers["www-authenticate"] == "Bearer"
    assert loopback_http.post(f"{stack.url}/sync", json={}, timeout=30).status_code == 401
    assert stack.get("/stats").status_code == 200
    # Public by default: probes and scrapers carry no token.
    assert loopback_http.get(f"{stack.url}/metrics", timeout=30).status_code == 200
    health = loopback_http.get(f"{stack.url}/health", timeout=30)
    assert health.status_code == 200
    checks = health.json()["checks"]
    assert {name: c["status"] for name, c in checks.items()} == dict.fromkeys(
        ("database", "apismith", "schedulehub", "dagster"), "ok"
    )
    assert all(c["latency_ms"] >= 0 for c in checks.values())
    assert stack.token not in health.text


def test_unknown_entity_is_refused_by_name(stack: Stack) -> None:
    response = stack.post("/sync", {"entities": ["widgets"]})
    assert response.status_code == 422
    assert "widgets" in response.json()["detail"]


def test_unknown_run_is_404(stack: Stack) -> None:
    assert stack.get("/sync/00000000-0000-0000-0000-000000000000").status_code == 404


@pytest.mark.slow
def test_start_a_sync_and_poll_it_to_success(stack: Stack) -> None:
    today = dt.datetime.now(dt.UTC).date()
    started = stack.post("/sync", {"entities": ["customers"], "date": today.isoformat()})
    assert started.status_code == 202, started.text
    assert started.json()["not_launched"] == []
    (run,) = started.json()["launched"]
    assert run["entity"] == "customers"
    body = _poll(stack, run["run_id"], TERMINAL)
    assert body["status"] == "SUCCESS", body
    assert "customers" in str(body["partition"])
    (batch,) = body["batches"]
    assert batch["entity"] == "customers"
    assert batch["fetched"] > 0
    assert batch["delivered"] == batch["insert"] > 0
    assert batch["stage_seconds"]

    # /metrics agrees with the batch rows the run wrote.
    text = loopback_http.get(f"{stack.url}/metrics", timeout=30).text
    rows = {
        s.labels["action"]: s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "syncflow_rows_total" and s.labels.get("entity") == "customers"
    }
    engine = make_engine(stack.database_url)
    try:
        with engine.connect() as conn:
            stored = conn.execute(
                sa.select(sync_batches.c.counts).where(sync_batches.c.entity == "customers")
            ).scalars()
            fetched = sum(int(c.get("fetched", 0)) for c in stored)
    finally:
        engine.dispose()
    assert rows["fetched"] == fetched > 0


@pytest.mark.slow
def test_cancel_a_second_run(stack: Stack) -> None:
    # Every APISmith answer is slow, so the run is surely still fetching when canceled.
    slow = {"slow_probability": 1.0, "slow_delay_s": 20.0}
    assert loopback_http.put(f"{stack.apismith.url}/admin/faults", json=slow, timeout=30).status_code == 200
    try:
        started = stack.post("/sync", {"entities": ["items"]})
        assert started.status_code == 202, started.text
        run_id = started.json()["launched"][0]["run_id"]
        _poll(stack, run_id, {"STARTED", *TERMINAL})
        canceled = stack.post(f"/sync/{run_id}/cancel")
        assert canceled.status_code == 202, canceled.text
        assert _poll(stack, run_id, TERMINAL)["status"] == "CANCELED"
    finally:
        loopback_http.delete(f"{stack.apismith.url}/admin/faults", timeout=30)


@pytest.mark.slow
def test_failed_and_pending_after_schedulehub_faults(stack: Stack) -> None:
    # Half of every ScheduleHub batch fails as transient_failure: those rows become failed records.
    faults = {"partial_failure_probability": 0.5, "seed": 7}
    assert (
        loopback_http.put(f"{stack.schedulehub.url}/admin/faults", json=faults, timeout=30).status_code == 200
    )
    try:
        run = stack.post("/sync", {"entities": ["sites"]}).json()["launched"][0]
        assert _poll(stack, run["run_id"], TERMINAL)["status"] == "SUCCESS"
    finally:
        loopback_http.delete(f"{stack.schedulehub.url}/admin/faults", timeout=30)
    # Operations before their work orders exist in ScheduleHub (no test of this module syncs
    # work orders, whatever the order the tests run in): the children wait.
    run = stack.post("/sync", {"entities": ["operations"]}).json()["launched"][0]
    assert _poll(stack, run["run_id"], TERMINAL)["status"] == "SUCCESS"

    failed = stack.get("/failed-records", params={"entity": "sites", "reason": "transient_failure"}).json()
    assert failed["total"] > 0
    assert {item["reason_code"] for item in failed["items"]} == {"transient_failure"}
    pending = stack.get("/pending-children", params={"entity": "operations", "limit": 5}).json()
    assert pending["total"] > 0
    assert len(pending["items"]) == min(5, pending["total"])
    assert {item["missing_parent_entity"] for item in pending["items"]} == {"work_orders"}

    retry = stack.post("/failed-records/retry", {"entities": ["sites", "customers"]})
    assert retry.status_code == 202, retry.text
    body = retry.json()
    # One run per entity with something to retry; customers had nothing.
    (run,) = body["launched"]
    assert run["entity"] == "sites"
    assert body["nothing_to_do"] == ["customers"]
    assert body["not_launched"] == []
    retried = _poll(stack, run["run_id"], TERMINAL)
    assert retried["status"] == "SUCCESS"
    (batch,) = retried["batches"]
    assert (batch["kind"], batch["entity"]) == ("retry", "sites")
    assert batch["counts"]["retried"] == failed["total"]


@pytest.mark.slow
def test_reconcile_dry_run_through_the_api(stack: Stack) -> None:
    started = stack.post("/reconcile", {"entities": ["items"], "dry_run": True})
    assert started.status_code == 202, started.text
    body = started.json()
    assert body["not_launched"] == []
    (run,) = body["launched"]
    assert run["entity"] == "items"
    status = _poll(stack, run["run_id"], TERMINAL)
    assert status["status"] == "SUCCESS", status
    assert status["job"] == "reconcile"
    assert status["batches"] == []  # a dry run deletes nothing and writes no batch
    assert stack.post("/reconcile", {"entities": ["widgets"]}).status_code == 422


def test_failed_records_pages_and_filters(stack: Stack) -> None:
    engine = make_engine(stack.database_url)
    try:
        with engine.begin() as conn:
            for n in range(7):
                insert_failure(conn, "work_centers", f"WC-{n}", "invalid_record" if n % 2 else "too_long")
            insert_pending(conn, "work_centers", "WC-child", "sites", "S-missing")
    finally:
        engine.dispose()
    first = stack.get("/failed-records", params={"entity": "work_centers", "limit": 3}).json()
    second = stack.get("/failed-records", params={"entity": "work_centers", "limit": 3, "offset": 3}).json()
    assert first["total"] == second["total"] == 7
    assert len(first["items"]) == len(second["items"]) == 3
    assert {i["bk"] for i in first["items"]}.isdisjoint({i["bk"] for i in second["items"]})
    only = stack.get("/failed-records", params={"entity": "work_centers", "reason": "invalid_record"}).json()
    assert only["total"] == 3
    assert "payload" not in only["items"][0]
    stats = stack.get("/stats").json()
    by_entity = {e["entity"]: e for e in stats["entities"]}
    assert by_entity["work_centers"]["open_failures"] == 7
    assert by_entity["work_centers"]["pending_children"] >= 1
    assert stats["overall"]["open_failures"] >= 7
    assert stack.get("/failed-records", params={"limit": 0}).status_code == 422


_schema = schemathesis.openapi.from_dict(
    create_app(
        ServiceSettings(
            database_url=SecretStr("postgresql://schema-only@127.0.0.1:1/none"), api_token=SecretStr("x")
        )
    ).openapi()
)


@_schema.parametrize()
@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
def test_openapi_fuzz_finds_no_server_error(case: schemathesis.Case, stack: Stack) -> None:
    launches = case.method == "POST" and (
        case.path in ("/sync", "/reconcile") or case.path.endswith("/retry")
    )
    if launches:
        # Launching runs is exercised above and in test_reconcile_dry_run_through_the_api. Fuzzed,
        # each example would start a real run (dozens of runs that keep the webserver busy for many
        # minutes): a date before the partitions' start, or an unknown entity, takes the route's
        # whole path up to the launch and is refused there.
        case.body = (
            {"entities": ["customers"], "date": "1999-01-01"}
            if case.path == "/sync"
            else {"entities": ["not_an_entity"]}
        )
    response = case.call(base_url=stack.url, headers=stack.auth, timeout=60)
    assert response.status_code < 500, f"{case.method} {case.formatted_path}: {response.text[:500]}"
    if launches:
        # Refused, never launched (202): the unknown entity, or what schemathesis changed in the
        # case itself (no body, other credentials, another method: 422, 401, 405).
        assert response.status_code != 202, response.text
    assert stack.token not in response.text


def test_a_dagster_transport_failure_is_unavailable_and_names_the_cause_type() -> None:
    from dagster_graphql import DagsterGraphQLClientError

    from syncflow_dagster.service.dagster_gateway import DagsterUnavailable, _translate

    try:
        try:
            raise TimeoutError("read timed out after 30 s on http://user:pw@127.0.0.1:3000")
        except TimeoutError as cause:
            raise DagsterGraphQLClientError(
                "Exception occured during execution of query \nmutation {...}\n with variables \n{}\n"
            ) from cause
    except DagsterGraphQLClientError as exc:
        translated = _translate(exc)
    assert isinstance(translated, DagsterUnavailable)
    assert str(translated).endswith("(TimeoutError)")
    assert "pw" not in str(translated)


def test_concurrent_launches_do_not_share_one_graphql_transport() -> None:
    """Two API requests launching runs at once must each reach Dagster (here: a slow, failing one).

    A gateway sharing one DagsterGraphQLClient answered the second caller
    TransportAlreadyConnected while the first request was still in flight.
    """
    import threading

    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    from syncflow_dagster.service.dagster_gateway import DagsterGateway, DagsterUnavailable
    from syncflow_dagster.simulators.serve import start_server as serve

    slow = FastAPI()
    arrived: list[int] = []

    @slow.post("/graphql")
    async def graphql() -> JSONResponse:
        # Answers once all three launches are in flight together (bounded), so they surely overlap.
        arrived.append(1)
        with contextlib.suppress(WaitTimeout):
            await wait_until_async(lambda: len(arrived) >= 3, "three launches in flight", timeout_s=30)
        return JSONResponse({"errors": [{"message": "webserver overloaded"}]}, status_code=502)

    causes: list[str] = []
    with serve(slow) as server:
        gateway = DagsterGateway(server.url, timeout_s=10)

        def launch() -> None:
            try:
                gateway.submit_retry("items")
            except DagsterUnavailable as exc:
                causes.append(str(exc))

        threads = [threading.Thread(target=launch) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    assert len(causes) == 3
    assert not [c for c in causes if "TransportAlreadyConnected" in c], causes
    assert len(arrived) >= 3  # each launch reached the webserver


def test_a_re_execution_reports_the_batches_of_its_lineage() -> None:
    # Batches are filed under the first run of a lineage (a re-execution continues
    # that run's batch), so /sync/{run_id} of a re-execution reads them there.
    from dagster._core.storage.tags import ROOT_RUN_ID_TAG as DAGSTERS_TAG

    from syncflow_dagster.service.dagster_gateway import ROOT_RUN_ID_TAG, RunInfo

    assert ROOT_RUN_ID_TAG == DAGSTERS_TAG  # the tag Dagster puts on re-executions

    def run(run_id: str, tags: dict[str, str]) -> RunInfo:
        return RunInfo(run_id, "SUCCESS", "sync", None, None, tags)

    assert run("first", {}).batch_run_id == "first"
    assert run("again", {ROOT_RUN_ID_TAG: "first", "dagster/parent_run_id": "first"}).batch_run_id == "first"
