"""The ScheduleHub stand-in: a scheduling API that speaks docs/contracts/schedulehub.md.

Records live on disk (`hub_store.HubStore`: SQLite in `data_dir`, or in a
temporary directory removed at shutdown), so a restart with the same data
directory keeps every record and 10M records need no Python object each.
Batch upserts are idempotent by external key and answer one result per row; a
reference to a record ScheduleHub does not hold is rejected with
`parent_missing`. Token auth guards /v1/*, a token bucket answers 429 with
Retry-After, and the fault injector adds 429/5xx/slow/dropped responses,
early-expiring tokens and partial batch failures (`transient_failure` rows).
"""

from __future__ import annotations

import math
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.compute as pc
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request, Response
from pydantic import BaseModel, Field
from starlette.requests import ClientDisconnect

from syncflow_dagster.simulators.arrow_json import (
    canonical_arrow,
    json_objects,
    json_references,
    objects_table,
)
from syncflow_dagster.simulators.faults import FaultConfig, FaultInjector
from syncflow_dagster.simulators.hub_store import (
    ACCEPTED,
    CREATED,
    DELETED,
    HAS_CHILDREN,
    INVALID_RECORD,
    MAX_EXTERNAL_KEY_LENGTH,
    NOT_FOUND,
    PARENT_MISSING,
    REJECTED,
    RESOURCE_NAME,
    TRANSIENT_FAILURE,
    UNCHANGED,
    UPDATED,
    HubStore,
    Result,
    StoredRecord,
    records_of,
    validate,
)
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

ARROW_STREAM = "application/vnd.apache.arrow.stream"
JSON = "application/json"
DEFAULT_MAX_BATCH_ROWS = 5000
DEFAULT_PAGE_LIMIT = 1000
MAX_PAGE_LIMIT = 10000
REF_PREFIX = "ref."

_STRING: pa.DataType = pa.string()
RESULT_SCHEMA = pa.schema(
    {
        "external_key": _STRING,
        "status": _STRING,
        "id": _STRING,
        "outcome": _STRING,
        "reason_code": _STRING,
        "retryable": pa.bool_(),
        "detail": _STRING,
    }
)


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


def _check_resource(resource: str) -> None:
    if not RESOURCE_NAME.match(resource):
        raise HTTPException(
            status_code=404,
            detail={"error": "unknown_resource", "detail": f"resource name {resource!r} is not valid"},
        )


def _wants_arrow(request: Request) -> bool:
    return ARROW_STREAM in request.headers.get("accept", "")


