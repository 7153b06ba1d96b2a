"""Asset checks: what must hold after a stage, evaluated on the stage's own frame or on the state store.

Checks that look at a stage's frame run inside that stage (declared with
`check_specs`), because the frame is in hand there and a blocking check on
`delta_plan` then stops a bad plan before anything is delivered. Freshness
looks across entities and runs on its own schedule.
"""

import datetime as dt
from typing import Any

import dagster as dg
import pyarrow as pa
import pyarrow.compute as pc
from dagster import AssetCheckExecutionContext

from syncflow_dagster.defs import bookkeeping
from syncflow_dagster.engine import columns as c
from syncflow_dagster.engine.delta import UNKNOWN_KEY

KEYS_UNIQUE = dg.AssetCheckSpec(
    "business_keys_unique_and_present",
    asset="delta_plan",
    blocking=True,
    description="Every planned row has a business key and a BK_HASH, and no key is planned twice.",
)
PENDING_AGE = dg.AssetCheckSpec(
    "pending_children_within_age",
    asset="resolved",
    description="Counts children waiting for a parent; fails (warn) when any has waited past the allowed age.",
)
DELIVERED_COMMITTED = dg.AssetCheckSpec(
    "delivered_equals_committed",
    asset="committed",
    description="Rows ScheduleHub accepted equal rows committed to entity state (upserts and deletes).",
)


def business_keys_unique_and_present(plan: pa.Table) -> dg.AssetCheckResult:
    missing = 0
    duplicates = 0
    if plan.num_rows:
        missing = plan[c.BK_HASH].null_count + plan[c.BK].null_count
        duplicates = plan.num_rows - len(pc.unique(plan[c.BK_HASH]))
    return dg.AssetCheckResult(
        check_name=KEYS_UNIQUE.name,
        passed=missing == 0 and duplicates == 0,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={"rows": plan.num_rows, "missing_keys": missing, "duplicate_keys": duplicates},
    )


def pending_children_within_age(database: Any, entity: str, max_age_hours: float) -> dg.AssetCheckResult:
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


def delivered_equals_committed(delivered: pa.Table, counts: dict[str, int]) -> dg.AssetCheckResult:
    accepted_upserts = accepted_deletes = 0
    if delivered.num_rows:
        accepted = delivered.filter(pc.equal(delivered["_delivery_status"], pa.scalar("accepted")))
        is_delete: Any = pc.equal(accepted[c.ACTION], pa.scalar(c.DELETE))
        accepted_upserts = accepted.num_rows - accepted.filter(is_delete).num_rows
        # A delete of a key ScheduleHub never confirmed has no state to remove.
        if c.REASON in accepted.column_names:
            reason: Any = accepted[c.REASON]
            never_stored: Any = pc.fill_null(pc.equal(reason, pa.scalar(UNKNOWN_KEY)), pa.scalar(False))
            is_delete = pc.and_(is_delete, pc.invert(never_stored))
        accepted_deletes = accepted.filter(is_delete).num_rows
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


@dg.asset_check(
    asset="sync_report",
    name="entities_synced_recently",
    description="Every entity's last successful sync is younger than SyncTuning.freshness_hours.",
    required_resource_keys={"database", "tuning"},
)
def entities_synced_recently(context: AssetCheckExecutionContext) -> dg.AssetCheckResult:
    from syncflow_dagster.defs.assets import CATALOG

    database = context.resources.database
    limit_hours = float(context.resources.tuning.freshness_hours)
    last = bookkeeping.last_success_per_entity(database)
    now = dt.datetime.now(dt.UTC)
    ages = {
        name: round((now - last[name]).total_seconds() / 3600, 2) if last.get(name) else None
        for name in CATALOG.topological_order
    }
    stale = sorted(name for name, age in ages.items() if age is None or age > limit_hours)
    return dg.AssetCheckResult(
        passed=not stale,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "stale_entities": ", ".join(stale) or "none",
            "hours_since_last_success": dg.MetadataValue.json(ages),
            "limit_hours": limit_hours,
        },
    )
