"""What the API's routes depend on, taken from `app.state` through `Depends`: settings, store, gateway, catalog, auth.

`create_app` puts the parts on `app.state` once; a route names what it needs
with one of the `Annotated` types here, so no route closes over create_app's
locals and every router can be read (and tested) on its own.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import sqlalchemy as sa
from fastapi import Depends, HTTPException, Path, Request, status
from fastapi.security import HTTPAuthorizationCredentials

from syncflow_dagster.catalog import Catalog
from syncflow_dagster.service.auth import bearer_scheme, check_bearer
from syncflow_dagster.service.dagster_gateway import DagsterGateway, DagsterRefused, DagsterUnavailable
from syncflow_dagster.service.settings import ServiceSettings


def _from_state(name: str) -> Callable[[Request], Awaitable[Any]]:
    """A dependency that hands a route `app.state.<name>`, one of the parts create_app set."""

    async def part(request: Request) -> Any:
        return getattr(request.app.state, name)

    return part


Settings = Annotated[ServiceSettings, Depends(_from_state("settings"))]
Store = Annotated[sa.Engine, Depends(_from_state("engine"))]
"""SyncFlow's database (the store's SQLAlchemy engine)."""
Gateway = Annotated[DagsterGateway, Depends(_from_state("gateway"))]
CatalogDep = Annotated[Catalog, Depends(_from_state("catalog"))]

# Dagster run ids are UUIDs; anything else is refused (422) before Dagster is asked.
RunId = Annotated[
    str, Path(pattern=r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
]


async def authenticated(
    request: Request,
    settings: Settings,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
) -> None:
    """The app-wide dependency: 401/503 unless the request may pass (auth.check_bearer)."""
    check_bearer(request, settings, credentials)


def entity_order(catalog: Catalog) -> list[str]:
    """Every entity of the catalog, parents first."""
    return list(catalog.topological_order)


def known_entities(catalog: Catalog, names: list[str], field: str) -> list[str]:
    """`names` in parent-first order (all entities when empty); 422 naming the first unknown one."""
    entities = entity_order(catalog)
    unknown = [n for n in names if n not in catalog.by_name]
    if unknown:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            detail=f"{field}: unknown entity {unknown[0]!r}; the catalog has {', '.join(entities)}",
        )
    return [n for n in entities if n in names] or ([] if names else entities)


def dagster_call(what: str, call: Any, *args: Any) -> Any:
    """`call(*args)` with Dagster's failures as HTTP answers: 503 unreachable, 404 unknown run, else 409."""
    try:
        return call(*args)
    except DagsterUnavailable as exc:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, detail=f"{what}: {exc}") from None
    except DagsterRefused as exc:
        code = status.HTTP_404_NOT_FOUND if "NotFound" in exc.kind else status.HTTP_409_CONFLICT
        raise HTTPException(code, detail=f"{what}: {exc}") from None
