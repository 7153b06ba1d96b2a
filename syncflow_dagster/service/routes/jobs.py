"""Launch the maintenance jobs, one Dagster run per entity: `retry` (failed records, released children) and `reconcile`."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, status

from syncflow_dagster.service import models as m
from syncflow_dagster.service.dagster_gateway import Launched, Refused
from syncflow_dagster.service.dependencies import CatalogDep, Gateway, Store, known_entities
from syncflow_dagster.service.store_views import entities_with_retry_work

router = APIRouter()


@router.post(
    "/failed-records/retry",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=m.RunsStarted,
    tags=["state"],
    responses={409: {"model": m.Problem}},
)
def retry_failed(
    request: m.RetryRequest, engine: Store, gateway: Gateway, catalog: CatalogDep
) -> m.RunsStarted:
    """Launch the `retry` job, one run per entity with something to retry (failed records due, or
    permanent / dead ones when asked for, and children whose parent arrived); 202 with the runs
    launched, the ones Dagster refused, and the entities that had nothing to retry."""
    names = known_entities(catalog, request.entities, "entities")
    with_work = entities_with_retry_work(
        engine, include_permanent=request.include_permanent, include_dead=request.include_dead
    )
    chosen = [n for n in names if n in with_work]
    launched, refused = gateway.submit_each(
        chosen,
        lambda name: gateway.submit_retry(
            name, include_permanent=request.include_permanent, include_dead=request.include_dead
        ),
    )
    return _runs_started("start retry", launched, refused, [n for n in names if n not in with_work])


@router.post(
    "/reconcile",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=m.RunsStarted,
    tags=["sync"],
    responses={409: {"model": m.Problem}},
)
def reconcile(request: m.ReconcileRequest, gateway: Gateway, catalog: CatalogDep) -> m.RunsStarted:
    """Launch the `reconcile` job (full key scan; deletes from ScheduleHub what APISmith no longer
    has, unless the delete guard blocks it), one run per entity; `dry_run` only reports."""
    names = known_entities(catalog, request.entities, "entities")
    launched, refused = gateway.submit_each(
        names, lambda name: gateway.submit_reconcile(name, dry_run=request.dry_run)
    )
    return _runs_started("start reconcile", launched, refused, [])


def _runs_started(
    what: str, launched: list[Launched], refused: list[Refused], nothing_to_do: list[str]
) -> m.RunsStarted:
    if refused and not launched:
        # Nothing was launched: the answer is the error, as for a single launch.
        code = (
            status.HTTP_503_SERVICE_UNAVAILABLE
            if any(r.unavailable for r in refused)
            else status.HTTP_409_CONFLICT
        )
        detail = "; ".join(f"{r.entity}: {r.detail}" for r in refused)
        raise HTTPException(code, detail=f"{what}: {detail}"[:2000])
    return m.RunsStarted(
        launched=[m.LaunchedRun(run_id=r.run_id, entity=r.entity) for r in launched],
        not_launched=[m.EntityRunNotStarted(entity=r.entity, reason=r.detail) for r in refused],
        nothing_to_do=nothing_to_do,
    )
