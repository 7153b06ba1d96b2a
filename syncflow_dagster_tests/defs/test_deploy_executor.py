"""Executor selection from the environment: the profile a deployment runs, and clear errors for bad values."""

from __future__ import annotations

import os

import dagster as dg
import pytest
from dagster._core.definitions.definition_config_schema import ConfiguredDefinitionConfigSchema

from syncflow_dagster.deploy import (
    DEFAULT_CELERY_BACKEND,
    DEFAULT_CELERY_BROKER,
    ExecutorKind,
    celery_app_args,
    executor_from_env,
    executor_settings,
)
from syncflow_dagster.deploy.executor import ExecutorConfigError


def test_in_process_is_the_default() -> None:
    # A run's nine stages in its one run worker: start-up paid once per run (docs/architecture.md).
    assert executor_from_env({}) is dg.in_process_executor
    assert executor_from_env({"SYNCFLOW_EXECUTOR": "in_process"}) is dg.in_process_executor


def test_multiprocess_profile_forks_steps_from_a_preloaded_forkserver() -> None:
    executor = executor_from_env({"SYNCFLOW_EXECUTOR": "multiprocess"})
    assert executor.name == "multiprocess"
    schema = executor.config_schema
    assert isinstance(schema, ConfiguredDefinitionConfigSchema)
    resolved = schema.resolve_config({})
    assert resolved.success, resolved.errors
    assert resolved.value is not None
    start = resolved.value["config"]["start_method"]
    assert start == {"forkserver": {"preload_modules": ["syncflow_dagster.definitions"]}}


def test_celery_profile_references_secret_urls_by_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    secret_broker = "amqp://syncflow:hunter2@rabbit.internal:5672/syncflow"
    environ = {
        "SYNCFLOW_EXECUTOR": "celery",
        "SYNCFLOW_CELERY_BROKER": secret_broker,
        "SYNCFLOW_CELERY_QUEUE": "syncflow_prod",
    }
    executor = executor_from_env(environ)
    assert executor.name == "celery"
    # The broker is an {"env": ...} reference, resolved where the run executes:
    # without the variable in the process the config does not resolve, and says which one is missing.
    schema = executor.config_schema
    assert isinstance(schema, ConfiguredDefinitionConfigSchema)
    monkeypatch.delenv("SYNCFLOW_CELERY_BROKER", raising=False)
    unresolved = schema.resolve_config({})
    assert not unresolved.success
    assert "SYNCFLOW_CELERY_BROKER" in str(unresolved.errors)
    assert "hunter2" not in str(unresolved.errors)
    monkeypatch.setenv("SYNCFLOW_CELERY_BROKER", secret_broker)
    resolved = schema.resolve_config({})
    assert resolved.success, resolved.errors
    assert resolved.value is not None
    config = resolved.value["config"]
    assert config["broker"] == secret_broker
    assert config["backend"] == DEFAULT_CELERY_BACKEND  # not set: the literal default
    assert config["config_source"]["task_default_queue"] == "syncflow_prod"


def test_celery_defaults_are_the_local_rabbitmq_and_redis() -> None:
    settings = executor_settings({"SYNCFLOW_EXECUTOR": "celery"})
    assert settings.executor is ExecutorKind.CELERY
    args = celery_app_args(settings)
    assert args["broker"] == DEFAULT_CELERY_BROKER == "amqp://guest:guest@127.0.0.1:5672//"
    assert args["backend"] == DEFAULT_CELERY_BACKEND == "redis://127.0.0.1:6379/0"
    assert args["config_source"]["task_default_queue"] == "dagster"
    assert args["config_source"]["task_acks_late"] is True


def test_worker_app_args_follow_the_environment() -> None:
    settings = executor_settings(
        {
            "SYNCFLOW_CELERY_BROKER": "amqp://u:p@mq:5672/v",
            "SYNCFLOW_CELERY_BACKEND": "redis://cache:6379/3",
            "SYNCFLOW_CELERY_QUEUE": "syncflow-eu",
        }
    )
    args = celery_app_args(settings)
    assert args["broker"] == "amqp://u:p@mq:5672/v"
    assert args["backend"] == "redis://cache:6379/3"
    assert args["config_source"]["task_default_queue"] == "syncflow-eu"
    # Secret URLs stay masked when the settings object is printed or logged.
    assert "u:p@" not in repr(settings)


def test_unknown_executor_names_the_variable_and_value() -> None:
    with pytest.raises(ExecutorConfigError, match=r"SYNCFLOW_EXECUTOR='dask'"):
        executor_from_env({"SYNCFLOW_EXECUTOR": "dask"})


def test_bad_queue_name_is_refused() -> None:
    with pytest.raises(ExecutorConfigError, match=r"SYNCFLOW_CELERY_QUEUE='a b'"):
        executor_settings({"SYNCFLOW_CELERY_QUEUE": "a b"})


def test_an_error_never_echoes_the_broker_url() -> None:
    with pytest.raises(ExecutorConfigError) as error:
        executor_settings({"SYNCFLOW_EXECUTOR": "celeryy", "SYNCFLOW_CELERY_BROKER": "amqp://u:hunter2@mq//"})
    assert "SYNCFLOW_EXECUTOR='celeryy'" in str(error.value)
    assert "hunter2" not in str(error.value)


def test_the_sync_code_location_runs_on_the_celery_executor(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SYNCFLOW_EXECUTOR", "celery")

    @dg.op
    def probe() -> None:
        return None

    @dg.job
    def probe_job() -> None:
        probe()

    defs = dg.Definitions(jobs=[probe_job], executor=executor_from_env(os.environ))
    assert defs.resolve_job_def("probe_job").executor_def.name == "celery"


def test_k8s_profile_without_dagster_k8s_says_what_to_install() -> None:
    # Without dagster-k8s (as on this machine) the profile refuses and names the package to add;
    # with it, the profile is dagster-k8s's own step-per-Job executor.
    try:
        import dagster_k8s  # noqa: F401
    except ImportError:
        with pytest.raises(ExecutorConfigError, match=r"SYNCFLOW_EXECUTOR=k8s needs dagster-k8s"):
            executor_from_env({"SYNCFLOW_EXECUTOR": "k8s"})
    else:
        assert executor_from_env({"SYNCFLOW_EXECUTOR": "k8s"}).name == "k8s"
