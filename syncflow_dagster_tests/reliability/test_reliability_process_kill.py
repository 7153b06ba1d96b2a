"""A step's process killed with SIGKILL mid-stage, then rerun (issue 7).

The killed run runs as production runs it: the code location's `sync` job in
a run worker process of its own (run_worker.py), each step in its own OS
process under Dagster's multiprocess executor, against a Dagster instance
whose run, event-log and schedule storage is Postgres (dagster-postgres, a
scratch database), with both stand-ins over HTTP and a real Postgres for
SyncFlow's state. While a step is mid-stage the test finds that step's
process (the pid Dagster records in the step's STEP_WORKER_STARTED event,
checked to descend from this test process and to hold a connection to what
the stage is busy with) and sends it SIGKILL; nothing else is killed. Every
attempt the step's retry policy allows is killed, so the run fails; it is
then re-executed from failure (deliver case) or the partition runs afresh
(persist case), the retry job runs, and ScheduleHub's full contents are
compared with the source: 0 lost, 0 duplicated, 0 different, 0 extra,
nothing held that a retry could clear.

Every wait is bounded; a run still going at the end of the test is waited for
(bounded) before the stand-ins stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import dagster as dg
import psutil
import pytest
import sqlalchemy as sa

from syncflow_dagster.defs.runner import materialize_sync, report_of
from syncflow_dagster_tests.reliability_harness import (
    clear_faults,
    faults_served,
    put_faults,
    run_retry_job,
    wait_for,
)
from syncflow_dagster_tests.run_worker import MARKER_TAG
from syncflow_dagster_tests.sync_harness import Deployment, deployment
from syncflow_dagster_tests.verify import Verification, verify_deployment
from syncflow_dagster_tests.webserver import dagster_postgres_url, scratch_database

pytestmark = [pytest.mark.slow, pytest.mark.daemon, pytest.mark.timeout(420)]

PARENT, CHILD = "sites", "work_centers"
FAMILY = [PARENT, CHILD]
TODAY = dt.datetime.now(dt.UTC).date()
# 50 work centers in batches of 5: ten upsert calls, four at a time.
BATCH_ROWS = 5
# How long ScheduleHub sits on the delayed batch: far longer than the kill takes.
SLOW_DELAY_S = 8.0
RUN_TIMEOUT_S = 240.0
WAIT_TIMEOUT_S = 90.0
POLL_S = 0.1
# The retry policies of assets.py: NETWORK_RETRY on delivered, DATABASE_RETRY on committed.
DELIVERED_ATTEMPTS = 4
COMMITTED_ATTEMPTS = 3

INSTANCE_YAML = """\
# Written by test_reliability_process_kill: the repo's storage section, nothing else.
storage:
  postgres:
    postgres_url:
      env: DAGSTER_POSTGRES_URL
telemetry:
  enabled: false
