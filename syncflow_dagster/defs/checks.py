"""Asset checks: what must hold after a stage, evaluated on the stage's own frame or on the state store.

Checks that look at a stage's frame run inside that stage (declared with
`check_specs`), because the frame is in hand there and a blocking check on
`delta_plan` then stops a bad plan before anything is delivered. They are
about one partition, so each is declared with the stages' partitions and its
result belongs to the partition the run materialised (`partitioned`).
Freshness is a check of its own that judges the entity of the partition it is
evaluated for (`entity_synced_recently_check`).
"""

import datetime as dt
import warnings
from collections.abc import Mapping
from typing import Any

import dagster as dg
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from dagster import AssetCheckExecutionContext

from syncflow_dagster.defs import bookkeeping
from syncflow_dagster.defs.resources import SyncTuning
from syncflow_dagster.engine import columns as c
from syncflow_dagster.engine import stage_table as st
from syncflow_dagster.engine.delta import UNKNOWN_KEY, key_words
from syncflow_dagster.store.frames.io_manager import partition_scopes
from syncflow_dagster.store.repositories import SyncStore

KEYS_UNIQUE = dg.AssetCheckSpec(
    "business_keys_unique_and_present",
    asset=st.DELTA.asset,
    blocking=True,
    description="Every planned row has a business key and a BK_HASH, and no key is planned twice.",
)
PENDING_AGE = dg.AssetCheckSpec(
    "pending_children_within_age",
    asset=st.PARENT_CHILD.asset,
    description="Counts children waiting for a parent; fails (warn) when any has waited past the allowed age.",
)
DELIVERED_COMMITTED = dg.AssetCheckSpec(
    "delivered_equals_committed",
    asset=st.PERSIST.asset,
    description="Rows ScheduleHub accepted equal rows committed to entity state (upserts and deletes).",
)
NO_FAILED_ROWS = dg.AssetCheckSpec(
    "no_failed_rows",
    asset=st.REPORT.asset,
    description="The run of this partition sent every row it read: warns with the counts when rows were "
    "rejected by normalize or refused by ScheduleHub, and names the command that lists them "
    "(syncflow failed list --entity NAME).",
)
FRESHNESS_DESCRIPTION = (
    "The partition's entity had a successful sync within the last "
    f"{SyncTuning.model_fields['freshness_hours'].default:g} hours (unless the deployment configures "
    "another limit); warns when it did not, with the hours since its last one."
)
# The counts of a batch that are rows SyncFlow could not deliver (sync_report's metadata names).
FAILED_COUNTS = ("rejected", "failed")


def partitioned(spec: dg.AssetCheckSpec, partitions: dg.PartitionsDefinition) -> dg.AssetCheckSpec:
    """`spec` with the stages' partitions: its results belong to the partition the run materialised."""
    with warnings.catch_warnings():
        # Partitioned check specs are a preview in Dagster 1.13; the warning would repeat at every load.
        warnings.simplefilter("ignore", dg.PreviewWarning)
        return dg.AssetCheckSpec(
            spec.name,
            asset=spec.asset_key,
            description=spec.description,
            blocking=spec.blocking,
            partitions_def=partitions,
        )


def business_keys_unique_and_present(plan: pa.Table) -> dg.AssetCheckResult:
    keys = KeyTally()
    keys.add(plan)
    return keys.check()


class KeyTally:
    """The keys check over a plan seen chunk by chunk: missing keys counted, key hashes kept (16 bytes a row)."""

    def __init__(self) -> None:
        self.rows = 0
        self.missing = 0
        self._hashes: list[pa.Array] = []

    def add(self, plan: pa.Table) -> None:
        if not plan.num_rows:
            return
        self.rows += plan.num_rows
        self.missing += plan[c.BK_HASH].null_count + plan[c.BK].null_count
        self._hashes.append(plan[c.BK_HASH].combine_chunks())

    def _first_words_distinct(self) -> bool:
        """No two keys share a first 64-bit word, so none repeats: 8 bytes a row sorted in place.

        `pc.unique` builds a hash table over every key (hundreds of MB at ten
        million keys); it still counts the duplicates exactly when this cannot
        rule them out (a repeated key, a shared first word, a null).
        """
        if any(hashes.null_count for hashes in self._hashes):
            return False
        words = np.concatenate([np.ascontiguousarray(key_words(hashes)[:, 0]) for hashes in self._hashes])
        words.sort()
        return not bool(np.any(words[1:] == words[:-1]))

    def check(self) -> dg.AssetCheckResult:
        duplicates = 0
        if self.rows and not self._first_words_distinct():
            duplicates = self.rows - len(pc.unique(pa.chunked_array(self._hashes)))
        return dg.AssetCheckResult(
            check_name=KEYS_UNIQUE.name,
            passed=self.missing == 0 and duplicates == 0,
            severity=dg.AssetCheckSeverity.ERROR,
            metadata={"rows": self.rows, "missing_keys": self.missing, "duplicate_keys": duplicates},
        )


def pending_children_within_age(
    database: SyncStore, entity: str, max_age_hours: float
) -> dg.AssetCheckResult:
    stats = bookkeeping.pending_stats(database, entity)
    oldest: dt.datetime | None = stats.get("oldest_since")
    age_hours = (dt.datetime.now(dt.UTC) - oldest).total_seconds() / 3600 if oldest else 0.0
    return dg.AssetCheckResult(
        check_name=PENDING_AGE.name,
        passed=age_hours <= max_age_hours,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "pending_children": int(stats.get("count", 0)),
            "oldest_age_hours": round(age_hours, 2),
            "max_age_hours": max_age_hours,
            "by_missing_parent": dg.MetadataValue.json(stats.get("by_parent", {})),
        },
    )


