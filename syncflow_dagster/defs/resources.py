"""Dagster resources: SyncFlow's database and the two partner clients, with their tunables as config.

The resources read no environment themselves: `defs.configuration.build_resources`
builds them from one (secrets only through `dg.EnvVar`, so Dagster shows the
variable's name in the UI and never its value). Every tunable is a config field
whose description names the variable that sets it and whose default is that of
the settings class the client or store reads (clients.http.HttpSettings,
store.database.StoreSettings, ...), so the UI shows the values in force.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from typing import TYPE_CHECKING, Any, Literal

import dagster as dg
import sqlalchemy as sa
from pydantic import Field, SecretStr

from syncflow_dagster.clients.apismith import ApiSmithClient, ApiSmithSettings
from syncflow_dagster.clients.http import HttpSettings
from syncflow_dagster.clients.schedulehub import ScheduleHubClient, ScheduleHubSettings
from syncflow_dagster.engine.chunks import DEFAULT_CHUNK_SIZE
from syncflow_dagster.store.database import StoreSettings, make_engine

if TYPE_CHECKING:
    # Imported where used at run time: a step pays only for the repositories it touches.
    from syncflow_dagster.store.batches import BatchRepository
    from syncflow_dagster.store.delivery_log import DeliveryLogRepository
    from syncflow_dagster.store.events import StageEventRepository
    from syncflow_dagster.store.failures import FailureRepository
    from syncflow_dagster.store.pending import PendingRepository
    from syncflow_dagster.store.read_marks import ReadMarkRepository
    from syncflow_dagster.store.state import StateRepository


def _default(settings: type[Any], field: str) -> Any:
    """The default of a settings field: the config below repeats the names, never the values."""
    return settings.model_fields[field].default


class HttpConfig(dg.Config):
    """Transport of a partner client (SYNCFLOW_HTTP_*; clients/http.py)."""

    connect_timeout_s: float = Field(
        default=_default(HttpSettings, "connect_timeout_s"), description="SYNCFLOW_HTTP_CONNECT_TIMEOUT_S"
    )
    read_timeout_s: float = Field(
        default=_default(HttpSettings, "read_timeout_s"), description="SYNCFLOW_HTTP_READ_TIMEOUT_S"
    )
    write_timeout_s: float = Field(
        default=_default(HttpSettings, "write_timeout_s"), description="SYNCFLOW_HTTP_WRITE_TIMEOUT_S"
    )
    pool_timeout_s: float = Field(
        default=_default(HttpSettings, "pool_timeout_s"),
        description="SYNCFLOW_HTTP_POOL_TIMEOUT_S: wait for a pooled connection",
    )
    max_attempts: int = Field(
        default=_default(HttpSettings, "max_attempts"),
        description="SYNCFLOW_HTTP_MAX_ATTEMPTS: attempts per request (429/5xx/transport errors)",
    )
    max_retry_seconds: float = Field(
        default=_default(HttpSettings, "max_retry_seconds"),
        description="SYNCFLOW_HTTP_MAX_RETRY_SECONDS: total retry budget per request",
    )
    backoff_base_s: float = Field(
        default=_default(HttpSettings, "backoff_base_s"),
        description="SYNCFLOW_HTTP_BACKOFF_BASE_S: full-jitter backoff base",
    )
    backoff_max_s: float = Field(
        default=_default(HttpSettings, "backoff_max_s"),
        description="SYNCFLOW_HTTP_BACKOFF_MAX_S: backoff cap",
    )
    max_retry_after_s: float = Field(
        default=_default(HttpSettings, "max_retry_after_s"),
        description="SYNCFLOW_HTTP_MAX_RETRY_AFTER_S: longer Retry-After values are capped to this",
    )
    max_concurrency: int = Field(
        default=_default(HttpSettings, "max_concurrency"),
        description="SYNCFLOW_HTTP_MAX_CONCURRENCY: requests in flight per client",
    )
    max_connections: int = Field(
        default=_default(HttpSettings, "max_connections"),
        description="SYNCFLOW_HTTP_MAX_CONNECTIONS: connection pool size",
    )
    token_refresh_margin_s: float = Field(
        default=_default(HttpSettings, "token_refresh_margin_s"),
        description="SYNCFLOW_HTTP_TOKEN_REFRESH_MARGIN_S: refresh a token this long before it expires",
    )
    verify_tls: bool = Field(
        default=_default(HttpSettings, "verify_tls"), description="SYNCFLOW_HTTP_VERIFY_TLS"
    )

    def settings(self) -> HttpSettings:
        return HttpSettings(**{name: getattr(self, name) for name in HttpSettings.model_fields})


class StoreConfig(dg.Config):
    """Tuning of the state store (SYNCFLOW_STORE_*; store/database.py)."""

    merge_work_mem: str = Field(
        default=_default(StoreSettings, "merge_work_mem"),
        pattern=r"^[0-9]+\s*(kB|MB|GB)$",
        description="SYNCFLOW_STORE_MERGE_WORK_MEM: Postgres work_mem of a commit's merge (kB, MB or GB)",
    )

    retry_base_seconds: float = Field(
        default=_default(StoreSettings, "retry_base_seconds"),
        description="SYNCFLOW_STORE_RETRY_BASE_SECONDS: first retry delay of a failed record (doubles per attempt)",
    )
    retry_cap_seconds: float = Field(
        default=_default(StoreSettings, "retry_cap_seconds"),
        description="SYNCFLOW_STORE_RETRY_CAP_SECONDS: longest retry delay",
    )
    retry_jitter: float = Field(
        default=_default(StoreSettings, "retry_jitter"),
        description="SYNCFLOW_STORE_RETRY_JITTER: share by which a delay is randomly shortened",
    )
    retry_max_attempts: int = Field(
        default=_default(StoreSettings, "retry_max_attempts"),
        description="SYNCFLOW_STORE_RETRY_MAX_ATTEMPTS: a retryable failure that failed this often gives up",
    )
    retry_max_age_hours: float = Field(
        default=_default(StoreSettings, "retry_max_age_hours"),
        description="SYNCFLOW_STORE_RETRY_MAX_AGE_HOURS: a retryable failure first seen longer ago gives up",
    )
    delivery_log_days: int = Field(
        default=_default(StoreSettings, "delivery_log_days"),
        description="SYNCFLOW_STORE_DELIVERY_LOG_DAYS: days the delivery log keeps a delivery",
    )

    def settings(self) -> StoreSettings:
        return StoreSettings(**{name: getattr(self, name) for name in type(self).model_fields})


@cache
def _engine_for(url: str) -> sa.Engine:
    # One pool per process and URL: multiprocess steps each build their own.
    return make_engine(url, pool_size=4, max_overflow=4)


@cache
def _migrated(url: str) -> bool:
    # Once per process and URL: Dagster builds resources anew for every step,
    # and the Alembic check (advisory lock + version read) is not free.
    from syncflow_dagster.store.migrate import upgrade

    upgrade(_engine_for(url))
    return True


class SyncDatabase(dg.ConfigurableResource):
    """SyncFlow's Postgres state store (schema `syncflow`)."""

    url: str = Field(description="Postgres URL (SYNCFLOW_DATABASE_URL).")
    migrate_on_start: bool = Field(default=True, description="Run the Alembic migrations when first used.")
    store: StoreConfig = Field(default_factory=StoreConfig, description="Tuning of the state store.")

    @property
    def engine(self) -> sa.Engine:
        if self.migrate_on_start:
            _migrated(self.url)
        return _engine_for(self.url)

    def state(self) -> StateRepository:
        from syncflow_dagster.store.state import StateRepository

        return StateRepository(self.engine, self.store.merge_work_mem)

    def batches(self) -> BatchRepository:
        from syncflow_dagster.store.batches import BatchRepository

        return BatchRepository(self.engine)

    def failures(self) -> FailureRepository:
        from syncflow_dagster.store.failures import FailureRepository

        return FailureRepository(self.engine, self.store.settings())

    def pending(self) -> PendingRepository:
        from syncflow_dagster.store.pending import PendingRepository

        return PendingRepository(self.engine, self.store.settings())

    def delivery_log(self) -> DeliveryLogRepository:
        from syncflow_dagster.store.delivery_log import DeliveryLogRepository

        return DeliveryLogRepository(self.engine, self.store.settings())

    def read_marks(self) -> ReadMarkRepository:
        from syncflow_dagster.store.read_marks import ReadMarkRepository

        return ReadMarkRepository(self.engine)

    def events(self) -> StageEventRepository:
        from syncflow_dagster.store.events import StageEventRepository

        return StageEventRepository(self.engine)

    @contextmanager
    def entity_lock(self, entity: str, timeout_s: float = 300.0) -> Iterator[None]:
        from syncflow_dagster.store.locks import entity_lock

        with entity_lock(self.engine, entity, timeout_s=timeout_s):
            yield