"""


T = TypeVar("T")


def _wait_for(what: str, probe: Callable[[], T | None], timeout: float = WAIT_TIMEOUT_S) -> T:
    return wait_for(what, probe, timeout, POLL_S)


# --- the deployment: stand-ins, SyncFlow's database, a Postgres-backed Dagster instance ---------------


@dataclass
class Worker:
    """A run worker process (run_worker.py) this test started, with its log."""

    process: subprocess.Popen[bytes]
    log: Path
    marker: str

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class Rig:
    env: Deployment
    instance: dg.DagsterInstance
    logs: Path
    workers: list[Worker] = field(default_factory=list)

    def _start(self, *args: str, marker: str = "") -> Worker:
        log = self.logs / f"worker-{len(self.workers)}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "syncflow_dagster_tests.run_worker", *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                # Its own process group: the worker, its forkserver and the steps' processes.
                start_new_session=True,
            )
        worker = Worker(process, log, marker)
        self.workers.append(worker)
        return worker

    def start_sync(self, entity: str) -> Worker:
        """A run of the sync job for entity × today, in a run worker process of its own."""
        marker = uuid.uuid4().hex
        return self._start("sync", entity, TODAY.isoformat(), marker, str(BATCH_ROWS), marker=marker)

    def reexecute_from_failure(self, run_id: str) -> dg.DagsterRun:
        return self.finish(self._start("reexecute", run_id))

    def run_of(self, worker: Worker) -> dg.DagsterRun | None:
        if worker.process.poll() is not None:
            raise AssertionError(f"run worker exited with {worker.process.returncode}:\n{worker.tail()}")
        runs = self.instance.get_runs(filters=dg.RunsFilter(tags={MARKER_TAG: worker.marker}), limit=1)
        return runs[0] if runs else None

    def finish(self, worker: Worker) -> dg.DagsterRun:
        try:
            worker.process.wait(RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"run still going after {RUN_TIMEOUT_S:.0f}s:\n{worker.tail()}") from None
        assert worker.process.returncode == 0, worker.tail()
        outcome = json.loads(worker.log.read_text().strip().splitlines()[-1])
        run = self.instance.get_run_by_id(outcome["run_id"])
        assert run is not None
        return run

    def stop(self) -> None:
        """Wait (bounded) for the run workers this test started; end a stuck one's process group."""
        for worker in self.workers:
            try:
                worker.process.wait(RUN_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(worker.process.pid, signal.SIGKILL)
                worker.process.wait(30)


@pytest.fixture
def rig(fresh_database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Rig]:
    with (
        deployment(fresh_database_url, rows=100, seed=41) as env,
        scratch_database(fresh_database_url, "dagster_kill") as instance_url,
    ):
        dagster_home = tmp_path / "dagster_home"
        dagster_home.mkdir()
        (dagster_home / "dagster.yaml").write_text(INSTANCE_YAML)
        # What the instance and the code location's resources read (EnvVars, resolved in each step).
        for name, value in {
            "DAGSTER_HOME": str(dagster_home),
            "DAGSTER_POSTGRES_URL": dagster_postgres_url(instance_url),
            "SYNCFLOW_EXECUTOR": "multiprocess",
            **env.environment(),
            "SYNCFLOW_PARTITIONS_START": (TODAY - dt.timedelta(days=7)).isoformat(),
            "SYNCFLOW_AUTOMATION": "stopped",
            # Backoffs in milliseconds: the test checks outcomes, not waiting.
            "SYNCFLOW_STORE_RETRY_BASE_SECONDS": "0.01",
            "SYNCFLOW_STORE_RETRY_JITTER": "0",
            "SYNCFLOW_HTTP_BACKOFF_BASE_S": "0.01",
            "SYNCFLOW_HTTP_BACKOFF_MAX_S": "0.1",
            "SYNCFLOW_HTTP_MAX_RETRY_SECONDS": "20",
            "PYTHONUNBUFFERED": "1",
        }.items():
            monkeypatch.setenv(name, value)
        with dg.DagsterInstance.get() as instance:
            rig = Rig(env, instance, tmp_path)
            try:
                yield rig
            finally:
                # A run left going by a failed assertion ends before the stand-ins and databases go.
                clear_faults(env.apismith_url, env.schedulehub_url)
                rig.stop()


# --- finding and killing a step's process --------------------------------------------------------


def _worker_pids(instance: dg.DagsterInstance, run_id: str, step_key: str) -> list[int]:
    """The pid of each process the multiprocess executor started for `step_key`, in start order."""
    pids = []
    for record in instance.all_logs(run_id, of_type=dg.DagsterEventType.STEP_WORKER_STARTED):
        event = record.dagster_event
        if event is None or record.step_key != step_key:
            continue
        pid = event.engine_event_data.metadata.get("pid")
        if pid is not None:
            pids.append(int(str(pid.value)))
    return pids


def _worker_pid(instance: dg.DagsterInstance, run_id: str, step_key: str, attempt: int) -> int | None:
    """The pid of the process of `step_key`'s attempt number `attempt` (from 0), once it has started."""
    pids = _worker_pids(instance, run_id, step_key)
    return pids[attempt] if len(pids) > attempt else None


def _ours(pid: int) -> psutil.Process:
    """The process `pid`, which must be a descendant of this test process (never anything else)."""
    process = psutil.Process(pid)
    assert os.getpid() in {p.pid for p in process.parents()}, f"pid {pid} is not a child of this test"
    return process


def _ports_to(process: psutil.Process, port: int) -> set[int]:
    """Local ports of the process's TCP connections to 127.0.0.1:`port`."""
    try:
        return {
            conn.laddr.port
            for conn in process.net_connections(kind="tcp")
            if conn.raddr and conn.raddr.port == port and conn.status == psutil.CONN_ESTABLISHED
        }
    except psutil.NoSuchProcess:
        return set()


def _kill(process: psutil.Process) -> None:
    process.send_signal(signal.SIGKILL)
    gone, _ = psutil.wait_procs([process], timeout=30)
    assert gone, f"pid {process.pid} survived SIGKILL"


def _step_events(instance: dg.DagsterInstance, run_id: str, step_key: str) -> list[dg.DagsterEventType]:
    return [
        r.dagster_event_type
        for r in instance.all_logs(run_id)
        if r.step_key == step_key
        and r.dagster_event_type
        in {
            dg.DagsterEventType.STEP_START,
            dg.DagsterEventType.STEP_RESTARTED,
            dg.DagsterEventType.STEP_UP_FOR_RETRY,
            dg.DagsterEventType.STEP_FAILURE,
            dg.DagsterEventType.STEP_SUCCESS,
        }
    ]


def _stage_metadata(instance: dg.DagsterInstance, run_id: str, step_key: str, name: str) -> Any:
    """A metadata value of the stage's materialization in the run (None until it materialised)."""
    for record in instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION):
        materialization = record.asset_materialization
        if record.step_key == step_key and materialization is not None:
            return materialization.metadata[name].value
    return None


