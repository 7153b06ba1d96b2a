"""Partitions: every stage asset is partitioned by entity (from the catalog) × date.

The date dimension is the day a record last changed (UTC), clipped into the
run's dates: the first day also holds everything earlier, and a run of today
holds every change read since the entity's last one (defs/reading.py). Its
first day comes from SYNCFLOW_PARTITIONS_START (default 2025-01-01).
"""

from __future__ import annotations

import datetime as dt
import os

import dagster as dg

from syncflow_dagster.catalog import Catalog

PARTITIONS_START_ENV = "SYNCFLOW_PARTITIONS_START"
DEFAULT_PARTITIONS_START = "2025-01-01"
ENTITY_DIMENSION = "entity"
DATE_DIMENSION = "date"


def partitions_start() -> str:
    value = os.environ.get(PARTITIONS_START_ENV, DEFAULT_PARTITIONS_START)
    try:
        dt.date.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{PARTITIONS_START_ENV}={value!r} is not a date (YYYY-MM-DD)") from None
    return value


def entity_partitions(catalog: Catalog) -> dg.StaticPartitionsDefinition:
    return dg.StaticPartitionsDefinition(list(catalog.topological_order))


def sync_partitions(catalog: Catalog) -> dg.MultiPartitionsDefinition:
    """entity × date; Dagster tags runs with dagster/partition/entity, which the
    run queue uses to allow one run per entity at a time (dagster.yaml)."""
    return dg.MultiPartitionsDefinition(
        {
            ENTITY_DIMENSION: entity_partitions(catalog),
            DATE_DIMENSION: dg.DailyPartitionsDefinition(start_date=partitions_start(), end_offset=1),
        }
    )


def sync_partition_key(entity: str, day: dt.date | str) -> dg.MultiPartitionKey:
    date = day if isinstance(day, str) else day.isoformat()
    return dg.MultiPartitionKey({ENTITY_DIMENSION: entity, DATE_DIMENSION: date})
