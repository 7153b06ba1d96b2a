"""Configuration of the monitoring & sync API, read from the environment by pydantic-settings.

Every variable is documented in docs/configuration.md. Secrets (the API token,
database passwords) are `SecretStr` or redacted before they reach a response,
a log line or an exception message.
"""

from __future__ import annotations

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_PUBLIC_PATHS = ("/health", "/metrics")


class DagsterSettings(BaseSettings):
    """Where the Dagster webserver is, whose GraphQL API launches and watches runs (`syncflow sync` needs only this)."""

    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True)

    dagster_graphql_url: str = Field(
        default="http://127.0.0.1:3000",
        validation_alias=AliasChoices("SYNCFLOW_DAGSTER_URL", "dagster_graphql_url"),
        description="Base URL of the Dagster webserver whose GraphQL API launches and watches runs.",
    )
    dagster_location: str | None = Field(
        default="syncflow",
        validation_alias=AliasChoices("SYNCFLOW_DAGSTER_LOCATION", "dagster_location"),
        description="Code location holding the sync and retry jobs.",
    )
    dagster_timeout_s: float = Field(
        default=30.0,
        gt=0,
        le=600,
        validation_alias=AliasChoices("SYNCFLOW_API_DAGSTER_TIMEOUT_S", "dagster_timeout_s"),
        description="Seconds to wait for Dagster's GraphQL API (launching a run loads the code location).",
    )


class ServiceSettings(DagsterSettings):
    """Where the API finds the store, Dagster and the partner systems, and how it authenticates callers."""

    database_url: SecretStr = Field(
        validation_alias=AliasChoices("SYNCFLOW_DATABASE_URL", "database_url"),
        description="SyncFlow's Postgres (schema syncflow).",
    )
    api_token: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("SYNCFLOW_API_TOKEN", "api_token"),
        description="Bearer token callers must send; without it every protected route answers 503.",
    )
    # Kept as text: pydantic-settings would JSON-decode a tuple-typed variable.
    public_paths_csv: str = Field(
        default=",".join(DEFAULT_PUBLIC_PATHS),
        validation_alias=AliasChoices("SYNCFLOW_API_PUBLIC_PATHS", "public_paths"),
        description="Comma-separated paths served without the token.",
    )
    apismith_base_url: str | None = Field(
        default=None, validation_alias=AliasChoices("APISMITH_BASE_URL", "apismith_base_url")
    )
    schedulehub_base_url: str | None = Field(
        default=None, validation_alias=AliasChoices("SCHEDULEHUB_BASE_URL", "schedulehub_base_url")
    )
    health_timeout_s: float = Field(
        default=3.0,
        gt=0,
        le=60,
        validation_alias=AliasChoices("SYNCFLOW_API_HEALTH_TIMEOUT_S", "health_timeout_s"),
    )

    @field_validator("public_paths_csv")
    @classmethod
    def _check_paths(cls, value: str) -> str:
        bad = [p for p in _split(value) if not p.startswith("/")]
        if bad:
            raise ValueError(f"SYNCFLOW_API_PUBLIC_PATHS entries must start with '/', got {bad}")
        return value

    @property
    def public_paths(self) -> tuple[str, ...]:
        return _split(self.public_paths_csv)


def _split(value: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in value.split(",") if p.strip())
