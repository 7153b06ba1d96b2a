"""Running syncs in-process: one entity × day, or every entity in parent-first order.

Used by the demo, the benchmarks and the tests. Production runs go through the
Dagster daemon (sensors, schedules, backfills); this is the same job executed
in the calling process.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from typing import Any

import dagster as dg

from syncflow_dagster.defs.assets import CATALOG, FULL_WINDOW_TAG, RESYNC_TAG, STAGE_ASSETS
from syncflow_dagster.defs.partitions import sync_partition_key
from syncflow_dagster.engine import stage_table as st


def materialize_sync(
    entity: str,
    day: dt.date,
    *,
    resources: Mapping[str, Any],
    instance: dg.DagsterInstance | None = None,
    raise_on_error: bool = True,
    log_level: str = "INFO",
    full_window: bool = False,
    resync: bool = False,
) -> dg.ExecuteInProcessResult:
    """Materialize the nine stages for one entity × day, in this process.

    `full_window` reads the whole day from APISmith again instead of resuming
    after what the partition's last finished run read; `resync` also delivers
    again what was delivered already (run tag `syncflow/resync=true`).

    `log_level` is the console logger's: the demo passes WARNING so that its
    summary is not buried under Dagster's step events (they are all still in
    the run's event log).
    """
    return dg.materialize(
        [*STAGE_ASSETS],
        partition_key=sync_partition_key(entity, day),
        resources=dict(resources),
        instance=instance,
        raise_on_error=raise_on_error,
        tags={
            "syncflow/entity": entity,
            "syncflow/trigger": "in_process",
            **({FULL_WINDOW_TAG: "true"} if full_window else {}),
            **({RESYNC_TAG: "true"} if resync else {}),
        },
        run_config={"loggers": {"console": {"config": {"log_level": log_level}}}},
    )


def sync_all(
    day: dt.date,
    *,
    resources: Mapping[str, Any],
    instance: dg.DagsterInstance | None = None,
    entities: Iterable[str] | None = None,
    log_level: str = "INFO",
    resync: bool = False,
) -> dict[str, dg.ExecuteInProcessResult]:
    """Every (selected) entity for one day, parents before children."""
    wanted = set(entities) if entities is not None else set(CATALOG.topological_order)
    return {
        name: materialize_sync(
            name, day, resources=resources, instance=instance, log_level=log_level, resync=resync
        )
        for name in CATALOG.topological_order
        if name in wanted
    }


def report_of(result: dg.ExecuteInProcessResult) -> dict[str, Any]:
    """The sync_report asset's metadata of a finished run (counts per action, seconds)."""
    for materialization in result.asset_materializations_for_node(st.REPORT.asset):
        return {k: v.value for k, v in materialization.metadata.items()}
    return {}


__all__ = ["materialize_sync", "report_of", "sync_all"]
