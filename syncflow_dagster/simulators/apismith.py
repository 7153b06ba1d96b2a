"""The APISmith stand-in: the ERP's REST API over real HTTP, as docs/contracts/apismith.md describes it.

`create_app(...)` serves a seeded synthetic dataset (or a folder of Parquet/CSV
files) from an in-memory `ErpStore`: changes and tombstones in keyset pages by
rowversion with a snapshot bound, a streamed listing of all business keys, a
cheap watermark, and admin routes to apply change sets, read snapshots, reset
and switch faults. Bulk endpoints answer JSON (orjson) by default and Arrow IPC
stream with `Accept: application/vnd.apache.arrow.stream`, the fast path.
API routes need a bearer token from `POST /oauth/token`; `/admin/*` and
`/health` are the operator's surface of a loopback stand-in and need none.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
from fastapi import APIRouter, Body, Depends, FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, SecretStr, TypeAdapter, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from syncflow_dagster.catalog.loader import default_catalog
from syncflow_dagster.catalog.models import Catalog, EntitySpec
from syncflow_dagster.simulators.changes import (
    ChangeSetError,
    change_set_from_json,
    make_change_set,
)
from syncflow_dagster.simulators.datagen import DatagenError, generate_dataset, uncoercible_value
from syncflow_dagster.simulators.erp_store import ErpStore, Page
from syncflow_dagster.simulators.faults import FaultConfig, FaultInjector
from syncflow_dagster.simulators.parquet_store import ParquetErpStore, is_disk_source
from syncflow_dagster.simulators.source_dir import load_source_dir
from syncflow_dagster.simulators.tokens import TokenIssuer

ARROW_STREAM = "application/vnd.apache.arrow.stream"
NDJSON = "application/x-ndjson"
DEFAULT_PAGE_SIZE = 10_000
MAX_PAGE_SIZE = 50_000
KEYS_BATCH_ROWS = 65_536
# The five headers that carry paging state next to an Arrow body.
H_NEXT = "X-Next-After-Rowversion"
H_SNAPSHOT = "X-Snapshot-Rowversion"
H_HAS_MORE = "X-Has-More"
H_ROWS = "X-Row-Count"
_ARROW_EOS = b"\xff\xff\xff\xff\x00\x00\x00\x00"


ChangedFrom = Annotated[str | None, Query(description="inclusive lower bound of the change time (ISO-8601)")]
ChangedTo = Annotated[str | None, Query(description="exclusive upper bound of the change time (ISO-8601)")]


class ApiSmithStandInSettings(BaseSettings):
    """The one API client the stand-in accepts, from the same variables the real client reads."""

    model_config = SettingsConfigDict(env_prefix="APISMITH_", extra="ignore")

    client_id: str = "syncflow"
    client_secret: SecretStr | None = None


class ChangeShape(BaseModel):
    """A generated change set: percentages of each chosen entity's live records."""

    model_config = ConfigDict(extra="forbid")

    updated_pct: float = Field(default=0.0, ge=0.0, le=100.0)
    inserted_pct: float = Field(default=0.0, ge=0.0, le=100.0)
    deleted_pct: float = Field(default=0.0, ge=0.0, le=100.0)
    seed: int = 0
    entities: list[str] | None = None
    changed_at: datetime | None = None


_CHANGED_AT: TypeAdapter[datetime | None] = TypeAdapter(datetime | None)


