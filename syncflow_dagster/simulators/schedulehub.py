"""The ScheduleHub stand-in: an in-memory scheduling API that speaks docs/contracts/schedulehub.md.

Records live in one dict per resource (external key -> id, attributes,
references), optionally snapshotted to a JSON file. Batch upserts are
idempotent by external key and answer one result per row; a reference to a
record ScheduleHub does not hold is rejected with `parent_missing`. Token auth
guards /v1/*, a token bucket answers 429 with Retry-After, and the fault
injector adds 429/5xx/slow/dropped responses, early-expiring tokens and
partial batch failures (`transient_failure` rows).
"""

from __future__ import annotations

import bisect
import math
import re
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.compute as pc
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request, Response
from pydantic import BaseModel, Field
from starlette.requests import ClientDisconnect

from syncflow_dagster.simulators.faults import FaultConfig, FaultInjector
from syncflow_dagster.simulators.tokens import TokenIssuer

ARROW_STREAM = "application/vnd.apache.arrow.stream"
JSON = "application/json"
RESOURCE_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
MAX_EXTERNAL_KEY_LENGTH = 512
DEFAULT_MAX_BATCH_ROWS = 5000
DEFAULT_PAGE_LIMIT = 1000
MAX_PAGE_LIMIT = 10000
REF_PREFIX = "ref."

# Result vocabulary (also in the contract).
ACCEPTED = "accepted"
REJECTED = "rejected"
CREATED = "created"
UPDATED = "updated"
UNCHANGED = "unchanged"
DELETED = "deleted"
NOT_FOUND = "not_found"
PARENT_MISSING = "parent_missing"
INVALID_RECORD = "invalid_record"
TRANSIENT_FAILURE = "transient_failure"
HAS_CHILDREN = "has_children"

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
_SCALARS = (str, int, float, bool, type(None))


@dataclass(slots=True)
class StoredRecord:
    id: str
    seq: int
    attributes: dict[str, Any]
    references: dict[str, str]


@dataclass
class ResourceTable:
    """One resource's records, in creation order so the read-back cursor is cheap."""

    name: str
    records: dict[str, StoredRecord] = field(default_factory=dict)
    # Creation sequence numbers and keys, append-only; a deleted key stays as a
    # hole that the reader skips, so `bisect` on `seqs` finds a cursor in O(log n).
    seqs: list[int] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    next_seq: int = 1

    def add(self, key: str, attributes: dict[str, Any], references: dict[str, str]) -> StoredRecord:
        seq = self.next_seq
        self.next_seq += 1
        record = StoredRecord(f"sh_{self.name}_{seq}", seq, attributes, references)
        self.records[key] = record
        self.seqs.append(seq)
        self.keys.append(key)
        return record

    def page(self, after: int, limit: int) -> tuple[list[tuple[str, StoredRecord]], int | None]:
        start = bisect.bisect_right(self.seqs, after)
        out: list[tuple[str, StoredRecord]] = []
        i = start
        while i < len(self.seqs) and len(out) < limit:
            key = self.keys[i]
            record = self.records.get(key)
            if record is not None and record.seq == self.seqs[i]:
                out.append((key, record))
            i += 1
        # Only holes may remain after `i`; then the next page is simply empty.
        return out, (out[-1][1].seq if out and i < len(self.seqs) else None)


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


