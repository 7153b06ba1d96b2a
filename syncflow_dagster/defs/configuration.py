"""Configuration in one place: the resources of a SyncFlow deployment, built from an environment.

`build_resources(environ)` is the one function that turns SyncFlow's
variables (docs/configuration.md) into Dagster resources. The code location
(definitions.py), `syncflow demo`, the benchmarks and the test harness all
call it; they differ only in the mapping they pass, which each reads or
makes at its own edge.

Two kinds of values:

* **Deployment values** (database URL, partner URLs, client ids and
  secrets). With `env_vars=True` (the code location) they become
  `dg.EnvVar`s: the Dagster UI shows the variable's name, never a secret's
  value, and each run resolves it from its own process's environment. Without
  it (an in-process deployment such as the demo) they are the mapping's values.
* **Tunables** (page and batch sizes, HTTP timeouts and retries, the store's
  retry schedule and merge memory, the chunk size, frame retention): read here from the mapping with their
  documented defaults, and handed to the resources as plain config, so the
  UI's resource and launchpad views show each value in force and a run may
  override it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

import dagster as dg
from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from syncflow_dagster.clients.apismith import ApiSmithSettings
from syncflow_dagster.clients.http import HttpSettings
from syncflow_dagster.clients.schedulehub import ScheduleHubSettings
from syncflow_dagster.defs.interrupts import StageFrameIOManager
from syncflow_dagster.defs.resources import (
    ApiSmithResource,
    HttpConfig,
    ScheduleHubResource,
    StoreConfig,
    SyncDatabase,
    SyncTuning,
)
from syncflow_dagster.engine.chunks import DEFAULT_CHUNK_SIZE
from syncflow_dagster.store.database import StoreSettings
from syncflow_dagster.store.frame_io_manager import PostgresFrameIOManager

S = TypeVar("S", bound=BaseSettings)

DATABASE_URL_ENV = "SYNCFLOW_DATABASE_URL"
STAGE_RETENTION_DAYS_ENV = "SYNCFLOW_STAGE_RETENTION_DAYS"
# The client id both partners know SyncFlow by when the deployment names none.
DEFAULT_CLIENT_ID = "syncflow"


class ChunkSettings(BaseSettings):
    """SYNCFLOW_CHUNK_SIZE: rows each stage handles at a time (the `tuning` resource's `chunk_size`)."""

    model_config = SettingsConfigDict(env_prefix="SYNCFLOW_", extra="ignore")

    chunk_size: int = Field(default=DEFAULT_CHUNK_SIZE, ge=1, description="Rows per chunk.")


class ConfigurationError(ValueError):
    """A deployment value the resources need is missing from the environment given."""


def env_variable(cls: type[BaseSettings], field: str) -> str:
    """The environment variable a settings field is read from (its alias, else prefix + name)."""
    alias = cls.model_fields[field].validation_alias
    if isinstance(alias, AliasChoices):
        first = alias.choices[0]
        if isinstance(first, str):
            return first
    if isinstance(alias, str):
        return alias
    return (str(cls.model_config.get("env_prefix", "")) + field).upper()


def settings_from(cls: type[S], environ: Mapping[str, str]) -> S:
    """`cls` as `environ` sets it, defaults elsewhere; the process environment is not consulted.

    Every field is passed explicitly, so pydantic-settings' own read of
    os.environ has nothing left to fill, and the validation (ranges, types)
    is the settings class's.
    """
    values: dict[str, Any] = {}
    for field, info in cls.model_fields.items():
        variable = env_variable(cls, field)
        if variable in environ:
            values[field] = environ[variable]
        elif not info.is_required():
            values[field] = info.get_default(call_default_factory=True)
    return cls(**values)


def http_config(environ: Mapping[str, str]) -> HttpConfig:
    """The partner clients' transport (SYNCFLOW_HTTP_*)."""
    return HttpConfig(**settings_from(HttpSettings, environ).model_dump())


def store_config(environ: Mapping[str, str]) -> StoreConfig:
    """The state store's tuning (SYNCFLOW_STORE_*)."""
    settings = settings_from(StoreSettings, environ)
    return StoreConfig(**{name: getattr(settings, name) for name in StoreConfig.model_fields})


def deployment_environment(
    *,
    database_url: str,
    apismith_url: str,
    apismith_secret: str,
    schedulehub_url: str,
    schedulehub_secret: str,
    client_id: str = DEFAULT_CLIENT_ID,
) -> dict[str, str]:
    """The deployment variables of a SyncFlow pointed at these servers (for an in-process deployment)."""
    return {
        DATABASE_URL_ENV: database_url,
        "APISMITH_BASE_URL": apismith_url,
        "APISMITH_CLIENT_ID": client_id,
        "APISMITH_CLIENT_SECRET": apismith_secret,
        "SCHEDULEHUB_BASE_URL": schedulehub_url,
        "SCHEDULEHUB_CLIENT_ID": client_id,
        "SCHEDULEHUB_CLIENT_SECRET": schedulehub_secret,
    }


def build_resources(environ: Mapping[str, str], *, env_vars: bool = False) -> dict[str, Any]:
    """Every resource the jobs, sensors and checks use, from `environ` (docs/configuration.md).

    `env_vars=True` is the code location's form: deployment values are
    `dg.EnvVar`s resolved when a run starts (a missing one fails that run,
    naming the variable). Otherwise they must be in `environ`.
    """

    def deployment(variable: str) -> str | dg.EnvVar:
        if env_vars:
            return dg.EnvVar(variable)
        value = environ.get(variable)
        if not value:
            raise ConfigurationError(f"{variable} is not set")
        return value

    def partner(prefix: str) -> dict[str, str | dg.EnvVar]:
        """Where a partner is and who SyncFlow is to it: <PREFIX>_BASE_URL, _CLIENT_ID, _CLIENT_SECRET."""
        client_id: str | dg.EnvVar = DEFAULT_CLIENT_ID
        if environ.get(f"{prefix}_CLIENT_ID"):
            client_id = dg.EnvVar(f"{prefix}_CLIENT_ID") if env_vars else environ[f"{prefix}_CLIENT_ID"]
        return {
            "base_url": deployment(f"{prefix}_BASE_URL"),
            "client_id": client_id,
            "client_secret": deployment(f"{prefix}_CLIENT_SECRET"),
        }

    database_url = deployment(DATABASE_URL_ENV)
    http = http_config(environ)
    apismith = settings_from(ApiSmithSettings, environ)
    schedulehub = settings_from(ScheduleHubSettings, environ)
    chunk_size = settings_from(ChunkSettings, environ).chunk_size
    retention = environ.get(STAGE_RETENTION_DAYS_ENV)
    retention_days = (
        int(retention) if retention else PostgresFrameIOManager.model_fields["retention_days"].default
    )
    return {
        "database": SyncDatabase(url=database_url, store=store_config(environ)),
        "apismith": ApiSmithResource(
            **partner("APISMITH"),
            token_path=apismith.token_path,
            format=apismith.format,
            garbage_page_retries=apismith.garbage_page_retries,
            page_size=apismith.page_size,
            http=http,
        ),
        "schedulehub": ScheduleHubResource(
            **partner("SCHEDULEHUB"),
            token_url=schedulehub.token_url,
            batch_size=schedulehub.delivery_batch_size,
            http=http,
        ),
        "tuning": SyncTuning(chunk_size=chunk_size),
        # The frame IO manager under the stages' stop rule (defs/interrupts.py).
        "frame_io_manager": StageFrameIOManager(
            database_url=database_url,
            retention_days=retention_days,
        ),
    }
