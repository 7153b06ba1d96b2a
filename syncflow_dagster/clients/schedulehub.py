"""ScheduleHub client: batched, idempotent delivery with one result per business key, and read-back.

`ScheduleHubClient.upsert` takes a SyncFlow frame (`_bk`, payload attribute
columns, `_ref.<parent_resource>` columns), turns it into ScheduleHub's wire
form (`external_key`, attributes in canonical text, `ref.<parent>`), sends it
in batches of `SYNCFLOW_DELIVERY_BATCH_SIZE` as Arrow IPC with bounded
concurrency and retries, and maps every row's answer back to its `_bk`. A
batch that still fails after its retries becomes rejected rows with a
retryable `http_<status>`/`transport_error` reason rather than an exception,
so the caller can park exactly those rows as failed records.
"""

from __future__ import annotations

import asyncio
import time
from types import TracebackType
from typing import Any

import httpx
import orjson
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from syncflow_dagster.clients.http import (
    ClientCredentials,
    HttpClientError,
    HttpSettings,
    JwtAuth,
    RequestFailedError,
    error_detail,
    make_async_client,
    send_with_retries,
)
from syncflow_dagster.engine.columns import BK

ARROW_STREAM = "application/vnd.apache.arrow.stream"
REF_PREFIX = "_ref."
WIRE_REF_PREFIX = "ref."
READ_PAGE_LIMIT = 10000

ACCEPTED = "accepted"
REJECTED = "rejected"
_STRING: pa.DataType = pa.string()
RESULT_SCHEMA = pa.schema(
    {
        BK: _STRING,
        "status": _STRING,
        "schedulehub_id": _STRING,
        "outcome": _STRING,
        "reason_code": _STRING,
        "retryable": pa.bool_(),
        "detail": _STRING,
    }
)


class ScheduleHubSettings(BaseSettings):
    """Where ScheduleHub is and how SyncFlow talks to it (environment variables in brackets)."""

    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True)

    base_url: str = Field(
        default="http://127.0.0.1:8002", validation_alias=AliasChoices("SCHEDULEHUB_BASE_URL", "base_url")
    )
    client_id: str = Field(
        default="syncflow", validation_alias=AliasChoices("SCHEDULEHUB_CLIENT_ID", "client_id")
    )
    client_secret: SecretStr = Field(
        default=SecretStr(""), validation_alias=AliasChoices("SCHEDULEHUB_CLIENT_SECRET", "client_secret")
    )
    # Defaults to <base_url>/oauth/token.
    token_url: str | None = Field(
        default=None, validation_alias=AliasChoices("SCHEDULEHUB_TOKEN_URL", "token_url")
    )
    delivery_batch_size: int = Field(
        default=5000,
        ge=1,
        le=100_000,
        validation_alias=AliasChoices("SYNCFLOW_DELIVERY_BATCH_SIZE", "delivery_batch_size"),
    )

    def credentials(self) -> ClientCredentials:
        token_url = self.token_url or f"{self.base_url.rstrip('/')}/oauth/token"
        return ClientCredentials(
            token_url=token_url, client_id=self.client_id, client_secret=self.client_secret
        )


def canonical_attribute(column: pa.ChunkedArray | pa.Array) -> pa.Array | pa.ChunkedArray:
    """An attribute column in ScheduleHub's canonical wire form.

    Decimals travel as their exact text (never floats), timestamps as ISO 8601
    UTC with microseconds and a `Z`, dates and times as ISO text; strings,
    integers, floats and booleans as they are.
    """
    kind = column.type
    value: Any = column
    if pa.types.is_timestamp(kind):
        value = wire_timestamp_text(value)
    elif pa.types.is_decimal(kind) or pa.types.is_date(kind) or pa.types.is_time(kind):
        value = value.cast(pa.string())
    elif pa.types.is_dictionary(kind):
        value = value.cast(kind.value_type)
    elif pa.types.is_large_string(kind):
        value = value.cast(pa.string())
    return value


