"""The one table of the nine sync stages: each stage's name, asset key, stage function, description and counts.

Everything that names a stage or a count derives it from here: the Dagster
assets (`defs/assets.py`: asset key, description), the stage events written to
Postgres and the sync report (the stage's name, the counts it reports), the
service API and the Prometheus metrics (`service/`), the CLI and
docs/architecture.md (checked by a test against this table).

A stage has one name (`Stage.name`, the product brief's: fetch, normalize, ...)
in events, the API, the metrics, the report and the logs; its asset key
(`Stage.asset`: extracted, normalized, ...) is the name of the Dagster asset that
materialises it, kept as it was because users' Dagster history lives under it.

It lives beside the engine's column names (the delta stage's counts are its
actions, `columns.ACTIONS`) and imports nothing else, so the store, the service
and the CLI read it without loading Dagster.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from syncflow_dagster.engine import columns as c


@dataclass(frozen=True)
class Stage:
    """One stage of a sync.

    `counts` are the counts a batch reports in its own columns (the report, the
    API's batch metrics, `syncflow status`); `detail_counts` the stage's other
    counts, kept in the stage event and a batch's `counts` only.
    """

    number: int
    name: str
    asset: str
    # The stage's per-chunk kernel as `module.function` of defs/ (None: the report's is the batch close).
    function: str | None
    description: str
    counts: tuple[str, ...] = ()
    detail_counts: tuple[str, ...] = ()

    @property
    def reports(self) -> tuple[str, ...]:
        """Every count name the stage's event may carry."""
        return self.counts + self.detail_counts

    @property
    def title(self) -> str:
        """`3 · identity`: how the stage is numbered and named in the UI and the docs."""
        return f"{self.number} · {self.name}"


FETCH = Stage(
    1,
    "fetch",
    "extracted",
    "stages.fetch_stage",
    "the entity's APISmith records and tombstones (`_deleted`), keyset-paged by rowversion. A run of today "
    "reads everything newer than the entity's read-through mark, whatever its change time; a run of past "
    "days reads the records that changed on them (the first day also holds everything earlier). Raw source "
    "columns, as text.",
    counts=("fetched", "tombstones"),
)
NORMALIZE = Stage(
    2,
    "normalize",
    "normalized",
    "stages.normalize_stage",
    "field mapping and the layered coercions the catalog declares (type, string, numeric, datetime). Rows "
    "with a value that cannot be coerced become failed records naming entity, key, field, value.",
    counts=("normalized", "rejected"),
    detail_counts=("rejected_values",),
)
IDENTITY = Stage(
    3,
    "identity",
    "identified",
    "stages.identity_stage",
    "BK_HASH = xxHash3-128 of the canonical business key, DATA_HASH = BLAKE3 of the canonical payload "
    "(recipe and test vectors in docs/identity.md).",
    detail_counts=("identified",),
)
ROWVERSION = Stage(
    4,
    "rowversion",
    "fresh_rows",
    "stages.rowversion_stage",
    "rows whose source rowversion is not newer than the delivered one are dropped before any hash compare; "
    "the incremental path's cost scales with the rows changed, not the entity's size.",
    counts=("stale",),
    detail_counts=("fresh",),
)
DELTA = Stage(
    5,
    "delta",
    "delta_plan",
    "stages.delta_stage",
    "insert / update / delete per business key against the last DELIVERED data hash (A→B→A is an update); "
    "duplicates in a batch resolve to the highest rowversion. Skips are counted, not kept.",
    # One count per planned action, named as the action (`_action` in the frame).
    counts=(*c.ACTIONS, "resync", "duplicates"),
)
PARENT_CHILD = Stage(
    6,
    "parent_child",
    "resolved",
    "parents.resolve_parents",
    "rows whose parent ScheduleHub does not have yet wait in pending_children; children parked earlier whose "
    "parents have since arrived are released into this frame. In a run over several entities, a parent this "
    "run delivers first counts as arrived.",
    counts=("pending", "released"),
    detail_counts=("ready", "failed_parent_missing_kept", "held_deleted_at_source"),
)
DELIVER = Stage(
    7,
    "deliver",
    "delivered",
    "stages.deliver_stage",
    "batched, idempotent upserts and deletes by external key to ScheduleHub; every row comes back accepted "
    "(with its ScheduleHub id) or rejected with a reason code.",
    counts=("delivered", "failed"),
)
PERSIST = Stage(
    8,
    "persist",
    "committed",
    "commits.persist_stage",
    "entity state is committed only for rows ScheduleHub confirmed; rejected rows become failed records with "
    "their reason and a retry time. Serialised per entity by an advisory lock.",
    counts=("committed",),
    detail_counts=("deleted_state", "deleted_never_stored", "failed_recorded", "failed_parent_missing"),
)
REPORT = Stage(
    9,
    "report",
    "sync_report",
    None,
    "the batch's counts per action and stage timings, written to sync_batches and shown here; the "
    "monitoring API and /metrics read the same rows.",
)

STAGES: tuple[Stage, ...] = (
    FETCH,
    NORMALIZE,
    IDENTITY,
    ROWVERSION,
    DELTA,
    PARENT_CHILD,
    DELIVER,
    PERSIST,
    REPORT,
)
BY_NAME: Mapping[str, Stage] = {stage.name: stage for stage in STAGES}
BY_ASSET: Mapping[str, Stage] = {stage.asset: stage for stage in STAGES}

# The counts a batch reports in columns of their own, in the order people read them:
# the report's metadata and frame, the API's batch metrics, the metrics' zeros.
BATCH_COUNTS: tuple[str, ...] = tuple(name for stage in STAGES for name in stage.counts)


@dataclass(frozen=True)
class JobEvent:
    """A stage event the retry, reconcile and repair jobs write: one per batch, with the counts of the
    sync stages it ran (parent-child, deliver, persist) and its own."""

    name: str
    own_counts: tuple[str, ...]
    stages: tuple[Stage, ...]

    @property
    def reports(self) -> tuple[str, ...]:
        return self.own_counts + tuple(name for stage in self.stages for name in stage.reports)


RETRY = JobEvent("retry", ("retried", "expired_pending", "gave_up"), (PARENT_CHILD, DELIVER, PERSIST))
# A reconcile's deletes count under the delta stage's name (`delete`), so a status over both kinds adds them up.
RECONCILE = JobEvent("reconcile", (c.DELETE,), (DELIVER, PERSIST))
TARGET_REPAIR = JobEvent("target_repair", ("to_repair", "not_in_source"), (PARENT_CHILD, DELIVER, PERSIST))
JOB_EVENTS: tuple[JobEvent, ...] = (RETRY, RECONCILE, TARGET_REPAIR)

# Every count name a stage event may carry, and who reports it.
EVENT_COUNTS: Mapping[str, tuple[str, ...]] = {
    **{stage.name: stage.reports for stage in STAGES},
    **{job.name: job.reports for job in JOB_EVENTS},
}


def unknown_counts(event: str, counts: Iterable[str]) -> list[str]:
    """The names among `counts` that the table does not list for `event` (a stage or job event name)."""
    allowed = EVENT_COUNTS.get(event)
    if allowed is None:
        return sorted(counts)
    return sorted(set(counts) - set(allowed))


def check_counts(event: str, counts: Iterable[str]) -> None:
    """Refuse a stage event whose name or counts the table does not list: one vocabulary, kept."""
    if event not in EVENT_COUNTS:
        raise ValueError(
            f"stage event {event!r} is not in the stage table; the names are {list(EVENT_COUNTS)}"
        )
    unknown = unknown_counts(event, counts)
    if unknown:
        raise ValueError(
            f"stage {event!r} reports counts {unknown} the stage table does not list for it "
            f"({list(EVENT_COUNTS[event])}); add them to engine/stage_table.py"
        )
