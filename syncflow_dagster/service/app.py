"""The monitoring & sync HTTP API (FastAPI): start and watch Dagster runs, read SyncFlow's state, /metrics.

`create_app()` wires settings, the store engine, the Dagster gateway and the
catalog; every route is a thin translation between HTTP and one of those.
OpenAPI is served at /openapi.json, /docs and /redoc. Run it with
`syncflow serve` (uvicorn).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

import httpx
import sqlalchemy as sa
from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request, Response, status
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials

from syncflow_dagster.catalog import Catalog, default_catalog
from syncflow_dagster.engine.columns import KEY_SEPARATOR
from syncflow_dagster.service import launch
from syncflow_dagster.service import models as m
from syncflow_dagster.service.auth import bearer_scheme, check_bearer
from syncflow_dagster.service.dagster_gateway import (
    DagsterGateway,
    DagsterRefused,
    DagsterUnavailable,
    Launched,
    Refused,
)
from syncflow_dagster.service.metrics import CONTENT_TYPE, exposition
from syncflow_dagster.service.settings import ServiceSettings
from syncflow_dagster.service.store_views import (
    BATCH_METRICS,
    BatchView,
    EntityStatsView,
    batches_of_run,
    batches_page,
    entities_with_retry_work,
    entity_stats,
    failed_records_page,
    pending_children_page,
)
from syncflow_dagster.store.database import make_engine

log = logging.getLogger(__name__)

# What "SyncFlow's database cannot be reached" looks like from SQLAlchemy: no connection,
# a connection lost, or no pooled connection free in time.
_DATABASE_UNAVAILABLE = (sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.TimeoutError)

_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": m.Problem, "description": "missing or wrong bearer token"},
    503: {"model": m.Problem, "description": "a dependency (Dagster, Postgres) is unavailable"},
}


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


# Dagster run ids are UUIDs; anything else is refused (422) before Dagster is asked.
RunId = Annotated[
    str, Path(pattern=r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
]


def create_app(
    settings: ServiceSettings | None = None,
    *,
    catalog: Catalog | None = None,
    engine: sa.Engine | None = None,
    gateway: DagsterGateway | None = None,
) -> FastAPI:
    """The API, from the environment unless its parts are given (tests pass their own)."""
    settings = settings or ServiceSettings()  # type: ignore[call-arg]  # fields come from the environment
    catalog = catalog or default_catalog()
    owned_engine = engine is None
    engine = engine or make_engine(settings.database_url.get_secret_value(), pool_size=4, max_overflow=2)
    gateway = gateway or DagsterGateway(
        settings.dagster_graphql_url, settings.dagster_location, timeout_s=settings.dagster_timeout_s
    )
    entities = list(catalog.topological_order)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        if owned_engine:
            engine.dispose()

    async def authenticated(
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
    ) -> None:
        check_bearer(request, settings, credentials)

    app = FastAPI(
        title="SyncFlow monitoring & sync API",
        version="1.0",
        description="Start syncs as Dagster runs, watch them, and read SyncFlow's state: stats, "
        "failed records, pending children, health and Prometheus metrics. "
        "Send `Authorization: Bearer <SYNCFLOW_API_TOKEN>`.",
        lifespan=lifespan,
        dependencies=[Depends(authenticated)],
        responses=_ERRORS,
    )
    app.state.settings = settings

    async def database_unavailable(request: Request, exc: Exception) -> JSONResponse:
        """503 as documented, not a bare 500; the exception's text (which can name the
        server) stays out of the answer and the log."""
        log.warning(
            "%s %s: SyncFlow's database is unavailable (%s)",
            request.method,
            request.url.path,
            type(exc).__name__,
        )
        return JSONResponse(
            status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
            content={"detail": f"SyncFlow's database is unavailable ({type(exc).__name__})"},
        )

    for kind in _DATABASE_UNAVAILABLE:
        app.add_exception_handler(kind, database_unavailable)

    app.state.engine = engine
    app.state.gateway = gateway

    def known_entities(names: list[str], field: str) -> list[str]:
        unknown = [n for n in names if n not in catalog.by_name]
        if unknown:
            raise HTTPException(
                status.HTTP_422_UNPROCESSABLE_CONTENT,
                detail=f"{field}: unknown entity {unknown[0]!r}; the catalog has {', '.join(entities)}",
            )
        return [n for n in entities if n in names] or ([] if names else entities)

    def dagster_call(what: str, call: Any, *args: Any) -> Any:
        try:
            return call(*args)
        except DagsterUnavailable as exc:
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, detail=f"{what}: {exc}") from None
        except DagsterRefused as exc:
            code = status.HTTP_404_NOT_FOUND if "NotFound" in exc.kind else status.HTTP_409_CONFLICT
            raise HTTPException(code, detail=f"{what}: {exc}") from None

    @app.post(
        "/sync",
        status_code=status.HTTP_202_ACCEPTED,
        response_model=m.SyncStarted,
        tags=["sync"],
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
    def start_sync(request: m.SyncRequest) -> m.SyncStarted:
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

    @app.get("/sync", response_model=m.SyncList, tags=["sync"])
    def list_syncs(
        entity: Annotated[str | None, Query(max_length=63)] = None,
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
            page = batches_page(
                conn, entity=entity, status=batch_status, kind=kind, limit=limit, offset=offset
            )
        return m.SyncList(
            total=page.total, limit=limit, offset=offset, items=[_batch_metrics(b) for b in page.items]
        )

    @app.get(
        "/sync/{run_id}", response_model=m.RunStatus, tags=["sync"], responses={404: {"model": m.Problem}}
    )
    def sync_status(run_id: RunId) -> m.RunStatus:
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

    @app.post(
        "/sync/{run_id}/cancel",
        status_code=status.HTTP_202_ACCEPTED,
        response_model=m.CancelAccepted,
        tags=["sync"],
        responses={404: {"model": m.Problem}, 409: {"model": m.Problem}},
    )
    def cancel_sync(run_id: RunId) -> m.CancelAccepted:
        """Ask Dagster to terminate the run (queued runs are canceled at once)."""
        dagster_call("cancel run", gateway.cancel, run_id)
        return m.CancelAccepted(run_id=run_id)

    @app.get("/stats", response_model=m.Stats, tags=["state"])
    def stats() -> m.Stats:
        """Per entity (parent-first order) and overall: batches, totals per action, failures, pending."""
        with engine.connect() as conn:
            views = list(entity_stats(conn, entities).values())
        return m.Stats(entities=[_entity_stats(v) for v in views], overall=_entity_stats(_overall(views)))

    @app.get("/failed-records", response_model=m.FailedRecordsPage, tags=["state"])
    def failed_records(
        entity: Annotated[str | None, Query(max_length=63)] = None,
        reason: Annotated[
            str | None, Query(max_length=200, description="reason_code, e.g. parent_missing")
        ] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
        include_resolved: bool = False,
        state: Annotated[
            Literal["open", "dead", "delivered", "resolved", "dismissed"] | None,
            Query(
                description="Only records in this state (default: open and dead, the ones holding their key)."
            ),
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

    def runs_started(
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

    @app.post(
        "/failed-records/retry",
        status_code=status.HTTP_202_ACCEPTED,
        response_model=m.RunsStarted,
        tags=["state"],
        responses={409: {"model": m.Problem}},
    )
    def retry_failed(request: m.RetryRequest) -> m.RunsStarted:
        """Launch the `retry` job, one run per entity with something to retry (failed records due, or
        permanent / dead ones when asked for, and children whose parent arrived); 202 with the runs
        launched, the ones Dagster refused, and the entities that had nothing to retry."""
        names = known_entities(request.entities, "entities") if request.entities else entities
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
        return runs_started("start retry", launched, refused, [n for n in names if n not in with_work])

    @app.post(
        "/reconcile",
        status_code=status.HTTP_202_ACCEPTED,
        response_model=m.RunsStarted,
        tags=["sync"],
        responses={409: {"model": m.Problem}},
    )
    def reconcile(request: m.ReconcileRequest) -> m.RunsStarted:
        """Launch the `reconcile` job (full key scan; deletes from ScheduleHub what APISmith no longer
        has, unless the delete guard blocks it), one run per entity; `dry_run` only reports."""
        names = known_entities(request.entities, "entities") if request.entities else entities
        launched, refused = gateway.submit_each(
            names, lambda name: gateway.submit_reconcile(name, dry_run=request.dry_run)
        )
        return runs_started("start reconcile", launched, refused, [])

    def close_failed(state: str, request: m.CloseFailedRequest) -> m.FailedClosed:
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
            known_entities([request.entity], "entity")
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

    @app.post("/failed-records/resolve", response_model=m.FailedClosed, tags=["state"])
    def resolve_failed(request: m.CloseFailedRequest) -> m.FailedClosed:
        """Close held failed records as `resolved` (fixed elsewhere, e.g. by hand in ScheduleHub), with who
        and why; they are no longer retried. A later failure of the same key opens a new record."""
        return close_failed("resolved", request)

    @app.post("/failed-records/dismiss", response_model=m.FailedClosed, tags=["state"])
    def dismiss_failed(request: m.CloseFailedRequest) -> m.FailedClosed:
        """Close held failed records as `dismissed` (not worth delivering), with who and why."""
        return close_failed("dismissed", request)

    @app.get("/pending-children", response_model=m.PendingChildrenPage, tags=["state"])
    def pending_children(
        entity: Annotated[str | None, Query(max_length=63)] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
    ) -> m.PendingChildrenPage:
        """Children waiting for their parent in ScheduleHub, longest-waiting first."""
        with engine.connect() as conn:
            page = pending_children_page(conn, entity=entity, limit=limit, offset=offset)
        items = [m.PendingChild.model_validate(item) for item in page.items]
        return m.PendingChildrenPage(total=page.total, limit=limit, offset=offset, items=items)

    @app.get("/health", response_model=m.Health, tags=["operations"], responses={503: {"model": m.Health}})
    def health(response: Response) -> m.Health:
        """Each dependency's status and latency. 503 when SyncFlow's own database is down."""
        checks = {
            "database": _check(lambda: _ping_database(engine)),
            "apismith": _check_http(settings.apismith_base_url, "/health", settings.health_timeout_s),
            "schedulehub": _check_http(
                settings.schedulehub_base_url, "/v1/resources", settings.health_timeout_s
            ),
            "dagster": _check(lambda: gateway.ping()),
        }
        if checks["database"].status != "ok":
            response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
            overall: Literal["ok", "degraded", "down"] = "down"
        else:
            overall = "ok" if all(c.status != "down" for c in checks.values()) else "degraded"
        return m.Health(status=overall, checks=checks)

    @app.get(
        "/metrics",
        tags=["operations"],
        response_class=Response,
        responses={200: {"content": {CONTENT_TYPE: {}}, "description": "Prometheus text exposition"}},
    )
    def metrics() -> Response:
        """Prometheus metrics computed from the store at scrape time."""
        return Response(content=exposition(engine, entities), media_type=CONTENT_TYPE)

    return app


def _date_range(span: launch.DateSpan) -> m.DateRange:
    return m.DateRange(start=span.first, end=span.last)


def _ping_database(engine: sa.Engine) -> None:
    with engine.connect() as conn:
        conn.execute(sa.text("SELECT 1"))


def _check(probe: Any) -> m.DependencyHealth:
    started = time.perf_counter()
    try:
        probe()
    except Exception as exc:  # a health check reports any failure; it must never raise
        return m.DependencyHealth(status="down", latency_ms=_ms(started), detail=f"{type(exc).__name__}")
    return m.DependencyHealth(status="ok", latency_ms=_ms(started))


def _check_http(base_url: str | None, path: str, timeout_s: float) -> m.DependencyHealth:
    """Reachability: any answer below 500 counts as up. ScheduleHub has no health route, and
    its 401 to a token-less request proves it is listening; credentials are checked by runs."""
    if not base_url:
        return m.DependencyHealth(status="not_configured", latency_ms=None)

    def probe() -> None:
        response = httpx.get(f"{base_url.rstrip('/')}{path}", timeout=timeout_s)
        if response.status_code >= 500:
            raise RuntimeError(f"HTTP {response.status_code}")

    return _check(probe)


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 2)