def accepted_changes(delivered: pa.Table) -> tuple[int, int]:
    """(upserts, deletes) ScheduleHub accepted among delivered rows; deletes of keys never stored excluded."""
    if not delivered.num_rows:
        return 0, 0
    accepted = delivered.filter(pc.equal(delivered["_delivery_status"], pa.scalar("accepted")))
    is_delete: Any = pc.equal(accepted[c.ACTION], pa.scalar(c.DELETE))
    upserts = accepted.num_rows - accepted.filter(is_delete).num_rows
    # A delete of a key ScheduleHub never confirmed has no state to remove.
    if c.REASON in accepted.column_names:
        reason: Any = accepted[c.REASON]
        never_stored: Any = pc.fill_null(pc.equal(reason, pa.scalar(UNKNOWN_KEY)), pa.scalar(False))
        is_delete = pc.and_(is_delete, pc.invert(never_stored))
    return upserts, accepted.filter(is_delete).num_rows


def delivered_equals_committed(
    delivered: pa.Table | tuple[int, int], counts: dict[str, int]
) -> dg.AssetCheckResult:
    """`delivered`: the delivered rows, or their `accepted_changes` summed over chunks."""
    accepted_upserts, accepted_deletes = (
        delivered if isinstance(delivered, tuple) else accepted_changes(delivered)
    )
    committed = int(counts.get("committed", 0))
    deleted = int(counts.get("deleted_state", 0))
    return dg.AssetCheckResult(
        check_name=DELIVERED_COMMITTED.name,
        # commit_delivered counts the rows it upserted plus the rows it deleted.
        passed=committed == accepted_upserts + accepted_deletes and deleted == accepted_deletes,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={
            "accepted_upserts": accepted_upserts,
            "committed_upserts": committed,
            "accepted_deletes": accepted_deletes,
            "committed_deletes": deleted,
        },
    )


def failed_rows_hint(entity: str) -> str:
    return f"syncflow failed list --entity {entity}"


def no_failed_rows(entity: str, counts: Mapping[str, Any], open_failed: int) -> dg.AssetCheckResult:
    """Warn when the partition's run rejected or failed rows; `counts` are the batch's (sync_report's)."""
    found = {name: int(counts.get(name, 0) or 0) for name in FAILED_COUNTS}
    passed = not any(found.values())
    metadata: dict[str, Any] = {
        "rejected": found["rejected"],
        "failed": found["failed"],
        "open_failed_records": open_failed,
    }
    description = None
    if not passed:
        hint = failed_rows_hint(entity)
        metadata["list_them"] = hint
        description = (
            f"{entity}: {found['rejected']} row(s) rejected by normalize, {found['failed']} refused by "
            f"ScheduleHub in this run; {open_failed} failed record(s) open. List them: {hint}"
        )
    return dg.AssetCheckResult(
        check_name=NO_FAILED_ROWS.name,
        passed=passed,
        severity=dg.AssetCheckSeverity.WARN,
        metadata=metadata,
        description=description,
    )


def entity_synced_recently(database: SyncStore, entity: str, limit_hours: float) -> dg.AssetCheckResult:
    """Whether `entity`'s last successful sync is at most `limit_hours` old."""
    last = bookkeeping.last_success_per_entity(database).get(entity)
    age = round((dt.datetime.now(dt.UTC) - last).total_seconds() / 3600, 2) if last else None
    passed = age is not None and age <= limit_hours
    return dg.AssetCheckResult(
        passed=passed,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "entity": entity,
            "hours_since_last_success": age if age is not None else "never",
            "limit_hours": limit_hours,
        },
        description=None
        if passed
        else (
            f"{entity}: no successful sync yet"
            if age is None
            else f"{entity}: last successful sync {age} hours ago, more than {limit_hours}"
        ),
    )


def entity_synced_recently_check(partitions: dg.PartitionsDefinition) -> dg.AssetChecksDefinition:
    """The freshness check of the partition's entity, evaluated on its own or after a sync's report."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dg.PreviewWarning)

        @dg.asset_check(
            asset=st.REPORT.asset,
            name="entity_synced_recently",
            description=FRESHNESS_DESCRIPTION,
            required_resource_keys={"database", "tuning"},
            partitions_def=partitions,
        )
        def check(context: AssetCheckExecutionContext) -> dg.AssetCheckResult:
            # A single-run backfill covers several entities: each is judged, and only they are.
            limit_hours = float(context.resources.tuning.freshness_hours)
            results = {
                entity: entity_synced_recently(context.resources.database, entity, limit_hours)
                for entity in partition_scopes(context.partition_keys)
            }
            if len(results) == 1:
                return next(iter(results.values()))
            stale = [entity for entity, result in results.items() if not result.passed]
            return dg.AssetCheckResult(
                passed=not stale,
                severity=dg.AssetCheckSeverity.WARN,
                description=f"stale: {', '.join(stale)}" if stale else None,
                metadata={
                    "entities": ", ".join(results),
                    "stale_entities": ", ".join(stale) or "none",
                    "per_entity": dg.MetadataValue.json(
                        {
                            name: {k: getattr(v, "value", v) for k, v in r.metadata.items()}
                            for name, r in results.items()
                        }
                    ),
                },
            )

    return check
