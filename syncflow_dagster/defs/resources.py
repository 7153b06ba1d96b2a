"""Dagster resources: SyncFlow's database and the two partner clients, configured from the environment.

Secrets reach these resources only through `dg.EnvVar`, so Dagster shows the
variable's name in the UI and never its value.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from typing import TYPE_CHECKING, Any

import dagster as dg
import sqlalchemy as sa
from pydantic import Field

from syncflow_dagster.store.database import make_engine

if TYPE_CHECKING:
    # Imported where used at run time: a step pays only for the repositories it touches.
    from syncflow_dagster.clients.apismith import ApiSmithClient
    from syncflow_dagster.clients.schedulehub import ScheduleHubClient
    from syncflow_dagster.store.batches import BatchRepository
    from syncflow_dagster.store.delivery_log import DeliveryLogRepository
    from syncflow_dagster.store.events import StageEventRepository
    from syncflow_dagster.store.failures import FailureRepository
    from syncflow_dagster.store.pending import PendingRepository
    from syncflow_dagster.store.read_marks import ReadMarkRepository
    from syncflow_dagster.store.state import StateRepository


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

    @property
    def engine(self) -> sa.Engine:
        if self.migrate_on_start:
            _migrated(self.url)
        return _engine_for(self.url)

    def state(self) -> StateRepository:
        from syncflow_dagster.store.state import StateRepository

        return StateRepository(self.engine)

    def batches(self) -> BatchRepository:
        from syncflow_dagster.store.batches import BatchRepository

        return BatchRepository(self.engine)

    def failures(self) -> FailureRepository:
        from syncflow_dagster.store.failures import FailureRepository

        return FailureRepository(self.engine)

    def pending(self) -> PendingRepository:
        from syncflow_dagster.store.pending import PendingRepository

        return PendingRepository(self.engine)

    def delivery_log(self) -> DeliveryLogRepository:
        from syncflow_dagster.store.delivery_log import DeliveryLogRepository

        return DeliveryLogRepository(self.engine)

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
    """The APISmith ERP API (base URL and client credentials from the environment)."""

    base_url: str = Field(description="APISMITH_BASE_URL")
    client_id: str = Field(description="APISMITH_CLIENT_ID")
    client_secret: str = Field(description="APISMITH_CLIENT_SECRET (secret: set it through an EnvVar)")
    page_size: int | None = Field(
        default=None,
        description="Rows per page of the changes endpoint; unset: SYNCFLOW_PAGE_SIZE (default 10 000).",
    )

    def client(self) -> ApiSmithClient:
        from pydantic import SecretStr

        from syncflow_dagster.clients.apismith import ApiSmithClient, ApiSmithSettings

        # Only what is set here overrides the environment: the client's settings read
        # SYNCFLOW_PAGE_SIZE, APISMITH_FORMAT, ... themselves (docs/configuration.md).
        chosen: dict[str, Any] = {} if self.page_size is None else {"page_size": self.page_size}
        settings = ApiSmithSettings(
            base_url=self.base_url,
            client_id=self.client_id,
            client_secret=SecretStr(self.client_secret),
            **chosen,
        )
        return ApiSmithClient(settings)


class ScheduleHubResource(dg.ConfigurableResource):
    """The ScheduleHub scheduling API (base URL and client credentials from the environment)."""

    base_url: str = Field(description="SCHEDULEHUB_BASE_URL")
    client_id: str = Field(description="SCHEDULEHUB_CLIENT_ID")
    client_secret: str = Field(description="SCHEDULEHUB_CLIENT_SECRET (secret: set it through an EnvVar)")
    batch_size: int | None = Field(
        default=None,
        description="Rows per batch-upsert or batch-delete call; unset: SYNCFLOW_DELIVERY_BATCH_SIZE "
        "(default 5 000).",
    )

    def client(self) -> ScheduleHubClient:
        from pydantic import SecretStr

        from syncflow_dagster.clients.schedulehub import ScheduleHubClient, ScheduleHubSettings

        # Only what is set here overrides the environment (SYNCFLOW_DELIVERY_BATCH_SIZE,
        # SCHEDULEHUB_TOKEN_URL are read by the client's settings).
        chosen: dict[str, Any] = {} if self.batch_size is None else {"delivery_batch_size": self.batch_size}
        settings = ScheduleHubSettings(
            base_url=self.base_url,
            client_id=self.client_id,
            client_secret=SecretStr(self.client_secret),
            **chosen,
        )
        return ScheduleHubClient(settings)


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
