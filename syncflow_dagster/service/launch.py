"""The one launcher of sync runs: what `POST /sync` and `syncflow sync` both call.

Given entities, a date / a date range / the whole history, `full_window` and a
trigger name, `plan_sync` validates the request and builds one run per entity:
a single-partition run for one date, or a range run (Dagster's
`dagster/asset_partition_range_start` / `_end` tags, multi-partition key
strings) for several dates; history is the range [partitions start .. today].
`launch` submits the runs through the Dagster gateway in the catalog's
topological order (parents first) and returns both lists: what it launched
(entity, run id, dates) and what it could not (entity, reason). A failure of
one launch never loses the ids already launched.

Dates are validated at the door: a date before SYNCFLOW_PARTITIONS_START or
after today (UTC) is refused with the valid range, before Dagster is asked
(Dagster would queue it and fail it three times, or "succeed" on a future day).
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from syncflow_dagster.catalog import Catalog
from syncflow_dagster.defs.assets import FULL_WINDOW_TAG, RESYNC_TAG
from syncflow_dagster.defs.partitions import partitions_start
from syncflow_dagster.defs.run_tags import partition_tags
from syncflow_dagster.service.dagster_gateway import DagsterRefused, DagsterUnavailable

# Tags every launched sync run carries (the run queue's per-entity limit keys on ENTITY_TAG).
ENTITY_TAG = "syncflow/entity"
TRIGGER_TAG = "syncflow/trigger"
PLAN_TAG = "syncflow/plan"


class SyncRefused(ValueError):
    """The request cannot be run as asked; the message names what and the valid values (HTTP 422)."""


@dataclass(frozen=True)
class DateSpan:
    """The dates a request covers: one day, or first..last inclusive."""

    first: dt.date
    last: dt.date

    @property
    def days(self) -> int:
        return (self.last - self.first).days + 1

    def __str__(self) -> str:
        return self.first.isoformat() if self.first == self.last else f"{self.first}..{self.last}"


@dataclass(frozen=True)
class SyncRequest:
    """What to sync. Exactly one of `date`, `dates` or `history` may be given; none means today (UTC)."""

    entities: Sequence[str] = ()
    date: dt.date | None = None
    dates: tuple[dt.date, dt.date] | None = None
    history: bool = False
    full_window: bool = False
    # Deliver again what SyncFlow holds as delivered (run tag syncflow/resync=true).
    resync: bool = False
    trigger: str = "api"


@dataclass(frozen=True)
class PlannedRun:
    entity: str
    span: DateSpan
    tags: dict[str, str]


@dataclass(frozen=True)
class LaunchedRun:
    entity: str
    run_id: str
    span: DateSpan


@dataclass(frozen=True)
class NotLaunched:
    entity: str
    span: DateSpan
    reason: str
    # True when Dagster could not be reached (HTTP 503), False when it refused the run (409).
    unavailable: bool = False


@dataclass
class LaunchOutcome:
    plan_id: str
    launched: list[LaunchedRun] = field(default_factory=list)
    not_launched: list[NotLaunched] = field(default_factory=list)


class SyncSubmitter(Protocol):
    """What the launcher needs of the Dagster gateway: submit the sync job with these tags."""

    def submit_sync_run(self, tags: dict[str, str]) -> str: ...


def valid_dates(today: dt.date | None = None) -> DateSpan:
    """The dates a sync may be asked for: SYNCFLOW_PARTITIONS_START .. today (UTC)."""
    return DateSpan(dt.date.fromisoformat(partitions_start()), today or utc_today())


def utc_today() -> dt.date:
    return dt.datetime.now(dt.UTC).date()


def requested_span(request: SyncRequest, valid: DateSpan) -> DateSpan:
    """The request's dates, checked against `valid`; a refusal names the valid range."""
    given = sum(x is not None and x is not False for x in (request.date, request.dates, request.history))
    if given > 1:
        raise SyncRefused("give one of date, dates or history, not several")
    if request.history:
        return valid
    if request.dates is not None:
        first, last = request.dates
        if first > last:
            raise SyncRefused(f"dates: {first}..{last} ends before it starts")
        span = DateSpan(first, last)
    else:
        day = request.date or valid.last
        span = DateSpan(day, day)
    outside = [d for d in (span.first, span.last) if not valid.first <= d <= valid.last]
    if outside:
        raise SyncRefused(
            f"date {outside[0].isoformat()} is outside the partitions: valid dates are "
            f"{valid.first.isoformat()} (SYNCFLOW_PARTITIONS_START) to {valid.last.isoformat()} (today, UTC)"
        )
    return span


