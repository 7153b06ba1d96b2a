"""Sync runs: start them (one Dagster run of job `sync` per entity, parents first), list, follow, cancel."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, HTTPException, Query, status

from syncflow_dagster.service import launch
from syncflow_dagster.service import models as m
from syncflow_dagster.service.dependencies import CatalogDep, Gateway, RunId, Store, dagster_call
from syncflow_dagster.service.store_views import BATCH_METRICS, BatchView, batches_of_run, batches_page

router = APIRouter(tags=["sync"])


@router.post(
    "/sync",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=m.SyncStarted,
    responses={
        409: {"model": m.Problem, "description": "Dagster refused every run of the request"},
        422: {
            "description": "an unknown entity, a date outside the partitions (`detail` names the "
            "valid range), or a malformed body (FastAPI's list of field errors)",
            "content": {
                "application/json": {
                    "schema": {
                        "anyOf": [
                            {"$ref": "#/components/schemas/Problem"},
                            {"$ref": "#/components/schemas/HTTPValidationError"},
                        ]
                    }
                }
            },
        },
    },
)
def start_sync(request: m.SyncRequest, catalog: CatalogDep, gateway: Gateway) -> m.SyncStarted:
    """Start one Dagster run of job `sync` per entity (parents first), over one date, a date range
    or the whole history; 202 with every run launched and every run that could not be."""
    wanted = launch.SyncRequest(
        entities=request.entities,
        date=request.date,
        dates=(request.dates.start, request.dates.end) if request.dates else None,
        history=request.history,
        full_window=request.full_window,
        resync=request.resync,
        trigger="api",
    )
    try:
        plan_id, planned = launch.plan_sync(catalog, wanted)
    except launch.SyncRefused as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=str(exc)) from None
    outcome = launch.launch(gateway, plan_id, planned)
    if not outcome.launched:
        # Nothing to lose: the caller retries the whole request.
        reasons = "; ".join(f"{n.entity}: {n.reason}" for n in outcome.not_launched)
        unavailable = any(n.unavailable for n in outcome.not_launched)
        code = status.HTTP_503_SERVICE_UNAVAILABLE if unavailable else status.HTTP_409_CONFLICT
        raise HTTPException(code, detail=f"start sync: no run launched: {reasons}"[:2000])
    return m.SyncStarted(
        plan=outcome.plan_id,
        launched=[
            m.StartedRun(entity=r.entity, run_id=r.run_id, dates=_date_range(r.span))
            for r in outcome.launched
        ],
        not_launched=[
            m.RunNotStarted(entity=n.entity, dates=_date_range(n.span), reason=n.reason)
            for n in outcome.not_launched
        ],
    )


@router.get("/sync", response_model=m.SyncList)
def list_syncs(
    engine: Store,
    entity: Annotated[m.StoreText | None, Query(max_length=63)] = None,
    batch_status: Annotated[
        Literal["running", "succeeded", "failed", "cancelled"] | None, Query(alias="status")
    ] = None,
    kind: Annotated[Literal["sync", "retry", "reconcile"] | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
) -> m.SyncList:
    """Recent batches, newest first (syncs, retries and reconciles), each with its run id and its stages
    as far as they got; filtered by entity, status and kind."""
    with engine.connect() as conn:
        page = batches_page(conn, entity=entity, status=batch_status, kind=kind, limit=limit, offset=offset)
    return m.SyncList(
        total=page.total, limit=limit, offset=offset, items=[_batch_metrics(b) for b in page.items]
    )


@router.get("/sync/{run_id}", response_model=m.RunStatus, responses={404: {"model": m.Problem}})
def sync_status(run_id: RunId, engine: Store, gateway: Gateway) -> m.RunStatus:
    """The run's Dagster status and the metrics of every batch it wrote (a re-execution: its lineage's),
    with each stage's counts and seconds as it finishes; a failed or cancelled run's up to where it stopped."""
    run = dagster_call("run status", gateway.run, run_id)
    with engine.connect() as conn:
        batches = batches_of_run(conn, run.batch_run_id)
    return m.RunStatus(
        run_id=run.run_id,
        status=run.status,
        job=run.job_name,
        started_at=run.started_at,
        ended_at=run.ended_at,
        partition=run.tags.get("dagster/partition"),
        batches=[_batch_metrics(b) for b in batches],
    )


@router.post(
    "/sync/{run_id}/cancel",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=m.CancelAccepted,
    responses={404: {"model": m.Problem}, 409: {"model": m.Problem}},
)
def cancel_sync(run_id: RunId, gateway: Gateway) -> m.CancelAccepted:
    """Ask Dagster to terminate the run (queued runs are canceled at once)."""
    dagster_call("cancel run", gateway.cancel, run_id)
    return m.CancelAccepted(run_id=run_id)


def _date_range(span: launch.DateSpan) -> m.DateRange:
    return m.DateRange(start=span.first, end=span.last)


def _batch_metrics(view: BatchView) -> m.BatchMetrics:
    counts = {name: view.counts.get(name, 0) for name in BATCH_METRICS}
    return m.BatchMetrics(
        batch_id=view.id,
        run_id=view.run_id,
        kind=view.kind,  # type: ignore[arg-type]  # the table's check constraint holds it to the three
        entity=view.entity,
        partition_date=view.partition_date,
        status=view.status,
        started_at=view.started_at,
        finished_at=view.finished_at,
        stage_seconds=view.stage_seconds,
        seconds=view.seconds,
        counts=dict(view.counts),
        stages=[
            m.StageProgress(
                stage=stage.stage,
                status=stage.status,  # type: ignore[arg-type]  # succeeded or failed (_stage_views)
                rows=stage.rows,
                seconds=stage.seconds,
                finished_at=stage.at,
                counts=stage.counts,
                error=stage.error,
            )
            for stage in view.stages
        ],
        **counts,
    )