def _json(payload: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    return Response(orjson.dumps(payload), status_code=status, media_type=JSON, headers=headers)


def _arrow(table: pa.Table, headers: Mapping[str, str] | None = None) -> Response:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return Response(sink.getvalue().to_pybytes(), media_type=ARROW_STREAM, headers=headers)


def _canonical_column(original: pa.ChunkedArray) -> list[Any]:
    """Python values of an Arrow column, with decimals/dates/times as canonical text."""
    values: list[Any] = canonical_arrow(original).to_pylist()
    return values


def _rows_from_arrow(table: pa.Table) -> list[tuple[Any, dict[str, Any], dict[str, Any]]]:
    if "external_key" not in table.column_names:
        raise HTTPException(
            status_code=400,
            detail={"error": "invalid_batch", "detail": "Arrow batch has no external_key column"},
        )
    keys = table.column("external_key").to_pylist()
    ref_names = [n for n in table.column_names if n.startswith(REF_PREFIX)]
    attr_names = [n for n in table.column_names if n != "external_key" and not n.startswith(REF_PREFIX)]
    ref_values = [table.column(n).to_pylist() for n in ref_names]
    attr_values = [_canonical_column(table.column(n)) for n in attr_names]
    parents = [n[len(REF_PREFIX) :] for n in ref_names]
    rows = []
    attr_rows = zip(*attr_values, strict=True) if attr_values else ([] for _ in keys)
    ref_rows = zip(*ref_values, strict=True) if ref_values else ([] for _ in keys)
    for key, attrs, refs in zip(keys, attr_rows, ref_rows, strict=True):
        rows.append(
            (
                key,
                dict(zip(attr_names, attrs, strict=True)),
                {p: v for p, v in zip(parents, refs, strict=True) if v is not None},
            )
        )
    return rows


def _clean_rows(table: pa.Table) -> list[bool] | None:
    """Per row, whether it needs none of `validate`'s checks; None when a column needs them for every row.

    Arrow already guarantees most of what `validate` checks per value (every
    attribute is a scalar of one type); what is left is checked per column:
    key present and not too long, floats finite, references non-empty.
    """
    compute: Any = pc  # pyarrow's stubs do not type the kernels' array-and-scalar forms
    attr_names = [n for n in table.column_names if n != "external_key" and not n.startswith(REF_PREFIX)]
    ref_names = [n for n in table.column_names if n.startswith(REF_PREFIX)]
    if any(not RESOURCE_NAME.match(n[len(REF_PREFIX) :]) for n in ref_names):
        return None
    keys = table.column("external_key")
    if not (pa.types.is_string(keys.type) or pa.types.is_large_string(keys.type)):
        return None
    length = compute.utf8_length(keys)
    clean: Any = compute.and_(compute.greater(length, 0), compute.less_equal(length, MAX_EXTERNAL_KEY_LENGTH))
    for name in attr_names:
        kind = table.column(name).type
        if pa.types.is_floating(kind):
            clean = compute.and_kleene(
                clean,
                compute.or_kleene(compute.is_finite(table.column(name)), compute.is_null(table.column(name))),
            )
        elif pa.types.is_nested(kind) or pa.types.is_binary(kind) or pa.types.is_fixed_size_binary(kind):
            return None
    for name in ref_names:
        column = table.column(name)
        if not (pa.types.is_string(column.type) or pa.types.is_null(column.type)):
            return None
        if pa.types.is_string(column.type):
            clean = compute.and_kleene(
                clean,
                compute.or_kleene(compute.is_null(column), compute.greater(compute.utf8_length(column), 0)),
            )
    return [bool(v) for v in compute.fill_null(clean, False).to_pylist()]


def _upsert_columns(store: HubStore, resource: str, batch: pa.Table, clean: list[bool]) -> pa.Table | None:
    """The batch decided column by column, or None when it needs the row-by-row path.

    Row by row: a key sent twice (the later row sees the earlier one) or a
    reference into the batch's own resource (a parent earlier in the batch).
    """
    keys = batch.column("external_key").combine_chunks()
    if REF_PREFIX + resource in batch.column_names:
        return None
    if pc.count_distinct(keys, mode="all").as_py() != batch.num_rows:
        return None
    rejected: pa.Array | None = None
    if not all(clean):
        unclean = [i for i, ok in enumerate(clean) if not ok]
        problems = [validate(*row) for row in _rows_from_arrow(batch.take(pa.array(unclean)))]
        if any(problem is None for problem in problems):
            return None  # a row the column checks flagged is valid after all: let the row path decide
        details: list[str | None] = [None] * batch.num_rows
        for index, problem in zip(unclean, problems, strict=True):
            details[index] = problem
        rejected = pa.array(details, pa.string())
    attr_names = [n for n in batch.column_names if n != "external_key" and not n.startswith(REF_PREFIX)]
    ref_names = [n for n in batch.column_names if n.startswith(REF_PREFIX)]
    parents = [n[len(REF_PREFIX) :] for n in ref_names]
    ref_columns = [batch.column(n).combine_chunks() for n in ref_names]
    attributes = json_objects(
        attr_names, [canonical_arrow(batch.column(n)) for n in attr_names], batch.num_rows
    )
    refs = json_references(parents, ref_columns, batch.num_rows)
    return store.upsert_columns(
        resource, keys, attributes, refs, dict(zip(parents, ref_columns, strict=True)), rejected
    )


def _result_tuples(results: pa.Table) -> list[Result]:
    columns = [results.column(name).to_pylist() for name in RESULT_SCHEMA.names]
    return list(zip(*columns, strict=True))


def _result_json(result: Result) -> dict[str, Any]:
    key, status, rid, outcome, reason, retryable, detail = result
    if status == ACCEPTED:
        return {"external_key": key, "status": status, "id": rid, "outcome": outcome}
    return {
        "external_key": key,
        "status": status,
        "reason_code": reason,
        "retryable": retryable,
        "detail": detail,
    }


def _results_table(results: Sequence[Result]) -> pa.Table:
    columns = list(zip(*results, strict=True)) if results else [()] * len(RESULT_SCHEMA)
    return pa.Table.from_arrays(
        [pa.array(list(values), field.type) for values, field in zip(columns, RESULT_SCHEMA, strict=True)],
        schema=RESULT_SCHEMA,
    )


def _results_response(request: Request, resource: str, results: Sequence[Result]) -> Response:
    if _wants_arrow(request):
        return _arrow(_results_table(results))
    summary: Counter[str] = Counter()
    for _key, status, _rid, outcome, reason, _retryable, _detail in results:
        summary[status] += 1
        summary[outcome or reason or ""] += 1
    return _json(
        {"resource": resource, "summary": dict(summary), "results": [_result_json(r) for r in results]}
    )


def _transient(key: Any) -> Result:
    return (
        key if isinstance(key, str) else None,
        REJECTED,
        None,
        None,
        TRANSIENT_FAILURE,
        True,
        "temporarily unavailable; retry",
    )


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
    limiter: dict[str, TokenBucket | None] = {
        "bucket": TokenBucket(rate_limit_per_s) if rate_limit_per_s else None
    }

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

    async def rate_limited(request: Request) -> None:
        bucket = limiter["bucket"]
        if bucket is None:
            return
        wait = bucket.take()
        if wait > 0:
            raise HTTPException(
                status_code=429,
                detail={"error": "rate_limited", "detail": f"limit is {bucket.rate:g} requests/s"},
                headers={"Retry-After": str(max(1, math.ceil(wait)))},
            )

    def too_large(count: int, what: str) -> HTTPException:
        return HTTPException(
            status_code=413,
            detail={
                "error": "batch_too_large",
                "detail": f"{count} {what}; the limit is {settings.max_batch_rows}",
                "limit": settings.max_batch_rows,
            },
        )

    api = APIRouter(prefix="/v1", dependencies=[Depends(issuer.require_token), Depends(rate_limited)])

    @api.put(
        "/resources/{resource}/records:batch-upsert",
        summary="Create or update records by external key; one result per row",
        responses={
            413: {"description": "batch larger than the limit"},
            400: {"description": "unreadable body"},
        },
    )
    async def batch_upsert(resource: str, request: Request) -> Response:
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
                records = payload.get("records") if isinstance(payload, dict) else None
                if not isinstance(records, list):
                    raise HTTPException(
                        status_code=400,
                        detail={"error": "invalid_batch", "detail": 'body must be {"records": [...]}'},
                    )
                rows = [
                    (r.get("external_key"), r.get("attributes", {}), r.get("references") or {})
                    if isinstance(r, dict)
                    else (None, None, None)
                    for r in records
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
            raise too_large(count, "records")
        partial = injector.config.partial_failure_probability
        skip = [injector.roll("partial_failure", partial) for _ in range(count)] if partial > 0 else None
        clean: list[bool] | None = None
        if batch is not None:
            # Arrow guarantees most of the per-value checks; the rest are done per column.
            clean = _clean_rows(batch)
            if skip is None and clean is not None:
                decided = _upsert_columns(store, resource, batch, clean)
                if decided is not None:
                    if _wants_arrow(request):
                        return _arrow(decided)
                    return _results_response(request, resource, _result_tuples(decided))
            rows = _rows_from_arrow(batch)
        results = store.upsert(resource, rows, clean, skip)
        if skip is not None:
            results = [_transient(r[0]) if skipped else r for r, skipped in zip(results, skip, strict=True)]
        return _results_response(request, resource, results)

    @api.post(
        "/resources/{resource}/records:batch-delete",
        summary="Delete records by external key; one result per key",
        responses={413: {"description": "batch larger than the limit"}},
    )
    async def batch_delete(resource: str, body: DeleteRequest, request: Request) -> Response:
        _check_resource(resource)
        if len(body.external_keys) > settings.max_batch_rows:
            raise too_large(len(body.external_keys), "keys")
        partial = injector.config.partial_failure_probability
        keys = body.external_keys
        skip = [injector.roll("partial_failure", partial) if partial > 0 else False for _ in keys]
        results = store.delete(resource, keys, settings.restrict_referenced_deletes, skip)
        results = [_transient(r[0]) if skipped else r for r, skipped in zip(results, skip, strict=True)]
        return _results_response(request, resource, results)

    @api.get("/resources", summary="Resources held and their record counts")
    async def list_resources() -> Response:
        return _json({"resources": [{"resource": n, "count": c} for n, c in store.counts().items()]})

    @api.get("/resources/{resource}/records", summary="Read records back, by cursor, in creation order")
    async def list_records(
        resource: str, request: Request, cursor: str | None = None, limit: int = DEFAULT_PAGE_LIMIT
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
        if _wants_arrow(request):
            return _arrow(_records_arrow(resource, seqs, keys, attributes, refs), headers)
        page = records_of(seqs, keys, attributes, refs)
        return _json(
            {"records": [_record_json(resource, r) for r in page], "next_cursor": next_cursor},
            headers=headers,
        )

    @api.get("/resources/{resource}/records/{external_key:path}", summary="One record by external key")
    async def get_record(resource: str, external_key: str) -> Response:
        _check_resource(resource)
        record = store.get(resource, external_key)
        if record is None:
            raise HTTPException(
                status_code=404,
                detail={"error": "not_found", "detail": f"no {resource} record with that key"},
            )
        return _json(_record_json(resource, record))

    app.include_router(api)
    app.include_router(issuer.router())
    admin = APIRouter(prefix="/admin", tags=["admin"])

    @admin.post("/reset", summary="Forget every record")
    async def reset() -> Response:
        store.reset()
        return _json({"reset": True})

    @admin.get("/settings", summary="Behaviour switches")
    async def get_settings() -> HubSettings:
        return settings

    @admin.put("/settings", summary="Replace the behaviour switches")
    async def put_settings(new: HubSettings) -> HubSettings:
        nonlocal settings
        settings = new
        app.state.settings = new
        limiter["bucket"] = TokenBucket(new.rate_limit_per_s) if new.rate_limit_per_s else None
        return settings

    @admin.post("/tokens:revoke", summary="Invalidate every token issued so far")
    async def revoke_tokens() -> Response:
        issuer.revoke_all()
        return _json({"revoked": True})

    @admin.get("/storage", summary="Where the records are kept and how much disk they take")
    async def storage() -> Response:
        return _json(
            {
                "data_dir": str(store.directory),
                "temporary": store.data_dir is None,
                "disk_bytes": store.disk_bytes(),
                "counts": store.counts(),
            }
        )

    app.include_router(admin)
    injector.install(app)
    return app


def _record_json(resource: str, record: StoredRecord) -> dict[str, Any]:
    return {
        "id": record.id(resource),
        "external_key": record.external_key,
        "attributes": record.attributes,
        "references": record.references,
    }


def _records_arrow(
    resource: str, seqs: list[int], keys: list[str], attributes: list[str], refs: list[str | None]
) -> pa.Table:
    """A read-back page as Arrow, its JSON texts parsed by Arrow's JSON reader (`_records_table` when they do not fit)."""
    attribute_columns = objects_table(attributes)
    reference_columns = objects_table([r or "{}" for r in refs])
    if attribute_columns is None or reference_columns is None:
        return _records_table(records_of(seqs, keys, attributes, refs), resource)
    compute: Any = pc  # pyarrow's stubs do not type the kernels' array-and-scalar forms
    ids = compute.binary_join_element_wise(
        f"sh_{resource}_", pc.cast(pa.array(seqs, pa.int64()), pa.string()), ""
    )
    columns: dict[str, Any] = {"id": ids, "external_key": pa.array(keys, pa.string())}
    for name in reference_columns.column_names:
        columns[REF_PREFIX + name] = reference_columns.column(name).cast(pa.string())
    for name in attribute_columns.column_names:
        columns[name] = attribute_columns.column(name)
    return pa.table(columns)


def _records_table(page: list[StoredRecord], resource: str) -> pa.Table:
    attr_names: dict[str, None] = {}
    ref_names: dict[str, None] = {}
    for r in page:
        attr_names.update(dict.fromkeys(r.attributes))
        ref_names.update(dict.fromkeys(r.references))
    columns: dict[str, Any] = {
        "id": pa.array([r.id(resource) for r in page], pa.string()),
        "external_key": pa.array([r.external_key for r in page], pa.string()),
    }
    for parent in ref_names:
        columns[REF_PREFIX + parent] = pa.array([r.references.get(parent) for r in page], pa.string())
    for name in attr_names:
        values = [r.attributes.get(name) for r in page]
        try:
            columns[name] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            # Mixed kinds in one attribute (allowed by the JSON API): send text.
            columns[name] = pa.array([None if v is None else str(v) for v in values], pa.string())
    return pa.table(columns)