def _step_failures(instance: dg.DagsterInstance, run_id: str) -> list[str]:
    return [
        f"{r.step_key}: {r.dagster_event.step_failure_data.error.message.strip()[:800]}"
        for r in instance.all_logs(run_id, of_type=dg.DagsterEventType.STEP_FAILURE)
        if r.dagster_event is not None and r.dagster_event.step_failure_data.error is not None
    ]


def _crash_messages(instance: dg.DagsterInstance, run_id: str, step_key: str) -> list[str]:
    return [
        r.message
        for r in instance.all_logs(run_id, of_type=dg.DagsterEventType.ENGINE_EVENT)
        if r.step_key == step_key and "child process for step" in r.message
    ]


# --- what SyncFlow's database holds ---------------------------------------------------------------


def _state(env: Deployment, entity: str) -> dict[str, tuple[bytes, int]]:
    """entity_state of `entity`: bk_hash -> (data_hash, rowversion)."""
    with env.resources["database"].engine.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT bk_hash, data_hash, rowversion FROM syncflow.entity_state WHERE entity = :e"),
            {"e": entity},
        )
        return {str(k): (bytes(d), int(v)) for k, d, v in rows}


def _watermark(env: Deployment, entity: str) -> Any:
    with env.resources["database"].engine.connect() as conn:
        return conn.execute(
            sa.text("SELECT * FROM syncflow.watermarks WHERE entity = :e"), {"e": entity}
        ).first()


def _batches(env: Deployment, entity: str) -> list[tuple[str, str]]:
    """(run_id, status) of the entity's sync batches, oldest first."""
    with env.resources["database"].engine.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT run_id, status FROM syncflow.sync_batches WHERE entity = :e ORDER BY id"),
            {"e": entity},
        )
        return [(str(r), str(s)) for r, s in rows]


def _advisory_locks(env: Deployment) -> int:
    with env.resources["database"].engine.connect() as conn:
        return int(
            conn.execute(
                sa.text(
                    "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database"
                    " WHERE l.locktype = 'advisory' AND d.datname = current_database()"
                )
            ).scalar_one()
        )


def _hub_counts(env: Deployment) -> dict[str, int]:
    async def read() -> dict[str, int]:
        async with env.resources["schedulehub"].client() as client:
            counts: dict[str, int] = await client.counts()
            return counts

    return asyncio.run(read())


def _assert_equal(verification: Verification) -> None:
    assert verification.defects() == [], verification.describe()
    assert verification.unexplained_held() == [], verification.describe()
    for verdict in verification.verdicts.values():
        summary = verdict.summary()
        assert summary["lost"] == summary["duplicated"] == summary["different"] == summary["extra"] == 0
        assert summary["unexplained_held"] == 0
        assert verdict.matched == verdict.source_rows - len(verdict.held) > 0, verification.describe()


# --- the tests ------------------------------------------------------------------------------------


def _report(instance: dg.DagsterInstance, run_id: str) -> dict[str, Any]:
    """The sync_report materialization's metadata of a run (counts per action)."""
    for record in instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION):
        materialization = record.asset_materialization
        if record.step_key == "sync_report" and materialization is not None:
            return {k: v.value for k, v in materialization.metadata.items()}
    raise AssertionError(f"run {run_id} has no sync_report materialization")


