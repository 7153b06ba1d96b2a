"""The APISmith client: pages of changes, tombstones, business keys and watermarks, as Arrow tables.

Built on the shared plumbing of `clients/http.py` (JWT auth refreshed before
`exp` and once after a 401, retries with full jitter honouring Retry-After,
bounded concurrency). Pages stream one at a time as `pa.Table`s, so an entity
is never held whole unless `fetch_*` is asked for. A read pins the server's
`snapshot_rowversion` at the first page and sends it with every later page,
so records that change while paging are neither skipped nor repeated (they
come in the next read). A page whose body cannot be parsed is fetched again a
bounded number of times, then `ApiSmithPageError` names entity and page.

Configuration (environment):
- APISMITH_BASE_URL, APISMITH_CLIENT_ID, APISMITH_CLIENT_SECRET
- APISMITH_TOKEN_PATH (default /oauth/token), APISMITH_FORMAT (arrow | json)
- APISMITH_GARBAGE_PAGE_RETRIES (default 3)
- SYNCFLOW_PAGE_SIZE (default 10000, at most 50000)
- SYNCFLOW_HTTP_* for timeouts, retries and concurrency (see HttpSettings)
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Any, Literal

import httpx
import orjson
import pyarrow as pa
from pydantic import AliasChoices, BaseModel, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from syncflow_dagster.clients.http import (
    ClientCredentials,
    HttpClientError,
    HttpSettings,
    JwtAuth,
    error_detail,
    make_async_client,
    send_with_retries,
)

log = logging.getLogger(__name__)

ARROW_STREAM = "application/vnd.apache.arrow.stream"
MAX_PAGE_SIZE = 50_000
KEYS_BATCH_ROWS = 65_536


class ApiSmithSettings(BaseSettings):
    """Where APISmith is and who we are to it (env prefix APISMITH_, page size SYNCFLOW_PAGE_SIZE)."""

    model_config = SettingsConfigDict(env_prefix="APISMITH_", extra="ignore", populate_by_name=True)

    base_url: str = "http://127.0.0.1:8001"
    client_id: str = "syncflow"
    client_secret: SecretStr = SecretStr("")
    token_path: str = "/oauth/token"  # noqa: S105 (a URL path, not a secret)
    format: Literal["arrow", "json"] = "arrow"
    garbage_page_retries: int = Field(default=3, ge=0, le=20)
    page_size: int = Field(
        default=10_000,
        ge=1,
        le=MAX_PAGE_SIZE,
        validation_alias=AliasChoices("SYNCFLOW_PAGE_SIZE", "page_size"),
    )


class ApiSmithError(HttpClientError):
    """APISmith refused a request (4xx) or answered something unusable; names entity and call."""


class ApiSmithPageError(ApiSmithError):
    """A page whose body could not be parsed, still after the bounded re-fetches."""


class IncompleteKeysError(ApiSmithError):
    """The keys listing held fewer keys than the entity's row count while nothing changed."""


class Watermark(BaseModel):
    """The cheap per-entity high-water mark a sensor polls."""

    source: str
    max_rowversion: int
    row_count: int
    max_changed_at: datetime | None = None


@dataclass(frozen=True)
class ChangePage:
    """One page of a read: rows plus the cursor state that produced the next request."""

    rows: pa.Table
    next_after_rowversion: int
    snapshot_rowversion: int
    has_more: bool


def _as_param(value: datetime | str | None) -> str | None:
    if value is None:
        return None
    return value.isoformat() if isinstance(value, datetime) else value


