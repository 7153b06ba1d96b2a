"""Deployment profiles: which Dagster executor runs the sync's steps, chosen by configuration.

The code location is the same on one machine and on many; `executor_from_env()`
picks multiprocess (default), in-process, or dagster-celery's `celery_executor`.
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
