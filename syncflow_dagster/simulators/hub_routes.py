"""The ScheduleHub stand-in's routes: /v1 records (batch upsert and delete, read-back) and /admin switches.

Two module-level APIRouters; what a route needs (the record store, the
behaviour switches, the request limiter, the fault injector, the token
issuer) comes through `Depends` from the `app.state` that
`schedulehub.create_app` fills, so one app's state never leaks into another's.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import orjson
import pyarrow as pa
from fastapi import APIRouter, Depends, HTTPException, Request, Response
from pydantic import BaseModel, Field
from starlette.requests import ClientDisconnect

from syncflow_dagster.simulators.faults import FaultInjector
from syncflow_dagster.simulators.hub_store import RESOURCE_NAME, HubStore, records_of
from syncflow_dagster.simulators.hub_wire import (
    ARROW_STREAM,
    arrow_response,
    clean_rows,
    json_response,
    record_json,
    records_arrow,
    result_tuples,
    results_response,
    rows_from_arrow,
    transient,
    upsert_columns,
    wants_arrow,
)

DEFAULT_MAX_BATCH_ROWS = 5000
DEFAULT_PAGE_LIMIT = 1000
MAX_PAGE_LIMIT = 10000


class TokenBucket:
    """A token-bucket request limiter: `rate_per_s` sustained, bursts up to `burst`."""

    def __init__(self, rate_per_s: float, burst: float | None = None) -> None:
        if rate_per_s <= 0:
            raise ValueError(f"rate_limit_per_s must be positive, got {rate_per_s!r}")
        self.rate = rate_per_s
        self.capacity = burst if burst is not None else max(1.0, rate_per_s)
        self.tokens = self.capacity
        self.updated = time.monotonic()

    def take(self) -> float:
        """0.0 when the request may pass, else the seconds until a token is available."""
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


class HubSettings(BaseModel):
    """Behaviour switches of the stand-in, readable and replaceable at /admin/settings."""

    max_batch_rows: int = Field(default=DEFAULT_MAX_BATCH_ROWS, ge=1, le=1_000_000)
    rate_limit_per_s: float | None = Field(default=None, gt=0)
    restrict_referenced_deletes: bool = False


class DeleteRequest(BaseModel):
    external_keys: list[str]


def limiter_for(settings: HubSettings) -> TokenBucket | None:
    """The request limiter the settings ask for (None: no limit)."""
    return TokenBucket(settings.rate_limit_per_s) if settings.rate_limit_per_s else None


def _from_state(name: str) -> Callable[[Request], Awaitable[Any]]:
    """A dependency that hands a route `app.state.<name>`, one of the parts create_app set."""

    async def part(request: Request) -> Any:
        return getattr(request.app.state, name)

    return part


Store = Annotated[HubStore, Depends(_from_state("store"))]
Settings = Annotated[HubSettings, Depends(_from_state("settings"))]
Faults = Annotated[FaultInjector, Depends(_from_state("faults"))]


async def _token_required(request: Request) -> dict[str, Any]:
    """The bearer token's claims (the app's TokenIssuer), or 401 with WWW-Authenticate."""
    claims: dict[str, Any] = await request.app.state.tokens.require_token(request)
    return claims


async def _rate_limited(request: Request) -> None:
    bucket: TokenBucket | None = request.app.state.limiter
    if bucket is None:
        return
    wait = bucket.take()
    if wait > 0:
        raise HTTPException(
            status_code=429,
            detail={"error": "rate_limited", "detail": f"limit is {bucket.rate:g} requests/s"},
            headers={"Retry-After": str(max(1, math.ceil(wait)))},
        )


records = APIRouter(prefix="/v1", dependencies=[Depends(_token_required), Depends(_rate_limited)])
admin = APIRouter(prefix="/admin", tags=["admin"])


def _check_resource(resource: str) -> None:
    if not RESOURCE_NAME.match(resource):
        raise HTTPException(
            status_code=404,
            detail={"error": "unknown_resource", "detail": f"resource name {resource!r} is not valid"},
        )


def _too_large(settings: HubSettings, count: int, what: str) -> HTTPException:
    return HTTPException(
        status_code=413,
        detail={
            "error": "batch_too_large",
            "detail": f"{count} {what}; the limit is {settings.max_batch_rows}",
            "limit": settings.max_batch_rows,
        },
    )


@records.put(
    "/resources/{resource}/records:batch-upsert",
    summary="Create or update records by external key; one result per row",
    responses={
        413: {"description": "batch larger than the limit"},
        400: {"description": "unreadable body"},
    },
)
async def batch_upsert(
    resource: str, request: Request, store: Store, settings: Settings, injector: Faults
) -> Response:
    _check_resource(resource)
    try:
        body = await request.body()
    except ClientDisconnect:
        # The client went away mid-body (a killed step): nothing was applied and
        # nobody is left to answer, so no error trace; the status is for the access log.
        return Response(status_code=499)
    batch: pa.Table | None = None
    rows: list[tuple[Any, Any, Any]] = []
    try:
        if request.headers.get("content-type", "").startswith(ARROW_STREAM):
            batch = pa.ipc.open_stream(body).read_all()
        else:
            payload = orjson.loads(body)
            records_sent = payload.get("records") if isinstance(payload, dict) else None
            if not isinstance(records_sent, list):
                raise HTTPException(
                    status_code=400,
                    detail={"error": "invalid_batch", "detail": 'body must be {"records": [...]}'},
                )
            rows = [
                (r.get("external_key"), r.get("attributes", {}), r.get("references") or {})
                if isinstance(r, dict)
                else (None, None, None)
                for r in records_sent
            ]
    except (orjson.JSONDecodeError, pa.ArrowInvalid) as exc:
        raise HTTPException(
            status_code=400, detail={"error": "invalid_batch", "detail": f"unreadable body: {exc}"}
        ) from None
    if batch is not None and "external_key" not in batch.column_names:
        raise HTTPException(
            status_code=400,
            detail={"error": "invalid_batch", "detail": "Arrow batch has no external_key column"},
        )
    count = batch.num_rows if batch is not None else len(rows)
    if count > settings.max_batch_rows:
        raise _too_large(settings, count, "records")
    partial = injector.config.partial_failure_probability
    skip = [injector.roll("partial_failure", partial) for _ in range(count)] if partial > 0 else None
    clean: list[bool] | None = None
    if batch is not None:
        # Arrow guarantees most of the per-value checks; the rest are done per column.
        clean = clean_rows(batch)
        if skip is None and clean is not None:
            decided = upsert_columns(store, resource, batch, clean)
            if decided is not None:
                if wants_arrow(request):
                    return arrow_response(decided)
                return results_response(request, resource, result_tuples(decided))
        rows = rows_from_arrow(batch)
    results = store.upsert(resource, rows, clean, skip)
    if skip is not None:
        results = [transient(r[0]) if skipped else r for r, skipped in zip(results, skip, strict=True)]
    return results_response(request, resource, results)


@records.post(
    "/resources/{resource}/records:batch-delete",
    summary="Delete records by external key; one result per key",
    responses={413: {"description": "batch larger than the limit"}},
)
async def batch_delete(
    resource: str, body: DeleteRequest, request: Request, store: Store, settings: Settings, injector: Faults
) -> Response:
    _check_resource(resource)
    if len(body.external_keys) > settings.max_batch_rows:
        raise _too_large(settings, len(body.external_keys), "keys")
    partial = injector.config.partial_failure_probability
    keys = body.external_keys
    skip = [injector.roll("partial_failure", partial) if partial > 0 else False for _ in keys]
    results = store.delete(resource, keys, settings.restrict_referenced_deletes, skip)
    results = [transient(r[0]) if skipped else r for r, skipped in zip(results, skip, strict=True)]
    return results_response(request, resource, results)


@records.get("/resources", summary="Resources held and their record counts")
async def list_resources(store: Store) -> Response:
    return json_response({"resources": [{"resource": n, "count": c} for n, c in store.counts().items()]})


@records.get("/resources/{resource}/records", summary="Read records back, by cursor, in creation order")
async def list_records(
    resource: str, request: Request, store: Store, cursor: str | None = None, limit: int = DEFAULT_PAGE_LIMIT
) -> Response:
    _check_resource(resource)
    if not 1 <= limit <= MAX_PAGE_LIMIT:
        raise HTTPException(
            status_code=400,
            detail={
                "error": "invalid_limit",
                "detail": f"limit must be 1..{MAX_PAGE_LIMIT}, got {limit}",
            },
        )
    try:
        after = int(cursor) if cursor else 0
    except ValueError:
        raise HTTPException(
            status_code=400,
            detail={"error": "invalid_cursor", "detail": f"cursor {cursor!r} is not valid"},
        ) from None
    seqs, keys, attributes, refs, next_seq = store.page_texts(resource, after, limit)
    next_cursor = str(next_seq) if next_seq is not None else None
    headers = {"X-Next-Cursor": next_cursor} if next_cursor else None
    if wants_arrow(request):
        return arrow_response(records_arrow(resource, seqs, keys, attributes, refs), headers)
    page = records_of(seqs, keys, attributes, refs)
    return json_response(
        {"records": [record_json(resource, r) for r in page], "next_cursor": next_cursor},
        headers=headers,
    )


@records.get("/resources/{resource}/records/{external_key:path}", summary="One record by external key")
async def get_record(resource: str, external_key: str, store: Store) -> Response:
    _check_resource(resource)
    record = store.get(resource, external_key)
    if record is None:
        raise HTTPException(
            status_code=404,
            detail={"error": "not_found", "detail": f"no {resource} record with that key"},
        )
    return json_response(record_json(resource, record))


@admin.post("/reset", summary="Forget every record")
async def reset(store: Store) -> Response:
    store.reset()
    return json_response({"reset": True})


@admin.get("/settings", summary="Behaviour switches")
async def get_settings(settings: Settings) -> HubSettings:
    return settings


@admin.put("/settings", summary="Replace the behaviour switches")
async def put_settings(new: HubSettings, request: Request) -> HubSettings:
    request.app.state.settings = new
    request.app.state.limiter = limiter_for(new)
    return new


@admin.post("/tokens:revoke", summary="Invalidate every token issued so far")
async def revoke_tokens(request: Request) -> Response:
    request.app.state.tokens.revoke_all()
    return json_response({"revoked": True})


@admin.get("/storage", summary="Where the records are kept and how much disk they take")
async def storage(store: Store) -> Response:
    return json_response(
        {
            "data_dir": str(store.directory),
            "temporary": store.data_dir is None,
            "disk_bytes": store.disk_bytes(),
            "counts": store.counts(),
        }
    )
