"""Prometheus exposition of SyncFlow's state: a custom Collector that reads the store on every scrape.

Nothing is counted in process memory: the numbers come from `sync_batches`,
`failed_records` and `pending_children`, so every replica of the API (and a
restarted one) exposes the same values, and counters only move when a batch
is written. A scrape that cannot reach the database reports
`syncflow_store_up 0` instead of failing the whole exposition.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import sqlalchemy as sa
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from syncflow_dagster.service.store_views import entity_stats
from syncflow_dagster.store.schema import failed_records, sync_batches

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class StoreCollector(Collector):
    """Collects SyncFlow's metrics from Postgres at scrape time."""

    def __init__(self, engine: sa.Engine, entities: list[str] | None = None) -> None:
        self._engine = engine
        self._entities = entities or []

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("syncflow_store_up", "1 when the scrape could read SyncFlow's Postgres.")
        try:
            families = self._families()
        except sa.exc.SQLAlchemyError as exc:
            # The exception text can carry the URL; log its type only.
            log.warning("metrics scrape could not read the store: %s", type(exc).__name__)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families

    def _families(self) -> list[Metric]:
        rows = CounterMetricFamily(
            "syncflow_rows", "Rows per entity and action over all sync batches.", labels=["entity", "action"]
        )
        batches = CounterMetricFamily(
            "syncflow_batches", "Sync batches per entity and status.", labels=["entity", "status"]
        )
        durations = SummaryMetricFamily(
            "syncflow_batch_duration_seconds",
            "Wall time of finished sync batches (finished_at - started_at).",
            labels=["entity"],
        )
        stage_seconds = CounterMetricFamily(
            "syncflow_stage_seconds", "Seconds spent per entity and stage.", labels=["entity", "stage"]
        )
        failed = GaugeMetricFamily(
            "syncflow_failed_records",
            "Open failed records per entity and reason.",
            labels=["entity", "reason"],
        )
        pending = GaugeMetricFamily(
            "syncflow_pending_children", "Children waiting for their parent, per entity.", labels=["entity"]
        )
        last_success = GaugeMetricFamily(
            "syncflow_last_success_timestamp_seconds",
            "Unix time the entity's last successful sync batch finished.",
            labels=["entity"],
        )
        with self._engine.connect() as conn:
            stats = entity_stats(conn, self._entities)
            for name, view in stats.items():
                for action, total in view.totals.items():
                    rows.add_metric([name, action], total)
                pending.add_metric([name], view.pending_children)
                if view.last_success_at is not None:
                    last_success.add_metric([name], view.last_success_at.timestamp())

            by_status = sa.select(sync_batches.c.entity, sync_batches.c.status, sa.func.count()).group_by(
                sync_batches.c.entity, sync_batches.c.status
            )
            for entity, status, n in conn.execute(by_status):
                batches.add_metric([entity, status], n)

            elapsed = sa.func.extract("epoch", sync_batches.c.finished_at - sync_batches.c.started_at)
            timing = (
                sa.select(sync_batches.c.entity, sa.func.count(), sa.func.coalesce(sa.func.sum(elapsed), 0))
                .where(sync_batches.c.finished_at.is_not(None))
                .group_by(sync_batches.c.entity)
            )
            for entity, n, total in conn.execute(timing):
                durations.add_metric([entity], count_value=n, sum_value=float(total))

            kv = (
                sa.func.jsonb_each_text(sync_batches.c.stage_seconds).table_valued("key", "value").alias("kv")
            )
            per_stage = (
                sa.select(sync_batches.c.entity, kv.c.key, sa.func.sum(sa.cast(kv.c.value, sa.Float)))
                .select_from(sync_batches.join(kv, sa.true()))
                .where(kv.c.value.regexp_match(r"^-?[0-9.eE+-]+$"))
                .group_by(sync_batches.c.entity, kv.c.key)
            )
            for entity, stage, total in conn.execute(per_stage):
                stage_seconds.add_metric([entity, stage], float(total))

            open_failed = (
                sa.select(failed_records.c.entity, failed_records.c.reason_code, sa.func.count())
                .where(failed_records.c.resolved_at.is_(None))
                .group_by(failed_records.c.entity, failed_records.c.reason_code)
            )
            for entity, reason, n in conn.execute(open_failed):
                failed.add_metric([entity, reason], n)
        return [rows, batches, durations, stage_seconds, failed, pending, last_success]


def exposition(engine: sa.Engine, entities: list[str] | None = None) -> bytes:
    """The text exposition of one scrape (a fresh registry, so nothing lingers between scrapes)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StoreCollector(engine, entities))
    return generate_latest(registry)
