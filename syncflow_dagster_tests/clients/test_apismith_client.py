"""The APISmith client against the stand-in over real sockets: every row exactly once, whatever goes wrong."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import pyarrow as pa
import pytest
from pydantic import SecretStr

from syncflow_dagster.catalog import default_catalog
from syncflow_dagster.clients.apismith import (
    ApiSmithClient,
    ApiSmithError,
    ApiSmithPageError,
    ApiSmithSettings,
    IncompleteKeysError,
)
from syncflow_dagster.clients.http import AuthenticationError, HttpSettings
from syncflow_dagster.simulators.apismith import create_app
from syncflow_dagster.simulators.datagen import generate_dataset
from syncflow_dagster.simulators.serve import RunningServer, start_server
from syncflow_dagster_tests import loopback_http
from syncflow_dagster_tests.waiting import token_expired, wait_until_async

AS_OF = datetime(2024, 5, 10, 12, 0, tzinfo=UTC)
SECRET = "apismith-client-test-secret"


@pytest.fixture(scope="module")
def dataset() -> dict[str, pa.Table]:
    return generate_dataset(default_catalog(), 2000, seed=21, as_of=AS_OF, history_days=3)


@pytest.fixture
def server(dataset: dict[str, pa.Table]) -> Iterator[RunningServer]:
    app = create_app(dataset=dataset, clients={"syncflow": SECRET}, secret="k" * 32)
    with start_server(app) as running:
        yield running


def fast_http(**overrides: Any) -> HttpSettings:
    # Short backoff so storms end quickly; caps stay in force.
    values: dict[str, Any] = {
        "backoff_base_s": 0.01,
        "backoff_max_s": 0.05,
        "max_attempts": 12,
        "max_retry_seconds": 60,
        "read_timeout_s": 10,
        **overrides,
    }
    return HttpSettings(**values)


def client(
    server: RunningServer, *, secret: str = SECRET, http: HttpSettings | None = None, **kw: Any
) -> ApiSmithClient:
    settings = ApiSmithSettings(
        base_url=server.url, client_id="syncflow", client_secret=SecretStr(secret), **kw
    )
    return ApiSmithClient(settings, http or fast_http())


def admin(server: RunningServer, method: str, path: str, body: Any = None) -> Any:
    response = loopback_http.request(method, server.url + path, json=body, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


async def read_rowversions(api: ApiSmithClient, source: str, page_size: int) -> list[int]:
    seen: list[int] = []
    async for table in api.iter_changes(source, page_size=page_size):
        seen.extend(table.column("RowVersion").to_pylist())
    return seen


def test_reads_every_page_as_arrow_and_json_alike(
    server: RunningServer, dataset: dict[str, pa.Table]
) -> None:
    async def run() -> tuple[pa.Table, pa.Table, list[int]]:
        async with client(server) as api:
            arrow = await api.fetch_changes("ProductionOrders", page_size=300)
            sizes = [t.num_rows async for t in api.iter_changes("ProductionOrders", page_size=300)]
        async with client(server, format="json") as api:
            as_json = await api.fetch_changes("ProductionOrders", page_size=300)
        return arrow, as_json, sizes

    arrow, as_json, sizes = asyncio.run(run())
    assert arrow.equals(dataset["ProductionOrders"])
    assert as_json.to_pylist() == arrow.to_pylist()
    assert sizes == [300] * 6 + [200]  # pages stream; the entity is never fetched whole by iter_changes


def test_window_and_cursor(server: RunningServer, dataset: dict[str, pa.Table]) -> None:
    start, end = AS_OF - timedelta(days=1), AS_OF + timedelta(seconds=1)

    async def run() -> tuple[pa.Table, pa.Table, Any]:
        async with client(server) as api:
            window = await api.fetch_changes("Items", start, end, page_size=17)
            nothing = await api.fetch_changes("Items", after_rowversion=10**12)
            mark = await api.watermark("Items")
            return window, nothing, mark

    window, nothing, mark = asyncio.run(run())
    changed = window.column("ModifiedAt").to_pylist()
    assert window.num_rows > 0
    assert all(start <= datetime.fromisoformat(c) < end for c in changed)
    assert nothing.num_rows == 0
    assert nothing.column_names == dataset["Items"].column_names  # an empty read still has the schema
    assert mark.row_count == dataset["Items"].num_rows
    assert mark.max_rowversion == dataset["Items"].column("RowVersion")[-1].as_py()


def test_every_row_exactly_once_through_a_429_and_5xx_storm(
    server: RunningServer, dataset: dict[str, pa.Table]
) -> None:
    admin(
        server,
        "PUT",
        "/admin/faults",
        {
            "rate_limit_probability": 0.3,
            "retry_after_s": 0,
            "server_error_probability": 0.3,
            "drop_connection_probability": 0.1,
            "max_faults": 40,
            "seed": 7,
        },
    )

    async def run() -> list[int]:
        async with client(server) as api:
            return await read_rowversions(api, "ProductionOrders", 50)

    seen = asyncio.run(run())
    assert seen == dataset["ProductionOrders"].column("RowVersion").to_pylist()
    served = admin(server, "GET", "/admin/faults")
    assert served["total_served"] == 40  # the storm happened, and ended


def test_retry_after_as_http_date_is_honoured(server: RunningServer, dataset: dict[str, pa.Table]) -> None:
    admin(
        server,
        "PUT",
        "/admin/faults",
        {
            "rate_limit_probability": 1.0,
            "retry_after_as_http_date": True,
            "retry_after_s": 0,
            "max_faults": 2,
        },
    )

    async def run() -> pa.Table:
        async with client(server) as api:
            return await api.fetch_changes("Sites")

    assert asyncio.run(run()).num_rows == dataset["Sites"].num_rows
    assert admin(server, "GET", "/admin/faults")["faults_served"] == {"rate_limit": 2}


def test_a_token_expiring_or_revoked_mid_read_is_survived(
    server: RunningServer, dataset: dict[str, pa.Table]
) -> None:
    # Tokens issued from now on live one second: the client must refresh before exp.
    admin(server, "PUT", "/admin/faults", {"token_ttl_s": 1})

    async def run() -> tuple[list[int], int]:
        seen: list[int] = []
        async with client(server) as api:
            pages = 0
            async for table in api.iter_changes("ProductionOrders", page_size=500):
                seen.extend(table.column("RowVersion").to_pylist())
                pages += 1
                if pages == 2:
                    # Every token issued so far stops working: the next call gets a 401.
                    await asyncio.to_thread(admin, server, "POST", "/admin/tokens:revoke")
                else:
                    # Outlive the token: the next page needs a new one.
                    await wait_until_async(
                        partial(token_expired, api.auth._token), "the token to expire", timeout_s=10
                    )
            return seen, api.auth.tokens_fetched

    seen, tokens = asyncio.run(run())
    assert seen == dataset["ProductionOrders"].column("RowVersion").to_pylist()
    assert tokens >= 4  # first, after the revocation, and at least two renewals before exp


def test_garbage_pages_are_refetched_then_reported(
    server: RunningServer, dataset: dict[str, pa.Table]
) -> None:
    admin(server, "PUT", "/admin/faults", {"garbage_page_probability": 1.0, "max_faults": 2})

    async def recovers() -> tuple[pa.Table, int]:
        async with client(server) as api:
            table = await api.fetch_changes("Customers")
            return table, api.pages_refetched

    table, refetched = asyncio.run(recovers())
    assert table.equals(dataset["Customers"])
    assert refetched == 2

    admin(server, "PUT", "/admin/faults", {"garbage_page_probability": 1.0})

    async def fails() -> None:
        async with client(server, format="json", garbage_page_retries=1) as api:
            await api.fetch_changes("Customers")

    with pytest.raises(ApiSmithPageError, match=r"entity 'Customers' changes page 1 .*after 2 attempts"):
        asyncio.run(fails())


def test_malformed_rows_arrive_as_rows_and_do_not_stop_the_read(
    server: RunningServer, dataset: dict[str, pa.Table]
) -> None:
    admin(server, "PUT", "/admin/faults", {"malformed_row_probability": 0.1, "seed": 3})

    async def run() -> pa.Table:
        async with client(server) as api:
            return await api.fetch_changes("SalesOrderLines", page_size=100)

    table = asyncio.run(run())
    expected = dataset["SalesOrderLines"]
    assert table.column("RowVersion").equals(expected.column("RowVersion"))
    differing = sum(
        1 for got, want in zip(table.to_pylist(), expected.to_pylist(), strict=True) if got != want
    )
    assert differing == admin(server, "GET", "/admin/faults")["faults_served"]["malformed_row"]
    assert differing > 0


def test_tombstones_and_keys(server: RunningServer, dataset: dict[str, pa.Table]) -> None:
    admin(server, "POST", "/admin/changesets", {"deleted_pct": 5, "seed": 2, "entities": ["WorkCenters"]})

    async def run() -> tuple[pa.Table, pa.Table, pa.Table, int]:
        async with client(server) as api:
            tombs = await api.fetch_tombstones("WorkCenters", page_size=2)
            keys = await api.fetch_keys("WorkCenters")
            parts = [t async for t in api.iter_keys("ProductionOrders")]
        async with client(server, format="json") as api:
            json_keys = await api.fetch_keys("WorkCenters")
            latency = await api.health()
        return tombs, keys, json_keys, len(parts) if latency > 0 else -1

    tombs, keys, json_keys, parts = asyncio.run(run())
    assert tombs.num_rows == round(dataset["WorkCenters"].num_rows * 0.05)
    assert tombs.column_names == ["Site", "WorkCenter", "RowVersion", "DeletedAt"]
    assert keys.num_rows == dataset["WorkCenters"].num_rows - tombs.num_rows
    assert keys.column_names == ["Site", "WorkCenter", "RowVersion"]
    assert json_keys.to_pylist() == keys.to_pylist()
    gone = set(zip(tombs.column("Site").to_pylist(), tombs.column("WorkCenter").to_pylist(), strict=True))
    live = set(zip(keys.column("Site").to_pylist(), keys.column("WorkCenter").to_pylist(), strict=True))
    assert not gone & live
    assert parts >= 1


def test_a_partial_keys_listing_is_an_error_not_a_result(server: RunningServer) -> None:
    admin(server, "PUT", "/admin/faults", {"keys_drop_fraction": 0.02, "seed": 1})

    async def run() -> None:
        async with client(server) as api:
            await api.fetch_keys("ProductionOrders")

    with pytest.raises(IncompleteKeysError, match=r"'ProductionOrders'.*1960 keys.*2000 records"):
        asyncio.run(run())


def test_errors_name_the_call_and_never_carry_the_secret(server: RunningServer) -> None:
    async def unknown() -> None:
        async with client(server) as api:
            await api.watermark("Nope")

    with pytest.raises(ApiSmithError, match=r"entity 'Nope' watermark.*HTTP 404") as raised:
        asyncio.run(unknown())
    assert SECRET not in str(raised.value)

    async def wrong_secret() -> None:
        async with client(server, secret="not-the-secret-at-all") as api:
            await api.watermark("Sites")

    with pytest.raises(AuthenticationError) as refused:
        asyncio.run(wrong_secret())
    assert "not-the-secret-at-all" not in str(refused.value)
    assert "not-the-secret-at-all" not in repr(client(server, secret="not-the-secret-at-all"))
    with pytest.raises(ValueError, match="page_size 50001"):
        asyncio.run(_iterate_with_page_size(server, 50_001))


async def _iterate_with_page_size(server: RunningServer, page_size: int) -> None:
    async with client(server) as api:
        async for _ in api.iter_changes("Sites", page_size=page_size):
            pass


def test_slow_answers_beyond_the_read_timeout_are_retried(
    server: RunningServer, dataset: dict[str, pa.Table]
) -> None:
    admin(server, "PUT", "/admin/faults", {"slow_probability": 1.0, "slow_delay_s": 3, "max_faults": 2})

    async def run() -> pa.Table:
        async with client(server, http=fast_http(read_timeout_s=0.5)) as api:
            return await api.fetch_changes("Sites")

    assert asyncio.run(run()).equals(dataset["Sites"])
    assert admin(server, "GET", "/admin/faults")["faults_served"] == {"slow": 2}
