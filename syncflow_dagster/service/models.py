"""Request and response bodies of the monitoring & sync API (they make the OpenAPI document)."""

from __future__ import annotations

import datetime as dt
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_RUNS_PER_REQUEST = 200


class SyncRequest(BaseModel):
    """Which partitions to sync: every entity x every date listed."""

    model_config = ConfigDict(extra="forbid")

    entities: list[str] = Field(
        default_factory=list, max_length=100, description="Catalog entity names; empty means every entity."
    )
    dates: list[dt.date] = Field(
        default_factory=list, max_length=366, description="Partition dates (UTC days); empty means today."
    )


class StartedRun(BaseModel):
    run_id: str
    entity: str
    date: dt.date


class SyncStarted(BaseModel):
    runs: list[StartedRun]


class BatchMetrics(BaseModel):
    """One batch of a run: counts per stage outcome and seconds per stage."""

    batch_id: str
    entity: str
    partition_date: dt.date | None
    status: str
    started_at: dt.datetime
    finished_at: dt.datetime | None
    fetched: int
    tombstones: int
    normalized: int
    rejected: int
    stale: int
    inserted: int
    updated: int
    deleted: int
    skipped: int
    duplicates: int
    pending: int
    released: int
    delivered: int
    failed: int
    committed: int
    stage_seconds: dict[str, float]
    seconds: float


class RunStatus(BaseModel):
    run_id: str
    status: str = Field(description="Dagster's run status: QUEUED, STARTED, SUCCESS, FAILURE, CANCELED, ...")
    job: str
    started_at: dt.datetime | None
    ended_at: dt.datetime | None
    partition: str | None
    batches: list[BatchMetrics]


class CancelAccepted(BaseModel):
    run_id: str
    status: Literal["canceling"] = "canceling"


class EntityStats(BaseModel):
    entity: str
    batches: int
    failed_batches: int
    last_batch_status: str | None
    last_batch_at: dt.datetime | None
    last_success_at: dt.datetime | None
    open_failures: int
    pending_children: int
    totals: dict[str, int]


class Stats(BaseModel):
    entities: list[EntityStats]
    overall: EntityStats


class FailedRecord(BaseModel):
    id: str
    entity: str
    bk: str = Field(description="The record's business key (ScheduleHub's external key).")
    reason_code: str
    reason_class: str
    detail: str | None
    attempts: int
    first_failed_at: dt.datetime
    last_failed_at: dt.datetime
    next_retry_at: dt.datetime | None
    resolved_at: dt.datetime | None
    batch_id: str | None


class FailedRecordsPage(BaseModel):
    total: int
    limit: int
    offset: int
    items: list[FailedRecord]


class RetryRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    entities: list[str] = Field(default_factory=list, max_length=100, description="Empty means every entity.")


class RetryStarted(BaseModel):
    run_id: str
    entities: list[str]


class PendingChild(BaseModel):
    id: str
    entity: str
    bk: str
    missing_parent_entity: str
    missing_parent_bk: str
    since: dt.datetime
    batch_id: str | None


class PendingChildrenPage(BaseModel):
    total: int
    limit: int
    offset: int
    items: list[PendingChild]


class DependencyHealth(BaseModel):
    status: Literal["ok", "down", "not_configured"]
    latency_ms: float | None
    detail: str | None = None


class Health(BaseModel):
    status: Literal["ok", "degraded", "down"]
    checks: dict[str, DependencyHealth]


class Problem(BaseModel):
    detail: str
