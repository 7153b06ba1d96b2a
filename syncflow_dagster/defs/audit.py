"""The target audit: ScheduleHub's keys and data hashes against SyncFlow's committed state, and its repair.

SyncFlow's state (store/state.py) says what ScheduleHub confirmed, key by key,
with the DATA_HASH of what was sent. A ScheduleHub that lost records (restored
from a backup, a stand-in started empty) no longer matches it, and an
incremental sync never notices: it skips what it delivered already. The audit
reads every record of each entity's resource back from ScheduleHub, re-derives
its DATA_HASH by normalising the record's attributes with the entity's catalog
fields (the same recipe as a sync's identity stage), and sorts the keys into
missing, extra and differing (engine/drift.py). With `repair: true` it reads
the entity from APISmith and delivers the missing and differing records again,
parents before children, then commits what ScheduleHub confirmed; extra records
are only reported (the reconcile job and the source decide deletes).

It is the asset check `target_matches_state`, run by the job `target_audit`,
on `schedulehub_records`: an external asset that stands for what ScheduleHub
holds (downstream of `committed`; SyncFlow never materialises it). A check on
a stage asset would run with every sync and every materialisation from the
UI, reading all of ScheduleHub each time.
"""

import time
from collections.abc import Callable
from typing import Any

import dagster as dg
import pyarrow as pa
import pyarrow.compute as pc
from dagster import AssetCheckExecutionContext
from pydantic import Field

from syncflow_dagster.catalog import EntitySpec
from syncflow_dagster.clients.apismith import ApiSmithClient
from syncflow_dagster.clients.schedulehub import WIRE_REF_PREFIX, ScheduleHubClient, canonical_attribute
from syncflow_dagster.defs import bookkeeping, pipeline, stages
from syncflow_dagster.defs.maintenance import EntitiesConfig
from syncflow_dagster.engine import columns as c
from syncflow_dagster.engine import stage_table as st
from syncflow_dagster.engine.chunks import DEFAULT_CHUNK_SIZE
from syncflow_dagster.engine.delta import dedupe_batch
from syncflow_dagster.engine.drift import TargetDrift, compare_target
from syncflow_dagster.engine.identity import add_identity, key_hash_of
from syncflow_dagster.engine.normalize import normalize
from syncflow_dagster.store.repositories import SyncStore

AUDIT_CHECK = "target_matches_state"
SCHEDULEHUB_RECORDS = dg.AssetSpec(
    "schedulehub_records",
    deps=[st.PERSIST.asset],
    description="The records ScheduleHub holds, as it answers GET /v1/resources/{resource}/records. "
    "SyncFlow never materialises it: the target_audit job checks it against SyncFlow's committed state.",
    group_name="target",
    kinds={"schedulehub"},
)
# What a repaired row's plan says, for the delivery log and `syncflow trace`.
MISSING_IN_TARGET = "missing_in_target"
DIFFERS_IN_TARGET = "differs_in_target"
_NO_CHANGE_TIME = pa.scalar("1970-01-01T00:00:00+00:00", pa.string())
SAMPLE_KEYS = 10


class AuditConfig(EntitiesConfig):
    repair: bool = Field(
        default=False,
        description="Deliver again the records ScheduleHub is missing or holds with other data (read "
        "from APISmith); extra records are only reported.",
    )


# -- the target's side -----------------------------------------------------------------------------


def target_identity(entity: EntitySpec, records: pa.Table, size: int = DEFAULT_CHUNK_SIZE) -> pa.Table:
    """(`_bk_hash`, `_bk`, `_data_hash`) of ScheduleHub's records of `entity`.

    The external key is SyncFlow's `_bk`; the data hash is re-derived from the
    attributes through the entity's own normalisation, so a record holds the
    same hash as the row that was delivered. A record whose attributes do not
    normalise gets a null hash (it then counts as differing).
    """
    keys = records.column("external_key").cast(pa.string()).combine_chunks()
    n = records.num_rows
    as_source: dict[str, Any] = {}
    for spec in entity.fields:
        if spec.target in records.column_names and not spec.target.startswith(WIRE_REF_PREFIX):
            column: Any = records.column(spec.target)
            if not pa.types.is_string(column.type):
                column = pc.cast(canonical_attribute(column), pa.string())
            as_source[spec.source] = column
        else:
            as_source[spec.source] = pa.nulls(n, pa.string())
    as_source[entity.rowversion] = pa.repeat(pa.scalar(1, pa.int64()), n)
    as_source[entity.changed_at] = pa.repeat(_NO_CHANGE_TIME, n)
    typed = add_identity(entity, normalize(entity, pa.table(as_source), size).rows, size)
    positions = pc.index_in(keys, value_set=typed.column(c.BK))
    data_hash: Any = pc.take(typed.column(c.DATA_HASH), positions)
    return pa.table(
        {
            c.BK_HASH: key_hash_of(keys),
            c.BK: keys,
            c.DATA_HASH: data_hash.cast(c.DATA_HASH_TYPE),
        }
    )