class ApiSmithResource(dg.ConfigurableResource):
    """The APISmith ERP API: base URL and client credentials (EnvVars in the code location) and its tunables."""

    base_url: str = Field(description="APISMITH_BASE_URL")
    client_id: str = Field(description="APISMITH_CLIENT_ID")
    client_secret: str = Field(description="APISMITH_CLIENT_SECRET (secret: set it through an EnvVar)")
    token_path: str = Field(
        default=_default(ApiSmithSettings, "token_path"),
        description="APISMITH_TOKEN_PATH: token endpoint path",
    )
    format: Literal["arrow", "json"] = Field(
        default=_default(ApiSmithSettings, "format"),
        description="APISMITH_FORMAT: arrow (fast path) or json for the bulk endpoints",
    )
    garbage_page_retries: int = Field(
        default=_default(ApiSmithSettings, "garbage_page_retries"),
        description="APISMITH_GARBAGE_PAGE_RETRIES: re-reads of an unreadable page before the fetch fails",
    )
    page_size: int = Field(
        default=_default(ApiSmithSettings, "page_size"),
        description="SYNCFLOW_PAGE_SIZE: rows per page of the changes endpoint (at most 50 000)",
    )
    http: HttpConfig = Field(default_factory=HttpConfig, description="Transport (SYNCFLOW_HTTP_*).")

    def client(self) -> ApiSmithClient:
        settings = ApiSmithSettings(
            base_url=self.base_url,
            client_id=self.client_id,
            client_secret=SecretStr(self.client_secret),
            token_path=self.token_path,
            format=self.format,
            garbage_page_retries=self.garbage_page_retries,
            page_size=self.page_size,
        )
        return ApiSmithClient(settings, self.http.settings())


