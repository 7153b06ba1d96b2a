"""The one launcher (service/launch.py): plans, date validation, parent-first order, and both lists.

Launches go through the real `DagsterGateway` over HTTP to a small GraphQL
stand-in that answers `launchPipelineExecution` as Dagster's webserver does
(success, a refusal for chosen entities, or no answer at all), and records the
tags each run was submitted with. POST /sync is checked over real HTTP on the
app itself (its database is a real Postgres, unused by this route).
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import SecretStr

from syncflow_dagster.catalog import default_catalog
from syncflow_dagster.service import launch
from syncflow_dagster.service.app import create_app
from syncflow_dagster.service.dagster_gateway import DagsterGateway
from syncflow_dagster.service.settings import ServiceSettings
from syncflow_dagster.simulators.serve import RunningServer, start_server
from syncflow_dagster_tests import loopback_http

CATALOG = default_catalog()
ORDER = list(CATALOG.topological_order)
TODAY = dt.datetime.now(dt.UTC).date()
START = TODAY - dt.timedelta(days=10)


@pytest.fixture(autouse=True)
def partitions_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SYNCFLOW_PARTITIONS_START", START.isoformat())


@dataclass
class FakeDagster:
    """Dagster's launch mutation over HTTP: launches everything except `refuse`d entities."""

    refuse: set[str] = field(default_factory=set)
    # After this many launches the server stops answering (502), as a webserver going down.
    fail_after: int | None = None
    submitted: list[dict[str, str]] = field(default_factory=list)

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/graphql", response_model=None)
        async def graphql(request: Request) -> Any:
            body = await request.json()
            params = body["variables"]["executionParams"]
            tags = {t["key"]: t["value"] for t in params["executionMetadata"]["tags"]}
            assert params["selector"]["pipelineName"] == "sync"
            if self.fail_after is not None and len(self.submitted) >= self.fail_after:
                return JSONResponse({"errors": [{"message": "webserver down"}]}, status_code=502)
            self.submitted.append(tags)
            result: dict[str, Any]
            if tags["syncflow/entity"] in self.refuse:
                result = {"__typename": "PythonError", "message": "no code location named syncflow"}
            else:
                result = {"__typename": "LaunchRunSuccess", "run": {"runId": str(uuid.uuid4())}}
            return {"data": {"launchPipelineExecution": result}}

        return app


@pytest.fixture
def fake() -> Iterator[tuple[FakeDagster, RunningServer]]:
    dagster = FakeDagster()
    server = start_server(dagster.app())
    try:
        yield dagster, server
    finally:
        server.stop()


# --- plans ---------------------------------------------------------------------------------------


def test_one_date_is_one_single_partition_run_per_entity_parents_first() -> None:
    plan_id, runs = launch.plan_sync(
        CATALOG, launch.SyncRequest(entities=list(reversed(ORDER)), date=TODAY - dt.timedelta(days=1))
    )
    assert [r.entity for r in runs] == ORDER
    day = (TODAY - dt.timedelta(days=1)).isoformat()
    first = runs[0]
    assert first.tags == {
        "syncflow/entity": first.entity,
        "syncflow/trigger": "api",
        "syncflow/plan": plan_id,
        "dagster/partition": f"{day}|{first.entity}",
        "dagster/partition/entity": first.entity,
        "dagster/partition/date": day,
    }
    assert {r.tags["syncflow/plan"] for r in runs} == {plan_id}
    uuid.UUID(plan_id)


def test_no_date_means_today() -> None:
    _, runs = launch.plan_sync(CATALOG, launch.SyncRequest(entities=["items"]))
    assert [(r.entity, r.span.first, r.span.last) for r in runs] == [("items", TODAY, TODAY)]


def test_a_date_range_is_one_range_run_per_entity() -> None:
    first, last = TODAY - dt.timedelta(days=3), TODAY - dt.timedelta(days=1)
    _, runs = launch.plan_sync(
        CATALOG,
        launch.SyncRequest(
            entities=["work_orders", "sites"], dates=(first, last), full_window=True, trigger="cli"
        ),
    )
    assert [r.entity for r in runs] == [n for n in ORDER if n in {"work_orders", "sites"}]
    tags = runs[-1].tags
    assert tags["dagster/asset_partition_range_start"] == f"{first.isoformat()}|work_orders"
    assert tags["dagster/asset_partition_range_end"] == f"{last.isoformat()}|work_orders"
    assert "dagster/partition" not in tags
    assert tags["syncflow/full_window"] == "true"
    assert tags["syncflow/trigger"] == "cli"
    assert runs[-1].span.days == 3


