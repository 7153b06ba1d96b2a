"""The API against a Dagster deployment with its daemon (run queue, sensors), as operators run it.

`dagster-webserver` and `dagster-daemon` run as subprocesses with the
repository's dagster.yaml (queued runs, one run per entity, run retries),
both stand-ins serve over HTTP and the monitoring API over HTTP on loopback.

* Cancel mid-delivery through the API: the batch becomes `cancelled` with the
  counts of the stages that finished (batch_cancel_sensor, in the daemon); a
  re-execution from failure continues it; ScheduleHub then equals the source,
  and no record was delivered twice.
* A sync, a retry and a reconcile of one entity launched together never run
  at the same time: all three carry `syncflow/entity`, which the queue limits.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pyarrow as pa
import pytest
import sqlalchemy as sa
from pydantic import SecretStr

from syncflow_dagster.defs import bookkeeping
from syncflow_dagster.defs.assets import CATALOG
from syncflow_dagster.defs.resources import ScheduleHubResource, SyncDatabase
from syncflow_dagster.engine import columns as c
from syncflow_dagster.engine.identity import add_identity
from syncflow_dagster.engine.normalize import normalize
from syncflow_dagster.service.app import create_app
from syncflow_dagster.service.settings import ServiceSettings
from syncflow_dagster.simulators import apismith, schedulehub
from syncflow_dagster.simulators.serve import RunningServer, start_server
from syncflow_dagster.store.database import make_engine
from syncflow_dagster.store.migrate import upgrade
from syncflow_dagster.store.schema import delivery_log
from syncflow_dagster_tests import loopback_http
from syncflow_dagster_tests.verify import verify_sync
from syncflow_dagster_tests.waiting import wait_until
from syncflow_dagster_tests.webserver import DagsterDeployment, dagster_deployment, scratch_database

TERMINAL = {"SUCCESS", "FAILURE", "CANCELED"}
RUN_TIMEOUT_S = 300.0
SENSOR_TIMEOUT_S = 180.0  # the batch sensors tick every 30 s; the daemon is busy on a shared box

REEXECUTE = """
mutation Reexecute($params: ReexecutionParams!) {
  launchRunReexecution(reexecutionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on PythonError { message }
  }
}
"""
RUNS_BY_TAG = """
query RunsByTag($key: String!, $value: String!) {
  runsOrError(filter: {tags: [{key: $key, value: $value}]}) {
    __typename
    ... on Runs { results { runId jobName status startTime endTime tags { key value } } }
  }
}
"""


@dataclass
class Stack:
    api: str
    token: str
    dagster: DagsterDeployment
    apismith: RunningServer
    schedulehub: RunningServer
    secret: str
    state_url: str

    def get(self, path: str, **params: Any) -> httpx.Response:
        return loopback_http.get(f"{self.api}{path}", params=params, headers=self._auth, timeout=120)

    def post(self, path: str, body: Any = None) -> httpx.Response:
        return loopback_http.post(f"{self.api}{path}", json=body, headers=self._auth, timeout=300)

    @property
    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def hub(self) -> ScheduleHubResource:
        return ScheduleHubResource(
            base_url=self.schedulehub.url, client_id="syncflow", client_secret=self.secret
        )

    def run_status(self, run_id: str) -> dict[str, Any]:
        response = self.get(f"/sync/{run_id}")
        assert response.status_code == 200, response.text
        return dict(response.json())

    def wait(self, run_id: str, until: set[str] = TERMINAL) -> dict[str, Any]:
        seen: dict[str, Any] = {}

        def ended() -> dict[str, Any] | None:
            seen.update(self.run_status(run_id))
            return dict(seen) if seen["status"] in until else None

        return wait_until(
            ended,
            f"run {run_id} to reach {sorted(until)}",
            timeout_s=RUN_TIMEOUT_S,
            interval_s=1.0,
            describe=lambda: f"last answer: {seen}",
        )


@pytest.fixture(scope="module")
def stack(pg_server_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    secret, token = secrets.token_urlsafe(16), secrets.token_urlsafe(16)
    clients = {"syncflow": secret}
    source = start_server(apismith.create_app(rows=400, seed=19, clients=clients))
    target = start_server(schedulehub.create_app(clients=clients))
    try:
        with scratch_database(pg_server_url, "syncflow_state") as state_url:
            upgrade(state_url)  # `syncflow db upgrade`, as a deployment does once per release
            env = {
                "SYNCFLOW_DATABASE_URL": state_url,
                "SYNCFLOW_PARTITIONS_START": (
                    dt.datetime.now(dt.UTC).date() - dt.timedelta(days=7)
                ).isoformat(),
                "APISMITH_BASE_URL": source.url,
                "APISMITH_CLIENT_ID": "syncflow",
                "APISMITH_CLIENT_SECRET": secret,
                "SCHEDULEHUB_BASE_URL": target.url,
                "SCHEDULEHUB_CLIENT_ID": "syncflow",
                "SCHEDULEHUB_CLIENT_SECRET": secret,
                # One process per run (the steps in it) keeps a shared 2-core box within the bounds.
                "SYNCFLOW_EXECUTOR": "in_process",
                # Small delivery calls, one at a time: a delivery spans many calls, so a cancel lands mid-way.
                "SYNCFLOW_DELIVERY_BATCH_SIZE": "2",
                "SYNCFLOW_HTTP_MAX_CONCURRENCY": "1",
            }
            with dagster_deployment(
                server_database_url=pg_server_url,
                dagster_home=tmp_path_factory.mktemp("dagster_home_ops"),
                code_location_env=env,
                with_daemon=True,
                pool_limits={"apismith": 2, "schedulehub": 2},
            ) as dagster:
                settings = ServiceSettings(
                    database_url=SecretStr(state_url),
                    api_token=SecretStr(token),
                    dagster_graphql_url=dagster.url,
                    dagster_timeout_s=180.0,
                )
                with start_server(create_app(settings)) as service:
                    try:
                        yield Stack(service.url, token, dagster, source, target, secret, state_url)
                    finally:
                        _keep_logs(dagster)
    finally:
        source.stop()
        target.stop()


def _keep_logs(dagster: DagsterDeployment) -> None:
    out = Path(__file__).resolve().parents[2] / "test-artifacts"
    out.mkdir(exist_ok=True)
    for name, path in dagster.logs.items():
        if path.exists():
            (out / f"ops-daemon-{name}.log").write_bytes(path.read_bytes())


def _hub_keys(stack: Stack, resource: str) -> list[str]:
    async def read() -> pa.Table:
        async with stack.hub().client() as client:
            table: pa.Table = await client.read_all(resource)
            return table

    return list(asyncio.run(read()).column("external_key").to_pylist())


RUN_LOGS = """
query Logs($runId: ID!) {
  logsForRun(runId: $runId) {
    __typename
    ... on EventConnection {
      events {
        __typename
        ... on MessageEvent { message timestamp }
        ... on ExecutionStepUpForRetryEvent { error { className message stack causes { className message } } }
      }
    }
  }
}
"""


def _run_messages(stack: Stack, run_id: str) -> str:
    """The run's event messages, for an assertion a reader can act on."""
    logs = stack.dagster.graphql(RUN_LOGS, {"runId": run_id})["logsForRun"]
    return "\n".join(
        f"{e.get('timestamp')} {e['__typename']}: {e.get('message', '')[:200]}"
        for e in logs.get("events", [])
    )


