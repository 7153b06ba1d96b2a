"""SyncflowRunLauncher's run-worker health check, against a Postgres-backed Dagster instance and real processes.

Run monitoring fails a STARTED run when this check says its worker is not
running; the check must therefore say FAILED only for a worker it can see is
gone, and RUNNING whenever it cannot tell.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import psutil
import pytest
from dagster._core.events import EngineEventData
from dagster._core.launcher import WorkerStatus
from dagster._core.storage.tags import GRPC_INFO_TAG

from syncflow_dagster.deploy.run_launcher import SyncflowRunLauncher, run_worker_pid, worker_alive
from syncflow_dagster_tests.waiting import wait_until
from syncflow_dagster_tests.webserver import dagster_postgres_url, scratch_database

INSTANCE_YAML = """\
storage:
  postgres:
    postgres_url:
      env: DAGSTER_POSTGRES_URL
run_launcher:
  module: syncflow_dagster.deploy.run_launcher
  class: SyncflowRunLauncher
telemetry:
  enabled: false
"""


@pytest.fixture
def instance(
    pg_server_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[dg.DagsterInstance]:
    with scratch_database(pg_server_url, "dagster_launcher") as url:
        (tmp_path / "dagster.yaml").write_text(INSTANCE_YAML)
        monkeypatch.setenv("DAGSTER_POSTGRES_URL", dagster_postgres_url(url))
        with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
            yield instance


def _run(instance: dg.DagsterInstance, grpc: dict[str, object] | None) -> dg.DagsterRun:
    tags = {GRPC_INFO_TAG: json.dumps(grpc)} if grpc is not None else {}
    run = dg.DagsterRun(
        job_name="sync", run_id=str(uuid.uuid4()), tags=tags, status=dg.DagsterRunStatus.STARTED
    )
    return instance.add_run(run)


def _record_worker(instance: dg.DagsterInstance, run: dg.DagsterRun, pid: int) -> None:
    # What Dagster's start_run_in_subprocess writes when the run worker starts.
    instance.report_engine_event(
        f"Started process for run (pid: {pid}).", run, EngineEventData.in_process(pid)
    )


def test_the_instance_uses_it(instance: dg.DagsterInstance) -> None:
    assert isinstance(instance.run_launcher, SyncflowRunLauncher)
    assert instance.run_launcher.supports_check_run_worker_health


def test_a_live_worker_is_running_and_a_killed_one_failed(instance: dg.DagsterInstance) -> None:
    launcher = instance.run_launcher
    run = _run(instance, {"host": "localhost", "port": 4266})
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        _record_worker(instance, run, worker.pid)
        assert run_worker_pid(instance, run.run_id) is not None
        health = launcher.check_run_worker_health(run)
        assert health.status == WorkerStatus.RUNNING, health
        assert health.run_worker_id == str(worker.pid)
    finally:
        worker.kill()
        worker.wait(30)
    health = launcher.check_run_worker_health(run)
    assert health.status == WorkerStatus.FAILED, health
    assert f"pid {worker.pid} is gone" in str(health.msg)


def test_a_zombie_is_dead_and_a_reused_pid_is_not_the_worker() -> None:
    worker = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        # Exited but not yet reaped by its parent (this test): a zombie until wait().
        wait_until(
            lambda: psutil.Process(worker.pid).status() == psutil.STATUS_ZOMBIE,
            "the child to exit (a zombie until reaped)",
            timeout_s=30,
            interval_s=0.05,
        )
        alive, detail = worker_alive(worker.pid, recorded_at=time.time())
        assert not alive
        assert "zombie" in detail
    finally:
        worker.wait(30)
    # A pid whose process was created after the worker was recorded is another process.
    me = os.getpid()
    alive, detail = worker_alive(me, recorded_at=psutil.Process(me).create_time() - 3600)
    assert not alive
    assert "newer process" in detail


def test_what_it_cannot_see_it_reports_running(instance: dg.DagsterInstance) -> None:
    launcher = instance.run_launcher
    gone = 2**22 + 12345  # above any pid_max default: no such process
    elsewhere = _run(instance, {"host": "code-server.internal", "port": 4266})
    _record_worker(instance, elsewhere, gone)
    assert launcher.check_run_worker_health(elsewhere).status == WorkerStatus.RUNNING
    not_recorded = _run(instance, {"host": "127.0.0.1", "port": 4266})
    assert launcher.check_run_worker_health(not_recorded).status == WorkerStatus.RUNNING
    in_process = _run(instance, None)  # a run executed in some process, not launched by the launcher
    _record_worker(instance, in_process, gone)
    assert launcher.check_run_worker_health(in_process).status == WorkerStatus.RUNNING
    local = _run(instance, {"socket": "/tmp/dagster-grpc.sock"})
    _record_worker(instance, local, gone)
    assert launcher.check_run_worker_health(local).status == WorkerStatus.FAILED