class ApiSmithClient:
    """Async APISmith client; use as `async with ApiSmithClient() as api: ...`."""

    def __init__(self, settings: ApiSmithSettings | None = None, http: HttpSettings | None = None) -> None:
        self.settings = settings or ApiSmithSettings()
        self.http = http or HttpSettings()
        base = self.settings.base_url.rstrip("/")
        self.auth = JwtAuth(
            ClientCredentials(
                token_url=base + self.settings.token_path,
                client_id=self.settings.client_id,
                client_secret=self.settings.client_secret,
            ),
            self.http,
        )
        self._client: httpx.AsyncClient | None = None
        self._limiter = asyncio.Semaphore(self.http.max_concurrency)
        self.pages_refetched = 0

    def __repr__(self) -> str:
        return f"ApiSmithClient(base_url={self.settings.base_url!r}, client_id={self.settings.client_id!r})"

    async def __aenter__(self) -> ApiSmithClient:
        self._client = make_async_client(self.settings.base_url, self.auth, self.http)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None
        await self.auth.aclose()

    # --- plumbing ---------------------------------------------------------------------------------

    async def _get(self, path: str, *, what: str, accept: str | None = None, **params: Any) -> httpx.Response:
        if self._client is None:
            raise RuntimeError("ApiSmithClient is not open; use `async with ApiSmithClient(...)`")
        headers = {"Accept": accept} if accept else None
        clean = {k: v for k, v in params.items() if v is not None}
        response = await send_with_retries(
            self._client,
            "GET",
            path,
            settings=self.http,
            limiter=self._limiter,
            params=clean,
            headers=headers,
        )
        if response.status_code != 200:
            raise ApiSmithError(f"APISmith {what}: GET {path} answered {error_detail(response)}")
        return response

    # --- API --------------------------------------------------------------------------------------

    async def health(self) -> float:
        """Seconds one round trip to /health took; raises if APISmith is not healthy."""
        started = time.perf_counter()
        await self._get("/health", what="health")
        return time.perf_counter() - started

    async def watermark(self, source: str) -> Watermark:
        response = await self._get(f"/v1/entities/{source}/watermark", what=f"entity {source!r} watermark")
        return Watermark.model_validate(orjson.loads(response.content))

    async def iter_change_pages(
        self,
        source: str,
        changed_from: datetime | str | None = None,
        changed_to: datetime | str | None = None,
        after_rowversion: int = 0,
        page_size: int | None = None,
        *,
        kind: Literal["changes", "tombstones"] = "changes",
        snapshot_rowversion: int | None = None,
    ) -> AsyncIterator[ChangePage]:
        """Every page of a read, in rowversion order, the snapshot pinned at the first page."""
        limit = page_size or self.settings.page_size
        if not 1 <= limit <= MAX_PAGE_SIZE:
            raise ValueError(f"page_size {limit} is outside 1..{MAX_PAGE_SIZE}")
        after = after_rowversion
        snapshot = snapshot_rowversion
        page_number = 0
        while True:
            page_number += 1
            page = await self._fetch_page(
                source,
                kind,
                page_number,
                changed_from=_as_param(changed_from),
                changed_to=_as_param(changed_to),
                after_rowversion=after,
                limit=limit,
                snapshot_rowversion=snapshot,
            )
            yield page
            if not page.has_more:
                return
            if page.next_after_rowversion <= after:
                raise ApiSmithError(
                    f"APISmith entity {source!r} {kind} page {page_number}: cursor did not advance "
                    f"(after_rowversion {after} → {page.next_after_rowversion})"
                )
            after = page.next_after_rowversion
            snapshot = page.snapshot_rowversion

    async def _fetch_page(self, source: str, kind: str, page_number: int, **params: Any) -> ChangePage:
        path = f"/v1/entities/{source}/{kind}"
        use_arrow = self.settings.format == "arrow"
        attempts = self.settings.garbage_page_retries + 1
        problem = ""
        for attempt in range(1, attempts + 1):
            response = await self._get(
                path,
                what=f"entity {source!r} {kind} page {page_number}",
                accept=ARROW_STREAM if use_arrow else "application/json",
                **params,
            )
            try:
                return self._parse_page(response, use_arrow)
            except (pa.ArrowInvalid, orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                problem = f"{type(exc).__name__}"
                self.pages_refetched += 1
                log.warning(
                    "APISmith entity %r %s page %d (after_rowversion %s): unparsable body, attempt %d/%d",
                    source,
                    kind,
                    page_number,
                    params.get("after_rowversion"),
                    attempt,
                    attempts,
                )
        raise ApiSmithPageError(
            f"APISmith entity {source!r} {kind} page {page_number} (after_rowversion "
            f"{params.get('after_rowversion')}, snapshot {params.get('snapshot_rowversion')}): "
            f"body could not be parsed after {attempts} attempts ({problem})"
        )

    @staticmethod
    def _parse_page(response: httpx.Response, use_arrow: bool) -> ChangePage:
        if use_arrow:
            rows = pa.ipc.open_stream(response.content).read_all()
            expected = response.headers.get("x-row-count")
            if expected is not None and int(expected) != rows.num_rows:
                raise ValueError(f"page announced {expected} rows, body held {rows.num_rows}")
            return ChangePage(
                rows,
                int(response.headers["x-next-after-rowversion"]),
                int(response.headers["x-snapshot-rowversion"]),
                response.headers["x-has-more"] == "true",
            )
        body = orjson.loads(response.content)
        return ChangePage(
            records_table(body["records"]),
            int(body["next_after_rowversion"]),
            int(body["snapshot_rowversion"]),
            bool(body["has_more"]),
        )

    async def iter_changes(
        self,
        source: str,
        changed_from: datetime | str | None = None,
        changed_to: datetime | str | None = None,
        after_rowversion: int = 0,
        page_size: int | None = None,
    ) -> AsyncIterator[pa.Table]:
        """Records changed in [changed_from, changed_to) after `after_rowversion`, page by page."""
        async for page in self.iter_change_pages(
            source, changed_from, changed_to, after_rowversion, page_size
        ):
            if page.rows.num_rows:
                yield page.rows

    async def fetch_changes(
        self,
        source: str,
        changed_from: datetime | str | None = None,
        changed_to: datetime | str | None = None,
        after_rowversion: int = 0,
        page_size: int | None = None,
        *,
        snapshot_rowversion: int | None = None,
    ) -> pa.Table:
        """The whole read as one table (all pages concatenated; the schema even when empty).

        `snapshot_rowversion` pins the read's upper bound from the first page on
        (by default, the server's current rowversion when the first page is read).
        """
        return await _collect(
            self.iter_change_pages(
                source,
                changed_from,
                changed_to,
                after_rowversion,
                page_size,
                snapshot_rowversion=snapshot_rowversion,
            )
        )

    async def iter_tombstones(
        self,
        source: str,
        changed_from: datetime | str | None = None,
        changed_to: datetime | str | None = None,
        after_rowversion: int = 0,
        page_size: int | None = None,
    ) -> AsyncIterator[pa.Table]:
        """Keys deleted in [changed_from, changed_to) after `after_rowversion`, page by page."""
        pages = self.iter_change_pages(
            source, changed_from, changed_to, after_rowversion, page_size, kind="tombstones"
        )
        async for page in pages:
            if page.rows.num_rows:
                yield page.rows

    async def fetch_tombstones(
        self,
        source: str,
        changed_from: datetime | str | None = None,
        changed_to: datetime | str | None = None,
        after_rowversion: int = 0,
        page_size: int | None = None,
        *,
        snapshot_rowversion: int | None = None,
    ) -> pa.Table:
        return await _collect(
            self.iter_change_pages(
                source,
                changed_from,
                changed_to,
                after_rowversion,
                page_size,
                kind="tombstones",
                snapshot_rowversion=snapshot_rowversion,
            )
        )

    async def iter_keys(self, source: str) -> AsyncIterator[pa.Table]:
        """All current business keys (source key columns + RowVersion) in batches.

        The listing is read as one body (so a connection dropped mid-body is
        retried whole), then handed out in record batches.
        """
        use_arrow = self.settings.format == "arrow"
        response = await self._get(
            f"/v1/entities/{source}/keys",
            what=f"entity {source!r} keys",
            accept=ARROW_STREAM if use_arrow else "application/x-ndjson",
        )
        try:
            if use_arrow:
                reader = pa.ipc.open_stream(response.content)
                for batch in reader:
                    yield pa.Table.from_batches([batch])
                return
            lines = response.content.splitlines()
            for start in range(0, len(lines), KEYS_BATCH_ROWS):
                yield records_table(
                    [orjson.loads(line) for line in lines[start : start + KEYS_BATCH_ROWS] if line]
                )
        except (pa.ArrowInvalid, orjson.JSONDecodeError) as exc:
            raise ApiSmithPageError(
                f"APISmith entity {source!r} keys: body could not be parsed ({type(exc).__name__})"
            ) from None

    async def fetch_keys(self, source: str, *, verify_complete: bool = True) -> pa.Table:
        """All current keys; with `verify_complete`, refuse a listing shorter than the row count.

        The watermark is read before and after the listing: when the entity did
        not change in between, the listing must hold exactly `row_count` keys.
        A partial listing would make reconciliation delete live records, so it
        is an error rather than a result.
        """
        before = await self.watermark(source) if verify_complete else None
        tables = [table async for table in self.iter_keys(source)]
        keys = pa.concat_tables(tables) if tables else pa.table({})
        if before is not None:
            after = await self.watermark(source)
            unchanged = after.max_rowversion == before.max_rowversion
            if unchanged and keys.num_rows != after.row_count:
                raise IncompleteKeysError(
                    f"APISmith entity {source!r} keys: listing held {keys.num_rows} keys but the entity "
                    f"has {after.row_count} records (nothing changed meanwhile): partial read"
                )
        return keys


def records_table(records: list[dict[str, Any]]) -> pa.Table:
    """JSON records as Arrow: payload text stays text, the rowversion int64."""
    if not records:
        return pa.table({})
    names = list(records[0])
    columns: dict[str, pa.Array] = {}
    for name in names:
        values = [record.get(name) for record in records]
        if all(v is None or isinstance(v, int) for v in values) and any(isinstance(v, int) for v in values):
            columns[name] = pa.array(values, type=pa.int64())
        else:
            columns[name] = pa.array([None if v is None else str(v) for v in values], type=pa.string())
    return pa.table(columns)


async def _collect(pages: AsyncIterator[ChangePage]) -> pa.Table:
    tables: list[pa.Table] = []
    async for page in pages:
        if page.rows.num_rows or not tables:
            tables.append(page.rows)
    non_empty = [t for t in tables if t.num_columns]
    if not non_empty:
        return tables[0] if tables else pa.table({})
    return pa.concat_tables(non_empty)
