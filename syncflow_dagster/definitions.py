"""The one `Definitions` of the SyncFlow code location (loaded by workspace.yaml)."""

from __future__ import annotations

import os

import dagster as dg

from syncflow_dagster.defs.assets import FRESHNESS_CHECK, STAGE_ASSETS
from syncflow_dagster.defs.audit import SCHEDULEHUB_RECORDS, target_audit_job, target_matches_state
from syncflow_dagster.defs.configuration import build_resources
from syncflow_dagster.defs.jobs import reconcile_job, retry_job, sync_job
from syncflow_dagster.defs.sensors import (
    apismith_change_sensor,
    batch_cancel_sensor,
    batch_failure_sensor,
    nightly_reconcile_schedule,
    pending_children_sensor,
    retry_schedule,
)
from syncflow_dagster.deploy import executor_from_env, warm_workers

# Run workers fork from a warm process that imported all this once (SYNCFLOW_RUN_WORKER_START).
warm_workers.install(os.environ)

defs = dg.Definitions(
    assets=[*STAGE_ASSETS, SCHEDULEHUB_RECORDS],
    asset_checks=[FRESHNESS_CHECK, target_matches_state],
    jobs=[sync_job, reconcile_job, retry_job, target_audit_job],
    sensors=[apismith_change_sensor, pending_children_sensor, batch_failure_sensor, batch_cancel_sensor],
    schedules=[retry_schedule, nightly_reconcile_schedule],
    # The one place the code location reads its environment (docs/configuration.md).
    resources=build_resources(os.environ, env_vars=True),
    # SYNCFLOW_EXECUTOR picks the profile (multiprocess, in_process, celery): see docs/scaling.md.
    executor=executor_from_env(os.environ),
)