def test_history_is_the_partitions_start_to_today() -> None:
    _, runs = launch.plan_sync(CATALOG, launch.SyncRequest(history=True))
    assert [r.entity for r in runs] == ORDER
    assert {(r.span.first, r.span.last) for r in runs} == {(START, TODAY)}
    assert runs[0].tags["dagster/asset_partition_range_start"] == f"{START.isoformat()}|{ORDER[0]}"


def test_a_one_day_range_is_a_single_partition_run() -> None:
    _, runs = launch.plan_sync(CATALOG, launch.SyncRequest(entities=["items"], dates=(TODAY, TODAY)))
    assert runs[0].tags["dagster/partition"] == f"{TODAY.isoformat()}|items"


# --- refusals ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_", "bad"),
    [
        (launch.SyncRequest(date=START - dt.timedelta(days=1)), START - dt.timedelta(days=1)),
        (launch.SyncRequest(date=TODAY + dt.timedelta(days=1)), TODAY + dt.timedelta(days=1)),
        (launch.SyncRequest(dates=(START - dt.timedelta(days=5), TODAY)), START - dt.timedelta(days=5)),
        (launch.SyncRequest(dates=(START, TODAY + dt.timedelta(days=2))), TODAY + dt.timedelta(days=2)),
    ],
)
def test_dates_outside_the_partitions_are_refused_naming_the_valid_range(
    request_: launch.SyncRequest, bad: dt.date
) -> None:
    with pytest.raises(launch.SyncRefused) as refused:
        launch.plan_sync(CATALOG, request_)
    assert str(refused.value) == (
        f"date {bad.isoformat()} is outside the partitions: valid dates are {START.isoformat()} "
        f"(SYNCFLOW_PARTITIONS_START) to {TODAY.isoformat()} (today, UTC)"
    )


def test_other_mistakes_are_refused_by_name() -> None:
    with pytest.raises(
        launch.SyncRefused, match="unknown entity 'widgets'; the catalog has customers, items"
    ):
        launch.plan_sync(CATALOG, launch.SyncRequest(entities=["items", "widgets"]))
    with pytest.raises(launch.SyncRefused, match="ends before it starts"):
        launch.plan_sync(CATALOG, launch.SyncRequest(dates=(TODAY, START)))
    with pytest.raises(launch.SyncRefused, match="one of date, dates or history"):
        launch.plan_sync(CATALOG, launch.SyncRequest(date=TODAY, history=True))


# --- launching -----------------------------------------------------------------------------------


def test_a_refused_launch_keeps_the_others_and_says_why(fake: tuple[FakeDagster, RunningServer]) -> None:
    dagster, server = fake
    dagster.refuse = {"items"}
    outcome = launch.plan_and_launch(DagsterGateway(server.url), CATALOG, launch.SyncRequest())
    assert [t["syncflow/entity"] for t in dagster.submitted] == ORDER
    assert [r.entity for r in outcome.launched] == [n for n in ORDER if n != "items"]
    assert all(uuid.UUID(r.run_id) for r in outcome.launched)
    assert [(n.entity, n.unavailable) for n in outcome.not_launched] == [("items", False)]
    assert "PythonError" in outcome.not_launched[0].reason
    assert "no code location named syncflow" in outcome.not_launched[0].reason


def test_dagster_going_away_mid_request_keeps_the_ids_already_launched(
    fake: tuple[FakeDagster, RunningServer],
) -> None:
    dagster, server = fake
    dagster.fail_after = 3
    outcome = launch.plan_and_launch(DagsterGateway(server.url), CATALOG, launch.SyncRequest())
    assert [r.entity for r in outcome.launched] == ORDER[:3]
    assert [n.entity for n in outcome.not_launched] == ORDER[3:]
    assert all(n.unavailable for n in outcome.not_launched)
    # One attempt at the unreachable webserver, then the rest are reported, not each tried again.
    assert outcome.not_launched[0].reason.startswith("Dagster unavailable")
    assert all(n.reason.startswith("not submitted: Dagster unavailable") for n in outcome.not_launched[1:])


