"""Jobs: sync (the nine stages), reconcile (full key scan), retry (failed records and released children)."""

from __future__ import annotations

import dagster as dg

from syncflow_dagster.defs.assets import GROUP
from syncflow_dagster.defs.maintenance import prune_stage_frames, reconcile_entities, retry_failed_and_pending

# A run that fails is retried from the failed step (the stages before it are
# stored by the frame IO manager), twice at most.
RUN_RETRY_TAGS = {"dagster/max_retries": "2", "dagster/retry_strategy": "FROM_FAILURE"}
# The tag the run queue's per-entity limit keys on (dagster.yaml).
ENTITY_TAG = "syncflow/entity"

sync_job = dg.define_asset_job(
    name="sync",
    selection=dg.AssetSelection.groups(GROUP),
    description="Fetch → normalize → identity → rowversion → delta → parent-child → deliver → persist → report, "
    "for one entity × date partition, or a range of them (a backfill run may cover several entities, "
    "parents first).",
    tags=RUN_RETRY_TAGS,
)


@dg.job(
    name="reconcile",
    description="Full key scan: deletes from ScheduleHub what APISmith no longer has, unless the share to delete "
    "exceeds the entity's delete guard (then it reports and deletes nothing). Beside it, not after it, an "
    "independent op prunes old stage frames and delivery-log rows.",
    tags=RUN_RETRY_TAGS,
)
def reconcile_job() -> None:
    reconcile_entities()
    prune_stage_frames()


@dg.job(
    name="retry",
    description="Redelivers failed records that are due (exponential backoff by attempt) and children whose "
    "parents have arrived, then commits what ScheduleHub confirmed.",
    tags=RUN_RETRY_TAGS,
)
def retry_job() -> None:
    retry_failed_and_pending()


def entity_run_tags(entity: str, trigger: str) -> dict[str, str]:
    """Tags of a retry or reconcile run of one entity: `syncflow/entity` puts it under the same
    one-run-per-entity limit as the entity's syncs; `syncflow/trigger` says who started it."""
    return {ENTITY_TAG: entity, "syncflow/trigger": trigger}


__all__ = [
    "ENTITY_TAG",
    "entity_run_tags",
    "reconcile_job",
    "retry_job",
    "sync_job",
]