def _assert_killed_every_attempt(
    instance: dg.DagsterInstance, run: dg.DagsterRun, step_key: str, attempts: int
) -> None:
    """The run failed because `step_key`'s process died on every attempt its retry policy allows."""
    assert run.status == dg.DagsterRunStatus.FAILURE
    assert _step_events(instance, run.run_id, step_key) == [
        dg.DagsterEventType.STEP_START,
        *[dg.DagsterEventType.STEP_UP_FOR_RETRY, dg.DagsterEventType.STEP_RESTARTED] * (attempts - 1),
        dg.DagsterEventType.STEP_FAILURE,
    ]
    crashes = _crash_messages(instance, run.run_id, step_key)
    assert len(crashes) == attempts
    assert all("terminated by signal 9 (SIGKILL)" in m for m in crashes), crashes


def test_deliver_step_killed_mid_delivery_then_reexecuted_from_failure(rig: Rig) -> None:
    env, instance = rig.env, rig.instance
    assert materialize_sync(PARENT, TODAY, resources=env.resources).success
    hub_port = int(env.schedulehub_url.rsplit(":", 1)[1])

    # Each attempt's first upsert call sits in ScheduleHub for SLOW_DELAY_S; the others go through.
    put_faults(env.schedulehub_url, slow_probability=1.0, slow_delay_s=SLOW_DELAY_S, max_faults=1)
    worker = rig.start_sync(CHILD)
    run = _wait_for("the run to be recorded", lambda: rig.run_of(worker))
    ready = _wait_for(
        "the parent-child stage",
        functools.partial(_stage_metadata, instance, run.run_id, "resolved", "rows_ready"),
    )
    held_at_kill = []
    for attempt in range(DELIVERED_ATTEMPTS):
        pid = _wait_for(
            f"delivered attempt {attempt + 1} to start",
            functools.partial(_worker_pid, instance, run.run_id, "delivered", attempt),
        )
        process = _ours(pid)
        # Mid-stage: the slow batch is being served, the step holds its connection to ScheduleHub,
        # and the batches after it have landed.
        _wait_for("the slow batch", lambda: faults_served(env.schedulehub_url).get("slow") == 1)
        _wait_for("the step's connection to ScheduleHub", functools.partial(_ports_to, process, hub_port))
        _wait_for(
            "the other batches to land",
            lambda: _hub_counts(env).get("work_centers", 0) >= ready - BATCH_ROWS,
        )
        held_at_kill.append(_hub_counts(env)["work_centers"])
        _kill(process)
        # The next attempt meets a slow batch again.
        put_faults(env.schedulehub_url, slow_probability=1.0, slow_delay_s=SLOW_DELAY_S, max_faults=1)

    failed = rig.finish(worker)
    clear_faults(env.schedulehub_url)
    _assert_killed_every_attempt(instance, failed, "delivered", DELIVERED_ATTEMPTS)
    assert _step_events(instance, failed.run_id, "committed") == []
    # ScheduleHub held rows SyncFlow never recorded: nothing is marked synced before delivery is confirmed.
    assert ready - BATCH_ROWS <= held_at_kill[0] < ready, (ready, held_at_kill)
    assert _state(env, CHILD) == {}
    assert _watermark(env, CHILD) is None
    assert _wait_for("advisory locks released", lambda: _advisory_locks(env) == 0)

    reexecuted = rig.reexecute_from_failure(failed.run_id)
    assert reexecuted.status == dg.DagsterRunStatus.SUCCESS, _step_failures(instance, reexecuted.run_id)
    started = {
        r.step_key for r in instance.all_logs(reexecuted.run_id, of_type=dg.DagsterEventType.STEP_START)
    }
    # The steps from the failed one on (the freshness check on sync_report included), nothing before.
    assert started == {"delivered", "committed", "sync_report", "sync_report_entity_synced_recently"}
    report = _report(instance, reexecuted.run_id)
    assert report["committed"] == report["delivered"] == ready == len(_state(env, CHILD))
    # The re-execution continues the failed run's sync batch and closes it with every stage's
    # counts, the fetch's included: no batch of the killed run is left running.
    assert _batches(env, CHILD) == [(failed.run_id, "succeeded")]
    assert report["fetched"] == _stage_metadata(instance, failed.run_id, "extracted", "rows_fetched") > 0
    assert _hub_counts(env)["work_centers"] == ready

    assert run_retry_job(env.resources).success
    again = report_of(materialize_sync(CHILD, TODAY, resources=env.resources))
    assert again["delivered"] == again["failed"] == 0
    _assert_equal(verify_deployment(env, FAMILY))