async def _read_target(client: ScheduleHubClient, resource: str) -> pa.Table:
    async with client:
        table: pa.Table = await client.read_all(resource)
        return table


def audit_entity(
    database: SyncStore,
    schedulehub_client: ScheduleHubClient,
    entity: EntitySpec,
    size: int = DEFAULT_CHUNK_SIZE,
) -> TargetDrift:
    """Compare ScheduleHub's records of `entity` with the state SyncFlow committed for it."""
    records = stages.run_async(_read_target(schedulehub_client, entity.resource))
    held = database.state().load_state(entity.name, (c.BK_HASH, c.BK, c.DATA_HASH))
    return compare_target(held, target_identity(entity, records, size))


# -- the repair ---------------------------------------------------------------------------------


async def _read_source(client: ApiSmithClient, entity: EntitySpec) -> pa.Table:
    async with client:
        table: pa.Table = await client.fetch_changes(entity.source)
        return table


def source_rows_for(
    apismith_client: ApiSmithClient, entity: EntitySpec, drift: TargetDrift, size: int = DEFAULT_CHUNK_SIZE
) -> pa.Table:
    """APISmith's current rows of the missing and differing keys, shaped as delivery-ready rows."""
    wanted = pa.concat_tables([drift.missing, drift.differing])
    raw = stages.run_async(_read_source(apismith_client, entity))
    rows = add_identity(entity, normalize(entity, stages._as_text(raw), size).rows, size)
    rows = rows.filter(pc.is_in(rows.column(c.BK_HASH), value_set=wanted.column(c.BK_HASH)))
    rows, _ = dedupe_batch(rows)
    is_missing = pc.is_in(rows.column(c.BK_HASH), value_set=drift.missing.column(c.BK_HASH))
    schema = bookkeeping.row_schema(entity)
    rows = rows.append_column(c.ACTION, pa.repeat(pa.scalar(c.UPDATE), rows.num_rows))
    shaped = rows.select(schema.names).cast(schema)
    reason = pc.if_else(is_missing, pa.scalar(MISSING_IN_TARGET), pa.scalar(DIFFERS_IN_TARGET))
    return shaped.append_column(c.REASON, reason)


def repair_entity(
    context: AssetCheckExecutionContext,
    database: SyncStore,
    apismith_client: ApiSmithClient,
    schedulehub: Callable[[], ScheduleHubClient],
    entity: EntitySpec,
    drift: TargetDrift,
    chunk_size: int,
) -> dict[str, int]:
    """Deliver again the missing and differing records of `entity`; the counts of what happened."""
    from syncflow_dagster.defs.assets import CATALOG

    started = time.perf_counter()
    rows = source_rows_for(apismith_client, entity, drift, chunk_size)
    run = context.run
    batch = bookkeeping.batch_for_run(
        database, entity.name, None, run.root_run_id or run.run_id, kind="reconcile"
    )
    # The sync's own stages from parent-child on: parents first, then what ScheduleHub confirmed.
    repair = pipeline.EntityRun(
        CATALOG, entity, database, batch, schedulehub=schedulehub, chunk_size=chunk_size
    )
    wanted = drift.missing.num_rows + drift.differing.num_rows
    _, counts = pipeline.run_batch(
        st.TARGET_REPAIR,
        rows,
        repair,
        {"to_repair": wanted, "not_in_source": wanted - rows.num_rows},
        started,
    )
    return counts


# -- the check and its job ----------------------------------------------------------------------