class HubStore:
    """All resources ScheduleHub holds, plus how many children reference each record."""

    def __init__(self) -> None:
        self.tables: dict[str, ResourceTable] = {}
        self.child_counts: Counter[tuple[str, str]] = Counter()

    def table(self, resource: str) -> ResourceTable:
        found = self.tables.get(resource)
        if found is None:
            found = self.tables[resource] = ResourceTable(resource)
        return found

    def has(self, resource: str, key: str) -> bool:
        found = self.tables.get(resource)
        return found is not None and key in found.records

    def counts(self) -> dict[str, int]:
        return {name: len(t.records) for name, t in sorted(self.tables.items())}

    def reset(self) -> None:
        self.tables.clear()
        self.child_counts.clear()

    def _reference(self, refs: Mapping[str, str], delta: int) -> None:
        for parent, key in refs.items():
            self.child_counts[(parent, key)] += delta
            if self.child_counts[(parent, key)] <= 0:
                del self.child_counts[(parent, key)]

    def upsert_one(
        self, resource: str, table: ResourceTable, key: Any, attributes: Any, references: Any
    ) -> dict[str, Any]:
        problem = _validate(key, attributes, references)
        if problem is not None:
            return _rejected(key, INVALID_RECORD, problem)
        for parent, parent_key in references.items():
            if not self.has(parent, parent_key):
                return _rejected(
                    key,
                    PARENT_MISSING,
                    f"references {parent} {parent_key!r}, which ScheduleHub does not hold",
                )
        existing = table.records.get(key)
        if existing is None:
            record = table.add(key, attributes, references)
            self._reference(references, +1)
            return _accepted(key, record.id, CREATED)
        if existing.attributes == attributes and existing.references == references:
            return _accepted(key, existing.id, UNCHANGED)
        self._reference(existing.references, -1)
        self._reference(references, +1)
        existing.attributes = attributes
        existing.references = references
        return _accepted(key, existing.id, UPDATED)

    def upsert_arrow(self, resource: str, table: ResourceTable, batch: pa.Table) -> pa.Table:
        """`upsert_one` for every row of an Arrow batch, with the per-value checks done per column.

        Same outcomes as calling `upsert_one` row by row (rows the column
        checks cannot clear go through it), at a fraction of the Python work
        per row: this is the stand-in's accept rate at ERP volumes.
        """
        clean = _clean_rows(batch)
        rows = _rows_from_arrow(batch)
        keys: list[Any] = []
        status: list[str] = []
        ids: list[str | None] = []
        outcome: list[str | None] = []
        reason: list[str | None] = []
        retryable: list[bool] = []
        detail: list[str | None] = []
        records = table.records
        for i, (key, attributes, references) in enumerate(rows):
            result: dict[str, Any] | None = None
            if clean is None or not clean[i]:
                result = self.upsert_one(resource, table, key, attributes, references)
            else:
                for parent, parent_key in references.items():
                    held = self.tables.get(parent)
                    if held is None or parent_key not in held.records:
                        result = _rejected(
                            key,
                            PARENT_MISSING,
                            f"references {parent} {parent_key!r}, which ScheduleHub does not hold",
                        )
                        break
                if result is None:
                    existing = records.get(key)
                    if existing is None:
                        record = table.add(key, attributes, references)
                        if references:
                            self._reference(references, +1)
                        keys.append(key)
                        status.append(ACCEPTED)
                        ids.append(record.id)
                        outcome.append(CREATED)
                        reason.append(None)
                        retryable.append(False)
                        detail.append(None)
                        continue
                    if existing.attributes == attributes and existing.references == references:
                        result = _accepted(key, existing.id, UNCHANGED)
                    else:
                        self._reference(existing.references, -1)
                        self._reference(references, +1)
                        existing.attributes = attributes
                        existing.references = references
                        result = _accepted(key, existing.id, UPDATED)
            assert result is not None  # every branch above set it or continued
            keys.append(result.get("external_key"))
            status.append(result["status"])
            ids.append(result.get("id"))
            outcome.append(result.get("outcome"))
            reason.append(result.get("reason_code"))
            retryable.append(bool(result.get("retryable", False)))
            detail.append(result.get("detail"))
        return pa.Table.from_pydict(
            {
                "external_key": keys,
                "status": status,
                "id": ids,
                "outcome": outcome,
                "reason_code": reason,
                "retryable": retryable,
                "detail": detail,
            },
            schema=RESULT_SCHEMA,
        )

    def delete_one(self, resource: str, key: Any, restrict: bool) -> dict[str, Any]:
        if not isinstance(key, str) or not key:
            return _rejected(str(key), INVALID_RECORD, "external_key must be a non-empty string")
        table = self.tables.get(resource)
        existing = table.records.get(key) if table is not None else None
        if existing is None or table is None:
            # Idempotent: deleting what is not there is success, said so.
            return _accepted(key, None, NOT_FOUND)
        children = self.child_counts.get((resource, key), 0)
        if restrict and children:
            return _rejected(key, HAS_CHILDREN, f"{children} record(s) still reference it")
        del table.records[key]
        self._reference(existing.references, -1)
        return _accepted(key, existing.id, DELETED)

    def snapshot(self) -> bytes:
        return orjson.dumps(
            {
                name: [[k, r.id, r.seq, r.attributes, r.references] for k, r in t.records.items()]
                for name, t in self.tables.items()
            }
        )

    def restore(self, data: bytes) -> None:
        self.reset()
        for name, rows in orjson.loads(data).items():
            table = self.table(name)
            for key, rid, seq, attributes, references in rows:
                table.records[key] = StoredRecord(rid, seq, attributes, references)
                table.seqs.append(seq)
                table.keys.append(key)
                table.next_seq = max(table.next_seq, seq + 1)
                self._reference(references, +1)


