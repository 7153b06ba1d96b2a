"""The instance's run launcher: Dagster's DefaultRunLauncher, plus a run-worker health check.

Run monitoring (dagster.yaml `run_monitoring`) can only fail a STARTED run
whose worker died if the run launcher can say whether that worker is alive;
Dagster's DefaultRunLauncher cannot, so a run whose worker was SIGKILLed while
no code server watched it (the code server restarted, or died with it) would
stay STARTED forever, and the one-run-per-entity limit would block its entity
until someone stepped in. SyncflowRunLauncher launches exactly as the default
one does (through the code location's gRPC server, one run worker process per
run) and answers the health check from the run worker's pid, which Dagster
records in the run's "Started process for run (pid: N)" engine event.

A worker is judged only where it can be: on this host (the run was launched
through a code server on a loopback address or a unix socket, as the daemon of
a one-machine deployment launches). Otherwise, or before the pid is recorded,
the answer is RUNNING: run monitoring must never fail a run it cannot see.
A pid that exists but was created after the event belongs to another process
(pid reuse), and a zombie is dead.

    run_launcher:
      module: syncflow_dagster.deploy.run_launcher
      class: SyncflowRunLauncher
"""

from __future__ import annotations

import json
from typing import Any

import dagster as dg
import psutil
from dagster._core.launcher import CheckRunHealthResult, DefaultRunLauncher, WorkerStatus
from dagster._core.storage.tags import GRPC_INFO_TAG

# Dagster's engine event of the run worker (dagster/_grpc/impl.py, start_run_in_subprocess).
STARTED_PROCESS_PREFIX = "Started process for run (pid:"
_LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
# The event is written by the worker just after it starts; its timestamp may trail the
# process's creation time by a little, never lead it by more than clock granularity.
_CREATE_TIME_SLACK_S = 1.0


class SyncflowRunLauncher(DefaultRunLauncher):
    """DefaultRunLauncher whose run workers run monitoring can check (see the module's docstring)."""

    @classmethod
    def from_config_value(cls, inst_data: Any, config_value: Any) -> SyncflowRunLauncher:
        return cls(inst_data=inst_data)

    @property
    def supports_check_run_worker_health(self) -> bool:
        return True

    def check_run_worker_health(self, run: dg.DagsterRun) -> CheckRunHealthResult:
        if not _launched_on_this_host(run):
            return CheckRunHealthResult(WorkerStatus.RUNNING, "run worker on another host: not checked")
        started = run_worker_pid(self._instance, run.run_id)
        if started is None:
            return CheckRunHealthResult(WorkerStatus.RUNNING, "no run worker pid recorded yet")
        pid, recorded_at = started
        alive, detail = worker_alive(pid, recorded_at)
        if alive:
            return CheckRunHealthResult(WorkerStatus.RUNNING, detail, run_worker_id=str(pid))
        return CheckRunHealthResult(WorkerStatus.FAILED, detail, run_worker_id=str(pid))


def _launched_on_this_host(run: dg.DagsterRun) -> bool:
    info = run.tags.get(GRPC_INFO_TAG)
    if not info:
        return False
    try:
        grpc = json.loads(info)
    except ValueError:
        return False
    return bool(grpc.get("socket")) or str(grpc.get("host", "")) in _LOCAL_HOSTS


def run_worker_pid(instance: dg.DagsterInstance, run_id: str) -> tuple[int, float] | None:
    """The pid of the run's latest run worker and when it was recorded, from the run's engine events."""
    found: tuple[int, float] | None = None
    for record in instance.all_logs(run_id, of_type=dg.DagsterEventType.ENGINE_EVENT):
        if not record.message.startswith(STARTED_PROCESS_PREFIX) or record.dagster_event is None:
            continue
        pid = record.dagster_event.engine_event_data.metadata.get("pid")
        if pid is not None:
            found = (int(str(pid.value)), record.timestamp)
    return found


def worker_alive(pid: int, recorded_at: float) -> tuple[bool, str]:
    """Whether process `pid`, recorded at `recorded_at`, is still that process and not a zombie."""
    try:
        process = psutil.Process(pid)
        if process.create_time() > recorded_at + _CREATE_TIME_SLACK_S:
            return False, f"run worker pid {pid} is gone (the pid now belongs to a newer process)"
        if process.status() == psutil.STATUS_ZOMBIE:
            return False, f"run worker pid {pid} exited (zombie)"
    except psutil.NoSuchProcess:
        return False, f"run worker pid {pid} is gone"
    except psutil.AccessDenied:
        return True, f"run worker pid {pid} exists (not ours to inspect)"
    return True, f"run worker pid {pid} is running"