class ScheduleHubResource(dg.ConfigurableResource):
    """The ScheduleHub scheduling API: base URL and client credentials (EnvVars in the code location) and its tunables."""

    base_url: str = Field(description="SCHEDULEHUB_BASE_URL")
    client_id: str = Field(description="SCHEDULEHUB_CLIENT_ID")
    client_secret: str = Field(description="SCHEDULEHUB_CLIENT_SECRET (secret: set it through an EnvVar)")
    token_url: str | None = Field(
        default=None, description="SCHEDULEHUB_TOKEN_URL: token endpoint; unset: <base_url>/oauth/token"
    )
    batch_size: int = Field(
        default=_default(ScheduleHubSettings, "delivery_batch_size"),
        description="SYNCFLOW_DELIVERY_BATCH_SIZE: rows per batch-upsert or batch-delete call",
    )
    http: HttpConfig = Field(default_factory=HttpConfig, description="Transport (SYNCFLOW_HTTP_*).")

    def client(self) -> ScheduleHubClient:
        settings = ScheduleHubSettings(
            base_url=self.base_url,
            client_id=self.client_id,
            client_secret=SecretStr(self.client_secret),
            token_url=self.token_url,
            delivery_batch_size=self.batch_size,
        )
        return ScheduleHubClient(settings, self.http.settings())


class SyncTuning(dg.ConfigurableResource):
    """Knobs of a sync run that operators tune without a code change."""

    pending_max_age_hours: float = Field(
        default=72.0,
        description="A child still waiting for its parent after this long becomes a failed record.",
    )
    freshness_hours: float = Field(
        default=26.0, description="The freshness check fails when an entity's last good sync is older."
    )
    retry_batch_limit: int = Field(default=50_000, description="Failed records retried per retry run.")
    chunk_size: int = Field(
        default=DEFAULT_CHUNK_SIZE,
        ge=1,
        description=(
            "SYNCFLOW_CHUNK_SIZE: rows each stage reads, works on and writes at a time; smaller "
            "chunks lower a large sync's peak memory at some cost in speed, results are the same."
        ),
    )
