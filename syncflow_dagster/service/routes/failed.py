"""Failed records: list the ones holding their key, and close them by hand (resolved or dismissed)."""

from __future__ import annotations

import uuid
from typing import Annotated, Literal

import sqlalchemy as sa
from fastapi import APIRouter, HTTPException, Query, status

from syncflow_dagster.catalog import Catalog
from syncflow_dagster.engine.columns import KEY_SEPARATOR
from syncflow_dagster.service import models as m
from syncflow_dagster.service.dependencies import CatalogDep, Store, known_entities
from syncflow_dagster.service.store_views import failed_records_page

router = APIRouter(tags=["state"])


@router.get("/failed-records", response_model=m.FailedRecordsPage)
def failed_records(
    engine: Store,
    entity: Annotated[m.StoreText | None, Query(max_length=63)] = None,
    reason: Annotated[
        m.StoreText | None, Query(max_length=200, description="reason_code, e.g. parent_missing")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
    include_resolved: bool = False,
    state: Annotated[
        Literal["open", "dead", "delivered", "resolved", "dismissed"] | None,
        Query(description="Only records in this state (default: open and dead, the ones holding their key)."),
    ] = None,
) -> m.FailedRecordsPage:
    """Failed records that hold their key (open and dead; newest first), filtered by entity, reason and state."""
    with engine.connect() as conn:
        page = failed_records_page(
            conn,
            entity=entity,
            reason=reason,
            limit=limit,
            offset=offset,
            include_resolved=include_resolved,
            state=state,
        )
    items = [m.FailedRecord.model_validate(item) for item in page.items]
    return m.FailedRecordsPage(total=page.total, limit=limit, offset=offset, items=items)


@router.post("/failed-records/resolve", response_model=m.FailedClosed)
def resolve_failed(request: m.CloseFailedRequest, engine: Store, catalog: CatalogDep) -> m.FailedClosed:
    """Close held failed records as `resolved` (fixed elsewhere, e.g. by hand in ScheduleHub), with who
    and why; they are no longer retried. A later failure of the same key opens a new record."""
    return _close_failed(engine, catalog, "resolved", request)


@router.post("/failed-records/dismiss", response_model=m.FailedClosed)
def dismiss_failed(request: m.CloseFailedRequest, engine: Store, catalog: CatalogDep) -> m.FailedClosed:
    """Close held failed records as `dismissed` (not worth delivering), with who and why."""
    return _close_failed(engine, catalog, "dismissed", request)


def _close_failed(
    engine: sa.Engine, catalog: Catalog, state: str, request: m.CloseFailedRequest
) -> m.FailedClosed:
    from syncflow_dagster.store.failures import FailureRepository

    ids: list[uuid.UUID] = []
    for text in request.ids:
        try:
            ids.append(uuid.UUID(text))
        except ValueError:
            raise HTTPException(
                status.HTTP_422_UNPROCESSABLE_CONTENT, detail=f"ids: {text!r} is not a failed record id"
            ) from None
    if request.entity is not None:
        known_entities(catalog, [request.entity], "entity")
    keys = [KEY_SEPARATOR.join(k) if isinstance(k, list) else k for k in request.keys]
    if not ids and not (request.entity and (keys or request.reason_code)):
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            detail="choose failed records by `ids`, or by `entity` with `keys` or a `reason_code`",
        )
    try:
        closed = FailureRepository(engine).close_by_person(
            state,
            by=request.by,
            reason=request.reason,
            ids=ids or None,
            entity=request.entity,
            bks=keys or None,
            reason_code=request.reason_code,
        )
    except ValueError as exc:  # a blank `by` or `reason`: the store names the field
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=str(exc)) from None
    items = [
        m.FailedRecord.model_validate(
            {
                **{k: v for k, v in vars(record).items() if k not in ("payload", "bk_hash")},
                "id": str(record.id),
                "batch_id": None if record.batch_id is None else str(record.batch_id),
            }
        )
        for record in closed
    ]
    return m.FailedClosed(closed=len(items), items=items)
