"""SyncFlow's state as the store holds it: per-entity stats and the children waiting for a parent."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from syncflow_dagster.service import models as m
from syncflow_dagster.service.dependencies import CatalogDep, Store, entity_order
from syncflow_dagster.service.store_views import EntityStatsView, entity_stats, pending_children_page

router = APIRouter(tags=["state"])


@router.get("/stats", response_model=m.Stats)
def stats(engine: Store, catalog: CatalogDep) -> m.Stats:
    """Per entity (parent-first order) and overall: batches, totals per action, failures, pending."""
    with engine.connect() as conn:
        views = list(entity_stats(conn, entity_order(catalog)).values())
    return m.Stats(entities=[_entity_stats(v) for v in views], overall=_entity_stats(_overall(views)))


@router.get("/pending-children", response_model=m.PendingChildrenPage)
def pending_children(
    engine: Store,
    entity: Annotated[m.StoreText | None, Query(max_length=63)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
) -> m.PendingChildrenPage:
    """Children waiting for their parent in ScheduleHub, longest-waiting first."""
    with engine.connect() as conn:
        page = pending_children_page(conn, entity=entity, limit=limit, offset=offset)
    items = [m.PendingChild.model_validate(item) for item in page.items]
    return m.PendingChildrenPage(total=page.total, limit=limit, offset=offset, items=items)


def _entity_stats(view: EntityStatsView) -> m.EntityStats:
    last = view.last_batch
    return m.EntityStats(
        entity=view.entity,
        batches=view.batches,
        failed_batches=view.failed_batches,
        last_batch_status=last.status if last else None,
        last_batch_at=last.started_at if last else None,
        last_success_at=view.last_success_at,
        open_failures=view.open_failures,
        pending_children=view.pending_children,
        totals=view.totals,
    )


def _overall(views: list[EntityStatsView]) -> EntityStatsView:
    total = EntityStatsView("*")
    for view in views:
        total.batches += view.batches
        total.failed_batches += view.failed_batches
        total.open_failures += view.open_failures
        total.pending_children += view.pending_children
        for key, value in view.totals.items():
            total.totals[key] = total.totals.get(key, 0) + value
        if view.last_success_at and (
            total.last_success_at is None or view.last_success_at > total.last_success_at
        ):
            total.last_success_at = view.last_success_at
        if view.last_batch and (
            total.last_batch is None or view.last_batch.started_at > total.last_batch.started_at
        ):
            total.last_batch = view.last_batch
    return total