def _sample(table: pa.Table) -> list[str]:
    return [str(k) for k in table.column(c.BK).slice(0, SAMPLE_KEYS).to_pylist()]


def _audit(context: AssetCheckExecutionContext, config: AuditConfig) -> dg.AssetCheckResult:
    from syncflow_dagster.defs.assets import CATALOG

    resources = context.resources
    names = config.entities or list(CATALOG.topological_order)
    unknown = [n for n in names if n not in CATALOG.by_name]
    if unknown:
        raise dg.Failure(
            f"target_audit: unknown entity {unknown[0]!r}; the catalog has {list(CATALOG.by_name)}"
        )
    report: dict[str, dict[str, Any]] = {}
    unrepaired = extra = 0
    # Parents first: a repaired child needs its parent in ScheduleHub already.
    for name in (n for n in CATALOG.topological_order if n in names):
        entity = CATALOG.entity(name)
        drift = audit_entity(
            resources.database, resources.schedulehub.client(), entity, resources.tuning.chunk_size
        )
        found: dict[str, Any] = {
            "held": drift.held,
            "in_target": drift.target,
            "missing_in_target": drift.missing.num_rows,
            "extra_in_target": drift.extra.num_rows,
            "differing": drift.differing.num_rows,
        }
        for label, table in (
            ("missing", drift.missing),
            ("extra", drift.extra),
            ("differing", drift.differing),
        ):
            if table.num_rows:
                found[f"sample_{label}"] = _sample(table)
        still = drift.missing.num_rows + drift.differing.num_rows
        if config.repair and still:
            counts = repair_entity(
                context,
                resources.database,
                resources.apismith.client(),
                resources.schedulehub.client,
                entity,
                drift,
                resources.tuning.chunk_size,
            )
            found["repaired"] = int(counts.get("delivered", 0))
            found["repair_failed"] = int(counts.get("failed", 0))
            found["repair_pending"] = int(counts.get("pending", 0))
            found["not_in_source"] = int(counts.get("not_in_source", 0))
            still = max(0, still - found["repaired"])
        context.log.info(f"target_audit {name}: {found}")
        report[name] = found
        extra += drift.extra.num_rows
        unrepaired += still
    drifted = sorted(
        name
        for name, found in report.items()
        if found["missing_in_target"] or found["extra_in_target"] or found["differing"]
    )
    summary = (
        "ScheduleHub matches SyncFlow's state"
        if not drifted
        else f"drift in {', '.join(drifted)}"
        + (f"; {unrepaired} record(s) still missing or differing" if unrepaired else "; repaired")
        + (
            ""
            if config.repair or not unrepaired
            else " (run target_audit with repair: true, or syncflow resync)"
        )
    )
    return dg.AssetCheckResult(
        passed=unrepaired == 0 and extra == 0,
        severity=dg.AssetCheckSeverity.ERROR if unrepaired else dg.AssetCheckSeverity.WARN,
        description=summary,
        metadata={
            "repair": config.repair,
            "entities_with_drift": ", ".join(drifted) or "none",
            "missing_in_target": sum(f["missing_in_target"] for f in report.values()),
            "extra_in_target": extra,
            "differing": sum(f["differing"] for f in report.values()),
            "still_missing_or_differing": unrepaired,
            "per_entity": dg.MetadataValue.json(report),
        },
    )


@dg.asset_check(
    asset=SCHEDULEHUB_RECORDS.key,
    name=AUDIT_CHECK,
    description="ScheduleHub holds every record SyncFlow's state says it delivered, with the same data: "
    "lists records missing in ScheduleHub, extra there, or differing, per entity (run by job "
    "target_audit; with repair: true it delivers the missing and differing ones again).",
    required_resource_keys={"database", "apismith", "schedulehub", "tuning"},
    pool="schedulehub",
)
def target_matches_state(context: AssetCheckExecutionContext, config: AuditConfig) -> dg.AssetCheckResult:
    return _audit(context, config)


target_audit_job = dg.define_asset_job(
    name="target_audit",
    selection=dg.AssetSelection.checks(target_matches_state),
    description="Compares ScheduleHub's records of each entity (keys and data hashes) with SyncFlow's "
    "committed state and reports records missing, extra or differing; with repair: true delivers the "
    "missing and differing ones again from APISmith, parents first.",
)