class ApiError(Exception):
    """An error answer: HTTP status, a stable code and a message naming what is wrong."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail


def _parse_time(name: str, value: str | None) -> int | None:
    if value is None or value == "":
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise ApiError(400, "bad_parameter", f"{name}={value!r} is not an ISO-8601 date-time") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1_000_000)


def _iso_from_us(value: int | None) -> str | None:
    if value is None:
        return None
    return datetime.fromtimestamp(value / 1_000_000, tz=UTC).isoformat(timespec="milliseconds")


def wants_arrow(request: Request) -> bool:
    return ARROW_STREAM in request.headers.get("accept", "")


def arrow_stream(schema: pa.Schema, batches: Iterator[pa.RecordBatch]) -> Iterator[bytes]:
    """An Arrow IPC stream, one message per batch: a streamed body never holds the whole listing."""
    yield schema.serialize().to_pybytes()
    for batch in batches:
        yield batch.serialize().to_pybytes()
    yield _ARROW_EOS


def json_records(batches: Iterator[pa.RecordBatch]) -> Iterator[bytes]:
    """`{"records": [...]}` written a batch at a time."""
    yield b'{"records":['
    first = True
    for batch in batches:
        if not batch.num_rows:
            continue
        rows = b",".join(orjson.dumps(row) for row in batch.to_pylist())
        yield rows if first else b"," + rows
        first = False
    yield b"]}"


def arrow_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


class ApiSmith:
    """The stand-in's state and routes (one instance per app)."""

    def __init__(
        self,
        store: ErpStore | ParquetErpStore,
        issuer: TokenIssuer,
        faults: FaultInjector,
    ) -> None:
        self.store = store
        self.issuer = issuer
        self.faults = faults

    # --- helpers ------------------------------------------------------------------------------------

    def entity(self, source: str) -> EntitySpec:
        try:
            return self.store.entity(source)
        except KeyError:
            raise ApiError(
                404, "unknown_entity", f"unknown entity {source!r}; known: {self.store.sources}"
            ) from None

    def _malformed(self, entity: EntitySpec, rows: pa.Table) -> pa.Table:
        """The malformed-row fault: some served rows carry a value no normaliser can coerce."""
        probability = self.faults.config.malformed_row_probability
        if probability <= 0 or rows.num_rows == 0:
            return rows
        fk = {f for relation in entity.parents for f in relation.fields}
        spoilable = [
            s
            for s in entity.fields
            if s.target not in entity.business_key and s.target not in fk and uncoercible_value(s) is not None
        ]
        if not spoilable:
            return rows
        hit = np.array([self.faults.roll("malformed_row", probability) for _ in range(rows.num_rows)])
        if not hit.any():
            return rows
        spec = spoilable[self.faults.random().randrange(len(spoilable))]
        index = rows.schema.get_field_index(spec.source)
        spoiled = pc.if_else(
            pa.array(hit), pa.scalar(uncoercible_value(spec), pa.string()), rows.column(index)
        )
        return rows.set_column(index, spec.source, spoiled)

    def page_response(self, request: Request, entity: EntitySpec, page: Page) -> Response:
        rows = self._malformed(entity, page.rows)
        headers = {
            H_NEXT: str(page.next_after_rowversion),
            H_SNAPSHOT: str(page.snapshot_rowversion),
            H_HAS_MORE: "true" if page.has_more else "false",
            H_ROWS: str(rows.num_rows),
        }
        garbage = self.faults.roll("garbage_page", self.faults.config.garbage_page_probability)
        if wants_arrow(request):
            body = arrow_bytes(rows)
            if garbage:
                body = b"\xff\xff\xff\xffnot an arrow stream" + body[len(body) // 2 :]
            return Response(body, media_type=ARROW_STREAM, headers=headers)
        payload = orjson.dumps(
            {
                "records": rows.to_pylist(),
                "next_after_rowversion": page.next_after_rowversion,
                "snapshot_rowversion": page.snapshot_rowversion,
                "has_more": page.has_more,
            }
        )
        if garbage:
            payload = payload[: len(payload) // 2] + b"<html>upstream error</html>"
        return Response(payload, media_type="application/json", headers=headers)

    def read_page(
        self,
        source: str,
        kind: str,
        *,
        changed_from: str | None,
        changed_to: str | None,
        after_rowversion: int,
        limit: int,
        snapshot_rowversion: int | None,
        rowversion_to: int | None,
    ) -> Page:
        if not 1 <= limit <= MAX_PAGE_SIZE:
            raise ApiError(400, "limit_out_of_range", f"limit={limit} is outside 1..{MAX_PAGE_SIZE}")
        if after_rowversion < 0:
            raise ApiError(400, "bad_parameter", f"after_rowversion={after_rowversion} is negative")
        current = self.store.current_rowversion
        if snapshot_rowversion is None:
            snapshot_rowversion = current
        elif snapshot_rowversion > current or snapshot_rowversion < 0:
            raise ApiError(
                400,
                "bad_snapshot",
                f"snapshot_rowversion={snapshot_rowversion} is not a rowversion this server has issued "
                f"(current {current}); start a new read without it",
            )
        start_us = _parse_time("changed_from", changed_from)
        end_us = _parse_time("changed_to", changed_to)
        if start_us is not None and end_us is not None and end_us < start_us:
            raise ApiError(
                400, "bad_parameter", f"changed_to={changed_to!r} is before changed_from={changed_from!r}"
            )
        upper = snapshot_rowversion if rowversion_to is None else min(snapshot_rowversion, rowversion_to)
        return self.store.window(
            source,
            kind,
            after_rowversion=after_rowversion,
            upper_rowversion=upper,
            changed_from_us=start_us,
            changed_to_us=end_us,
            limit=limit,
            snapshot_rowversion=snapshot_rowversion,
        )

    def keys_stream(self, request: Request, entity: EntitySpec) -> StreamingResponse:
        schema, batches = self.store.key_batches(entity.source)
        fraction = self.faults.config.keys_drop_fraction
        if fraction > 0:
            batches = self._drop_keys(batches, fraction)
        if wants_arrow(request):
            return StreamingResponse(arrow_stream(schema, batches), media_type=ARROW_STREAM)

        def ndjson_chunks() -> Iterator[bytes]:
            for batch in batches:
                if batch.num_rows:
                    lines = [orjson.dumps(row) for row in batch.to_pylist()]
                    yield b"\n".join(lines) + b"\n"

        return StreamingResponse(ndjson_chunks(), media_type=NDJSON)

    def _drop_keys(self, batches: Iterator[pa.RecordBatch], fraction: float) -> Iterator[pa.RecordBatch]:
        """The partial-read fault: silently omit a share of the keys (of each streamed batch)."""
        rng = np.random.default_rng(self.faults.random().randrange(2**32))
        for batch in batches:
            drop = round(batch.num_rows * fraction)
            budget = self.faults.budget_left()
            drop = drop if budget is None else min(drop, budget)
            if drop:
                keep = np.ones(batch.num_rows, dtype=bool)
                keep[rng.choice(batch.num_rows, size=drop, replace=False)] = False
                batch = batch.filter(pa.array(keep))
                self.faults.count("keys_dropped", drop)
            yield batch

    def watermark(self, entity: EntitySpec) -> dict[str, Any]:
        max_rowversion, row_count, max_changed_us = self.store.watermark(entity.source)
        return {
            "source": entity.source,
            "max_rowversion": max_rowversion,
            "row_count": row_count,
            "max_changed_at": _iso_from_us(max_changed_us),
        }

    def apply_changes(self, body: Mapping[str, Any]) -> dict[str, Any]:
        catalog = self.store.catalog
        try:
            if "upserts" in body or "deletes" in body:
                change_set = change_set_from_json(
                    catalog, {k: v for k, v in body.items() if k != "changed_at"}
                )
                changed_at = _CHANGED_AT.validate_python(body.get("changed_at"))
            else:
                shape = ChangeShape.model_validate(body)
                change_set = make_change_set(
                    self.store.live_records(),
                    catalog,
                    shape.updated_pct,
                    shape.inserted_pct,
                    shape.deleted_pct,
                    shape.seed,
                    shape.entities,
                    # Value pools drawn around the change time: a seed and a changed_at give one change set.
                    as_of=shape.changed_at,
                )
                changed_at = shape.changed_at
            applied = self.store.apply(change_set, now=changed_at)
        except (ChangeSetError, DatagenError, ValueError, ValidationError) as exc:
            raise ApiError(400, "bad_change_set", str(exc)) from None
        for source, cascaded in change_set.cascaded.items():
            if source in applied:
                applied[source]["cascaded_deletes"] = cascaded
        return {"applied": applied, "current_rowversion": self.store.current_rowversion}


def _default_clients() -> dict[str, str]:
    settings = ApiSmithStandInSettings()
    if settings.client_secret is None:
        raise ValueError(
            "the APISmith stand-in needs its client secret: set APISMITH_CLIENT_SECRET "
            "(and APISMITH_CLIENT_ID, default 'syncflow') or pass clients= to create_app"
        )
    return {settings.client_id: settings.client_secret.get_secret_value()}


def create_app(
    *,
    dataset: Mapping[str, pa.Table] | None = None,
    catalog: Catalog | None = None,
    rows: int = 1_000,
    seed: int = 0,
    source_dir: Path | None = None,
    clients: Mapping[str, str] | None = None,
    secret: str | None = None,
    faults: FaultConfig | FaultInjector | None = None,
    history_days: int = 0,
    as_of: datetime | None = None,
    token_ttl_s: float = 900.0,
) -> FastAPI:
    """The APISmith stand-in app. Data: `dataset`, else `source_dir`, else generated from `rows`/`seed`."""
    catalog = catalog or default_catalog()
    store: ErpStore | ParquetErpStore
    if dataset is None and source_dir is not None and is_disk_source(catalog, Path(source_dir)):
        # Parquet with RowVersion and ModifiedAt throughout: served from disk, never loaded whole.
        store = ParquetErpStore(catalog, Path(source_dir))
    else:
        if dataset is None:
            if source_dir is not None:
                dataset = load_source_dir(catalog, Path(source_dir), as_of=as_of)
            else:
                dataset = generate_dataset(catalog, rows, seed, as_of=as_of, history_days=history_days)
        store = ErpStore(catalog, dataset)
    injector = faults if isinstance(faults, FaultInjector) else FaultInjector(faults)
    issuer = TokenIssuer(
        clients if clients is not None else _default_clients(),
        # A fresh signing key per process: tokens never outlive the stand-in.
        secret or secrets.token_urlsafe(32),
        ttl_s=token_ttl_s,
        ttl_override=injector.token_ttl_s,
    )
    app = FastAPI(
        title="APISmith (SyncFlow stand-in)",
        version="1.0",
        description="The ERP's REST API as docs/contracts/apismith.md describes it.",
    )
    app.state.apismith = ApiSmith(store, issuer, injector)
    app.add_exception_handler(ApiError, _api_error)
    app.include_router(issuer.router())
    injector.install(app)
    app.include_router(routes)
    return app


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    """An ApiError as the contract's error body: {"error": code, "detail": text}."""
    assert isinstance(exc, ApiError)  # registered for ApiError only
    return JSONResponse({"error": exc.code, "detail": exc.detail}, status_code=exc.status)


async def _apismith(request: Request) -> ApiSmith:
    api: ApiSmith = request.app.state.apismith
    return api


Api = Annotated[ApiSmith, Depends(_apismith)]
"""The app's APISmith (store, token issuer, faults), from `app.state`."""


async def _token_required(request: Request) -> dict[str, Any]:
    """The bearer token's claims (the app's TokenIssuer), or 401 with WWW-Authenticate."""
    claims: dict[str, Any] = await request.app.state.apismith.issuer.require_token(request)
    return claims


# The stand-in's routes; /health and /admin/* are the operator's surface and need no token.
routes = APIRouter()
_auth = [Depends(_token_required)]


@routes.get("/health", summary="Liveness (no token needed)")
def health() -> dict[str, str]:
    return {"status": "ok"}


@routes.get("/v1/entities", summary="Entities served, with row counts", dependencies=_auth)
def list_entities(api: Api) -> dict[str, Any]:
    return {
        "entities": [
            {"entity": api.entity(s).name, **api.watermark(api.entity(s))} for s in api.store.sources
        ]
    }


@routes.get("/v1/entities/{source}/watermark", summary="Highest rowversion, row count", dependencies=_auth)
def watermark(source: str, api: Api) -> dict[str, Any]:
    return api.watermark(api.entity(source))


def _window_route(kind: str, what: str) -> None:
    """GET /v1/entities/{source}/<kind>: the changes and tombstones reads share one contract."""

    def read_window(
        request: Request,
        source: str,
        api: Api,
        changed_from: ChangedFrom = None,
        changed_to: ChangedTo = None,
        after_rowversion: int = 0,
        limit: int = DEFAULT_PAGE_SIZE,
        snapshot_rowversion: int | None = None,
        rowversion_to: int | None = None,
    ) -> Response:
        entity = api.entity(source)
        page = api.read_page(
            entity.source,
            kind,
            changed_from=changed_from,
            changed_to=changed_to,
            after_rowversion=after_rowversion,
            limit=limit,
            snapshot_rowversion=snapshot_rowversion,
            rowversion_to=rowversion_to,
        )
        return api.page_response(request, entity, page)

    routes.get(
        f"/v1/entities/{{source}}/{kind}",
        summary=f"Records {what} in a window, keyset-paginated by rowversion",
        dependencies=_auth,
        responses={200: {"content": {ARROW_STREAM: {}}}},
        name=kind,
    )(read_window)


_window_route("changes", "changed")
_window_route("tombstones", "deleted")


@routes.get(
    "/v1/entities/{source}/keys",
    summary="All current business keys (streamed NDJSON or Arrow)",
    dependencies=_auth,
    responses={200: {"content": {NDJSON: {}, ARROW_STREAM: {}}}},
)
def keys(request: Request, source: str, api: Api) -> StreamingResponse:
    return api.keys_stream(request, api.entity(source))


@routes.post("/admin/changesets", summary="Apply a change set (generated shape or explicit records)")
def post_changeset(body: Annotated[dict[str, Any], Body()], api: Api) -> dict[str, Any]:
    return api.apply_changes(body)


@routes.get(
    "/admin/snapshot/{source}",
    summary="All live records of an entity, for verification",
    responses={200: {"content": {ARROW_STREAM: {}}}},
)
def snapshot(request: Request, source: str, api: Api) -> Response:
    entity = api.entity(source)
    schema, batches = api.store.record_batches(entity.source)
    if wants_arrow(request):
        return StreamingResponse(arrow_stream(schema, batches), media_type=ARROW_STREAM)
    return StreamingResponse(json_records(batches), media_type="application/json")


@routes.post("/admin/tokens:revoke", summary="Invalidate every token issued so far")
def revoke_tokens(api: Api) -> dict[str, str]:
    api.issuer.revoke_all()
    return {"status": "revoked"}


@routes.post("/admin/reset", summary="Back to the initial data; change sets and tombstones are dropped")
def reset(api: Api) -> dict[str, Any]:
    api.store.reset()
    return {"current_rowversion": api.store.current_rowversion}