def _put_faults(url: str, **faults: Any) -> None:
    assert loopback_http.put(f"{url}/admin/faults", json=faults, timeout=30).status_code == 200


@pytest.mark.slow
def test_cancel_mid_delivery_then_resume_delivers_everything_once(stack: Stack) -> None:
    # Every ScheduleHub answer takes two seconds: 2 rows per call, one call at a time, so the
    # delivery lasts long enough for the cancel to travel (API, webserver, code server, run).
    _put_faults(stack.schedulehub.url, slow_probability=1.0, slow_delay_s=2.0)
    try:
        started = stack.post("/sync", {"entities": ["customers"]})
        assert started.status_code == 202, started.text
        run_id = started.json()["launched"][0]["run_id"]

        def delivering() -> bool:
            # A run that ended before delivering anything can never be canceled mid-delivery.
            assert stack.run_status(run_id)["status"] not in TERMINAL
            return bool(_hub_keys(stack, "customers"))

        wait_until(delivering, "a first customer in ScheduleHub", timeout_s=RUN_TIMEOUT_S, interval_s=0.5)
        cancelled = stack.post(f"/sync/{run_id}/cancel")
        assert cancelled.status_code == 202, cancelled.text
        ended = stack.wait(run_id)["status"]
        assert ended == "CANCELED", _run_messages(stack, run_id)
    finally:
        loopback_http.delete(f"{stack.schedulehub.url}/admin/faults", timeout=30)
    sent_before = len(_hub_keys(stack, "customers"))

    # The daemon's batch_cancel_sensor closes the batch with what the finished stages counted.
    def closed_batch() -> dict[str, Any] | None:
        (batch,) = stack.run_status(run_id)["batches"]
        return dict(batch) if batch["status"] != "running" else None

    batch = wait_until(
        closed_batch, f"the batch of run {run_id} to close", timeout_s=SENSOR_TIMEOUT_S, interval_s=2.0
    )
    assert batch["status"] == "cancelled", batch
    finished = [s["stage"] for s in batch["stages"]]
    assert finished[: finished.index("parent_child") + 1] == [
        "fetch",
        "normalize",
        "identity",
        "rowversion",
        "delta",
        "parent_child",
    ]
    assert "deliver" not in finished
    assert batch["fetched"] > 0
    assert batch["delivered"] == 0
    listed = stack.get("/sync", entity="customers", status="cancelled").json()
    assert [i["batch_id"] for i in listed["items"]] == [batch["batch_id"]]

    # Resume: re-execute from failure. The same batch goes on and closes with every stage.
    answer = stack.dagster.graphql(
        REEXECUTE, {"params": {"parentRunId": run_id, "strategy": "FROM_FAILURE"}}
    )["launchRunReexecution"]
    assert answer["__typename"] == "LaunchRunSuccess", answer
    again = answer["run"]["runId"]
    resumed = stack.wait(again)
    assert resumed["status"] == "SUCCESS", resumed
    (done,) = resumed["batches"]
    assert done["batch_id"] == batch["batch_id"]
    assert done["status"] == "succeeded"
    assert done["fetched"] == batch["fetched"]  # the fetch was not run again
    assert done["delivered"] == done["insert"] > sent_before > 0

    engine = make_engine(stack.state_url)
    try:
        verification = verify_sync(stack.apismith.url, stack.hub(), engine, ["customers"])
        assert verification.defects() == [], verification.describe()
        # No record delivered twice: one accepted delivery per key in the log, none created twice
        # in ScheduleHub (its ids are sequence numbers: as many as records).
        with engine.connect() as conn:
            per_key = conn.execute(
                sa.select(delivery_log.c.bk_hash, sa.func.count())
                .where(delivery_log.c.entity == "customers", delivery_log.c.status == "accepted")
                .group_by(delivery_log.c.bk_hash)
            ).all()
    finally:
        engine.dispose()
    keys = _hub_keys(stack, "customers")
    assert len(keys) == len(set(keys)) == done["delivered"]
    assert {n for _, n in per_key} == {1}
    assert len(per_key) == len(keys)


