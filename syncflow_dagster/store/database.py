"""Connecting to SyncFlow's Postgres: URL handling and the SQLAlchemy Core engine."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import sqlalchemy as sa
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def sqlalchemy_url(url: str) -> str:
    """Map a libpq-style URL (postgresql://, postgres://) onto the psycopg 3 dialect."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme in ("postgresql", "postgres", "postgresql+psycopg2"):
        scheme = "postgresql+psycopg"
    if scheme != "postgresql+psycopg":
        raise ValueError(f"database URL must be a postgresql:// URL, got scheme {parts.scheme!r}")
    return urlunsplit((scheme, parts.netloc, parts.path, parts.query, parts.fragment))


def libpq_url(url: str) -> str:
    """The same URL in plain libpq form (for psycopg.connect and dagster-postgres)."""
    parts = urlsplit(url)
    return urlunsplit(("postgresql", parts.netloc, parts.path, parts.query, parts.fragment))


def dagster_postgres_url(url: str) -> str:
    """The URL in the form dagster-postgres needs (`postgresql+psycopg2://`).

    dagster-postgres runs on psycopg2, while SQLAlchemy 2.1 maps a bare
    `postgresql://` to psycopg 3; with that driver the webserver's connections
    are closed under it and every page answers 500.
    """
    parts = urlsplit(url)
    return urlunsplit(("postgresql+psycopg2", parts.netloc, parts.path, parts.query, parts.fragment))


def redact_url(url: str) -> str:
    """A URL safe to log: any password is replaced by ***."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def make_engine(url: str, **kwargs: object) -> sa.Engine:
    """A pooled SQLAlchemy Core engine on psycopg 3."""
    options: dict[str, object] = {"pool_pre_ping": True, "future": True}
    options.update(kwargs)
    return sa.create_engine(sqlalchemy_url(url), **options)


# work_mem for the merges of a commit (SET LOCAL, that transaction only): enough to sort
# a million staged keys in memory.
DEFAULT_MERGE_WORK_MEM = "256MB"


class StoreSettings(BaseSettings):
    """Tuning of the state store, from the environment (prefix SYNCFLOW_STORE_)."""

    model_config = SettingsConfigDict(env_prefix="SYNCFLOW_STORE_", extra="ignore")

    merge_work_mem: str = Field(default=DEFAULT_MERGE_WORK_MEM, pattern=r"^[0-9]+\s*(kB|MB|GB)$")
    # Retry schedule of failed records: the n-th failure waits
    # base * 2**(n-1) seconds, at most cap, shortened by up to `jitter` (a share).
    retry_base_seconds: float = Field(default=60.0, gt=0)
    retry_cap_seconds: float = Field(default=6 * 3600.0, gt=0)
    retry_jitter: float = Field(default=0.2, ge=0.0, lt=1.0)
    # A retryable failure gives up (becomes `dead`, keeping its history) when it has
    # failed this many times, or when its first failure is older than this.
    retry_max_attempts: int = Field(default=10, ge=2, le=1000)
    retry_max_age_hours: float = Field(default=7 * 24.0, gt=0)
    # Days the delivery log (what `syncflow trace` reads) keeps a delivery.
    delivery_log_days: int = Field(default=90, ge=1)


def driver_cursor(conn: sa.Connection) -> psycopg.Cursor[Any]:
    """A psycopg cursor on the same session and transaction as a SQLAlchemy connection.

    COPY is psycopg's API, not SQLAlchemy's; going through the driver
    connection lets a COPY into staging and the merge that reads it share one
    transaction with the statements the connection runs.
    """
    driver = conn.connection.driver_connection
    if not isinstance(driver, psycopg.Connection):
        raise TypeError(f"SyncFlow's store needs the psycopg 3 driver, got {type(driver).__name__}")
    return driver.cursor()
