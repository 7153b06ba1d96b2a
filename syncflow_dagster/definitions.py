"""The one `Definitions` of the SyncFlow code location (loaded by workspace.yaml)."""

from __future__ import annotations

import os

import dagster as dg

from syncflow_dagster.defs.assets import FRESHNESS_CHECK, STAGE_ASSETS
from syncflow_dagster.defs.audit import SCHEDULEHUB_RECORDS, target_audit_job, target_matches_state
from syncflow_dagster.defs.jobs import reconcile_job, retry_job, sync_job
from syncflow_dagster.defs.resources import ApiSmithResource, ScheduleHubResource, SyncDatabase, SyncTuning
from syncflow_dagster.defs.sensors import (
    apismith_change_sensor,
    batch_cancel_sensor,
    batch_failure_sensor,
    nightly_reconcile_schedule,
    pending_children_sensor,
    retry_schedule,
)
from syncflow_dagster.deploy import executor_from_env, warm_workers
from syncflow_dagster.store.frame_io_manager import PostgresFrameIOManager


def _client_id(variable: str) -> str | dg.EnvVar:
    """The partner client id: the variable when set, else `syncflow` (the clients' documented default)."""
    return dg.EnvVar(variable) if os.environ.get(variable) else "syncflow"


def build_resources() -> dict[str, object]:
    """Resources from the environment; secrets stay EnvVars, resolved only at run time."""
    database_url = dg.EnvVar("SYNCFLOW_DATABASE_URL")
    return {
        "database": SyncDatabase(url=database_url),
        "apismith": ApiSmithResource(
            base_url=dg.EnvVar("APISMITH_BASE_URL"),
            client_id=_client_id("APISMITH_CLIENT_ID"),
            client_secret=dg.EnvVar("APISMITH_CLIENT_SECRET"),
        ),
        "schedulehub": ScheduleHubResource(
            base_url=dg.EnvVar("SCHEDULEHUB_BASE_URL"),
            client_id=_client_id("SCHEDULEHUB_CLIENT_ID"),
            client_secret=dg.EnvVar("SCHEDULEHUB_CLIENT_SECRET"),
        ),
        "tuning": SyncTuning(),
        "frame_io_manager": PostgresFrameIOManager(
            database_url=database_url,
            retention_days=int(os.environ.get("SYNCFLOW_STAGE_RETENTION_DAYS", "14")),
        ),
    }


# Run workers fork from a warm process that imported all this once (SYNCFLOW_RUN_WORKER_START).
warm_workers.install()

defs = dg.Definitions(
    assets=[*STAGE_ASSETS, SCHEDULEHUB_RECORDS],
    asset_checks=[FRESHNESS_CHECK, target_matches_state],
    jobs=[sync_job, reconcile_job, retry_job, target_audit_job],
    sensors=[apismith_change_sensor, pending_children_sensor, batch_failure_sensor, batch_cancel_sensor],
    schedules=[retry_schedule, nightly_reconcile_schedule],
    resources=build_resources(),
    # SYNCFLOW_EXECUTOR picks the profile (multiprocess, in_process, celery): see docs/scaling.md.
    executor=executor_from_env(),
)
