"""Request and response bodies of the monitoring & sync API (they make the OpenAPI document)."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field


def _no_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain a NUL character (PostgreSQL text cannot hold one)")
    return value


StoreText = Annotated[str, AfterValidator(_no_nul)]
"""Text a request hands to SyncFlow's store: anything but NUL, which PostgreSQL refuses (a 422 naming
the field or parameter, not the driver's 500). Every text query parameter and request field uses it."""


class DateRange(BaseModel):
    model_config = ConfigDict(extra="forbid")

    start: dt.date = Field(description="First date (UTC), inclusive.")
    end: dt.date = Field(description="Last date (UTC), inclusive.")


class SyncRequest(BaseModel):
    """What to sync: one run per entity, over one date, a date range or the whole history.

    Give at most one of `date`, `dates` and `history`; none means today (UTC).
    Dates must lie between SYNCFLOW_PARTITIONS_START and today (UTC), else 422.
    """

    model_config = ConfigDict(extra="forbid")

    entities: list[StoreText] = Field(
        default_factory=list, max_length=100, description="Catalog entity names; empty means every entity."
    )
    date: dt.date | None = Field(default=None, description="One partition date (UTC day).")
    dates: DateRange | None = Field(
        default=None, description="A range of partition dates: one run per entity covers all of them."
    )
    history: bool = Field(
        default=False,
        description="Every date from SYNCFLOW_PARTITIONS_START to today: a first load, one run per entity.",
    )
    full_window: bool = Field(
        default=False,
        description="Read the dates' whole window from APISmith again (run tag syncflow/full_window=true) "
        "instead of resuming after what the last finished run read.",
    )
    resync: bool = Field(
        default=False,
        description="Deliver again what SyncFlow holds as delivered over these dates (run tag "
        "syncflow/resync=true): the whole window is read and rows already delivered are not skipped. "
        "For a ScheduleHub that lost records; idempotent.",
    )


class StartedRun(BaseModel):
    entity: str
    run_id: str
    dates: DateRange


class RunNotStarted(BaseModel):
    entity: str
    dates: DateRange
    reason: str = Field(description="Why it was not launched (Dagster refused it, or could not be reached).")


class SyncStarted(BaseModel):
    """Every run the request launched and every one it could not, parents first."""

    plan: str = Field(description="The request's plan id: every run carries it as tag syncflow/plan.")
    launched: list[StartedRun]
    not_launched: list[RunNotStarted]


class StageProgress(BaseModel):
    """A stage of a batch that finished (or failed), with what it counted."""

    stage: str
    status: Literal["succeeded", "failed"]
    rows: int | None = Field(description="Rows in the stage's output frame.")
    seconds: float | None
    finished_at: dt.datetime
    counts: dict[str, int]
    error: str | None = Field(default=None, description="Why a failed stage failed (type and message).")


class BatchMetrics(BaseModel):
    """One batch of a run: counts per stage outcome and seconds per stage.

    While the batch runs, and after its run failed or was cancelled, the counts
    are those of the stages that finished (`stages`).
    """

    batch_id: str
    run_id: str | None = Field(description="The run the batch is filed under (the root of a re-execution).")
    kind: Literal["sync", "retry", "reconcile"] = Field(description="The job that wrote the batch.")
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
    insert: int
    update: int
    delete: int
    skip: int
    resync: int
    duplicates: int
    pending: int
    released: int
    delivered: int
    failed: int
    committed: int
    counts: dict[str, int] = Field(
        description="Every count the batch's stages reported, the ones above included (a retry's "
        "`retried`, `gave_up`, ...)."
    )
    stage_seconds: dict[str, float]
    seconds: float
    stages: list[StageProgress] = Field(description="The stages that finished, in order, as they finished.")


class SyncList(BaseModel):
    total: int
    limit: int
    offset: int
    items: list[BatchMetrics]


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
    state: Literal["open", "dead", "delivered", "resolved", "dismissed"] = Field(
        description="open: retried on its schedule (retryable) or waiting for a person (permanent); "
        "dead: gave up after its attempts or age; delivered: ScheduleHub took it; resolved, dismissed: "
        "a person closed it."
    )
    state_at: dt.datetime | None
    state_by: str | None = Field(description="Who closed it or gave it up ('syncflow' when SyncFlow did).")
    state_reason: str | None


class CloseFailedRequest(BaseModel):
    """Which held failed records to close, by whom and why: ids, or an entity with keys or a reason code."""

    model_config = ConfigDict(extra="forbid")

    ids: list[StoreText] = Field(default_factory=list, max_length=1000, description="Failed record ids.")
    entity: StoreText | None = Field(default=None, max_length=63)
    keys: list[StoreText | list[StoreText]] = Field(
        default_factory=list,
        max_length=1000,
        description="Business keys of `entity`: the key text, or a composite key as its parts in key order.",
    )
    reason_code: StoreText | None = Field(
        default=None, max_length=200, description="Every held record of `entity` with this reason code."
    )
    reason: StoreText = Field(min_length=1, max_length=2000, description="Why (kept with the record).")
    by: StoreText = Field(min_length=1, max_length=200, description="Who (kept with the record).")


class FailedClosed(BaseModel):
    closed: int
    items: list[FailedRecord]


class FailedRecordsPage(BaseModel):
    total: int
    limit: int
    offset: int
    items: list[FailedRecord]


class RetryRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    entities: list[StoreText] = Field(
        default_factory=list, max_length=100, description="Empty means every entity."
    )
    include_permanent: bool = Field(
        default=False,
        description="Also retry open permanent failures (they are never retried on a timer).",
    )
    include_dead: bool = Field(default=False, description="Also retry failures that gave up (state `dead`).")


class LaunchedRun(BaseModel):
    run_id: str
    entity: str


class EntityRunNotStarted(BaseModel):
    entity: str
    reason: str = Field(description="Why it was not launched (Dagster refused it, or could not be reached).")


class RunsStarted(BaseModel):
    """One run per entity: every one launched, every one Dagster did not launch, entities with nothing to do
    (the words of POST /sync's answer)."""

    launched: list[LaunchedRun]
    not_launched: list[EntityRunNotStarted]
    nothing_to_do: list[str] = Field(
        default_factory=list, description="Entities asked for that had nothing to retry: no run was started."
    )


class ReconcileRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    entities: list[StoreText] = Field(
        default_factory=list, max_length=100, description="Empty means every entity."
    )
    dry_run: bool = Field(
        default=False, description="Compare keys and report what would be deleted; delete nothing."
    )


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
