"""Operations: /health (each dependency's status and latency) and /metrics (Prometheus, from the store)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal

import httpx
import sqlalchemy as sa
from fastapi import APIRouter, Response, status

from syncflow_dagster.clients.http import tls_verification
from syncflow_dagster.service import models as m
from syncflow_dagster.service.dependencies import CatalogDep, Gateway, Settings, Store, entity_order
from syncflow_dagster.service.metrics import CONTENT_TYPE, exposition

router = APIRouter(tags=["operations"])


@router.get("/health", response_model=m.Health, responses={503: {"model": m.Health}})
def health(response: Response, settings: Settings, engine: Store, gateway: Gateway) -> m.Health:
    """Each dependency's status and latency. 503 when SyncFlow's own database is down."""
    checks = {
        "database": _check(lambda: _ping_database(engine)),
        "apismith": _check_http(settings.apismith_base_url, "/health", settings.health_timeout_s),
        "schedulehub": _check_http(settings.schedulehub_base_url, "/v1/resources", settings.health_timeout_s),
        "dagster": _check(lambda: gateway.ping()),
    }
    if checks["database"].status != "ok":
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
        overall: Literal["ok", "degraded", "down"] = "down"
    else:
        overall = "ok" if all(c.status != "down" for c in checks.values()) else "degraded"
    return m.Health(status=overall, checks=checks)


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE: {}}, "description": "Prometheus text exposition"}},
)
def metrics(engine: Store, catalog: CatalogDep) -> Response:
    """Prometheus metrics computed from the store at scrape time."""
    return Response(content=exposition(engine, entity_order(catalog)), media_type=CONTENT_TYPE)


def _ping_database(engine: sa.Engine) -> None:
    with engine.connect() as conn:
        conn.execute(sa.text("SELECT 1"))


def _check(probe: Callable[[], object]) -> m.DependencyHealth:
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
        response = httpx.get(
            f"{base_url.rstrip('/')}{path}", timeout=timeout_s, verify=tls_verification(True)
        )
        if response.status_code >= 500:
            raise RuntimeError(f"HTTP {response.status_code}")

    return _check(probe)


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 2)
