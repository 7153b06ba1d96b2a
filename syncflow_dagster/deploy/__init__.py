"""Deployment profiles: which Dagster executor runs the sync's steps, chosen by configuration.

The code location is the same on one machine and on many; `executor_from_env(environ)`
(definitions.py gives it the process environment) picks in-process (default),
multiprocess, or dagster-celery's `celery_executor`; `run_launcher.SyncflowRunLauncher`
is the instance's run launcher (dagster.yaml).
"""

from __future__ import annotations

from syncflow_dagster.deploy.executor import (
    DEFAULT_CELERY_BACKEND,
    DEFAULT_CELERY_BROKER,
    DEFAULT_CELERY_QUEUE,
    ExecutorKind,
    ExecutorSettings,
    celery_app_args,
    executor_from_env,
    executor_settings,
)

__all__ = [
    "DEFAULT_CELERY_BACKEND",
    "DEFAULT_CELERY_BROKER",
    "DEFAULT_CELERY_QUEUE",
    "ExecutorKind",
    "ExecutorSettings",
    "celery_app_args",
    "executor_from_env",
    "executor_settings",
]