_UTC_MICROS = pa.timestamp("us", tz="UTC")


def wire_timestamp_text(column: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray | pa.Array:
    """`YYYY-MM-DDTHH:MM:SS.ffffffZ` in UTC (naive timestamps read as UTC); null stays null.

    The same text as `strftime(..., "%Y-%m-%dT%H:%M:%SZ")` of the timestamp in
    UTC microseconds (Arrow's `%S` carries the six fractional digits), built
    from Arrow's timestamp-to-string cast instead: that cast writes
    `YYYY-MM-DD HH:MM:SS.ffffff` for a naive microsecond timestamp and takes a
    fraction of strftime's time (docs/benchmarks.md).
    The naive value of a UTC timestamp is its UTC wall clock; the first (only)
    space becomes the `T`, which also holds for years outside 0000..9999.
    """
    value: Any = column
    if column.type.tz is None:
        value = pc.assume_timezone(value, "UTC")
    wall = pc.cast(pc.cast(value.cast(_UTC_MICROS), pa.timestamp("us")), pa.string())
    return pc.binary_join_element_wise(pc.replace_substring(wall, " ", "T", max_replacements=1), "Z", "")


def to_wire(records: pa.Table) -> pa.Table:
    """SyncFlow frame -> ScheduleHub batch: external_key, ref.<parent> and attribute columns."""
    if BK not in records.column_names:
        raise ValueError(f"records to deliver have no {BK!r} column (columns: {records.column_names})")
    columns: dict[str, Any] = {"external_key": records.column(BK).cast(pa.string())}
    for name in records.column_names:
        if name.startswith(REF_PREFIX):
            columns[WIRE_REF_PREFIX + name[len(REF_PREFIX) :]] = records.column(name).cast(pa.string())
        elif not name.startswith("_"):
            # SyncFlow's own `_` columns (hashes, rowversion, action) stay home.
            columns[name] = canonical_attribute(records.column(name))
    return pa.table(columns)


def _arrow_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def _failed_rows(keys: list[Any], reason: str, retryable: bool, detail: str) -> pa.Table:
    n = len(keys)
    return pa.table(
        {
            BK: pa.array(keys, pa.string()),
            "status": pa.array([REJECTED] * n, pa.string()),
            "schedulehub_id": pa.nulls(n, pa.string()),
            "outcome": pa.nulls(n, pa.string()),
            "reason_code": pa.array([reason] * n, pa.string()),
            "retryable": pa.array([retryable] * n, pa.bool_()),
            "detail": pa.array([detail] * n, pa.string()),
        },
        schema=RESULT_SCHEMA,
    )


def _empty_results() -> pa.Table:
    return RESULT_SCHEMA.empty_table()


class ScheduleHubClient:
    """Async client for ScheduleHub; use as `async with ScheduleHubClient(...) as hub:`."""

    def __init__(self, settings: ScheduleHubSettings | None = None, http: HttpSettings | None = None) -> None:
        self.settings = settings or ScheduleHubSettings()
        self.http = http or HttpSettings()
        self._auth = JwtAuth(self.settings.credentials(), self.http)
        self._client: httpx.AsyncClient | None = None
        self._limiter: asyncio.Semaphore | None = None

    def __repr__(self) -> str:
        return (
            f"ScheduleHubClient(base_url={self.settings.base_url!r}, client_id={self.settings.client_id!r})"
        )

    async def __aenter__(self) -> ScheduleHubClient:
        self._client = make_async_client(self.settings.base_url, self._auth, self.http)
        self._limiter = asyncio.Semaphore(self.http.max_concurrency)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None
        await self._auth.aclose()

    @property
    def tokens_fetched(self) -> int:
        return self._auth.tokens_fetched

    async def _send(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        if self._client is None:
            raise RuntimeError("ScheduleHubClient must be used inside 'async with'")
        return await send_with_retries(
            self._client, method, url, settings=self.http, limiter=self._limiter, **kwargs
        )

    # -- delivery -------------------------------------------------------------

    async def upsert(self, resource: str, records: pa.Table) -> pa.Table:
        """Create or update `records` in `resource`; one result row per input row, by `_bk`.

        The wire form and the Arrow IPC body are built batch by batch, only for
        the batches in flight (`max_concurrency`), so memory holds a few
        batches' wire copies rather than one of the whole frame plus every body.
        """
        if BK not in records.column_names:
            raise ValueError(f"records to deliver have no {BK!r} column (columns: {records.column_names})")
        size = self.settings.delivery_batch_size
        url = f"/v1/resources/{resource}/records:batch-upsert"
        in_flight = asyncio.Semaphore(self.http.max_concurrency)

        async def deliver(start: int) -> pa.Table:
            async with in_flight:
                return await self._upsert_records(resource, url, records.slice(start, size))

        results = await asyncio.gather(*(deliver(start) for start in range(0, records.num_rows, size)))
        return pa.concat_tables(results) if results else _empty_results()

    async def _upsert_records(self, resource: str, url: str, records: pa.Table) -> pa.Table:
        """One batch of SyncFlow rows: to the wire form, rows without a key refused, the rest sent."""
        wire = to_wire(records)
        keys: Any = wire.column("external_key")
        missing = pc.fill_null(pc.equal(pc.utf8_length(keys), pa.scalar(0, pa.int32())), True)
        if not pc.any(missing).as_py():
            return await self._upsert_batch(url, wire)
        # A row without a business key cannot be delivered; say so for that row.
        refused = _failed_rows(
            wire.filter(missing).column("external_key").to_pylist(),
            "invalid_record",
            False,
            f"{resource}: business key {BK} is null or empty",
        )
        wire = wire.filter(pc.invert(missing))
        if wire.num_rows == 0:
            return refused
        return pa.concat_tables([refused, await self._upsert_batch(url, wire)])

    async def _upsert_batch(self, url: str, batch: pa.Table) -> pa.Table:
        keys = batch.column("external_key").to_pylist()
        try:
            response = await self._send(
                "PUT",
                url,
                content=_arrow_bytes(batch),
                headers={"Content-Type": ARROW_STREAM, "Accept": ARROW_STREAM},
            )
        except RequestFailedError as exc:
            reason = f"http_{exc.status}" if exc.status else "transport_error"
            return _failed_rows(keys, reason, True, str(exc))
        except HttpClientError as exc:
            # The token endpoint refused us: every row of this batch waits for a fix.
            return _failed_rows(keys, "auth_failed", True, str(exc))
        if response.status_code == 413 and batch.num_rows > 1:
            # The partner's limit is lower than ours: halve until it fits.
            half = batch.num_rows // 2
            parts = await asyncio.gather(
                self._upsert_batch(url, batch.slice(0, half)), self._upsert_batch(url, batch.slice(half))
            )
            return pa.concat_tables(parts)
        if response.status_code != 200:
            return _failed_rows(keys, f"http_{response.status_code}", False, error_detail(response))
        return self._results(keys, response)

    async def delete(self, resource: str, keys: pa.Array | pa.ChunkedArray) -> pa.Table:
        """Delete `keys` (business keys) from `resource`; one result row per key."""
        values = [k for k in keys.to_pylist()]
        size = self.settings.delivery_batch_size
        url = f"/v1/resources/{resource}/records:batch-delete"
        parts = await asyncio.gather(
            *(self._delete_batch(url, values[start : start + size]) for start in range(0, len(values), size))
        )
        return pa.concat_tables(parts) if parts else _empty_results()

    async def _delete_batch(self, url: str, keys: list[Any]) -> pa.Table:
        bad = [k for k in keys if not isinstance(k, str) or not k]
        good = [k for k in keys if isinstance(k, str) and k]
        parts = [_failed_rows(bad, "invalid_record", False, "business key is null or empty")] if bad else []
        if good:
            try:
                response = await self._send(
                    "POST",
                    url,
                    content=orjson.dumps({"external_keys": good}),
                    headers={"Content-Type": "application/json", "Accept": ARROW_STREAM},
                )
            except RequestFailedError as exc:
                parts.append(
                    _failed_rows(
                        good, f"http_{exc.status}" if exc.status else "transport_error", True, str(exc)
                    )
                )
            except HttpClientError as exc:
                parts.append(_failed_rows(good, "auth_failed", True, str(exc)))
            else:
                if response.status_code != 200:
                    parts.append(
                        _failed_rows(good, f"http_{response.status_code}", False, error_detail(response))
                    )
                else:
                    parts.append(self._results(good, response))
        return pa.concat_tables(parts) if parts else _empty_results()

    def _results(self, keys: list[Any], response: httpx.Response) -> pa.Table:
        try:
            answer = pa.ipc.open_stream(response.content).read_all()
        except pa.ArrowInvalid:
            return _failed_rows(keys, "invalid_response", True, "ScheduleHub answered an unreadable body")
        if answer.num_rows != len(keys):
            return _failed_rows(
                keys,
                "invalid_response",
                True,
                f"ScheduleHub answered {answer.num_rows} results for {len(keys)} rows",
            )
        # Results come in request order; the echoed key is checked, the sent one is kept.
        echoed = answer.column("external_key").to_pylist()
        if echoed != keys:
            return _failed_rows(
                keys, "invalid_response", True, "ScheduleHub results do not match the batch order"
            )
        retryable: Any = answer.column("retryable")
        columns: dict[str, Any] = {
            BK: pa.array(keys, pa.string()),
            "status": answer.column("status"),
            "schedulehub_id": answer.column("id"),
            "outcome": answer.column("outcome"),
            "reason_code": answer.column("reason_code"),
            "retryable": pc.fill_null(retryable, False),
            "detail": answer.column("detail"),
        }
        return pa.table(columns, schema=RESULT_SCHEMA)

    # -- read-back ------------------------------------------------------------

    async def read_all(self, resource: str) -> pa.Table:
        """Every record of `resource`: id, external_key, ref.<parent> and attribute columns."""
        pages: list[pa.Table] = []
        cursor: str | None = None
        # Bounded: a cursor that does not advance would otherwise loop forever.
        for _ in range(10_000_000 // READ_PAGE_LIMIT + 1000):
            params: dict[str, Any] = {"limit": READ_PAGE_LIMIT}
            if cursor:
                params["cursor"] = cursor
            response = await self._send(
                "GET", f"/v1/resources/{resource}/records", params=params, headers={"Accept": ARROW_STREAM}
            )
            if response.status_code != 200:
                raise RequestFailedError(
                    f"reading {resource} back failed: {error_detail(response)}", status=response.status_code
                )
            page = pa.ipc.open_stream(response.content).read_all()
            if page.num_rows:
                pages.append(page)
            next_cursor = response.headers.get("x-next-cursor")
            if not next_cursor or next_cursor == cursor:
                break
            cursor = next_cursor
        else:
            raise RequestFailedError(f"reading {resource} back did not end within the page budget")
        if not pages:
            return pa.table({"id": pa.array([], pa.string()), "external_key": pa.array([], pa.string())})
        return pa.concat_tables(pages, promote_options="permissive")

    async def counts(self) -> dict[str, int]:
        """Records held per resource."""
        response = await self._send("GET", "/v1/resources")
        if response.status_code != 200:
            raise RequestFailedError(f"counts failed: {error_detail(response)}", status=response.status_code)
        return {row["resource"]: int(row["count"]) for row in response.json()["resources"]}

    async def health(self) -> float:
        """Seconds one authenticated round trip takes; raises if ScheduleHub does not answer 200."""
        started = time.perf_counter()
        await self.counts()
        return time.perf_counter() - started
