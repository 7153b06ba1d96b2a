"""A run launched from the UI's asset graph runs Dagster's `__ASSET_JOB`; SyncFlow shows it as `sync`."""

from __future__ import annotations

from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from syncflow_dagster.defs.jobs import sync_job
from syncflow_dagster.service.dagster_gateway import SYNC_JOB, DagsterGateway
from syncflow_dagster.simulators.serve import start_server


def _graphql_answering(job_name: str) -> Starlette:
    """A loopback GraphQL endpoint that answers the run query as Dagster's webserver does."""

    async def graphql(request: Request) -> JSONResponse:
        body: dict[str, Any] = await request.json()
        run_id = body["variables"]["runId"]
        run = {
            "__typename": "Run",
            "runId": run_id,
            "status": "SUCCESS",
            "jobName": job_name,
            "startTime": 1.0,
            "endTime": 2.0,
            "tags": [],
        }
        return JSONResponse({"data": {"runOrError": run}})

    return Starlette(routes=[Route("/graphql", graphql, methods=["POST"])])


def test_the_sync_job_name_is_the_one_the_gateway_shows() -> None:
    assert sync_job.name == SYNC_JOB


def test_a_run_of_the_implicit_asset_job_is_shown_as_sync_and_others_as_they_are() -> None:
    run_id = "0b2d3c1e-0000-4000-8000-000000000001"
    for dagster_name, shown in (("__ASSET_JOB", "sync"), ("retry", "retry"), ("sync", "sync")):
        with start_server(_graphql_answering(dagster_name)) as server:
            assert DagsterGateway(server.url).run(run_id).job_name == shown