def _backends_of(env: Deployment, pids: set[int]) -> list[tuple[int, str | None, str | None, str]]:
    """Postgres backends among `pids` still in this test's database: (pid, wait_event_type, wait_event, query)."""
    if not pids:
        return []
    with env.resources["database"].engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT pid, wait_event_type, wait_event, query FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid = ANY(:pids)"
            ),
            {"pids": sorted(pids)},
        )
        return [(int(p), t, e, q) for p, t, e, q in rows]


def _new_lock_waits(env: Deployment, seen: set[int]) -> list[tuple[int, str | None, str | None, str]]:
    """Sessions of this test's database waiting on a lock, other than the ones already `seen`.

    The database is the test's own and only the killed run writes to it, so a new waiting
    session is the commit attempt's; sessions are told apart by backend pid, which also holds
    when the tests reach Postgres through a unix socket (no client port to match a process by).
    """
    with env.resources["database"].engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT pid, wait_event_type, wait_event, query FROM pg_stat_activity"
                " WHERE datname = current_database() AND wait_event_type = 'Lock'"
                " AND pid <> pg_backend_pid() AND NOT (pid = ANY(:seen))"
            ),
            {"seen": sorted(seen) or [0]},
        )
        return [(int(p), t, e, q) for p, t, e, q in rows]


def test_persist_step_killed_mid_commit_then_a_fresh_run(rig: Rig) -> None:
    env, instance = rig.env, rig.instance
    # The initial syncs run in process, recorded in the Postgres instance, so that the killed run
    # and the fresh one resume after the initial run's window mark (a failed run leaves none).
    for entity in FAMILY:
        assert materialize_sync(entity, TODAY, resources=env.resources, instance=instance).success
    env.apply_changes(updated_pct=40, inserted_pct=20, seed=42, entities=[CHILD])
    before, watermark_before = _state(env, CHILD), _watermark(env, CHILD)

    # The commit writes entity_state rows, then advances the watermark: with the watermarks
    # table locked, every attempt stops inside its transaction, after its state rows.
    blocker = env.resources["database"].engine.connect()
    blocker.execute(sa.text("LOCK TABLE syncflow.watermarks IN EXCLUSIVE MODE"))
    killed_backends: set[int] = set()
    waits = []
    try:
        worker = rig.start_sync(CHILD)
        run = _wait_for("the run to be recorded", lambda: rig.run_of(worker))
        for attempt in range(COMMITTED_ATTEMPTS):
            pid = _wait_for(
                f"committed attempt {attempt + 1} to start",
                functools.partial(_worker_pid, instance, run.run_id, "committed", attempt),
            )
            process = _ours(pid)
            waiting = _wait_for(
                "the commit to wait on a lock", functools.partial(_new_lock_waits, env, killed_backends)
            )
            killed_backends |= {w[0] for w in waiting}
            waits.append(waiting[0])
            _kill(process)
        failed = rig.finish(worker)
        # The killed processes' sessions that are blocked inside their transaction outlive them.
        assert _backends_of(env, killed_backends)
    finally:
        blocker.rollback()
        blocker.close()

    _assert_killed_every_attempt(instance, failed, "committed", COMMITTED_ATTEMPTS)
    # The first attempt stopped at the watermark, with its state rows written; the later ones
    # waited for the first one's commit lock, which its orphaned session held until now.
    assert waits[0][2] == "relation", waits
    assert "watermarks" in waits[0][3], waits
    assert all(w[2] == "advisory" for w in waits[1:]), waits
    _wait_for("the killed processes' sessions to end", lambda: not _backends_of(env, killed_backends))
    assert _wait_for("advisory locks released", lambda: _advisory_locks(env) == 0)
    # Nothing half written: state and watermark are exactly what they were before the run.
    assert _state(env, CHILD) == before
    assert _watermark(env, CHILD) == watermark_before
    delivered = _stage_metadata(instance, failed.run_id, "delivered", "rows_delivered")
    assert delivered > 0

    # A fresh run of the partition (in process, as the other fault tests run): it reads what the
    # killed run read, and as the state still says "before" it redelivers the same changes.
    fresh = report_of(materialize_sync(CHILD, TODAY, resources=env.resources, instance=instance))
    assert fresh["fetched"] == _stage_metadata(instance, failed.run_id, "extracted", "rows_fetched")
    assert fresh["delivered"] == fresh["committed"] == delivered
    assert fresh["failed"] == 0

    assert run_retry_job(env.resources).success
    _assert_equal(verify_deployment(env, FAMILY))
