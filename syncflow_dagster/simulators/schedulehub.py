"""The ScheduleHub stand-in: a scheduling API that speaks docs/contracts/schedulehub.md.

Records live on disk (`hub_store.HubStore`: SQLite in `data_dir`, or in a
temporary directory removed at shutdown), so a restart with the same data
directory keeps every record and 10M records need no Python object each.
Batch upserts are idempotent by external key and answer one result per row; a
reference to a record ScheduleHub does not hold is rejected with
`parent_missing`. Token auth guards /v1/*, a token bucket answers 429 with
Retry-After, and the fault injector adds 429/5xx/slow/dropped responses,
early-expiring tokens and partial batch failures (`transient_failure` rows).

`create_app` assembles the app: the store, switches, limiter, faults and
token issuer on `app.state`, the routers of hub_routes.py (records, admin)
and the token route; the wire forms (Arrow and JSON) are in hub_wire.py.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI

from syncflow_dagster.simulators.faults import FaultConfig, FaultInjector
from syncflow_dagster.simulators.hub_routes import (
    DEFAULT_MAX_BATCH_ROWS,
    HubSettings,
    admin,
    limiter_for,
    records,
)
from syncflow_dagster.simulators.hub_store import (
    ACCEPTED,
    CREATED,
    DELETED,
    HAS_CHILDREN,
    INVALID_RECORD,
    NOT_FOUND,
    PARENT_MISSING,
    REJECTED,
    TRANSIENT_FAILURE,
    UNCHANGED,
    UPDATED,
    HubStore,
)
from syncflow_dagster.simulators.hub_wire import ARROW_STREAM, RESULT_SCHEMA
from syncflow_dagster.simulators.tokens import TokenIssuer

__all__ = [
    "ACCEPTED",
    "ARROW_STREAM",
    "CREATED",
    "DELETED",
    "HAS_CHILDREN",
    "INVALID_RECORD",
    "NOT_FOUND",
    "PARENT_MISSING",
    "REJECTED",
    "RESULT_SCHEMA",
    "TRANSIENT_FAILURE",
    "UNCHANGED",
    "UPDATED",
    "HubStore",
    "create_app",
]


def create_app(
    *,
    clients: Mapping[str, str] | None = None,
    secret: str | None = None,
    faults: FaultConfig | None = None,
    rate_limit_per_s: float | None = None,
    max_batch_rows: int = DEFAULT_MAX_BATCH_ROWS,
    data_dir: Path | None = None,
) -> FastAPI:
    """The ScheduleHub stand-in as an ASGI app.

    `clients` maps client id to secret (default: one `syncflow` client with a
    random secret, so nothing is guessable); `secret` signs tokens (random by
    default). Records are kept in `data_dir` (created if missing; a restart
    on the same directory keeps every record), or, without one, in a
    temporary directory removed when the server stops. The store opens when
    the server starts (ASGI lifespan) and closes when it stops.
    """
    injector = FaultInjector(faults)
    issuer = TokenIssuer(
        clients if clients is not None else {"syncflow": secrets.token_urlsafe(24)},
        secret or secrets.token_urlsafe(32),
        ttl_override=injector.token_ttl_s,
    )
    store = HubStore(data_dir)
    settings = HubSettings(max_batch_rows=max_batch_rows, rate_limit_per_s=rate_limit_per_s)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        store.open()
        try:
            yield
        finally:
            store.close()

    app = FastAPI(
        title="ScheduleHub",
        version="1.0",
        description="Stand-in for the ScheduleHub scheduling API (see docs/contracts/schedulehub.md).",
        lifespan=lifespan,
    )
    app.state.store = store
    app.state.faults = injector
    app.state.tokens = issuer
    app.state.settings = settings
    app.state.limiter = limiter_for(settings)
    app.include_router(records)
    app.include_router(issuer.router())
    app.include_router(admin)
    injector.install(app)
    return app