def _runs_of(stack: Stack, entity: str) -> list[dict[str, Any]]:
    data = stack.dagster.graphql(RUNS_BY_TAG, {"key": "syncflow/entity", "value": entity})["runsOrError"]
    assert data["__typename"] == "Runs", data
    return list(data["results"])


@pytest.mark.slow
def test_one_run_per_entity_holds_across_sync_retry_and_reconcile(stack: Stack) -> None:
    entity = "items"
    # Something for the retry to do: a failed record of items that is due, with a payload
    # built as the deliver stage builds it.
    spec = CATALOG.entity(entity)
    raw = pa.table(
        {
            "ItemNo": ["IT-RETRIED"],
            "Description": ["held back by a 503"],
            "ItemType": ["MAKE"],
            "UoM": ["pc"],
            "StdCost": ["1.5"],
            "LeadTimeDays": ["3"],
            "Blocked": ["false"],
            "RowVersion": [1],
            "ModifiedAt": ["2026-01-01T00:00:00Z"],
        }
    )
    row = add_identity(spec, normalize(spec, raw).rows)
    row = row.append_column(c.ACTION, pa.array([c.INSERT]))
    database = SyncDatabase(url=stack.state_url)
    database.failures().record_failures(
        entity,
        None,
        pa.table(
            {
                c.BK_HASH: row[c.BK_HASH],
                c.BK: row[c.BK],
                "reason_code": ["transient_failure"],
                "reason_class": ["retryable"],
                "detail": ["503"],
                "payload": bookkeeping.row_payloads(spec, row),
            }
        ),
        now=dt.datetime.now(dt.UTC) - dt.timedelta(days=1),
    )
    # APISmith answers slowly, so each run lasts long enough for an overlap to show.
    _put_faults(stack.apismith.url, slow_probability=1.0, slow_delay_s=1.0)
    try:
        sync = stack.post("/sync", {"entities": [entity]})
        retry = stack.post("/failed-records/retry", {"entities": [entity]})
        reconcile = stack.post("/reconcile", {"entities": [entity], "dry_run": True})
        for answer in (sync, retry, reconcile):
            assert answer.status_code == 202, answer.text
        assert retry.json()["not_launched"] == []
        assert reconcile.json()["not_launched"] == []
        run_ids = [
            sync.json()["launched"][0]["run_id"],
            retry.json()["launched"][0]["run_id"],
            reconcile.json()["launched"][0]["run_id"],
        ]
        statuses = [stack.wait(run_id)["status"] for run_id in run_ids]
    finally:
        loopback_http.delete(f"{stack.apismith.url}/admin/faults", timeout=30)
    assert statuses == ["SUCCESS", "SUCCESS", "SUCCESS"]
    runs = {r["runId"]: r for r in _runs_of(stack, entity)}
    assert set(run_ids) <= set(runs)
    assert {runs[r]["jobName"] for r in run_ids} == {"sync", "retry", "reconcile"}
    spans = sorted((runs[r]["startTime"], runs[r]["endTime"]) for r in run_ids)
    for (_, earlier_end), (later_start, _) in itertools.pairwise(spans):
        assert later_start >= earlier_end, f"two runs of {entity} overlapped: {spans}"
    # The retry's own batch is filed under its run, with its kind.
    (retry_batch,) = stack.get(f"/sync/{run_ids[1]}").json()["batches"]
    assert retry_batch["kind"] == "retry"
    assert retry_batch["counts"]["retried"] == 1
    assert os.environ.get("SYNCFLOW_AUTOMATION") != "running"  # only the runs launched here ran