def requested_entities(catalog: Catalog, names: Sequence[str]) -> list[str]:
    """The named entities (empty: all) in the catalog's topological order; an unknown name is refused."""
    order = list(catalog.topological_order)
    unknown = [n for n in names if n not in catalog.by_name]
    if unknown:
        raise SyncRefused(f"unknown entity {unknown[0]!r}; the catalog has {', '.join(order)}")
    wanted = set(names)
    return [n for n in order if n in wanted] if wanted else order


def run_tags(
    entity: str, span: DateSpan, *, plan_id: str, trigger: str, full_window: bool, resync: bool = False
) -> dict[str, str]:
    """The tags of one entity's sync run over `span`."""
    tags = {ENTITY_TAG: entity, TRIGGER_TAG: trigger, PLAN_TAG: plan_id}
    tags.update(partition_tags(entity, span.first, span.last))
    if full_window:
        tags[FULL_WINDOW_TAG] = "true"
    if resync:
        tags[RESYNC_TAG] = "true"
    return tags


def plan_sync(
    catalog: Catalog, request: SyncRequest, *, today: dt.date | None = None, plan_id: str | None = None
) -> tuple[str, list[PlannedRun]]:
    """Validate `request` and build its runs, parents first. Raises SyncRefused."""
    if not request.trigger or len(request.trigger) > 63:
        raise SyncRefused(f"trigger: {request.trigger!r} must be 1 to 63 characters")
    span = requested_span(request, valid_dates(today))
    names = requested_entities(catalog, request.entities)
    plan = plan_id or str(uuid.uuid4())
    runs = [
        PlannedRun(
            name,
            span,
            run_tags(
                name,
                span,
                plan_id=plan,
                trigger=request.trigger,
                full_window=request.full_window,
                resync=request.resync,
            ),
        )
        for name in names
    ]
    return plan, runs


def launch(gateway: SyncSubmitter, plan_id: str, runs: Sequence[PlannedRun]) -> LaunchOutcome:
    """Submit `runs` in order; every run ends in exactly one of the two lists.

    A refusal of one run (Dagster said no) does not stop the others. When Dagster
    cannot be reached, the runs not yet submitted are reported as not launched
    with that reason rather than each waiting out the timeout again.
    """
    outcome = LaunchOutcome(plan_id)
    unavailable: str | None = None
    for run in runs:
        if unavailable is not None:
            outcome.not_launched.append(
                NotLaunched(run.entity, run.span, f"not submitted: {unavailable}", unavailable=True)
            )
            continue
        try:
            run_id = gateway.submit_sync_run(run.tags)
        except DagsterUnavailable as exc:
            unavailable = f"Dagster unavailable ({exc})"
            outcome.not_launched.append(NotLaunched(run.entity, run.span, unavailable, unavailable=True))
        except DagsterRefused as exc:
            outcome.not_launched.append(NotLaunched(run.entity, run.span, f"Dagster refused: {exc}"))
        else:
            outcome.launched.append(LaunchedRun(run.entity, run_id, run.span))
    return outcome


def plan_and_launch(gateway: SyncSubmitter, catalog: Catalog, request: SyncRequest) -> LaunchOutcome:
    """`plan_sync` then `launch`: what POST /sync and `syncflow sync` do."""
    plan_id, runs = plan_sync(catalog, request)
    return launch(gateway, plan_id, runs)
