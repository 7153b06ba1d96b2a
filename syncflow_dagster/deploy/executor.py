"""Executor selection: which Dagster executor runs a sync's steps, read from the environment.

    SYNCFLOW_EXECUTOR        in_process (default) | multiprocess | celery | k8s
    SYNCFLOW_CELERY_BROKER   the Celery broker URL (default amqp://guest:guest@127.0.0.1:5672//)
    SYNCFLOW_CELERY_BACKEND  the Celery result backend URL (default redis://127.0.0.1:6379/0)
    SYNCFLOW_CELERY_QUEUE    the queue the run's steps are sent to and the workers consume (default dagster)

`in_process` is the default because a sync run's nine stages are short and
sequential: one run worker process executes them all, so a run pays Python's
start-up and the code location's import once (docs/architecture.md, "The
executor", has the daemon-path figures). `multiprocess` runs each step in a
process of its own, forked from a forkserver that preloaded the code location
(so a step does not import Dagster and the definitions again).

The broker and backend URLs may carry passwords: they reach the executor's
config as `{"env": ...}` references, so Dagster resolves them in the run's
process and never stores or shows their values.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Any

import dagster as dg
from pydantic import Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

EXECUTOR_ENV = "SYNCFLOW_EXECUTOR"
BROKER_ENV = "SYNCFLOW_CELERY_BROKER"
BACKEND_ENV = "SYNCFLOW_CELERY_BACKEND"
QUEUE_ENV = "SYNCFLOW_CELERY_QUEUE"

DEFAULT_CELERY_BROKER = "amqp://guest:guest@127.0.0.1:5672//"
DEFAULT_CELERY_BACKEND = "redis://127.0.0.1:6379/0"
DEFAULT_CELERY_QUEUE = "dagster"


class ExecutorKind(StrEnum):
    """The executors a deployment may choose; all of them Dagster's own."""

    IN_PROCESS = "in_process"
    MULTIPROCESS = "multiprocess"
    CELERY = "celery"
    # dagster-k8s's k8s_job_executor: one Kubernetes Job per step, configured
    # by the K8sRunLauncher of the Helm chart (image, env secrets, resources).
    K8S = "k8s"


class ExecutorSettings(BaseSettings):
    """The deployment profile, from SYNCFLOW_* variables."""

    model_config = SettingsConfigDict(env_prefix="SYNCFLOW_", extra="ignore")

    executor: ExecutorKind = Field(default=ExecutorKind.IN_PROCESS, description=EXECUTOR_ENV)
    celery_broker: SecretStr = Field(default=SecretStr(DEFAULT_CELERY_BROKER), description=BROKER_ENV)
    celery_backend: SecretStr = Field(default=SecretStr(DEFAULT_CELERY_BACKEND), description=BACKEND_ENV)
    celery_queue: str = Field(
        default=DEFAULT_CELERY_QUEUE,
        pattern=r"^[A-Za-z0-9_\-]{1,120}$",
        description=f"{QUEUE_ENV}: letters, digits, '_' and '-' (it is also an AMQP exchange name)",
    )


class ExecutorConfigError(ValueError):
    """A deployment variable has a value SyncFlow cannot use; the message names it (never a secret's value)."""


def executor_settings(environ: Mapping[str, str]) -> ExecutorSettings:
    """Read the profile from `environ` (the caller's: definitions.py passes the process's), with an error naming the variable."""
    values = {
        field: environ[var]
        for field, var in (
            ("executor", EXECUTOR_ENV),
            ("celery_broker", BROKER_ENV),
            ("celery_backend", BACKEND_ENV),
            ("celery_queue", QUEUE_ENV),
        )
        if var in environ
    }
    try:
        # Explicit values only: the process environment must not leak in.
        return ExecutorSettings.model_validate(values)
    except ValidationError as error:
        problems = []
        for item in error.errors():
            field = str(item["loc"][0]) if item["loc"] else "?"
            variable = f"SYNCFLOW_{field.upper()}"
            shown = "" if field in {"celery_broker", "celery_backend"} else f"={environ.get(variable)!r}"
            problems.append(f"{variable}{shown}: {item['msg']}")
        raise ExecutorConfigError("invalid deployment profile: " + "; ".join(problems)) from None


def _celery_config_source(queue: str) -> dict[str, Any]:
    """Celery settings shared by the executor (producer) and the workers (consumers).

    dagster-celery publishes a step to exchange `<queue>` with routing key
    `<queue>.execute_plan`; a topic exchange bound with `<queue>.#` (declared
    the same way on both sides, see celery_app.py) is what delivers it to a
    queue other than dagster-celery's built-in `dagster` queue.
    """
    return {
        "task_default_queue": queue,
        "task_create_missing_queue_exchange_type": "topic",
        # A step is acknowledged when it finished, so a worker that dies mid-step
        # hands the step back to the broker instead of losing it.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
    }


def _secret_source(environ: Mapping[str, str], variable: str, default: str) -> str | dict[str, str]:
    # An {"env": ...} reference keeps the URL (and its password) out of the job's config and the UI.
    return {"env": variable} if variable in environ else default


def celery_app_args(settings: ExecutorSettings) -> dict[str, Any]:
    """Broker, backend and settings for a Celery app, resolved (for the worker side, celery_app.py)."""
    return {
        "broker": settings.celery_broker.get_secret_value(),
        "backend": settings.celery_backend.get_secret_value(),
        "config_source": _celery_config_source(settings.celery_queue),
    }


def _celery_executor(settings: ExecutorSettings, environ: Mapping[str, str]) -> dg.ExecutorDefinition:
    try:
        from dagster_celery import celery_executor
    except ImportError as error:  # pragma: no cover - depends on the installed extras
        raise ExecutorConfigError(
            f"{EXECUTOR_ENV}=celery needs dagster-celery: install syncflow-dagster[celery]"
        ) from error
    return celery_executor.configured(
        {
            "broker": _secret_source(environ, BROKER_ENV, DEFAULT_CELERY_BROKER),
            "backend": _secret_source(environ, BACKEND_ENV, DEFAULT_CELERY_BACKEND),
            "config_source": _celery_config_source(settings.celery_queue),
        },
        name="celery",
    )


# The module whose import loads the whole code location: the forkserver imports it once,
# and every step's process is forked from it with Dagster, pyarrow and the definitions loaded.
PRELOADED_MODULES = ("syncflow_dagster.definitions",)

MULTIPROCESS_EXECUTOR = dg.multiprocess_executor.configured(
    {"start_method": {"forkserver": {"preload_modules": list(PRELOADED_MODULES)}}},
    name="multiprocess",
)


def _k8s_executor() -> dg.ExecutorDefinition:
    try:
        from dagster_k8s import k8s_job_executor
    except ImportError as error:
        raise ExecutorConfigError(
            f"{EXECUTOR_ENV}=k8s needs dagster-k8s (pinned with the Dagster family: dagster-k8s==0.29.27) "
            "in the code location's image"
        ) from error
    return k8s_job_executor


def executor_from_env(environ: Mapping[str, str]) -> dg.ExecutorDefinition:
    """The executor of every job in the code location, as SYNCFLOW_EXECUTOR in `environ` says."""
    settings = executor_settings(environ)
    if settings.executor is ExecutorKind.CELERY:
        return _celery_executor(settings, environ)
    if settings.executor is ExecutorKind.K8S:
        return _k8s_executor()
    if settings.executor is ExecutorKind.MULTIPROCESS:
        return MULTIPROCESS_EXECUTOR
    return dg.in_process_executor
