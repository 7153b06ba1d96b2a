"""`SyncStore`: the type a stage or an op takes for SyncFlow's state store, one accessor per repository.

The Dagster resource `defs.resources.SyncDatabase` is one (it builds each
repository on its pooled engine); code below the Dagster layer names this
protocol instead, so it needs neither Dagster nor the resource to be typed.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Protocol

import sqlalchemy as sa

from syncflow_dagster.store.batches import BatchRepository
from syncflow_dagster.store.delivery_log import DeliveryLogRepository
from syncflow_dagster.store.events import StageEventRepository
from syncflow_dagster.store.failures import FailureRepository
from syncflow_dagster.store.pending import PendingRepository
from syncflow_dagster.store.read_marks import ReadMarkRepository
from syncflow_dagster.store.state import StateRepository


class SyncStore(Protocol):
    """SyncFlow's Postgres state (schema `syncflow`), as the stages and ops use it."""

    @property
    def engine(self) -> sa.Engine: ...

    def state(self) -> StateRepository: ...

    def batches(self) -> BatchRepository: ...

    def failures(self) -> FailureRepository: ...

    def pending(self) -> PendingRepository: ...

    def delivery_log(self) -> DeliveryLogRepository: ...

    def read_marks(self) -> ReadMarkRepository: ...

    def events(self) -> StageEventRepository: ...

    def entity_lock(self, entity: str, timeout_s: float = 300.0) -> AbstractContextManager[None]:
        """Hold the entity's advisory lock (`store.locks.entity_lock`) for the block."""
        ...