# --- POST /sync ----------------------------------------------------------------------------------


@pytest.fixture
def api(fake: tuple[FakeDagster, RunningServer], database_url: str) -> Iterator[tuple[FakeDagster, str]]:
    dagster, server = fake
    settings = ServiceSettings(
        database_url=SecretStr(database_url), api_token=SecretStr("t0ken"), dagster_graphql_url=server.url
    )
    service = start_server(create_app(settings))
    try:
        yield dagster, service.url
    finally:
        service.stop()


def _post(url: str, body: dict[str, Any]) -> httpx.Response:
    return loopback_http.post(f"{url}/sync", json=body, headers={"Authorization": "Bearer t0ken"}, timeout=60)


def test_post_sync_answers_both_lists(api: tuple[FakeDagster, str]) -> None:
    dagster, url = api
    dagster.refuse = {"customers"}
    first = (TODAY - dt.timedelta(days=2)).isoformat()
    response = _post(
        url, {"entities": ["customers", "sites"], "dates": {"start": first, "end": TODAY.isoformat()}}
    )
    assert response.status_code == 202, response.text
    body = response.json()
    assert [r["entity"] for r in body["launched"]] == ["sites"]
    assert body["launched"][0]["dates"] == {"start": first, "end": TODAY.isoformat()}
    assert [(n["entity"], n["dates"]["start"]) for n in body["not_launched"]] == [("customers", first)]
    assert {t["syncflow/plan"] for t in dagster.submitted} == {body["plan"]}
    assert {t["syncflow/trigger"] for t in dagster.submitted} == {"api"}


def test_post_sync_full_window_and_history(api: tuple[FakeDagster, str]) -> None:
    dagster, url = api
    response = _post(url, {"entities": ["sites"], "history": True, "full_window": True})
    assert response.status_code == 202, response.text
    assert dagster.submitted[-1]["syncflow/full_window"] == "true"
    assert dagster.submitted[-1]["dagster/asset_partition_range_start"] == f"{START.isoformat()}|sites"
    assert response.json()["launched"][0]["dates"] == {"start": START.isoformat(), "end": TODAY.isoformat()}


def test_post_sync_refuses_dates_outside_the_partitions_with_422(api: tuple[FakeDagster, str]) -> None:
    dagster, url = api
    for body in (
        {"date": (START - dt.timedelta(days=1)).isoformat()},
        {"date": (TODAY + dt.timedelta(days=1)).isoformat()},
        {"dates": {"start": "1999-01-01", "end": TODAY.isoformat()}},
    ):
        response = _post(url, {"entities": ["sites"], **body})
        assert response.status_code == 422, response.text
        assert f"valid dates are {START.isoformat()}" in response.json()["detail"]
    assert dagster.submitted == []


def test_post_sync_when_nothing_launched_is_an_error_not_an_empty_202(api: tuple[FakeDagster, str]) -> None:
    dagster, url = api
    dagster.refuse = {"sites"}
    refused = _post(url, {"entities": ["sites"]})
    assert refused.status_code == 409
    assert "sites: Dagster refused" in refused.json()["detail"]
    dagster.fail_after = 0
    unavailable = _post(url, {"entities": ["sites"]})
    assert unavailable.status_code == 503


def test_post_sync_resync_tags_every_run(api: tuple[FakeDagster, str]) -> None:
    dagster, url = api
    response = _post(url, {"entities": ["work_centers", "sites"], "history": True, "resync": True})
    assert response.status_code == 202, response.text
    assert [t["syncflow/entity"] for t in dagster.submitted] == ["sites", "work_centers"]
    assert all(t["syncflow/resync"] == "true" for t in dagster.submitted)
    plain = _post(url, {"entities": ["sites"]})
    assert plain.status_code == 202, plain.text
    assert "syncflow/resync" not in dagster.submitted[-1]
