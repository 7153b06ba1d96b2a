"""The monitoring & sync HTTP API (FastAPI): start and watch Dagster runs, read SyncFlow's state, /metrics.

`create_app()` puts settings, the store engine, the Dagster gateway and the
catalog on `app.state` and includes the routers of `service/routes/`, whose
routes take what they need through `Depends` (service/dependencies.py); every
route is a thin translation between HTTP and one of those. OpenAPI is served
at /openapi.json, /docs and /redoc. Run it with `syncflow serve` (uvicorn).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import sqlalchemy as sa
from fastapi import Depends, FastAPI, Request, status
from fastapi.responses import JSONResponse

from syncflow_dagster.catalog import Catalog, default_catalog
from syncflow_dagster.service import models as m
from syncflow_dagster.service.dagster_gateway import DagsterGateway
from syncflow_dagster.service.dependencies import authenticated
from syncflow_dagster.service.routes import ROUTERS
from syncflow_dagster.service.settings import ServiceSettings
from syncflow_dagster.store.database import make_engine

log = logging.getLogger(__name__)

# What "SyncFlow's database cannot be reached" looks like from SQLAlchemy: no connection,
# a connection lost, or no pooled connection free in time.
_DATABASE_UNAVAILABLE = (sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.TimeoutError)

_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": m.Problem, "description": "missing or wrong bearer token"},
    503: {"model": m.Problem, "description": "a dependency (Dagster, Postgres) is unavailable"},
}


def create_app(
    settings: ServiceSettings | None = None,
    *,
    catalog: Catalog | None = None,
    engine: sa.Engine | None = None,
    gateway: DagsterGateway | None = None,
) -> FastAPI:
    """The API, from the environment unless its parts are given (tests pass their own)."""
    settings = settings or ServiceSettings()  # type: ignore[call-arg]  # fields come from the environment
    owned_engine = engine is None
    engine = engine or make_engine(settings.database_url.get_secret_value(), pool_size=4, max_overflow=2)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        if owned_engine:
            app.state.engine.dispose()

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
    app.state.catalog = catalog or default_catalog()
    app.state.engine = engine
    app.state.gateway = gateway or DagsterGateway(
        settings.dagster_graphql_url, settings.dagster_location, timeout_s=settings.dagster_timeout_s
    )
    for kind in _DATABASE_UNAVAILABLE:
        app.add_exception_handler(kind, _database_unavailable)
    for router in ROUTERS:
        app.include_router(router)
    return app


async def _database_unavailable(request: Request, exc: Exception) -> JSONResponse:
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
