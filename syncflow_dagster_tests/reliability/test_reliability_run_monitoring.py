"""The run worker of a daemon-launched run killed with SIGKILL mid-delivery; the next run of its entity heals it.

With the in_process executor (the default) the run worker is the process that
executes every stage, so it is the process to kill. The deployment is the one
operators run: dagster-webserver and dagster-daemon subprocesses, the
repository's dagster.yaml (queued coordinator with one run per entity, run
monitoring, SyncflowRunLauncher, run retries), a Postgres instance, both
stand-ins over HTTP and SyncFlow's state in Postgres.

The test launches one `sites` run through the launcher (as POST /sync does),
holds its first ScheduleHub batch so the run is surely mid-delivery, finds the
run worker's pid in the run's "Started process for run" event (checked to
descend from this test's processes), and sends it SIGKILL. Then: the run is
marked FAILURE within the monitoring bound, not left STARTED; the daemon's run
retry (from the failed stage) is the entity's next run, is not blocked by the
per-entity limit, succeeds, and ScheduleHub equals the source with nothing
duplicated.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import psutil
import pytest

from syncflow_dagster.catalog import default_catalog
from syncflow_dagster.service import launch
from syncflow_dagster.service.dagster_gateway import DagsterGateway
from syncflow_dagster_tests.reliability_harness import clear_faults, faults_served, put_faults, wait_for
from syncflow_dagster_tests.sync_harness import Deployment, deployment
from syncflow_dagster_tests.verify import verify_deployment
from syncflow_dagster_tests.webserver import STAGE_POOL_LIMITS, DagsterDeployment, dagster_deployment

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

ENTITY = "sites"
TODAY = dt.datetime.now(dt.UTC).date()
# ScheduleHub sits on the run's first batch far longer than finding and killing the worker takes.
SLOW_DELAY_S = 60.0
# dagster.yaml's run_monitoring.poll_interval_seconds is 15; the code server that launched the
# worker notices its death sooner. Either way the run must be FAILURE well within this.
FAILED_WITHIN_S = 90.0
WAIT_S = 300.0
POLL_S = 0.5

RUN_EVENTS = """
query RunEvents($runId: ID!) {
  runOrError(runId: $runId) { ... on Run { status tags { key value } } }
  logsForRun(runId: $runId, limit: 5000) {
    ... on EventConnection { events { __typename ... on MessageEvent { message } } }
  }
}
"""
_PID = re.compile(r"Started process for run \(pid: (\d+)\)")

T = TypeVar("T")


def _wait_for(what: str, probe: Callable[[], T | None], timeout: float = WAIT_S) -> T:
    return wait_for(what, probe, timeout, POLL_S)


@dataclass
class Stack:
    env: Deployment
    dagster: DagsterDeployment

    def run(self, run_id: str) -> tuple[str, dict[str, str], list[str]]:
        """The run's status, tags and event messages."""
        data = self.dagster.graphql(RUN_EVENTS, {"runId": run_id})
        run = data["runOrError"]
        messages = [e.get("message") or "" for e in data["logsForRun"].get("events", [])]
        return run["status"], {t["key"]: t["value"] for t in run["tags"]}, messages


@pytest.fixture
def stack(
    fresh_database_url: str, pg_server_url: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Stack]:
    start = TODAY - dt.timedelta(days=3)
    monkeypatch.setenv("SYNCFLOW_PARTITIONS_START", start.isoformat())
    with deployment(fresh_database_url, rows=200, seed=29) as env:
        code_location_env = {
            **env.environment(),
            "SYNCFLOW_PARTITIONS_START": start.isoformat(),
            "SYNCFLOW_HTTP_BACKOFF_BASE_S": "0.01",
            "SYNCFLOW_HTTP_BACKOFF_MAX_S": "0.1",
        }
        with dagster_deployment(
            server_database_url=pg_server_url,
            dagster_home=tmp_path / "dagster_home",
            code_location_env=code_location_env,
            with_daemon=True,
            pool_limits=STAGE_POOL_LIMITS,
        ) as dagster:
            try:
                yield Stack(env, dagster)
            finally:
                clear_faults(env.apismith_url, env.schedulehub_url)


def _ours(pid: int) -> psutil.Process:
    """Process `pid`, which must descend from this test (its daemon's code server started it)."""
    process = psutil.Process(pid)
    assert os.getpid() in {p.pid for p in process.parents()}, f"pid {pid} is not a descendant of this test"
    return process


def test_killed_run_worker_fails_the_run_and_the_next_run_heals_it(stack: Stack) -> None:
    env = stack.env
    put_faults(env.schedulehub_url, slow_probability=1.0, slow_delay_s=SLOW_DELAY_S, max_faults=1)
    gateway = DagsterGateway(stack.dagster.url, timeout_s=180)
    outcome = launch.plan_and_launch(
        gateway, default_catalog(), launch.SyncRequest(entities=[ENTITY], trigger="test")
    )
    assert outcome.not_launched == []
    (run_id,) = [r.run_id for r in outcome.launched]

    def worker_pid() -> int | None:
        status, _, messages = stack.run(run_id)
        assert status not in {"FAILURE", "CANCELED", "SUCCESS"}, f"run ended {status} before the kill"
        found = [int(m.group(1)) for m in map(_PID.search, messages) if m]
        return found[-1] if found else None

    pid = _wait_for("the run worker to start", worker_pid)
    worker = _ours(pid)
    _wait_for("the held ScheduleHub batch", lambda: faults_served(env.schedulehub_url).get("slow") == 1)
    assert stack.run(run_id)[0] == "STARTED"
    worker.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    clear_faults(env.schedulehub_url)

    status = _wait_for(
        "the killed run to be marked failed",
        lambda: (s := stack.run(run_id)[0]) in {"FAILURE", "CANCELED", "SUCCESS"} and s,
        timeout=FAILED_WITHIN_S,
    )
    assert status == "FAILURE"
    assert time.monotonic() - killed_at < FAILED_WITHIN_S
    _, tags, messages = stack.run(run_id)
    # Whoever noticed (the code server that started the worker, or run monitoring) says why.
    assert any("SIGKILL" in m or "run worker pid" in m for m in messages), messages[-10:]

    # The daemon's run retry is the entity's next run: the per-entity limit no longer blocks it.
    retry_id = _wait_for("the run retry", lambda: stack.run(run_id)[1].get("dagster/auto_retry_run_id"))
    retry_status = _wait_for(
        "the retry to end",
        lambda: (s := stack.run(retry_id)[0]) in {"FAILURE", "CANCELED", "SUCCESS"} and s,
        timeout=WAIT_S,
    )
    assert retry_status == "SUCCESS", stack.run(retry_id)[2][-20:]
    _, retry_tags, _ = stack.run(retry_id)
    assert retry_tags["syncflow/entity"] == ENTITY
    assert retry_tags["dagster/parent_run_id"] == run_id
    assert tags["syncflow/entity"] == ENTITY

    verification = verify_deployment(env, [ENTITY])
    assert verification.equal, verification.describe()
    verdict = verification.verdicts[ENTITY]
    assert verdict.matched == verdict.source_rows > 0
    assert not verdict.duplicated