def _validate(key: Any, attributes: Any, references: Any) -> str | None:
    if not isinstance(key, str) or not key:
        return f"external_key must be a non-empty string, got {key!r}"
    if len(key) > MAX_EXTERNAL_KEY_LENGTH:
        return f"external_key longer than {MAX_EXTERNAL_KEY_LENGTH} characters"
    if not isinstance(attributes, dict):
        return "attributes must be an object"
    for name, value in attributes.items():
        if not isinstance(value, _SCALARS):
            return f"attribute {name!r} must be a string, number, boolean or null, got {type(value).__name__}"
        if isinstance(value, float) and not math.isfinite(value):
            return f"attribute {name!r} is not a finite number: {value!r}"
    if not isinstance(references, dict):
        return "references must be an object"
    for parent, parent_key in references.items():
        if not RESOURCE_NAME.match(parent):
            return f"reference names unknown resource {parent!r}"
        if not isinstance(parent_key, str) or not parent_key:
            return f"reference to {parent!r} must be a non-empty external key, got {parent_key!r}"
    return None


def _accepted(key: str, rid: str | None, outcome: str) -> dict[str, Any]:
    return {"external_key": key, "status": ACCEPTED, "id": rid, "outcome": outcome}


def _rejected(key: Any, reason: str, detail: str, *, retryable: bool = False) -> dict[str, Any]:
    return {
        "external_key": key if isinstance(key, str) else None,
        "status": REJECTED,
        "reason_code": reason,
        "retryable": retryable,
        "detail": detail,
    }


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
    column: Any = original
    kind = original.type
    if pa.types.is_timestamp(kind):
        if kind.tz is None:
            column = pc.assume_timezone(column, "UTC")
        column = pc.strftime(column.cast(pa.timestamp("us", tz="UTC")), format="%Y-%m-%dT%H:%M:%SZ")
    elif pa.types.is_decimal(kind) or pa.types.is_date(kind) or pa.types.is_time(kind):
        column = column.cast(pa.string())
    elif pa.types.is_dictionary(kind):
        column = column.cast(kind.value_type)
    return column.to_pylist()


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
    """Per row, whether it needs none of `_validate`'s checks; None when a column needs them for every row.

    Arrow already guarantees most of what `_validate` checks per value (every
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


def _results_response(request: Request, resource: str, results: list[dict[str, Any]]) -> Response:
    summary: Counter[str] = Counter()
    for r in results:
        summary[r["status"]] += 1
        summary[r.get("outcome") or r.get("reason_code") or ""] += 1
    if _wants_arrow(request):
        columns = {name: [r.get(name) for r in results] for name in RESULT_SCHEMA.names}
        columns["retryable"] = [bool(r.get("retryable", False)) for r in results]
        return _arrow(pa.Table.from_pydict(columns, schema=RESULT_SCHEMA))
    return _json({"resource": resource, "summary": dict(summary), "results": results})


def create_app(
    *,
    clients: Mapping[str, str] | None = None,
    secret: str | None = None,
    faults: FaultConfig | None = None,
    rate_limit_per_s: float | None = None,
    max_batch_rows: int = DEFAULT_MAX_BATCH_ROWS,
    snapshot_path: Path | None = None,
) -> FastAPI:
    """The ScheduleHub stand-in as an ASGI app.

    `clients` maps client id to secret (default: one `syncflow` client with a
    random secret, so nothing is guessable); `secret` signs tokens (random by
    default). `snapshot_path`, when given, is loaded at startup if present and
    written at shutdown and on `POST /admin/snapshot`.
    """
    injector = FaultInjector(faults)
    issuer = TokenIssuer(
        clients if clients is not None else {"syncflow": secrets.token_urlsafe(24)},
        secret or secrets.token_urlsafe(32),
        ttl_override=injector.token_ttl_s,
    )
    store = HubStore()
    settings = HubSettings(max_batch_rows=max_batch_rows, rate_limit_per_s=rate_limit_per_s)
    limiter: dict[str, TokenBucket | None] = {
        "bucket": TokenBucket(rate_limit_per_s) if rate_limit_per_s else None
    }

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if snapshot_path is not None and snapshot_path.exists():
            store.restore(snapshot_path.read_bytes())
        yield
        if snapshot_path is not None:
            snapshot_path.write_bytes(store.snapshot())

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
        content_type = request.headers.get("content-type", "")
        partial = injector.config.partial_failure_probability
        if content_type.startswith(ARROW_STREAM) and _wants_arrow(request) and partial <= 0:
            # Arrow in and out, no injected row failures: the columnar path.
            try:
                batch = pa.ipc.open_stream(body).read_all()
            except pa.ArrowInvalid as exc:
                raise HTTPException(
                    status_code=400, detail={"error": "invalid_batch", "detail": f"unreadable body: {exc}"}
                ) from None
            if "external_key" not in batch.column_names:
                raise HTTPException(
                    status_code=400,
                    detail={"error": "invalid_batch", "detail": "Arrow batch has no external_key column"},
                )
            if batch.num_rows > settings.max_batch_rows:
                raise HTTPException(
                    status_code=413,
                    detail={
                        "error": "batch_too_large",
                        "detail": f"{batch.num_rows} records; the limit is {settings.max_batch_rows}",
                        "limit": settings.max_batch_rows,
                    },
                )
            return _arrow(store.upsert_arrow(resource, store.table(resource), batch))
        rows: list[tuple[Any, Any, Any]]
        try:
            if content_type.startswith(ARROW_STREAM):
                rows = _rows_from_arrow(pa.ipc.open_stream(body).read_all())
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
        if len(rows) > settings.max_batch_rows:
            raise HTTPException(
                status_code=413,
                detail={
                    "error": "batch_too_large",
                    "detail": f"{len(rows)} records; the limit is {settings.max_batch_rows}",
                    "limit": settings.max_batch_rows,
                },
            )
        table = store.table(resource)
        results = []
        for key, attributes, references in rows:
            if partial > 0 and injector.roll("partial_failure", partial):
                results.append(
                    _rejected(key, TRANSIENT_FAILURE, "temporarily unavailable; retry", retryable=True)
                )
                continue
            results.append(store.upsert_one(resource, table, key, attributes, references))
        return _results_response(request, resource, results)

    @api.post(
        "/resources/{resource}/records:batch-delete",
        summary="Delete records by external key; one result per key",
        responses={413: {"description": "batch larger than the limit"}},
    )
    async def batch_delete(resource: str, body: DeleteRequest, request: Request) -> Response:
        _check_resource(resource)
        if len(body.external_keys) > settings.max_batch_rows:
            raise HTTPException(
                status_code=413,
                detail={
                    "error": "batch_too_large",
                    "detail": f"{len(body.external_keys)} keys; the limit is {settings.max_batch_rows}",
                    "limit": settings.max_batch_rows,
                },
            )
        partial = injector.config.partial_failure_probability
        results = []
        for key in body.external_keys:
            if partial > 0 and injector.roll("partial_failure", partial):
                results.append(
                    _rejected(key, TRANSIENT_FAILURE, "temporarily unavailable; retry", retryable=True)
                )
                continue
            results.append(store.delete_one(resource, key, settings.restrict_referenced_deletes))
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
        table = store.tables.get(resource)
        page, next_seq = table.page(after, limit) if table is not None else ([], None)
        next_cursor = str(next_seq) if next_seq is not None else None
        headers = {"X-Next-Cursor": next_cursor} if next_cursor else None
        if _wants_arrow(request):
            return _arrow(_records_table(page), headers)
        return _json(
            {"records": [_record_json(k, r) for k, r in page], "next_cursor": next_cursor}, headers=headers
        )

    @api.get("/resources/{resource}/records/{external_key:path}", summary="One record by external key")
    async def get_record(resource: str, external_key: str) -> Response:
        _check_resource(resource)
        table = store.tables.get(resource)
        record = table.records.get(external_key) if table is not None else None
        if record is None:
            raise HTTPException(
                status_code=404,
                detail={"error": "not_found", "detail": f"no {resource} record with that key"},
            )
        return _json(_record_json(external_key, record))

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

    @admin.post("/snapshot", summary="Write the store to the snapshot file")
    async def snapshot() -> Response:
        if snapshot_path is None:
            raise HTTPException(status_code=409, detail={"error": "no_snapshot_path"})
        snapshot_path.write_bytes(store.snapshot())
        return _json({"written": str(snapshot_path), "counts": store.counts()})

    app.include_router(admin)
    injector.install(app)
    return app


def _record_json(key: str, record: StoredRecord) -> dict[str, Any]:
    return {
        "id": record.id,
        "external_key": key,
        "attributes": record.attributes,
        "references": record.references,
    }


def _records_table(page: list[tuple[str, StoredRecord]]) -> pa.Table:
    attr_names: dict[str, None] = {}
    ref_names: dict[str, None] = {}
    for _, r in page:
        attr_names.update(dict.fromkeys(r.attributes))
        ref_names.update(dict.fromkeys(r.references))
    columns: dict[str, Any] = {
        "id": pa.array([r.id for _, r in page], pa.string()),
        "external_key": pa.array([k for k, _ in page], pa.string()),
    }
    for parent in ref_names:
        columns[REF_PREFIX + parent] = pa.array([r.references.get(parent) for _, r in page], pa.string())
    for name in attr_names:
        values = [r.attributes.get(name) for _, r in page]
        try:
            columns[name] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            # Mixed kinds in one attribute (allowed by the JSON API): send text.
            columns[name] = pa.array([None if v is None else str(v) for v in values], pa.string())
    return pa.table(columns)
