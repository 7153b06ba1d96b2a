"""The tags that say which partitions a sync run covers: one entity × date, or a range of dates.

Shared by everything that launches sync runs (the change sensor here, `POST /sync`
and `syncflow sync` through service/launch.py), so that a range run launched by
either is the run Dagster's single-run backfill would make.
"""

from __future__ import annotations

import datetime as dt

import dagster as dg

from syncflow_dagster.defs.partitions import DATE_DIMENSION, ENTITY_DIMENSION

# Dagster's tags for a run over a range of partitions (what a single-run backfill sets).
RANGE_START_TAG = "dagster/asset_partition_range_start"
RANGE_END_TAG = "dagster/asset_partition_range_end"
# Dagster's tags for a run of one partition (what the UI's Launchpad sets).
PARTITION_TAG = "dagster/partition"


def partition_key(entity: str, day: dt.date) -> str:
    """A sync partition's key as Dagster writes it (dimensions in name order: `date|entity`)."""
    return str(dg.MultiPartitionKey({ENTITY_DIMENSION: entity, DATE_DIMENSION: day.isoformat()}))


def partition_tags(entity: str, first: dt.date, last: dt.date) -> dict[str, str]:
    """The partition tags of one entity's sync run over first..last (one day: a single partition)."""
    if first == last:
        return {
            PARTITION_TAG: partition_key(entity, first),
            f"{PARTITION_TAG}/{ENTITY_DIMENSION}": entity,
            f"{PARTITION_TAG}/{DATE_DIMENSION}": first.isoformat(),
        }
    return {RANGE_START_TAG: partition_key(entity, first), RANGE_END_TAG: partition_key(entity, last)}
