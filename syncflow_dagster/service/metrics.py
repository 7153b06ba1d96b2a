"""Prometheus exposition of SyncFlow's state: a custom Collector that reads the store on every scrape.

Nothing is counted in process memory: the numbers come from `sync_batches`,
`stage_events`, `failed_records` and `pending_children`, so every replica of
the API (and a restarted one) exposes the same values. Counters are read from
what only grows (the append-only stage events, a batch's close counters, the
number of batches that succeeded), so they never go down: a batch reopened by
a re-execution does not take back its failed close. What is open now (batches
running, failed records, children waiting) is a gauge. A scrape that cannot reach the database reports
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

from syncflow_dagster.service.store_views import BATCH_METRICS, entity_stats
from syncflow_dagster.store.schema import failed_records, stage_events, sync_batches

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
            "syncflow_rows",
            "Rows per entity and count name, summed over every stage that finished (a re-executed stage "
            "counts again: it did the work again).",
            labels=["entity", "action"],
        )
        batches = CounterMetricFamily(
            "syncflow_batches",
            "Batch closes per entity, kind and status: succeeded once, failed or cancelled each time a run "
            "stopped (a re-execution reopens the batch; the close stays counted).",
            labels=["entity", "kind", "status"],
        )
        running = GaugeMetricFamily(
            "syncflow_batches_running", "Batches open now, per entity and kind.", labels=["entity", "kind"]
        )
        durations = SummaryMetricFamily(
            "syncflow_batch_duration_seconds",
            "Wall time of succeeded batches (finished_at - started_at).",
            labels=["entity"],
        )
        stage_seconds = CounterMetricFamily(
            "syncflow_stage_seconds",
            "Seconds spent per entity and stage, failed attempts included.",
            labels=["entity", "stage"],
        )
        failed = GaugeMetricFamily(
            "syncflow_failed_records",
            "Open failed records per entity and reason (retried on their schedule, or waiting for a person).",
            labels=["entity", "reason"],
        )
        dead = GaugeMetricFamily(
            "syncflow_dead_records",
            "Failed records that gave up after their attempts or age, per entity and reason.",
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
            for (entity, action), total in sorted(rows_by_action(conn, self._entities).items()):
                rows.add_metric([entity, action], total)
            stats = entity_stats(conn, self._entities)
            for name, view in stats.items():
                pending.add_metric([name], view.pending_children)
                if view.last_success_at is not None:
                    last_success.add_metric([name], view.last_success_at.timestamp())

            t = sync_batches
            closes = sa.select(
                t.c.entity,
                t.c.kind,
                sa.func.count().filter(t.c.status == "succeeded"),
                sa.func.coalesce(sa.func.sum(t.c.failed_closes), 0),
                sa.func.coalesce(sa.func.sum(t.c.cancelled_closes), 0),
                sa.func.count().filter(t.c.status == "running"),
            ).group_by(t.c.entity, t.c.kind)
            seen: set[str] = set()
            for entity, kind, succeeded, failed_n, cancelled_n, running_n in conn.execute(closes):
                seen.add(entity)
                batches.add_metric([entity, kind, "succeeded"], succeeded)
                batches.add_metric([entity, kind, "failed"], int(failed_n))
                batches.add_metric([entity, kind, "cancelled"], int(cancelled_n))
                running.add_metric([entity, kind], running_n)
            for entity in self._entities:
                if entity not in seen:  # present with zeros, so dashboards and rate() see it from the start
                    for status in ("succeeded", "failed", "cancelled"):
                        batches.add_metric([entity, "sync", status], 0)
                    running.add_metric([entity, "sync"], 0)

            elapsed = sa.func.extract("epoch", t.c.finished_at - t.c.started_at)
            timing = (
                sa.select(t.c.entity, sa.func.count(), sa.func.coalesce(sa.func.sum(elapsed), 0))
                .where(t.c.status == "succeeded")
                .group_by(t.c.entity)
            )
            for entity, n, total in conn.execute(timing):
                durations.add_metric([entity], count_value=n, sum_value=float(total))

            e = stage_events
            per_stage = (
                sa.select(e.c.entity, e.c.stage, sa.func.sum(e.c.seconds))
                .where(e.c.status.in_(("succeeded", "failed")), e.c.seconds.is_not(None))
                .group_by(e.c.entity, e.c.stage)
            )
            for entity, stage, total in conn.execute(per_stage):
                stage_seconds.add_metric([entity, stage], float(total))

            f = failed_records
            held = (
                sa.select(f.c.entity, f.c.reason_code, f.c.state, sa.func.count())
                .where(f.c.resolved_at.is_(None))
                .group_by(f.c.entity, f.c.reason_code, f.c.state)
            )
            for entity, reason, state, n in conn.execute(held):
                (dead if state == "dead" else failed).add_metric([entity, reason], n)
        return [rows, batches, running, durations, stage_seconds, failed, dead, pending, last_success]


def rows_by_action(conn: sa.Connection, entities: list[str]) -> dict[tuple[str, str], int]:
    """Per entity and count name, the sum over every finished stage event (monotonic: the log is append-only).

    Names are the stage table's, as the stages wrote them; entities of `entities`
    that never synced are present with zeros for the batch metrics.
    """
    e = stage_events
    kv = sa.func.jsonb_each_text(e.c.detail).table_valued("key", "value").alias("kv")
    query = (
        sa.select(e.c.entity, kv.c.key, sa.func.sum(sa.cast(kv.c.value, sa.BigInteger)))
        .select_from(e.join(kv, sa.true()))
        .where(e.c.status == "succeeded", kv.c.value.regexp_match(r"^[0-9]+$"))
        .group_by(e.c.entity, kv.c.key)
    )
    out: dict[tuple[str, str], int] = {(name, action): 0 for name in entities for action in BATCH_METRICS}
    for entity, key, total in conn.execute(query):
        out[(entity, key)] = out.get((entity, key), 0) + int(total)
    return out


def exposition(engine: sa.Engine, entities: list[str] | None = None) -> bytes:
    """The text exposition of one scrape (a fresh registry, so nothing lingers between scrapes)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StoreCollector(engine, entities))
    return generate_latest(registry)
